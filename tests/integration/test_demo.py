"""`make demo`: the whole pipeline live for about a minute, then what Elasticsearch holds.

Not part of `make test` (marker ``demo``). It starts the same real topology as the tests:
Elasticsearch (TLS + auth), a top master with the relay engine, a syndic, two gateway minions
in two sites, each with its own Mosquitto broker and a sensor simulator publishing real MQTT
messages. Ctrl-C stops everything it started (pytest tears the fixtures down).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.support.simulator import Simulator
from tests.support.topology import GATEWAYS, wait_for

pytestmark = pytest.mark.demo

DURATION = float(os.environ.get("DEMO_SECONDS", "60"))


def _out(text: str) -> None:
    sys.__stdout__.write(text)
    sys.__stdout__.flush()


def _indexed(es) -> int:
    return es.count("tributary-readings-*", {"terms": {"sensor": ["boiler-1", "room-1", "tank-1"]}})


def test_demo(topology):
    es, brokers = topology["es"], topology["brokers"]
    base = _indexed(es)
    _out(
        f"\nTributary demo: Elasticsearch {es.version} at {es.url}; gateways "
        + ", ".join(
            f"{gw} (site {site}, broker :{brokers[gw].port})" for gw, site in GATEWAYS.items()
        )
        + "\n"
    )
    sims = [Simulator(brokers[gw].port, gw, seed=n) for n, gw in enumerate(GATEWAYS)]
    for s in sims:
        s.start()
    start = time.monotonic()
    try:
        while time.monotonic() - start < DURATION:
            published = sum(s.published for s in sims)
            indexed = _indexed(es) - base
            _out(
                f"\r  {time.monotonic() - start:5.0f}s  published {published:7d}  "
                f"indexed {indexed:7d}  lag {published - indexed:6d}   "
            )
            time.sleep(1)  # the progress line's refresh period, not a wait for a condition
    finally:
        for s in sims:
            s.stop()
    published = sum(s.published for s in sims)
    wait_for(lambda: _indexed(es) - base >= published, timeout=120, what="the backlog to drain")
    _out(f"\r  done: published {published}, indexed {_indexed(es) - base}\n\n")
    # Nested terms aggregations: the integ-test zip has no x-pack analytics (multi_terms).
    leaf = {
        "min": {"min": {"field": "value"}},
        "max": {"max": {"field": "value"}},
        "last": {
            "top_hits": {
                "size": 1,
                "sort": [{"@timestamp": "desc"}],
                "_source": ["value", "unit", "site"],
            }
        },
    }
    res = es.search(
        "tributary-readings-*",
        {
            "size": 0,
            "query": {"terms": {"sensor": ["boiler-1", "room-1", "tank-1"]}},
            "aggs": {
                "gw": {
                    "terms": {"field": "gateway"},
                    "aggs": {
                        "s": {
                            "terms": {"field": "sensor"},
                            "aggs": {"m": {"terms": {"field": "metric"}, "aggs": leaf}},
                        }
                    },
                }
            },
        },
    )
    _out(
        f"{'gateway':16} {'site':10} {'sensor/metric':24} {'count':>7} {'last':>9} "
        f"{'min':>9} {'max':>9} unit\n"
    )
    for g in res["aggregations"]["gw"]["buckets"]:
        for s in g["s"]["buckets"]:
            for b in s["m"]["buckets"]:
                src = b["last"]["hits"]["hits"][0]["_source"]
                _out(
                    f"{g['key']:16} {src.get('site') or '':10} {s['key'] + '/' + b['key']:24} "
                    f"{b['doc_count']:7d} {src['value']:9.2f} {b['min']['value']:9.2f} "
                    f"{b['max']['value']:9.2f} {src.get('unit') or ''}\n"
                )
    assert _indexed(es) - base == published
