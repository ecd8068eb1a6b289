"""Start a real single-node Elasticsearch (the integ-test zip from Maven Central) for tests,
the demo and the benchmarks.

Elasticsearch refuses to run as root, so as root it runs as a dedicated system user
(``tributary-es``, created by ``scripts/setup.sh``). Security is on: a file-realm superuser
gets a generated password. Optionally HTTPS with a CA generated for the run.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ES_USER = os.environ.get("TRIBUTARY_ES_USER", "tributary-es")


def cache_dir() -> Path:
    if os.environ.get("TRIBUTARY_CACHE"):
        return Path(os.environ["TRIBUTARY_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/tributary")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tributary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return 0
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java(es_major: int) -> str:
    """A JDK that this Elasticsearch supports (8.x: 17+, 9.x: 21+), newest first."""
    need = 21 if es_major >= 9 else 17
    if os.environ.get("ES_JAVA_HOME"):
        candidates = [os.environ["ES_JAVA_HOME"]]
    else:
        candidates = sorted(glob.glob("/usr/lib/jvm/*"), reverse=True)
    found = []
    best: tuple[int, str] | None = None
    for home in candidates:
        java = os.path.join(home, "bin", "java")
        if not os.access(java, os.X_OK) or os.path.islink(home):
            continue
        major = _java_major(java)
        found.append(f"{home} (Java {major})")
        if major >= need and (best is None or major > best[0]):
            best = (major, home)
    if best is None:
        raise RuntimeError(
            f"Elasticsearch {es_major}.x needs Java {need} or newer; found: "
            + (", ".join(found) or "no JDK under /usr/lib/jvm")
        )
    return best[1]


@dataclass
class Elasticsearch:
    """A running Elasticsearch node."""

    port: int
    password: str
    username: str = "tributary"
    tls: bool = False
    ca_path: str | None = None
    workdir: str = ""
    proc: subprocess.Popen | None = None
    version: str = ""
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def client_config(self) -> dict:
        cfg = {
            "hosts": [self.url],
            "username": self.username,
            "password": self.password,
            "replicas": 0,
        }
        if self.ca_path:
            cfg["ca_certs"] = self.ca_path
        return cfg

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        ctype: str = "application/json",
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", ctype)
        ctx = ssl.create_default_context(cafile=self.ca_path) if self.tls else None
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def client(self):
        from saltext.tributary.relay.elasticsearch import make_client

        return make_client(self.client_config)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"Elasticsearch exited ({self.proc.returncode}): {self.log_tail()}"
                )
            try:
                code, body = self.request(
                    "GET", "/_cluster/health?wait_for_status=yellow&timeout=1s", timeout=5
                )
                if code == 200:
                    return
                last = f"{code} {body[:200]!r}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise RuntimeError(f"Elasticsearch not ready after {timeout}s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        logs = sorted(glob.glob(os.path.join(self.workdir, "logs", "*.log")))
        out = []
        for path in logs:
            try:
                with open(path, errors="replace") as fh:
                    out.extend(fh.readlines()[-n:])
            except OSError:
                pass
        return "".join(out[-n:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start(self) -> None:
        """(Re)start the node on the same port and data (after :meth:`stop`)."""
        self.proc = subprocess.Popen(
            [os.path.join(self.workdir, "home", "bin", "elasticsearch")],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_demote() if os.geteuid() == 0 else None,
            start_new_session=True,
        )
        self.wait_ready()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # helpers for assertions
    def refresh(self, index: str = "tributary-*") -> None:
        self.request("POST", f"/{index}/_refresh")

    def count(self, index: str = "tributary-readings-*", query: dict | None = None) -> int:
        import json

        self.refresh(index)
        code, body = self._read(
            index,
            f"/{index}/_count?ignore_unavailable=true&allow_no_indices=true",
            json.dumps({"query": query or {"match_all": {}}}).encode(),
        )
        if code != 200:
            raise RuntimeError(f"count failed: {code} {body[:300]!r}")
        return json.loads(body)["count"]

    def search(self, index: str, body: dict) -> dict:
        import json

        self.refresh(index)
        code, out = self._read(
            index,
            f"/{index}/_search?ignore_unavailable=true&allow_no_indices=true",
            json.dumps(body).encode(),
        )
        if code != 200:
            raise RuntimeError(f"search failed: {code} {out[:300]!r}")
        return json.loads(out)

    def _read(self, index: str, path: str, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
        """POST a read; while a just-created index's shards are still starting, wait for them.

        Elasticsearch answers 503 ``no_shard_available_action_exception`` to a search
        that reaches an index whose primary is not yet allocated (created by the
        relay a moment ago, or recovering after a restart). That is not an answer
        about the data, so wait for the index to be at least yellow and ask again,
        within a deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            code, out = self.request("POST", path, body)
            if code != 503 or time.monotonic() >= deadline:
                return code, out
            self.request(
                "GET",
                f"/_cluster/health/{index}?wait_for_status=yellow&timeout=5s&expand_wildcards=all",
            )
            time.sleep(0.2)  # poll interval: the health answer may come back at once


def _demote():
    pw = pwd.getpwnam(ES_USER)

    def fn():
        os.setgid(pw.pw_gid)
        os.initgroups(ES_USER, pw.pw_gid)
        os.setuid(pw.pw_uid)

    return fn


def _make_tls(conf: Path, home: Path, env: dict, run_as_es) -> str:
    """CA + node certificate (PEM) with elasticsearch-certutil; returns the CA path."""
    certs = conf / "certs"
    certs.mkdir(exist_ok=True)
    subprocess.run(
        [
            str(home / "bin" / "elasticsearch-certutil"),
            "ca",
            "--pem",
            "--silent",
            "--out",
            str(certs / "ca.zip"),
        ],
        env=env,
        check=True,
        capture_output=True,
        preexec_fn=run_as_es,
    )
    subprocess.run(["unzip", "-q", "-o", str(certs / "ca.zip"), "-d", str(certs)], check=True)
    subprocess.run(
        [
            str(home / "bin" / "elasticsearch-certutil"),
            "cert",
            "--pem",
            "--silent",
            "--ca-cert",
            str(certs / "ca" / "ca.crt"),
            "--ca-key",
            str(certs / "ca" / "ca.key"),
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
            "--name",
            "node",
            "--out",
            str(certs / "node.zip"),
        ],
        env=env,
        check=True,
        capture_output=True,
        preexec_fn=run_as_es,
    )
    subprocess.run(["unzip", "-q", "-o", str(certs / "node.zip"), "-d", str(certs)], check=True)
    return str(certs / "ca" / "ca.crt")


def start_elasticsearch(
    *,
    tls: bool = False,
    heap_mb: int = 768,
    port: int | None = None,
    extra_settings: dict[str, str] | None = None,
) -> Elasticsearch:
    """Unpack-free start: the cached distribution is linked into a fresh work dir;
    ``extra_settings`` go into its elasticsearch.yml (``http.max_content_length``, say)."""
    dist = cache_dir() / "es" / "current"
    if not dist.exists():
        raise RuntimeError(f"no Elasticsearch at {dist}: run `make setup` (scripts/setup.sh) first")
    dist = dist.resolve()
    version = dist.name.split("-", 1)[-1]
    java_home = find_java(int(version.split(".")[0]))
    workdir = Path(tempfile.mkdtemp(prefix="tributary-es-", dir="/tmp"))
    home = workdir / "home"
    # Hard links keep the start fast; config is copied since ES writes to it (keystore, users).
    try:
        subprocess.run(["cp", "-al", str(dist), str(home)], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        shutil.copytree(dist, home, symlinks=True)
    shutil.rmtree(home / "config")
    shutil.copytree(dist / "config", home / "config")
    for d in ("data", "logs", "tmp"):
        (workdir / d).mkdir()
    port = port or free_port()
    password = secrets.token_urlsafe(18)
    conf = home / "config"
    settings = {
        "cluster.name": "tributary-test",
        "node.name": "node-1",
        "path.data": str(workdir / "data"),
        "path.logs": str(workdir / "logs"),
        "network.host": "127.0.0.1",
        "http.port": str(port),
        "transport.port": str(free_port()),
        "discovery.type": "single-node",
        "xpack.security.enabled": "true",
        "xpack.security.transport.ssl.enabled": "false",
        "xpack.security.http.ssl.enabled": "true" if tls else "false",
        "action.destructive_requires_name": "false",
        "cluster.routing.allocation.disk.threshold_enabled": "false",
        "indices.breaker.total.use_real_memory": "false",
        **(extra_settings or {}),
    }
    (conf / "jvm.options.d").mkdir(exist_ok=True)
    (conf / "jvm.options.d" / "heap.options").write_text(f"-Xms{heap_mb}m\n-Xmx{heap_mb}m\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ES_", "JAVA_"))}
    env.update(
        {
            "ES_JAVA_HOME": java_home,
            "ES_TMPDIR": str(workdir / "tmp"),
            "ES_PATH_CONF": str(conf),
            "HOME": str(workdir),
        }
    )
    run_as_es = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam(ES_USER)
        subprocess.run(
            [
                "chown",
                "-R",
                f"{pw.pw_uid}:{pw.pw_gid}",
                str(workdir / "data"),
                str(workdir / "logs"),
                str(workdir / "tmp"),
                str(conf),
            ],
            check=True,
        )
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        run_as_es = _demote()
    ca_path = None
    if tls:
        ca_path = _make_tls(conf, home, env, None)
        settings["xpack.security.http.ssl.key"] = "certs/node/node.key"
        settings["xpack.security.http.ssl.certificate"] = "certs/node/node.crt"
        settings["xpack.security.http.ssl.certificate_authorities"] = "certs/ca/ca.crt"
        if os.geteuid() == 0:
            pw = pwd.getpwnam(ES_USER)
            subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(conf)], check=True)
        os.chmod(workdir, 0o755)
    (conf / "elasticsearch.yml").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    subprocess.run(
        [
            str(home / "bin" / "elasticsearch-users"),
            "useradd",
            "tributary",
            "-p",
            password,
            "-r",
            "superuser",
        ],
        env=env,
        check=True,
        capture_output=True,
        preexec_fn=run_as_es,
    )
    node = Elasticsearch(
        port=port,
        password=password,
        tls=tls,
        ca_path=ca_path,
        workdir=str(workdir),
        version=version,
        env=env,
    )
    try:
        node.start()
    except BaseException:  # not ready, or Ctrl-C while starting: leave no node running
        node.cleanup()
        raise
    return node


@contextlib.contextmanager
def running_elasticsearch(**kwargs) -> Iterator[Elasticsearch]:
    """:func:`start_elasticsearch` as a context manager: the node is stopped and its work dir
    removed on the way out, also on errors and Ctrl-C (the test fixtures and the demo)."""
    node = start_elasticsearch(**kwargs)
    try:
        yield node
    finally:
        node.cleanup()
