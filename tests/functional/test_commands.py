"""Commands down to a device through a real Mosquitto broker: acknowledged, refused by the
device, or timed out, each with what the device said (the device is a paho client here)."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from saltext.tributary.gateway.commands import parse_commands, send_command
from saltext.tributary.gateway.sources.mqtt import BrokerConfig

pytest.importorskip("paho.mqtt.client")


class Device:
    """Answers commands on cmd/<name>/+: ``setpoint`` ok, ``open`` refused, ``sleep`` never."""

    def __init__(self, port: int, name: str) -> None:
        import paho.mqtt.client as mqtt

        self.seen: list[dict] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{name}")
        self.client.on_connect = lambda c, *a: c.subscribe(f"cmd/{name}/+", qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/reply"):
            return
        body = json.loads(msg.payload)
        self.seen.append(body)
        if body["command"] == "setpoint":
            answer = {"id": body["id"], "status": "ok", "setpoint": body["payload"]}
        elif body["command"] == "open":
            answer = {"id": body["id"], "status": "refused", "reason": "interlock"}
        else:
            return
        client.publish(body["reply_to"], json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def device():
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        pytest.skip("mosquitto is not installed")
    from tests.support.mosquitto import start_broker

    broker = start_broker()
    dev = Device(broker.port, "boiler-1")
    yield broker, dev
    dev.close()
    broker.cleanup()


def test_acked_refused_and_timed_out(device):
    broker, dev = device
    cfg, errors = parse_commands({"timeout_s": 5, "devices": ["boiler-1"]})
    assert not errors
    b = BrokerConfig(port=broker.port)
    ok = send_command(b, cfg, "boiler-1", "setpoint", 70)
    assert ok["result"] is True and ok["outcome"] == "acked" and ok["answer"]["setpoint"] == 70
    assert ok["topic"] == "cmd/boiler-1/setpoint" and dev.seen[-1]["id"] == ok["id"]
    assert 0 < ok["latency_ms"] < 5000
    no = send_command(b, cfg, "boiler-1", "open")
    assert no["outcome"] == "refused_by_device" and no["answer"]["reason"] == "interlock"
    assert no["reason"] == "the device answered status 'refused'"
    late = send_command(b, cfg, "boiler-1", "sleep", timeout_s=0.5)
    assert late["outcome"] == "timeout" and late["result"] is False
    assert send_command(b, cfg, "boiler/1", "x")["outcome"] == "refused"
    down = send_command(BrokerConfig(port=1), cfg, "boiler-1", "setpoint", 70)
    assert down["outcome"] == "error" and "broker 127.0.0.1:1" in down["reason"]


ALLOW = {
    "devices": ["boiler-1"],
    "timeout_s": 5,
    "allow": [
        {
            "device": "boiler-*",
            "commands": ["setpoint"],
            "payload": {"type": "number", "min": 40, "max": 90},
        },
        {"device": "boiler-*", "commands": ["open", "sleep"]},
    ],
    "rate": {"max": 3, "window_s": 60},
}


def test_the_gateway_checks_sends_and_audits_every_command(device, tmp_path):
    """``tributary.command``'s logic with a real broker and device: a refused command is never
    published; allowed ones are, within the rate limit; test mode publishes nothing; each
    command and its outcome is a record in the gateway spool (what the beacons ship)."""
    from saltext.tributary.gateway import operations
    from saltext.tributary.gateway.spool import GatewaySpool

    broker, dev = device
    opts = {
        "id": "gw-test",
        "cachedir": str(tmp_path),
        "beacons": {"tributary_mqtt": [{"broker": {"port": broker.port}}]},
    }
    pillar = {"tributary": {"commands": ALLOW}}

    def run(*args, **kw):
        return operations.command(opts, pillar, *args, user="alice", jid="2026", **kw)

    hot = run("boiler-1", "setpoint", 95)
    assert hot["outcome"] == "refused" and hot["result"] is False
    assert hot["reason"] == "tributary:commands.allow[0].payload.max: 95 is above 90"
    assert run("boiler-1", "vent")["reason"].startswith("tributary:commands.allow: no rule")
    plan = run("boiler-1", "setpoint", 70, test=True)
    assert plan["outcome"] == "test" and plan["result"] is None
    assert plan["topic"] == "cmd/boiler-1/setpoint" and plan["message"]["payload"] == 70
    assert dev.seen == []  # nothing refused or tested was published
    ok = run("boiler-1", "setpoint", 70)
    assert ok["outcome"] == "acked" and dev.seen[-1]["id"] == ok["id"]
    assert run("boiler-1", "open")["outcome"] == "refused_by_device"
    assert run("boiler-1", "sleep", timeout=0.3)["outcome"] == "timeout"
    over = run("boiler-1", "setpoint", 71)
    assert over["outcome"] == "refused" and over["reason"].startswith("tributary:commands.rate: 3")
    assert len(dev.seen) == 3
    spool = GatewaySpool(str(tmp_path / "tributary" / "spool.db"))
    try:
        audit = spool.records("command")
    finally:
        spool.close()
    assert [(r["command"], r["outcome"]) for r in audit] == [
        ("setpoint", "refused"),
        ("vent", "refused"),
        ("setpoint", "test"),
        ("setpoint", "acked"),
        ("open", "refused_by_device"),
        ("sleep", "timeout"),
        ("setpoint", "refused"),
    ]
    assert audit[0]["reason"] == hot["reason"] and audit[0]["rule"] == "tributary:commands.allow[0]"
    acked = audit[3]
    assert acked["correlation_id"] == ok["id"] and acked["answer"]["setpoint"] == 70
    assert acked["user"] == "alice" and acked["jid"] == "2026" and acked["latency_ms"] > 0
    assert ok["audit"] == {"recorded": True, "epoch": ok["audit"]["epoch"], "seq": acked["seq"]}


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"topic": "cmd/all"}, "tributary:commands.topic"),
        ({"timeout_s": 0}, "tributary:commands.timeout_s"),
        ({"devices": ["a b"]}, "tributary:commands.devices[0]"),
        ({"topics": "x"}, "tributary:commands.topics: unknown option"),
        ({"allow": [{"device": "x"}]}, "tributary:commands.allow[0].commands: required"),
    ],
)
def test_bad_command_configs_name_the_key(cfg, key):
    _, errors = parse_commands(cfg)
    assert any(key in e for e in errors), errors
