"""Package-mode Mosquitto applied for real on a minion, bridged to a test upstream broker.

The tests run in file order and share the broker the first one provisions."""

from __future__ import annotations

import copy
import hashlib
import pathlib

import pytest

from tests.integration.states.conftest import (
    Sub,
    apply,
    assert_all_ok,
    changed,
    pub,
    retained,
    state_results,
    wait_for,
)
from tests.support.es import free_port
from tests.support.mosquitto import start_broker

CONF = pathlib.Path("/etc/mosquitto/mosquitto.conf")
PIDFILE = pathlib.Path("/run/mosquitto/mosquitto.pid")
OPS = {"user": "ops", "password": "ops-secret"}
SENSOR = {"user": "sensor", "password": "sensor-secret"}
CLIENT_ID = "states-gw-1-upstream"


def digest(path: pathlib.Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def broker_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pathlib.Path(f"/proc/{pid}").exists() else None


@pytest.fixture(scope="module")
def upstream():
    broker = start_broker()
    yield broker
    broker.cleanup()


@pytest.fixture(scope="module", autouse=True)
def cleanup(states_minion, pillar_root):
    yield
    ret = apply(states_minion, "mosquitto.clean")
    assert_all_ok(ret)
    assert broker_pid() is None


@pytest.fixture(scope="module")
def gw_port():
    return free_port()


def gateway_pillar(gw_port: int, up_port: int, extra_topics: tuple = ()) -> dict:
    return {
        "mosquitto": {
            "mode": "package",
            "init_delay": 1,
            "autosave_interval": 1,
            "max_queued_messages": 10000,
            "listeners": [{"port": gw_port, "address": "127.0.0.1"}],
            "allow_anonymous": False,
            "users": {
                SENSOR["user"]: {"password": SENSOR["password"]},
                OPS["user"]: {"password": OPS["password"]},
            },
            "acl": {
                SENSOR["user"]: [{"topic": "sensors/#", "access": "write"}],
                OPS["user"]: [{"topic": "#", "access": "readwrite"}],
                # the bridge's local side is subject to the ACL (local_username below)
                "bridge": [
                    {"topic": "sensors/#", "access": "read"},
                    {"topic": "alerts/#", "access": "read"},
                    {"topic": "cmd/#", "access": "write"},
                ],
            },
            "bridges": {
                "upstream": {
                    "addresses": [f"127.0.0.1:{up_port}"],
                    "remote_clientid": CLIENT_ID,
                    "local_username": "bridge",
                    "restart_timeout": [1, 2],
                    "keepalive_interval": 5,
                    "topics": [
                        {
                            "topic": "sensors/#",
                            "direction": "out",
                            "qos": 1,
                            "remote_prefix": "site/brisbane/",
                        },
                        {
                            "topic": "cmd/#",
                            "direction": "in",
                            "qos": 1,
                            "remote_prefix": "site/brisbane/",
                        },
                        *extra_topics,
                    ],
                }
            },
        }
    }


def bridge_up(up_port: int) -> bool:
    return retained(up_port, f"$SYS/broker/connection/{CLIENT_ID}/state") == "1"


def test_apply_bridges_both_ways(states_minion, pillar, upstream, gw_port):
    pillar.set(gateway_pillar(gw_port, upstream.port))
    res = assert_all_ok(apply(states_minion, "mosquitto"))
    assert "tributary-mosquitto-config-file" in changed(res)
    assert broker_pid(), "the init script did not leave a running broker"
    wait_for(lambda: bridge_up(upstream.port), 30, "the bridge to connect upstream")

    # gateway -> upstream
    up_sub = Sub(upstream.port, ["site/brisbane/sensors/#"]).wait_subscribed()
    try:
        r = pub(gw_port, "sensors/t1/temperature", "21.5", **SENSOR)
        assert r.returncode == 0, r.stderr
        assert up_sub.wait(1) == [("site/brisbane/sensors/t1/temperature", "21.5")]
    finally:
        up_sub.stop()

    # upstream -> gateway (a command)
    gw_sub = Sub(gw_port, ["cmd/#"], **OPS).wait_subscribed()
    try:
        r = pub(upstream.port, "site/brisbane/cmd/replay", "go")
        assert r.returncode == 0, r.stderr
        assert gw_sub.wait(1) == [("cmd/replay", "go")]
    finally:
        gw_sub.stop()
