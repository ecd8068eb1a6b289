"""bench/es_passthrough.py (bench only): answers ``GET /``/``HEAD /`` itself, forwards the rest
byte for byte over a kept-alive connection, and says 502 when the node is down. Against a
real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import importlib.util
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("es_passthrough", REPO / "bench/es_passthrough.py")
assert spec is not None and spec.loader is not None
es_passthrough = importlib.util.module_from_spec(spec)
spec.loader.exec_module(es_passthrough)


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Elasticsearch
    seen: list[tuple[str, str, bytes]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        Upstream.seen.append(("GET", self.path, b""))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"abc", b"defgh"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"error":"method not allowed"}'
        self.send_response(405)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        Upstream.seen.append(("POST", self.path, data))
        body = json.dumps({"errors": False, "got": len(data)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def passthrough() -> Iterator[tuple[int, int]]:
    """(pass-through port, upstream port) with the upstream running."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    Upstream.seen = []
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_port = upstream.server_address[1]
    port = _free_port()
    loop = asyncio.new_event_loop()
    p = es_passthrough.Passthrough(("127.0.0.1", up_port), "8.19.21")
    server = loop.run_until_complete(asyncio.start_server(p.handle, "127.0.0.1", port))
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    async def shutdown() -> None:
        # the connections' handlers end inside the running loop (a handler left pending is
        # closed later by the garbage collector, on a closed loop: an unraisable error)
        server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    try:
        yield port, up_port
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()
        upstream.shutdown()
        upstream.server_close()


def test_root_answered_rest_forwarded_on_one_connection(passthrough):
    port, _ = passthrough
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/")
    r = c.getresponse()
    assert r.status == 200
    assert json.loads(r.read())["version"]["number"] == "8.19.21"
    c.request("HEAD", "/")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b""
    body = b'{"create":{}}\n{"v":1}\n' * 1000
    c.request("POST", "/_bulk", body=body, headers={"Content-Type": "application/x-ndjson"})
    r = c.getresponse()
    assert r.status == 200
    assert json.loads(r.read()) == {"errors": False, "got": len(body)}
    c.request("GET", "/chunked")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"abcdefgh"
    c.request("GET", "/other")  # not the root: the node's own answer
    r = c.getresponse()
    assert r.status == 405 and b"not allowed" in r.read()
    c.close()
    assert [(m, p) for m, p, _ in Upstream.seen] == [
        ("POST", "/_bulk"),
        ("GET", "/chunked"),
        ("GET", "/other"),
    ]
    assert Upstream.seen[0][2] == body


def test_node_down_is_a_502_and_root_still_answers():
    port = _free_port()
    dead = _free_port()  # nothing listens there
    loop = asyncio.new_event_loop()
    p = es_passthrough.Passthrough(("127.0.0.1", dead), "8.19.21")
    server = loop.run_until_complete(asyncio.start_server(p.handle, "127.0.0.1", port))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/")
        assert c.getresponse().read()
        c.request("POST", "/_bulk", body=b"{}\n")
        r = c.getresponse()
        assert r.status == 502
        assert "bench pass-through" in json.loads(r.read())["error"]
        c.close()
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
