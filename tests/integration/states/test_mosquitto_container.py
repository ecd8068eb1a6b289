"""Docker engine config + container-mode Mosquitto, applied for real.

dockerd is started by the test (Debian's init script fails on ulimit here) from the
daemon.json the docker state wrote, with data-root, exec-root and socket in a temp dir."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.integration.states.conftest import (
    Sub,
    apply,
    assert_all_ok,
    changed,
    pub,
    state_results,
    wait_for,
)
from tests.support.es import free_port
from tests.support.mosquitto import start_broker

OPS = {"user": "ops", "password": "ops-secret"}


def docker_cli(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "-H", f"unix://{sock}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def workdir():
    d = pathlib.Path(tempfile.mkdtemp(prefix="trib-dk-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def docker_pillar(d: pathlib.Path) -> dict:
    return {
        "docker": {
            "config_file": str(d / "daemon.json"),
            "manage_service": False,
            "daemon": {
                "data-root": str(d / "data"),
                "exec-root": str(d / "exec"),
                "pidfile": str(d / "docker.pid"),
                "hosts": [f"unix://{d}/docker.sock"],
                "iptables": False,
                "ip-masq": False,
                "bridge": "none",
            },
        },
        # saltext-dockermod's client reads docker.url through config.get (pillar included)
        "docker.url": f"unix://{d}/docker.sock",
    }


@pytest.fixture(scope="module")
def dockerd(states_minion, pillar_root, workdir):
    from tests.integration.states.conftest import Pillar

    Pillar(pillar_root).set(docker_pillar(workdir))
    res = assert_all_ok(apply(states_minion, "docker"))
    assert "tributary-docker-daemon-json" in changed(res)
    written = json.loads((workdir / "daemon.json").read_text())
    assert written["bridge"] == "none" and written["log-driver"] == "json-file"

    log = open(workdir / "dockerd.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    proc = subprocess.Popen(
        ["dockerd", "--config-file", str(workdir / "daemon.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sock = str(workdir / "docker.sock")
    try:
        wait_for(lambda: docker_cli(sock, "version").returncode == 0, 60, "dockerd")
        print(f"dockerd ready in {time.monotonic() - started:.2f}s")
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def container_pillar(d: pathlib.Path, port: int, up_port: int) -> dict:
    mq = d / "mosquitto"
    return {
        **docker_pillar(d),
        "mosquitto": {
            "mode": "container",
            "init_delay": 1,
            "listeners": [{"port": port, "address": "127.0.0.1"}],
            "allow_anonymous": False,
            "users": {OPS["user"]: {"password": OPS["password"]}},
            "acl": {
                OPS["user"]: [{"topic": "#", "access": "readwrite"}],
                "bridge": [{"topic": "telemetry/#", "access": "read"}],
            },
            # a bridge in the container: its thread needs libgcc_s.so.1 in the image
            "bridges": {
                "upstream": {
                    "addresses": [f"127.0.0.1:{up_port}"],
                    "local_username": "bridge",
                    "remote_clientid": "container-gw",
                    "restart_timeout": [1, 2],
                    "topics": [{"topic": "telemetry/#", "direction": "out", "remote_prefix": "c/"}],
                }
            },
            "container": {
                "name": "tributary-mosquitto-test",
                "manage_docker": False,
                "conf_dir": str(mq / "config"),
                "data_dir": str(mq / "data"),
                "log_dir": str(mq / "log"),
                "build_dir": str(mq / "build"),
            },
        },
    }


def test_container_mode_broker_round_trip(states_minion, pillar, dockerd, workdir):
    port = free_port()
    upstream = start_broker()
    pillar.set(container_pillar(workdir, port, upstream.port))
    try:
        started = time.monotonic()
        res = assert_all_ok(apply(states_minion, "mosquitto"))
        print(f"container-mode apply took {time.monotonic() - started:.1f}s")
        for sid in ("tributary-mosquitto-image-context", "tributary-mosquitto-image-rebuilt"):
            print(f"{sid}: {res[sid]['duration']:.0f} ms")
        assert "tributary-mosquitto-container-running" in changed(res)

        # the state results are not trusted alone: the container must stay up and serve MQTT
        def listening():
            return pub(port, "probe", "x", **OPS).returncode == 0

        wait_for(listening, 30, "the containerised broker")
        sub = Sub(port, ["telemetry/#"], **OPS).wait_subscribed()
        up_sub = Sub(upstream.port, ["c/telemetry/#"]).wait_subscribed()
        try:
            assert pub(port, "telemetry/t1", "42", **OPS).returncode == 0
            assert sub.wait(1) == [("telemetry/t1", "42")]
            assert up_sub.wait(1) == [("c/telemetry/t1", "42")]  # through the bridge
        finally:
            sub.stop()
            up_sub.stop()
        assert pub(port, "telemetry/t1", "x", user="ops", password="wrong").returncode != 0
        info = json.loads(docker_cli(dockerd, "inspect", "tributary-mosquitto-test").stdout)[0]
        assert info["State"]["Running"] and info["RestartCount"] == 0, info["State"]

        # idempotent: nothing rebuilt, nothing recreated
        res = assert_all_ok(apply(states_minion, "mosquitto"))
        assert changed(res) == {}
        # test=True on the converged state: nothing to do, nothing failing
        res = state_results(apply(states_minion, "mosquitto", test=True))
        pending = {
            k: (v["result"], v["comment"]) for k, v in res.items() if v["result"] is not True
        }
        assert not pending
        assert changed(res) == {}
        info2 = json.loads(docker_cli(dockerd, "inspect", "tributary-mosquitto-test").stdout)[0]
        assert info2["Id"] == info["Id"]
    finally:
        res = assert_all_ok(apply(states_minion, "mosquitto.clean"))
        assert docker_cli(dockerd, "inspect", "tributary-mosquitto-test").returncode != 0
        upstream.cleanup()
