"""Alert notifications reach an upstream broker (a real Mosquitto, read with mosquitto_sub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from saltext.tributary.reactor.notify import notify_config, publish

pytest.importorskip("paho.mqtt.client")


@pytest.fixture
def broker():
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        pytest.skip("mosquitto is not installed")
    from tests.support.mosquitto import start_broker

    b = start_broker()
    yield b
    b.cleanup()


def test_published_and_refused(broker):
    opts = {"tributary_reactor": {"notify": {"broker": {"port": broker.port}, "timeout_s": 5}}}
    cfg, error = notify_config(opts)
    assert cfg is not None, error
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "alerts/#", "-C", "1", "-W", "20", "-v"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        msg = {"rule": "boiler-hot", "state": "firing", "value": 85.0}
        out = ""
        # mosquitto_sub subscribes asynchronously: publish until it has one (it exits)
        for _ in range(40):
            assert publish(cfg, "alerts/brisbane/boiler-hot", msg)["result"] is True
            try:
                out, _ = sub.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        assert out, "mosquitto_sub received nothing"
        topic, body = out.strip().split(" ", 1)
        assert topic == "alerts/brisbane/boiler-hot" and json.loads(body) == msg
    finally:
        if sub.poll() is None:
            sub.kill()
    assert publish(cfg, "alerts/#", {})["result"] is False
    assert notify_config({})[0] is None
    down = {"tributary_reactor": {"notify": {"broker": {"port": 1}, "timeout_s": 1}}}
    gone = publish(notify_config(down)[0], "alerts/x", {})
    assert gone["result"] is False and "broker 127.0.0.1:1" in gone["error"]
