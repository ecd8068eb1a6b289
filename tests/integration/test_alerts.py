"""An alert rule in the relay engine's config fires and resolves through the real topology:
Salt events ``tributary/alert/<rule>/<state>`` on the top master's bus (what the reactor acts
on), documents in ``tributary-alerts-*``, and ``salt-run tributary.alerts``."""

from __future__ import annotations

import time

import pytest

from tests.support.topology import es_count, in_order, wait_for

pytestmark = pytest.mark.usefixtures("topology")

GW = "gw-brisbane-1"
SENSOR = "alert-probe"


def test_a_threshold_rule_fires_and_resolves(topology, event_listener):
    es, top, brokers = topology["es"], topology["top"], topology["brokers"]

    def events(state: str, since: float) -> list:
        tag = f"tributary/alert/probe-hot/{state}"
        return [
            e.data
            for e in in_order(event_listener.get_events([(top.id, tag)], after_time=since))
            if e.data.get("gateway") == GW
        ]

    start = time.time()
    brokers[GW].publish(f"sensors/{SENSOR}/temperature", ["70", "85"])
    fired = wait_for(lambda: events("firing", start), 90, "the alert firing")
    assert fired[0]["value"] == 85.0 and fired[0]["severity"] == "critical"
    assert fired[0]["site"] == "brisbane" and fired[0]["sensor"] == SENSOR
    ret = top.salt_run_cli(timeout=60).run("tributary.alerts", site="brisbane")
    assert ret.returncode == 0 and ret.data["sites"]["brisbane"]["firing"][0]["rule"] == "probe-hot"
    brokers[GW].publish(f"sensors/{SENSOR}/temperature", ["78", "74"])  # hysteresis: 74 clears
    resolved = wait_for(lambda: events("resolved", start), 90, "the alert resolved")
    assert resolved[0]["value"] == 74.0 and resolved[0]["duration_s"] >= 0
    assert es_count(es, GW, SENSOR) == 4

    def indexed() -> list:
        res = es.search(
            "tributary-alerts-*",
            {"size": 10, "query": {"term": {"rule": "probe-hot"}}, "sort": [{"@timestamp": "asc"}]},
        )
        return [h["_source"]["state"] for h in res["hits"]["hits"]]

    wait_for(lambda: indexed() == ["firing", "resolved"], 60, "both transitions indexed")
