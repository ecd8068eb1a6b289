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
    no = send_command(b, cfg, "boiler-1", "open")
    assert no["outcome"] == "refused" and no["answer"]["reason"] == "interlock"
    late = send_command(b, cfg, "boiler-1", "sleep", timeout_s=0.5)
    assert late["outcome"] == "timeout" and late["result"] is False
    assert send_command(b, cfg, "boiler/1", "x")["outcome"] == "invalid"


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"topic": "cmd/all"}, "tributary:commands.topic"),
        ({"timeout_s": 0}, "tributary:commands.timeout_s"),
        ({"devices": ["a b"]}, "tributary:commands.devices[0]"),
        ({"topics": "x"}, "tributary:commands.topics: unknown option"),
    ],
)
def test_bad_command_configs_name_the_key(cfg, key):
    _, errors = parse_commands(cfg)
    assert any(key in e for e in errors), errors
