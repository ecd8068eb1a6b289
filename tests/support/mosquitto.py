"""Start real Mosquitto brokers on free loopback ports, and drive mosquitto_pub/sub."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.es import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


#: Lines per ``mosquitto_pub -l`` run. Measured here (mosquitto 2.0.11): fed 100,000 lines at
#: QoS 1, mosquitto_pub sent only ~35,000 PUBLISH packets before its DISCONNECT (its own -d
#: log; the broker delivered all it got); runs of 25,000 lines delivered every line.
PUB_CHUNK = 20_000


@dataclass
class Broker:
    port: int
    workdir: str
    extra: str = ""
    proc: subprocess.Popen | None = None

    @property
    def conf(self) -> str:
        return os.path.join(self.workdir, "mosquitto.conf")

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 200000",
            "max_inflight_messages 1000",
            f"log_dest file {self.workdir}/mosquitto.log",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        Path(self.conf).write_text("\n".join(lines) + "\n" + self.extra)

    def start(self, timeout: float = 20) -> None:
        self.write_conf()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", self.conf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # persists the queue on the way out
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def publish(self, topic: str, payloads: list[str] | str, qos: int = 1) -> None:
        """Publish with the real mosquitto_pub client (one line per message via -l)."""
        if isinstance(payloads, str):
            payloads = [payloads]
        for lo in range(0, len(payloads), PUB_CHUNK):
            data = "".join(p + "\n" for p in payloads[lo : lo + PUB_CHUNK])
            subprocess.run(
                [
                    *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port)),
                    *("-q", str(qos), "-M", "1000", "-t", topic, "-l"),
                ],
                input=data.encode(),
                check=True,
                timeout=120,
            )


def start_broker(extra: str = "") -> Broker:
    broker = Broker(
        port=free_port(), workdir=tempfile.mkdtemp(prefix="tributary-mqtt-"), extra=extra
    )
    try:
        broker.start()
    except BaseException:  # not listening in time, or Ctrl-C: leave no broker running
        broker.cleanup()
        raise
    return broker


@contextlib.contextmanager
def running_brokers(names: Iterable[str], extra: str = "") -> Iterator[dict[str, Broker]]:
    """One broker per name (a gateway id), each on its own free loopback port; all stopped
    and their work dirs removed on the way out, also on errors and Ctrl-C."""
    started: dict[str, Broker] = {}
    try:
        for name in names:
            started[name] = start_broker(extra)
        yield started
    finally:
        for broker in started.values():
            broker.cleanup()
