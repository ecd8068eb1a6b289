""" "This is not fine for 10am on Tuesday", through the real topology.

Four weeks of a building's power readings (high in weekday office hours, low otherwise) go
through MQTT, a gateway, the syndic and the relay, at accelerated time: the sensor's own
timestamps, one reading every ten minutes. A value that is normal at 10am on a weekday is not
flagged on Tuesday; the same value at 10am on a Sunday is an anomaly, with an explanation, in
Elasticsearch, as a Salt event on the top master's bus, and in ``salt-run tributary.anomalies``;
``salt-run tributary.model`` says what the model expects and why.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.support.topology import dumps, es_count, wait_for

pytestmark = pytest.mark.usefixtures("topology")

GW = "gw-sydney-1"
SENSOR = "office-power"
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
WEEK = 7 * DAY
EPOCH_MONDAY = 4 * DAY  # 1970-01-05 00:00 UTC was a Monday


def office(ts: int, rnd: random.Random) -> float:
    day = (ts - EPOCH_MONDAY) // DAY % 7
    hour = ts // HOUR % 24
    busy = day < 5 and 8 <= hour < 18
    return round((50.0 if busy else 5.0) + rnd.gauss(0, 1.0), 2)


def test_normal_for_10am_on_tuesday_is_an_anomaly_at_10am_on_sunday(topology, event_listener):
    es, top, brokers = topology["es"], topology["top"], topology["brokers"]
    now = int(time.time() * 1000)
    this_monday = now - (now - EPOCH_MONDAY) % WEEK
    start = this_monday - 4 * WEEK  # within the relay's max_age_s (35 days)
    last_week = this_monday - WEEK
    tuesday_10 = last_week + DAY + 10 * HOUR
    sunday_10 = last_week + 6 * DAY + 10 * HOUR
    rnd = random.Random(11)
    msgs = []
    ts = start
    while ts < this_monday:
        value = office(ts, rnd)
        if sunday_10 <= ts < sunday_10 + HOUR:
            value = round(50.0 + rnd.gauss(0, 1.0), 2)  # a weekday's office load, on Sunday
        msgs.append(dumps({"ts": ts, "temp": value, "env": {"hum": 40}}))
        ts += 10 * MIN
    began = time.time()
    brokers[GW].publish(f"json/{SENSOR}", msgs)
    wait_for(lambda: es_count(es, GW, SENSOR) >= 2 * len(msgs), 180, "the four weeks indexed")

    tag = f"tributary/anomaly/{GW}/{SENSOR}/temperature"
    matched = event_listener.wait_for_events([(top.id, tag)], timeout=120, after_time=began)
    assert matched.found_all_events, "no anomaly event on the top master's bus"
    events = [e.data for e in matched.matches]

    def found() -> list[dict]:
        res = es.search(
            "tributary-anomalies-*",
            {
                "size": 100,
                "query": {
                    "bool": {"filter": [{"term": {"gateway": GW}}, {"term": {"sensor": SENSOR}}]}
                },
            },
        )
        return [h["_source"] for h in res["hits"]["hits"]]

    docs = wait_for(found, 60, "anomaly documents")
    sunday = [d for d in docs if sunday_10 <= d["@timestamp"] < sunday_10 + HOUR]
    assert sunday, [(d["@timestamp"], d["context"]) for d in docs]
    d = sunday[0]
    assert d["context"] == "Sun 10:00 (hour of week)" and d["metric"] == "temperature"
    assert d["expected"] < 15 < 45 < d["value"] and d["band"][1] < d["value"]
    assert d["samples"] > 3000 and d["context_samples"] >= 4 and d["site"] == "sydney"
    assert not [x for x in docs if tuesday_10 <= x["@timestamp"] < tuesday_10 + HOUR]
    assert any(e.get("context") == "Sun 10:00 (hour of week)" for e in events)

    run = top.salt_run_cli(timeout=120)
    ret = run.run("tributary.anomalies", gateway=GW, sensor=SENSOR, since="35d")
    assert ret.returncode == 0 and ret.data["count"] >= 1, ret

    # what the model expects now, once it has saved its state with every reading
    def saved_model() -> dict | None:
        ret = run.run("tributary.model", GW, f"{SENSOR}/temperature")
        ok = ret.returncode == 0 and ret.data.get("result")
        return ret.data if ok and ret.data["samples"] >= len(msgs) else None

    model = wait_for(saved_model, 60, "the model saved with every reading")
    assert model["state"] in ("ok", "quiet") and model["usual_interval_s"] == 600
    assert model["context"].endswith("(hour of week)")
