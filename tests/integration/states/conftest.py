"""Fixtures for the Salt-state tests: a salt master + minion of their own (not the session
syndic topology of tests/integration/conftest.py), file_roots = the repo's salt/states and salt/,
pillar_roots = a temp dir the tests write, and helpers for MQTT clients and waits."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
HERE = pathlib.Path(__file__).resolve().parent
QUIET = {"log_level_logfile": "warning", "log_level": "warning"}


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Pillar:
    """Pillar data for the test minion, written to the master's pillar_roots."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        (root / "top.sls").write_text("base:\n  '*':\n    - tributary_test\n")
        self.set({})

    def set(self, data: dict) -> None:
        # JSON is YAML: no templating surprises
        (self.root / "tributary_test.sls").write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="package", autouse=True)
def machine_lock():
    """These tests own machine-wide things (/etc/mosquitto, /run/mosquitto, the mosquitto
    service): two runs at once on one machine (say, a full-suite run next to this directory's)
    would apply and clean each other's broker. Serialize them on a lock file."""
    fd = os.open(os.path.join(tempfile.gettempdir(), "tributary-states-tests.lock"),
                 os.O_CREAT | os.O_RDWR, 0o644)  # fmt: skip
    deadline = time.monotonic() + 1200
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                pytest.fail("another run of tests/integration/states held the lock for 20 min")
            time.sleep(1)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@pytest.fixture(scope="package")
def pillar_root():
    root = pathlib.Path(tempfile.mkdtemp(prefix="tributary-states-pillar-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def states_master(salt_factories, pillar_root):
    factory = salt_factories.salt_master_daemon(
        "states-master",
        overrides={
            **QUIET,
            "file_roots": {"base": [str(REPO / "salt" / "states"), str(REPO / "salt")]},
            "pillar_roots": {"base": [str(pillar_root)]},
        },
    )
    with factory.started():
        yield factory


@pytest.fixture(scope="package")
def states_minion(states_master):
    factory = states_master.salt_minion_daemon(
        "gw-brisbane-states",
        overrides={
            **QUIET,
            "grains": {"site": "brisbane", "role": "gateway"},
            # test-only service provider: really runs init scripts (see its docstring)
            "module_dirs": [str(HERE / "extmods" / "modules")],
            "providers": {"service": "tributary_test_service"},
        },
    )
    with factory.started():
        yield factory


@pytest.fixture
def pillar(pillar_root, states_minion):
    return Pillar(pillar_root)


def apply(minion, sls: str, test: bool = False, timeout: int = 300):
    args = ["state.apply", sls]
    if test:
        args.append("test=True")
    return minion.salt_call_cli(timeout=timeout).run(*args)


def state_results(ret) -> dict[str, dict]:
    """{state id: result dict} from a state.apply return (fails on render errors)."""
    assert isinstance(ret.data, dict), f"state run did not produce results: {ret.stdout}"
    return {v["__id__"]: v for v in ret.data.values()}


def assert_all_ok(ret) -> dict[str, dict]:
    res = state_results(ret)
    bad = {k: (v["comment"], v["changes"]) for k, v in res.items() if v["result"] is not True}
    assert not bad, bad
    return res


def changed(res: dict[str, dict]) -> dict[str, Any]:
    return {k: v["changes"] for k, v in res.items() if v["changes"]}


class Sub:
    """A real mosquitto_sub client; collects ``topic payload`` lines in a thread."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        user=None,
        password=None,
        client_id=None,
        clean=True,
        host="127.0.0.1",
        cafile=None,
    ):
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", host, "-p", str(port), "-q", "1", "-v", "-d"]
        for t in topics:
            cmd += ["-t", t]
        if user:
            cmd += ["-u", user, "-P", password]
        if client_id:
            cmd += ["-i", client_id]
        if not clean:
            cmd += ["-c"]
        if cafile:
            cmd += ["--cafile", cafile]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.messages: list[tuple[str, str]] = []
        self.subscribed = threading.Event()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append(line)
            if line.startswith("Client ") or line.startswith("Subscribed (mid"):
                if "received SUBACK" in line:
                    self.subscribed.set()
                continue
            topic, _, payload = line.partition(" ")
            self.messages.append((topic, payload))

    def wait_subscribed(self, timeout: float = 20) -> Sub:
        if not self.subscribed.wait(timeout):
            raise AssertionError(f"mosquitto_sub did not subscribe: {self.log[-5:]}")
        return self

    def wait(self, n: int, timeout: float = 30) -> list[tuple[str, str]]:
        wait_for(lambda: len(self.messages) >= n, timeout, f"{n} messages ({self.log[-5:]})")
        return list(self.messages)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # seen once: SIGTERM right after SUBACK
                self.proc.kill()
                self.proc.wait(5)


def pub(
    port: int, topic: str, payload: str, *, user=None, password=None, qos=1, host="127.0.0.1"
) -> subprocess.CompletedProcess:
    cmd = ["mosquitto_pub", "-h", host, "-p", str(port), "-q", str(qos), "-t", topic, "-m", payload]
    if user:
        cmd += ["-u", user, "-P", password]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def retained(port: int, topic: str, **auth) -> str | None:
    """The retained payload on ``topic`` (None when there is none within 2 s)."""
    cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-C", "1", "-W", "2"]
    if auth:
        cmd += ["-u", auth["user"], "-P", auth["password"]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


os.environ.setdefault("TRIBUTARY_REPO", str(REPO))
