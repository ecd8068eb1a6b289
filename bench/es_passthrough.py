"""BENCH ONLY: an HTTP pass-through in front of the test Elasticsearch, for Telegraf.

Not part of Tributary and never used by it. Telegraf's ``elasticsearch`` output reads the
server version from ``GET /`` and refuses to start without it ("elasticsearch version not
supported: "); the integ-test distribution that the tests and benchmarks run answers
``GET /`` with 405. This process answers ``GET /`` and ``HEAD /`` (Telegraf's version check
and its client's health check) the way a full distribution does, with the node's real version,
and forwards every other request unchanged to the node.

Each client connection gets its own upstream connection, one to one: when the node closes or
refuses, the client's connection is closed (or answered 502 when no upstream could be opened),
so the client sees what it would see talking to the node itself. Nothing is retried here (a
retried ``_bulk`` would add duplicates that are not the client's).

    python bench/es_passthrough.py --port 9299 --upstream 127.0.0.1:9200 --version 8.19.21
"""

from __future__ import annotations

import argparse
import asyncio
import json

HOP = b"\r\n\r\n"


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


async def _copy_body(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter | None, hdrs: dict[str, str]
) -> bytes:
    """Copy one message body (Content-Length or chunked); returns it when ``dst`` is None."""
    buf = bytearray()

    def put(b: bytes) -> None:
        if dst is None:
            buf.extend(b)
        else:
            dst.write(b)

    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        while True:
            line = await src.readuntil(b"\r\n")
            put(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    t = await src.readuntil(b"\r\n")
                    put(t)
                    if t == b"\r\n":
                        return bytes(buf)
            put(await src.readexactly(size + 2))
    n = int(hdrs.get("content-length", "0") or 0)
    while n > 0:
        chunk = await src.read(min(n, 1 << 20))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        put(chunk)
        n -= len(chunk)
    return bytes(buf)


class Passthrough:
    def __init__(self, upstream: tuple[str, int], version: str) -> None:
        self.upstream = upstream
        self.version = version

    def root(self, method: str) -> bytes:
        body = json.dumps(
            {
                "name": "node-1",
                "cluster_name": "tributary-bench",
                "version": {
                    "number": self.version,
                    "build_flavor": "default",
                    "minimum_wire_compatibility_version": "7.17.0",
                    "minimum_index_compatibility_version": "7.0.0",
                },
                "tagline": "You Know, for Search",
            }
        ).encode()
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        return head if method == "HEAD" else head + body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r: asyncio.StreamReader | None = None
        up_w: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(HOP)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                line, hdrs = _headers(head)
                method, target = line.split(" ", 2)[:2]
                if target == "/" and method in ("GET", "HEAD"):
                    await _copy_body(reader, None, hdrs)
                    writer.write(self.root(method))
                    await writer.drain()
                    continue
                if up_w is None:
                    try:
                        up_r, up_w = await asyncio.open_connection(*self.upstream, limit=1 << 22)
                    except OSError as exc:
                        await _copy_body(reader, None, hdrs)
                        msg = json.dumps({"error": f"bench pass-through: {exc}"}).encode()
                        writer.write(
                            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n"
                            + f"content-length: {len(msg)}\r\nconnection: close\r\n\r\n".encode()
                            + msg
                        )
                        await writer.drain()
                        return
                assert up_r is not None
                up_w.write(head)
                await _copy_body(reader, up_w, hdrs)
                await up_w.drain()
                rhead = await up_r.readuntil(HOP)
                status_line, rhdrs = _headers(rhead)
                writer.write(rhead)
                status = int(status_line.split(" ", 2)[1])
                if method != "HEAD" and status not in (204, 304) and status >= 200:
                    if "content-length" in rhdrs or "chunked" in rhdrs.get("transfer-encoding", ""):
                        await _copy_body(up_r, writer, rhdrs)
                    else:  # delimited by the close
                        writer.write(await up_r.read())
                        await writer.drain()
                        return
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return  # the node went away mid-request: the client's connection goes too
        finally:
            if up_w is not None:
                up_w.close()
            writer.close()


async def serve(port: int, upstream: tuple[str, int], version: str) -> None:
    p = Passthrough(upstream, version)
    server = await asyncio.start_server(p.handle, "127.0.0.1", port, limit=1 << 22)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="host:port of the Elasticsearch node")
    ap.add_argument("--version", required=True, help="the node's version, answered on GET /")
    a = ap.parse_args()
    host, port = a.upstream.rsplit(":", 1)
    asyncio.run(serve(a.port, (host, int(port)), a.version))


if __name__ == "__main__":
    main()
