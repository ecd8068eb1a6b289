"""Flap damping through the real topology: an alert that fires, resolves and fires again
within the window is held ``flapping`` (one event, one document) and, once its condition has
been stable, settles ``firing`` on the top master's clock; the rule is ``f-flappy`` in
``conftest.fault_relay_config`` (3 changes in 120 s, stable 4 s)."""

from __future__ import annotations

import time

import pytest

from tests.integration.faults.conftest import FGATEWAYS
from tests.support.topology import in_order, wait_for

pytestmark = pytest.mark.usefixtures("faults")

GW = next(iter(FGATEWAYS))
RULE = "f-flappy"


def test_a_flapping_alert_is_notified_once_then_settles(faults, event_listener):
    es, top, brokers = faults["es"], faults["top"], faults["brokers"]
    start = time.time()

    def events(state: str) -> list[dict]:
        tag = f"tributary/alert/{RULE}/{state}"
        return [
            e.data
            for e in in_order(event_listener.get_events([(top.id, tag)], after_time=start))
            if e.data.get("gateway") == GW
        ]

    def step(value: str, state: str, n: int) -> list[dict]:
        brokers[GW].publish("sensors/f-flap-probe/temperature", [value])
        return wait_for(lambda: len(events(state)) >= n and events(state), 60, f"{state} #{n}")

    step("85", "firing", 1)
    step("70", "resolved", 1)
    (flapping,) = step("85", "flapping", 1)  # the third change in 120 s
    assert flapping["changes"] == 3 and flapping["value"] == 85.0
    assert len(events("firing")) == 1  # held, not fired again
    # no reading for 4 s: stable (on) on the top master's clock -> firing, once
    settled = wait_for(lambda: events("firing")[1:], 30, "settled firing")
    assert settled[0]["flapped"] is True
    step("70", "resolved", 2)  # counting started again: a plain resolution

    def indexed() -> list[str]:
        res = es.search(
            "tributary-alerts-*",
            {
                "size": 20,
                "query": {"bool": {"must": [{"term": {"rule": RULE}}, {"term": {"gateway": GW}}]}},
                "sort": [{"@timestamp": "asc"}],
            },
        )
        return [h["_source"]["state"] for h in res["hits"]["hits"]]

    expected = ["firing", "resolved", "flapping", "firing", "resolved"]
    wait_for(lambda: indexed() == expected, 60, "the five transitions indexed")
    assert len(events("flapping")) == 1
