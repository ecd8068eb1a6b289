"""Pipeline self-metrics land in ``<prefix>-metrics-*`` periodically (every 5 s here)."""

from __future__ import annotations

from tests.support.topology import wait_for


def test_pipeline_metrics_indexed(faults):
    es = faults["es"]
    wait_for(
        lambda: es.count("tributary-metrics-*", {"match_all": {}}) >= 2,
        timeout=60,
        what="two metrics documents",
    )
    res = es.search("tributary-metrics-*", {"size": 1, "sort": [{"@timestamp": "desc"}]})
    doc = res["hits"]["hits"][0]["_source"]
    assert doc["relay"] == "ftop"
    for key in ("spool_batches", "spool_bytes", "open_gaps", "missing_readings"):
        assert key in doc, doc
    assert "events_in" in doc["counters"] or "keysets_in" in doc["counters"], doc
