"""Commands down to devices through the real topology: the gateway's allow-list refuses what
it does not allow (nothing published, the refusal audited in Elasticsearch); an allowed
command reaches a simulated device on the gateway's own Mosquitto, is acknowledged, and is
audited with the device's answer and the latency. The audit travels the readings' path:
gateway spool, signed batch, syndic, relay, ``tributary-commands-*``."""

from __future__ import annotations

import time

import pytest

from tests.support.cmd_device import CommandDevice, Listener
from tests.support.topology import wait_for

pytest.importorskip("paho.mqtt.client")
pytestmark = pytest.mark.usefixtures("topology")

BNE, SYD = "gw-brisbane-1", "gw-sydney-1"


@pytest.fixture
def devices(topology):
    brokers = topology["brokers"]
    made = {
        "boiler-1": CommandDevice(brokers[BNE].port, "boiler-1"),
        "boiler-9": CommandDevice(brokers[SYD].port, "boiler-9"),
        "pump-1": CommandDevice(brokers[SYD].port, "pump-1", obeys=("start", "stop")),
    }
    listeners = {gw: Listener(brokers[gw].port, f"listen-{gw}") for gw in (BNE, SYD)}
    yield made, listeners
    for d in [*made.values(), *listeners.values()]:
        d.close()


def audit_doc(es, gateway: str, audit: dict) -> dict | None:
    """The ``tributary-commands-*`` document of a command (its id is the record's)."""
    doc_id = f"{gateway}:{audit['epoch']}:{audit['seq']}"
    res = es.search("tributary-commands-*", {"query": {"ids": {"values": [doc_id]}}})
    hits = res["hits"]["hits"]
    return hits[0]["_source"] if hits else None


def audited(es, gateway: str, ret: dict) -> dict:
    assert ret["audit"]["recorded"] is True, ret
    return wait_for(lambda: audit_doc(es, gateway, ret["audit"]), 60, "the command audited")


def test_a_command_not_allowed_is_refused_and_audited(topology, devices):
    es, gw = topology["es"], topology["gateways"][BNE]
    made, listeners = devices
    for args, reason in (
        (("boiler-1", "open"), "tributary:commands.allow: no rule allows command 'open'"),
        (("boiler-1", "setpoint", 95), "tributary:commands.allow[0].payload.max: 95 is above 90"),
    ):
        ret = gw.salt_call_cli(timeout=60).run("tributary.command", *args)
        # salt-call exits 1 for a return whose result is false
        assert ret.returncode == 1 and ret.data, ret
        assert ret.data["outcome"] == "refused" and ret.data["result"] is False, ret.data
        assert ret.data["reason"].startswith(reason), ret.data
        doc = audited(es, BNE, ret.data)
        assert doc["outcome"] == "refused" and doc["reason"] == ret.data["reason"]
        assert doc["gateway"] == BNE and doc["site"] == "brisbane" and doc["device"] == "boiler-1"
        assert doc["command"] == args[1] and doc["user"].startswith("salt-call")
    # test mode: what would be sent, nothing published
    ret = gw.salt_call_cli(timeout=60).run(
        "tributary.command", "boiler-1", "setpoint", 70, test=True
    )
    assert ret.data["outcome"] == "test" and ret.data["topic"] == "cmd/boiler-1/setpoint", ret
    assert ret.data["message"]["payload"] == 70 and ret.data["qos"] == 1
    assert audited(es, BNE, ret.data)["outcome"] == "test"
    assert made["boiler-1"].seen == []
    assert [t for t in listeners[BNE].topics if t.startswith("cmd/boiler-1/")] == []


def test_an_allowed_command_is_acked_and_audited_with_answer_and_latency(topology, devices):
    es, gw = topology["es"], topology["gateways"][BNE]
    made, _ = devices
    started = time.monotonic()
    ret = gw.salt_call_cli(timeout=60).run("tributary.command", "boiler-1", "setpoint", 72)
    took = time.monotonic() - started
    assert ret.returncode == 0, ret
    data = ret.data
    assert data["outcome"] == "acked" and data["result"] is True, data
    assert data["answer"] == {"id": data["id"], "status": "ok", "did": "setpoint", "value": 72}
    assert [m["id"] for m in made["boiler-1"].seen] == [data["id"]]
    doc = audited(es, BNE, data)
    assert doc["outcome"] == "acked" and doc["correlation_id"] == data["id"]
    assert doc["answer"]["value"] == 72 and doc["payload"] == "72" and doc["payload_value"] == 72
    assert 0 < doc["latency_ms"] < took * 1000
    assert doc["topic"] == "cmd/boiler-1/setpoint" and doc["qos"] == 1
    print(f"command acked in {doc['latency_ms']} ms at the gateway; salt-call took {took:.1f} s")
