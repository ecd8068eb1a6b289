"""Alerts on the fault topology: a firing alert survives a top-master restart (no second
``firing``, its resolution after the restart recorded), and rules match on gateway grains
carried by the signed heartbeat through the syndic (rules in ``conftest.fault_relay_config``)."""

from __future__ import annotations

import time

import pytest

from tests.integration.faults.conftest import FGATEWAYS
from tests.support.topology import es_count, in_order, wait_for

pytestmark = pytest.mark.usefixtures("faults")

GW_A = next(iter(FGATEWAYS))


def alert_events(event_listener, top, rule: str, state: str, since: float) -> list[dict]:
    tag = f"tributary/alert/{rule}/{state}"
    return [
        e.data
        for e in in_order(event_listener.get_events([(top.id, tag)], after_time=since))
        if e.data.get("gateway") == GW_A
    ]


def indexed(es, rule: str) -> list[str]:
    """The states of ``rule``'s transitions for GW_A in ``tributary-alerts-*``, in order."""
    res = es.search(
        "tributary-alerts-*",
        {
            "size": 50,
            "query": {"bool": {"must": [{"term": {"rule": rule}}, {"term": {"gateway": GW_A}}]}},
            "sort": [{"@timestamp": "asc"}],
        },
    )
    return [h["_source"]["state"] for h in res["hits"]["hits"]]


def test_a_firing_alert_survives_a_top_master_restart(faults, event_listener):
    es, top, brokers = faults["es"], faults["top"], faults["brokers"]
    start = time.time()
    brokers[GW_A].publish("sensors/f-alert-probe/temperature", ["85"])
    wait_for(lambda: alert_events(event_listener, top, "f-hot", "firing", start), 90, "firing")
    wait_for(lambda: indexed(es, "f-hot") == ["firing"], 60, "the firing indexed")

    top.terminate()
    top.start()
    ret = top.salt_run_cli(timeout=60).run("tributary.alerts", site="brisbane")
    assert ret.returncode == 0, ret
    assert [a["rule"] for a in ret.data["sites"]["brisbane"]["firing"]] == ["f-hot"]

    # still hot (a lost alert would fire again on 86), then cleared below 75 (hysteresis)
    brokers[GW_A].publish("sensors/f-alert-probe/temperature", ["86", "74"])
    resolved = wait_for(
        lambda: alert_events(event_listener, top, "f-hot", "resolved", start), 90, "resolved"
    )
    assert resolved[0]["value"] == 74.0 and resolved[0]["severity"] == "critical"
    wait_for(lambda: es_count(es, GW_A, "f-alert-probe") == 3, 60, "the three readings")
    wait_for(lambda: "resolved" in indexed(es, "f-hot"), 60, "the resolution indexed")
    assert indexed(es, "f-hot") == ["firing", "resolved"]
    assert len(alert_events(event_listener, top, "f-hot", "firing", start)) == 1


def test_a_rule_matches_on_the_grains_of_the_gateways_heartbeat(faults, event_listener):
    es, top, brokers = faults["es"], faults["top"], faults["brokers"]

    def heartbeat_grains():
        ret = top.salt_run_cli(timeout=60).run("tributary.status", gateway=GW_A)
        gw = (ret.data or {}).get("gateways", {}).get(GW_A) or {}
        return (gw.get("gateway_spool") or {}).get("grains")

    assert wait_for(heartbeat_grains, 60, "a heartbeat carrying grains") == {"role": "gateway"}
    start = time.time()
    last = [0.0]

    def fired():
        # the alert engine reads the heartbeat facts every few seconds: publish until it has
        if time.monotonic() - last[0] > 3:
            brokers[GW_A].publish("sensors/f-grain-probe/temperature", ["85"])
            last[0] = time.monotonic()
        return alert_events(event_listener, top, "f-role-hot", "firing", start)

    (doc,) = wait_for(fired, 60, "the rule on role=gate* firing")
    assert doc["sensor"] == "f-grain-probe" and doc["site"] == "brisbane"
    wait_for(lambda: indexed(es, "f-role-hot") == ["firing"], 60, "the firing indexed")
    # the same readings, a rule on another role: never matched
    assert indexed(es, "f-boiler-room-hot") == []
    assert alert_events(event_listener, top, "f-boiler-room-hot", "firing", start) == []
