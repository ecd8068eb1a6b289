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
CLIENT_ID = "gw-brisbane-states-upstream"


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


def test_second_apply_reports_no_changes(states_minion, pillar, upstream, gw_port):
    pillar.set(gateway_pillar(gw_port, upstream.port))
    pid = broker_pid()
    res = assert_all_ok(apply(states_minion, "mosquitto"))
    assert changed(res) == {}
    assert broker_pid() == pid


def test_wrong_credentials_refused_and_acl_enforced(gw_port):
    r = pub(gw_port, "sensors/t1/temperature", "1", user="sensor", password="wrong")
    assert r.returncode != 0
    assert "not authorised" in (r.stderr + r.stdout).lower()
    r = pub(gw_port, "sensors/t1/temperature", "1")  # anonymous
    assert r.returncode != 0

    ops_sub = Sub(gw_port, ["#"], **OPS).wait_subscribed()
    try:
        # sensor may write sensors/#, not cmd/# (MQTT 3.1.1: a denied publish is dropped)
        assert pub(gw_port, "cmd/reboot", "denied", **SENSOR).returncode == 0
        assert pub(gw_port, "sensors/t2/humidity", "allowed", **SENSOR).returncode == 0
        # ops may write anywhere: a marker that follows the other two
        assert pub(gw_port, "ops/marker", "end", **OPS).returncode == 0
        got = ops_sub.wait(2)
        wait_for(lambda: ("ops/marker", "end") in ops_sub.messages, 20, "the marker")
        got = list(ops_sub.messages)
        assert ("sensors/t2/humidity", "allowed") in got
        assert ("cmd/reboot", "denied") not in got
    finally:
        ops_sub.stop()


def test_queued_while_upstream_down_arrive_after(upstream, gw_port):
    # a persistent-session subscriber upstream, so the upstream keeps what arrives for it
    sub = Sub(upstream.port, ["site/brisbane/sensors/#"], client_id="up-sub", clean=False)
    sub.wait_subscribed()
    sub.stop()
    upstream.stop()
    payloads = [f"offline-{i}" for i in range(20)]
    for p in payloads:
        r = pub(gw_port, "sensors/t3/temperature", p, **SENSOR)
        assert r.returncode == 0, r.stderr
    upstream.start()
    wait_for(lambda: bridge_up(upstream.port), 30, "the bridge to reconnect")
    sub = Sub(upstream.port, ["site/brisbane/sensors/#"], client_id="up-sub", clean=False)
    try:
        got = sub.wait(len(payloads), 30)
        assert [p for _, p in got] == payloads
    finally:
        sub.stop()


def test_queued_messages_survive_a_gateway_broker_restart(states_minion, upstream, gw_port):
    # persistence: what the bridge holds for a down upstream outlives a gateway broker restart
    sub = Sub(upstream.port, ["site/brisbane/sensors/#"], client_id="up-sub2", clean=False)
    sub.wait_subscribed()
    sub.stop()
    upstream.stop()
    payloads = [f"kept-{i}" for i in range(10)]
    for p in payloads:
        assert pub(gw_port, "sensors/t4/temperature", p, **SENSOR).returncode == 0
    pid = broker_pid()
    ret = states_minion.salt_call_cli(timeout=120).run("service.restart", "mosquitto")
    assert ret.returncode == 0 and ret.data is True, ret
    wait_for(lambda: broker_pid() not in (None, pid), 30, "the restarted broker")
    upstream.start()
    wait_for(lambda: bridge_up(upstream.port), 30, "the bridge to reconnect")
    sub = Sub(upstream.port, ["site/brisbane/sensors/#"], client_id="up-sub2", clean=False)
    try:
        got = sub.wait(len(payloads), 30)
        assert [p for _, p in got] == payloads
    finally:
        sub.stop()


def test_test_mode_reports_and_changes_nothing(states_minion, pillar, upstream, gw_port):
    extra = (
        {"topic": "alerts/#", "direction": "out", "qos": 1, "remote_prefix": "site/brisbane/"},
    )
    pillar.set(gateway_pillar(gw_port, upstream.port, extra))
    before, pid = digest(CONF), broker_pid()
    ret = apply(states_minion, "mosquitto", test=True)
    res = state_results(ret)
    assert res["tributary-mosquitto-config-file"]["result"] is None
    # the file would change; its diff is not shown (mosquitto.conf holds bridge passwords)
    changes = str(res["tributary-mosquitto-config-file"]["changes"])
    assert changes not in ("", "{}") and "alerts/#" not in changes
    assert all(v["result"] in (True, None) for v in res.values())
    assert digest(CONF) == before
    assert broker_pid() == pid


def test_pillar_change_restarts_broker_and_new_topic_crosses(
    states_minion, pillar, upstream, gw_port
):
    extra = (
        {"topic": "alerts/#", "direction": "out", "qos": 1, "remote_prefix": "site/brisbane/"},
    )
    pillar.set(gateway_pillar(gw_port, upstream.port, extra))
    pid = broker_pid()
    res = assert_all_ok(apply(states_minion, "mosquitto"))
    assert "tributary-mosquitto-config-file" in changed(res)
    assert "tributary-mosquitto-service-running" in changed(res)
    new_pid = broker_pid()
    assert new_pid and new_pid != pid
    wait_for(lambda: bridge_up(upstream.port), 30, "the bridge to reconnect")
    sub = Sub(upstream.port, ["site/brisbane/alerts/#"]).wait_subscribed()
    try:
        assert pub(gw_port, "alerts/t1/overheat", "85", **OPS).returncode == 0
        assert sub.wait(1) == [("site/brisbane/alerts/t1/overheat", "85")]
    finally:
        sub.stop()


def _break(data: dict, how: str) -> str:
    m = data["mosquitto"]
    if how == "direction":
        m["bridges"]["upstream"]["topics"][0]["direction"] = "sideways"
        return "mosquitto:bridges:upstream:topics:0:direction"
    if how == "password":
        del m["users"]["ops"]["password"]
        return "mosquitto:users:ops:password"
    m["bridges"]["upstream"]["tls"] = {"cafile": "/nonexistent/ca.pem"}
    return "mosquitto:bridges:upstream:tls:cafile"


@pytest.mark.parametrize("how", ["direction", "password", "certificate"])
def test_invalid_pillar_fails_naming_the_key(states_minion, pillar, upstream, gw_port, how):
    data = copy.deepcopy(gateway_pillar(gw_port, upstream.port))
    key = _break(data, how)
    pillar.set(data)
    before, pid = digest(CONF), broker_pid()
    ret = apply(states_minion, "mosquitto")
    assert ret.returncode != 0
    assert key in ret.stdout + ret.stderr
    assert digest(CONF) == before
    assert broker_pid() == pid


def test_config_mosquitto_refuses_is_caught_before_restart(
    states_minion, pillar, upstream, gw_port
):
    # valid pillar shape, but a configuration the broker itself rejects: the scratch-port
    # validation broker catches it and the running broker is left alone
    data = gateway_pillar(gw_port, upstream.port)
    data["mosquitto"]["extra_config"] = ["no_such_option 1"]
    pillar.set(data)
    before, pid = digest(CONF), broker_pid()
    res = state_results(apply(states_minion, "mosquitto"))
    conf = res["tributary-mosquitto-config-file"]
    assert conf["result"] is False
    assert "no_such_option" in conf["comment"]
    assert res["tributary-mosquitto-service-running"]["result"] is False  # requisite failed
    assert digest(CONF) == before
    assert broker_pid() == pid
