"""A sensor that stops is found silent within its configured factor and cleared when it
resumes: a Salt event on the top master's bus for each transition, a document in
``tributary-findings-*``, and ``salt-run tributary.health`` lists it while it is open."""

from __future__ import annotations

import time

import pytest

from tests.support.topology import dumps, es_count, in_order, wait_for

pytestmark = pytest.mark.usefixtures("topology")

GW = "gw-brisbane-1"
SENSOR = "silence-probe"


def test_a_silent_sensor_is_raised_and_cleared(topology, event_listener):
    es, top, brokers = topology["es"], topology["top"], topology["brokers"]

    def burst(n: int) -> None:
        now = int(time.time() * 1000)
        brokers[GW].publish(
            f"json/{SENSOR}",
            [
                dumps({"ts": now - (n - i) * 1000, "temp": 20 + i % 3, "env": {"hum": 40}})
                for i in range(n)
            ],
        )

    def events(state: str, since: float) -> list:
        tag = f"tributary/health/sensor_silent/{state}"
        return [
            e.data
            for e in in_order(event_listener.get_events([(top.id, tag)], after_time=since))
            if e.data.get("sensor") == SENSOR and e.data.get("gateway") == GW
        ]

    start = time.time()
    burst(20)  # one reading a second: its usual interval
    wait_for(lambda: es_count(es, GW, SENSOR) >= 40, 90, "the burst indexed")
    raised = wait_for(lambda: events("raised", start), 60, "sensor_silent raised")
    assert raised[0]["layer"] == "device" and raised[0]["site"] == "brisbane"
    assert raised[0]["detail"]["usual_interval_s"] == 1.0
    ret = top.salt_run_cli(timeout=120).run("tributary.health", check_es=False, site="brisbane")
    assert ret.returncode == 0, ret
    device = ret.data["sites"]["brisbane"]["device"]
    assert any(f["kind"] == "sensor_silent" and f.get("sensor") == SENSOR for f in device)
    resumed = time.time()
    burst(5)
    cleared = wait_for(lambda: events("cleared", resumed), 60, "sensor_silent cleared")
    assert cleared[0]["duration_s"] > 0

    def indexed() -> set:
        res = es.search(
            "tributary-findings-*",
            {
                "size": 50,
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"sensor": SENSOR}},
                            {"term": {"kind": "sensor_silent"}},
                        ]
                    }
                },
            },
        )
        return {h["_source"]["state"] for h in res["hits"]["hits"]}

    wait_for(lambda: indexed() >= {"raised", "cleared"}, 60, "both transitions indexed")
