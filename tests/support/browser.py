"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, with the
network off: it loads a local page, records every request the page makes and every console
message, exception and log entry, and takes screenshots.

The protocol runs over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: answers and events
out, each message JSON ended by a NUL byte), so no websocket client is needed. The network is
off through a proxy that does not exist (``--proxy-server=127.0.0.1:1``) for every host,
loopback included: a page that tried to fetch anything would show the request and its failure.

``python -m tests.support.browser page.html shot.png [width] [height] [scale]`` writes a
screenshot of the top of a page (the README's report screenshot is made this way).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    url: str
    requests: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    console: list[dict] = field(default_factory=list)  # consoleAPICalled + Log.entryAdded
    exceptions: list[dict] = field(default_factory=list)

    @property
    def errors(self) -> list[dict]:
        return [m for m in self.console if m.get("level") in ("error", "assert")] + self.exceptions


class Browser:
    """One headless Chromium with one page (a context manager)."""

    def __init__(self, width: int = 1200, height: int = 900, timeout: float = 60) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("no chromium: run make setup (Debian package chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="tributary-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends become fds 3 and 4 (inheritable)
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            exe,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--mute-audio",
            # network off: every host, loopback included, goes to a proxy that is not there
            "--proxy-server=127.0.0.1:1",
            "--proxy-bypass-list=<-loopback>",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.profile, "stderr.log"), "wb"),  # noqa: SIM115
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self._events: list[dict] = []
        target = next(
            t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
        )
        self.session = self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=self.session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    # protocol
    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    with open(os.path.join(self.profile, "stderr.log"), errors="replace") as fh:
                        raise RuntimeError(f"chromium exited: {fh.read()[-2000:]}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._events.append(m)

    def wait_event(self, method: str, deadline: float) -> dict:
        while True:
            for i, m in enumerate(self._events):
                if m.get("method") == method:
                    return self._events.pop(i)
            self._events.append(self._read(deadline))

    # what the tests use
    def load(self, path_or_url: str) -> PageLoad:
        """Navigate, wait for the load event (and a quiet moment for late requests), and
        report the page's requests, failures, console messages and exceptions."""
        url = path_or_url if "://" in path_or_url else "file://" + os.path.abspath(path_or_url)
        self._events.clear()
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + self.timeout
        self.wait_event("Page.loadEventFired", deadline)
        # nothing is pending once the document is complete and no request is in flight
        self.call("Runtime.evaluate", session=self.session, expression="document.readyState")
        load = PageLoad(url)
        for m in self._events:
            p = m.get("params", {})
            method = m.get("method")
            if method == "Network.requestWillBeSent":
                load.requests.append(p["request"]["url"])
            elif method == "Network.loadingFailed":
                load.failed.append(p)
            elif method == "Runtime.consoleAPICalled":
                load.console.append(
                    {
                        "level": p.get("type"),
                        "text": " ".join(str(a.get("value")) for a in p["args"]),
                    }
                )
            elif method == "Log.entryAdded":
                e = p["entry"]
                load.console.append(
                    {"level": e.get("level"), "text": e.get("text"), "url": e.get("url")}
                )
            elif method == "Runtime.exceptionThrown":
                load.exceptions.append(p["exceptionDetails"])
        return load

    def evaluate(self, expression: str) -> Any:
        res = self.call(
            "Runtime.evaluate", session=self.session, expression=expression, returnByValue=True
        )
        return res["result"].get("value")

    def screenshot(self, full: bool = True, clip: dict | None = None) -> bytes:
        import base64

        params: dict[str, Any] = {"format": "png"}
        if full and clip is None:
            size = self.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        if clip is not None:
            params["clip"] = clip
            params["captureBeyondViewport"] = True
        return base64.b64decode(
            self.call("Page.captureScreenshot", session=self.session, **params)["data"]
        )

    def close(self) -> None:
        try:
            os.write(self._cmd_w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._cmd_w, self._out_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> int:
    page, out = argv[0], argv[1]
    width = int(argv[2]) if len(argv) > 2 else 1100
    height = int(argv[3]) if len(argv) > 3 else 1500
    scale = float(argv[4]) if len(argv) > 4 else 0.75
    with Browser(width=width, height=height) as b:
        load = b.load(page)
        if load.errors or [u for u in load.requests if not u.startswith(("file:", "data:"))]:
            print(f"page problems: {load}", file=sys.stderr)
            return 1
        png = b.screenshot(clip={"x": 0, "y": 0, "width": width, "height": height, "scale": scale})
    with open(out, "wb") as fh:
        fh.write(png)
    print(f"{out}: {len(png)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
