"""Elasticsearch aggregations behind the fleet report, and their answers read into the model.

Only aggregations are asked for (``size: 0``): composite aggregations paged by ``after_key``
for the per-series buckets, date histograms, terms and min/avg/max. No reading document is
fetched, so the cost grows with series x buckets, not with readings. Only aggregations of
Elasticsearch's core are used (the integ-test distribution has no ``top_metrics`` or
pipeline aggregations): deltas of the relay's counters are taken here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from saltext.tributary.report.model import (
    GAP_COUNTERS,
    HOPS,
    PERCENTS,
    AlertMark,
    AnomalyMark,
    Bucket,
    FindingsChart,
    FleetRow,
    Pipeline,
    PipelinePoint,
    Series,
    SiteChart,
    Window,
    sibling_envelope,
)

log = logging.getLogger(__name__)

#: ``search(index, body) -> response``: an Elasticsearch search that tolerates missing indices.
Search = Callable[[str, dict[str, Any]], Mapping[str, Any]]

NO_SITE = "(no site)"
PAGE = 5000
LAYERS = ("device", "population", "application")


def client_search(client: Any) -> Search:
    """A :data:`Search` over an elasticsearch-py client (missing indices answer empty)."""

    def search(index: str, body: dict[str, Any]) -> Mapping[str, Any]:
        resp = client.search(index=index, body=body, ignore_unavailable=True, allow_no_indices=True)
        return resp.body if hasattr(resp, "body") else resp

    return search


def _range(field: str, window: Window) -> dict[str, Any]:
    return {
        "range": {field: {"gte": window.start_ms, "lte": window.end_ms, "format": "epoch_millis"}}
    }


def _filters(window: Window, site: str | None, field: str = "@timestamp") -> list[dict[str, Any]]:
    out = [_range(field, window)]
    if site:
        out.append({"wildcard": {"site": {"value": str(site)}}})
    return out


def _hist(field: str, window: Window) -> dict[str, Any]:
    return {"date_histogram": {"field": field, "fixed_interval": f"{window.interval_ms}ms"}}


def _aggs(resp: Mapping[str, Any]) -> Mapping[str, Any]:
    return resp.get("aggregations") or {}


def _num(agg: Mapping[str, Any] | None) -> float | None:
    v = (agg or {}).get("value")
    return None if v is None else float(v)


def composite_pages(
    search: Search, index: str, query: dict[str, Any], sources: list, aggs: dict[str, Any]
) -> Iterator[Mapping[str, Any]]:
    """Every bucket of a composite aggregation, page by page."""
    after = None
    while True:
        comp: dict[str, Any] = {"size": PAGE, "sources": sources}
        if after is not None:
            comp["after"] = after
        body = {"size": 0, "query": query, "aggs": {"c": {"composite": comp, "aggs": aggs}}}
        c = _aggs(search(index, body)).get("c") or {}
        buckets = c.get("buckets") or []
        yield from buckets
        after = c.get("after_key")
        if not buckets or after is None:
            return


def _terms(name: str, field: str, missing: bool = False) -> dict[str, Any]:
    src: dict[str, Any] = {"field": field}
    if missing:
        src["missing_bucket"] = True
    return {name: {"terms": src}}


SeriesKey = tuple[str, str, str, str]  # site, gateway, sensor, metric


def series_buckets(search: Search, prefix: str, window: Window, site: str | None) -> list[Series]:
    """Per series (site, gateway, sensor, metric) and bucket: count, min, mean, max of its
    readings (a gateway-aggregated reading counts with its window's own min and max)."""
    sources = [
        _terms("site", "site", missing=True),
        _terms("gateway", "gateway"),
        _terms("sensor", "sensor"),
        _terms("metric", "metric"),
        {"t": {"date_histogram": _hist("@timestamp", window)["date_histogram"]}},
    ]
    aggs = {
        "lo": {"min": {"field": "value"}},
        "mean": {"avg": {"field": "value"}},
        "hi": {"max": {"field": "value"}},
        "agg_lo": {"min": {"field": "agg.min"}},
        "agg_hi": {"max": {"field": "agg.max"}},
    }
    query = {"bool": {"filter": _filters(window, site)}}
    out: dict[SeriesKey, Series] = {}
    for b in composite_pages(search, f"{prefix}-readings-*", query, sources, aggs):
        k = b["key"]
        key = (k["site"] or NO_SITE, k["gateway"], k["sensor"], k["metric"])
        s = out.get(key)
        if s is None:
            s = out[key] = Series(*key)
        lo = min(x for x in (_num(b["lo"]), _num(b["agg_lo"])) if x is not None)
        hi = max(x for x in (_num(b["hi"]), _num(b["agg_hi"])) if x is not None)
        s.buckets.append(Bucket(int(k["t"]), int(b["doc_count"]), lo, _num(b["mean"]) or 0.0, hi))
    return list(out.values())


def anomaly_marks(
    search: Search, prefix: str, window: Window, site: str | None
) -> dict[tuple[str, str, str], list[AnomalyMark]]:
    """Each anomaly of the period at its own timestamp, with the value, the detector's
    expected value and band and its score (one composite bucket per anomaly: exact positions
    without fetching documents)."""
    sources = [
        _terms("gateway", "gateway"),
        _terms("sensor", "sensor"),
        _terms("metric", "metric"),
        _terms("t", "@timestamp"),
    ]
    aggs = {
        "value": {"max": {"field": "value"}},
        "expected": {"avg": {"field": "expected"}},
        "band_lo": {"min": {"field": "band"}},
        "band_hi": {"max": {"field": "band"}},
        "score": {"max": {"field": "score"}},
    }
    query = {"bool": {"filter": [*_filters(window, site), {"term": {"anomaly": True}}]}}
    out: dict[tuple[str, str, str], list[AnomalyMark]] = {}
    iv = window.interval_ms
    for b in composite_pages(search, f"{prefix}-anomalies-*", query, sources, aggs):
        k = b["key"]
        t = int(k["t"])
        out.setdefault((k["gateway"], k["sensor"], k["metric"]), []).append(
            AnomalyMark(
                t=t,
                bucket=t - t % iv,
                count=int(b["doc_count"]),
                value=_num(b["value"]) or 0.0,
                expected=_nan(b["expected"]),
                band_lo=_nan(b["band_lo"]),
                band_hi=_nan(b["band_hi"]),
                score=_num(b["score"]) or 0.0,
            )
        )
    return out


def _nan(agg: Mapping[str, Any]) -> float:
    v = _num(agg)
    return math.nan if v is None else v


def alert_marks(
    search: Search, prefix: str, window: Window, site: str | None
) -> tuple[dict[tuple[str, str, str], list[AlertMark]], dict[str, dict[str, int]]]:
    """Alert transitions per series at their timestamps, and per rule the count by state."""
    sources = [
        _terms("gateway", "gateway"),
        _terms("sensor", "sensor", missing=True),
        _terms("metric", "metric", missing=True),
        _terms("rule", "rule"),
        _terms("state", "state"),
        _terms("severity", "severity", missing=True),
        _terms("t", "@timestamp"),
    ]
    query = {"bool": {"filter": _filters(window, site)}}
    marks: dict[tuple[str, str, str], list[AlertMark]] = {}
    by_rule: dict[str, dict[str, int]] = {}
    for b in composite_pages(search, f"{prefix}-alerts-*", query, sources, {}):
        k = b["key"]
        n = int(b["doc_count"])
        marks.setdefault((k["gateway"], k["sensor"] or "", k["metric"] or ""), []).append(
            AlertMark(int(k["t"]), k["rule"], k["state"], n, k["severity"] or "")
        )
        states = by_rule.setdefault(k["rule"], {})
        states[k["state"]] = states.get(k["state"], 0) + n
    return marks, dict(sorted(by_rule.items()))


def site_charts(
    series: list[Series],
    anomalies: Mapping[tuple[str, str, str], list[AnomalyMark]],
    alerts: Mapping[tuple[str, str, str], list[AlertMark]],
) -> list[SiteChart]:
    """One chart per site and metric: its series with their anomalies and alerts."""
    groups: dict[tuple[str, str], list[Series]] = {}
    for s in series:
        key = (s.gateway, s.sensor, s.metric)
        s.anomalies = sorted(anomalies.get(key, []), key=lambda a: a.t)
        s.alerts = sorted(alerts.get(key, []), key=lambda a: a.t)
        s.buckets.sort(key=lambda b: b.t)
        groups.setdefault((s.site, s.metric), []).append(s)
    return [
        SiteChart(
            site, metric, sorted(ss, key=lambda s: (s.gateway, s.sensor)), sibling_envelope(ss)
        )
        for (site, metric), ss in sorted(groups.items())
    ]


def fleet_rows(search: Search, prefix: str, window: Window, site: str | None) -> list[FleetRow]:
    """Sites x gateways: last reading, last heartbeat and the spool backlog it reported."""
    rows: dict[str, FleetRow] = {}
    body: dict[str, Any] = {
        "size": 0,
        "query": {"bool": {"filter": _filters(window, site)}},
        "aggs": {
            "gw": {
                "terms": {"field": "gateway", "size": 10_000},
                "aggs": {
                    "last": {"max": {"field": "@timestamp"}},
                    "site": {"terms": {"field": "site", "size": 1}},
                },
            }
        },
    }
    for b in (_aggs(search(f"{prefix}-readings-*", body)).get("gw") or {}).get("buckets", []):
        sites = b["site"]["buckets"]
        rows[b["key"]] = FleetRow(
            site=sites[0]["key"] if sites else NO_SITE,
            gateway=b["key"],
            last_seen_ms=_int(b["last"]),
            readings=int(b["doc_count"]),
        )
    hb_aggs = body["aggs"]["gw"]["aggs"]
    hb_aggs["latest"] = {
        "terms": {"field": "@timestamp", "size": 1, "order": {"_key": "desc"}},
        "aggs": {"unsent": {"max": {"field": "spool_unsent"}}},
    }
    for b in (_aggs(search(f"{prefix}-health-*", body)).get("gw") or {}).get("buckets", []):
        sites = b["site"]["buckets"]
        row = rows.get(b["key"]) or rows.setdefault(
            b["key"], FleetRow(sites[0]["key"] if sites else NO_SITE, b["key"])
        )
        last = _int(b["last"])
        if last is not None and (row.last_seen_ms is None or last > row.last_seen_ms):
            row.last_seen_ms = last
        latest = b["latest"]["buckets"]
        if latest:
            unsent = _int(latest[0]["unsent"])
            row.backlog = unsent
    return sorted(rows.values(), key=lambda r: (r.site, r.gateway))


def _int(agg: Mapping[str, Any]) -> int | None:
    v = _num(agg)
    return None if v is None else int(v)


def _hist_counts(resp: Mapping[str, Any], name: str = "h") -> dict[int, Mapping[str, Any]]:
    return {int(b["key"]): b for b in (_aggs(resp).get(name) or {}).get("buckets", [])}


def pipeline(search: Search, prefix: str, window: Window, site: str | None) -> Pipeline:
    """Per bucket: readings measured and readings indexed, their mean lag and each hop's lag
    percentiles (``hop_ms``), dead letters, replay requests, gaps opened, repaired, filled and
    given up and open gaps (from the relay's self-metrics); commands sent per outcome when a
    commands index exists."""
    keys = window.keys()
    points = {t: PipelinePoint(t) for t in keys}
    q = {"bool": {"filter": _filters(window, site)}}
    readings = search(
        f"{prefix}-readings-*",
        {
            "size": 0,
            "query": q,
            "aggs": {
                "h": {
                    **_hist("@timestamp", window),
                    "aggs": {
                        "ts": {"avg": {"field": "@timestamp"}},
                        "relayed": {"avg": {"field": "relayed_at"}},
                        **{
                            f"hop_{h}": {
                                "percentiles": {"field": f"hop_ms.{h}", "percents": list(PERCENTS)}
                            }
                            for h in HOPS
                        },
                    },
                }
            },
        },
    )
    for t, b in _hist_counts(readings).items():
        p = points.get(t) or points.setdefault(t, PipelinePoint(t))
        p.readings_in = int(b["doc_count"])
        ts, rel = _num(b["ts"]), _num(b["relayed"])
        if ts is not None and rel is not None:
            p.lag_s = round((rel - ts) / 1000, 3)
        for h in HOPS:
            pct = percentiles_s(b.get(f"hop_{h}"))
            if pct:
                p.hops[h] = pct
    indexed = search(
        f"{prefix}-readings-*",
        {
            "size": 0,
            "query": {"bool": {"filter": _filters(window, site, "relayed_at")}},
            "aggs": {"h": _hist("relayed_at", window)},
        },
    )
    for t, b in _hist_counts(indexed).items():
        if t in points:
            points[t].indexed = int(b["doc_count"])
    # dead letters carry no site: the fleet's
    dl = search(
        f"{prefix}-deadletter-*",
        {
            "size": 0,
            "query": _range("@timestamp", window),
            "aggs": {"h": _hist("@timestamp", window), "r": {"terms": {"field": "reason"}}},
        },
    )
    for t, b in _hist_counts(dl).items():
        if t in points:
            points[t].dead_letters = int(b["doc_count"])
    reasons = {b["key"]: int(b["doc_count"]) for b in (_aggs(dl).get("r") or {}).get("buckets", [])}
    metrics_present = _relay_metrics(search, prefix, window, points)
    commands = _commands(search, prefix, window, site, keys)
    return Pipeline(
        points=[points[t] for t in sorted(points)],
        dead_letter_reasons=reasons,
        totals={},
        commands=commands,
        metrics_present=metrics_present,
    )


def percentiles_s(agg: Mapping[str, Any] | None) -> dict[int, float]:
    """A ``percentiles`` aggregation's answer in seconds, by percent (``{50: 1.2, 95: 3.4}``);
    percents without a value (no document had the field) are left out."""
    out: dict[int, float] = {}
    values = (agg or {}).get("values") or {}
    items = values.items() if isinstance(values, Mapping) else ()
    for key, v in items:
        if v is None:
            continue
        try:
            pct = float(key)
        except ValueError:
            continue
        if pct.is_integer() and math.isfinite(float(v)):
            out[int(pct)] = round(float(v) / 1000, 3)
    return out


def _relay_metrics(
    search: Search, prefix: str, window: Window, points: dict[int, PipelinePoint]
) -> bool:
    """Deltas of the relay's cumulative counters (its self-metrics documents) per bucket.
    A counter that went down (a relay restarted with a fresh spool) restarts the deltas."""
    counters = tuple(GAP_COUNTERS)
    resp = search(
        f"{prefix}-metrics-*",
        {
            "size": 0,
            "query": {"range": {"@timestamp": {"lte": window.end_ms, "format": "epoch_millis"}}},
            "aggs": {
                "before": {
                    "filter": {
                        "range": {"@timestamp": {"lt": window.start_ms, "format": "epoch_millis"}}
                    },
                    "aggs": {c: {"max": {"field": f"counters.{c}"}} for c in counters},
                },
                "in": {
                    "filter": _range("@timestamp", window),
                    "aggs": {
                        "h": {
                            **_hist("@timestamp", window),
                            "aggs": {
                                **{c: {"max": {"field": f"counters.{c}"}} for c in counters},
                                "open_gaps": {"max": {"field": "open_gaps"}},
                            },
                        }
                    },
                },
            },
        },
    )
    inner = _aggs(resp).get("in") or {}
    buckets = (inner.get("h") or {}).get("buckets", [])
    if not buckets:
        return False
    prev = {c: _num((_aggs(resp).get("before") or {}).get(c)) for c in counters}
    for b in buckets:
        t = int(b["key"])
        p = points.get(t)
        for c in counters:
            v = _num(b[c])
            if v is None:
                continue
            base = prev[c]
            # no earlier value: no delta to take; a lower value: the counter restarted
            delta = 0 if base is None else int(v - base if v >= base else v)
            prev[c] = v
            if p is not None:
                setattr(p, GAP_COUNTERS[c], delta)
        if p is not None and b["doc_count"]:
            p.open_gaps = _int(b["open_gaps"])
    return True


def _commands(
    search: Search, prefix: str, window: Window, site: str | None, keys: list[int]
) -> dict[str, list[int]] | None:
    """Commands per outcome and bucket from ``<prefix>-commands-*`` (None when there is no
    such index or it cannot be aggregated by outcome)."""
    resp: Mapping[str, Any] = {}
    # a keyword ``outcome``, or the ``.keyword`` sub-field of a dynamically mapped one
    for field in ("outcome", "outcome.keyword"):
        try:
            resp = search(
                f"{prefix}-commands-*",
                {
                    "size": 0,
                    "query": {"bool": {"filter": _filters(window, site)}},
                    "aggs": {
                        "o": {
                            "terms": {"field": field, "size": 50},
                            "aggs": {"h": _hist("@timestamp", window)},
                        }
                    },
                },
            )
        except Exception as exc:  # e.g. a text field: not aggregatable
            log.debug("tributary report: commands by %s: %s", field, exc)
            continue
        if (_aggs(resp).get("o") or {}).get("buckets"):
            break
    outcomes = (_aggs(resp).get("o") or {}).get("buckets")
    if not outcomes:
        return None
    idx = {t: i for i, t in enumerate(keys)}
    out: dict[str, list[int]] = {}
    for o in outcomes:
        row = [0] * len(keys)
        for b in o["h"]["buckets"]:
            i = idx.get(int(b["key"]))
            if i is not None:
                row[i] = int(b["doc_count"])
        out[str(o["key"])] = row
    return out


def findings_chart(search: Search, prefix: str, window: Window, site: str | None) -> FindingsChart:
    """Findings raised per bucket in the device and population layers, anomalies found per
    bucket as the application layer, and how many of each kind were raised."""
    keys = window.keys()
    idx = {t: i for i, t in enumerate(keys)}
    layers = {layer: [0] * len(keys) for layer in LAYERS}
    resp = search(
        f"{prefix}-findings-*",
        {
            "size": 0,
            "query": {"bool": {"filter": [*_filters(window, site), {"term": {"state": "raised"}}]}},
            "aggs": {
                "l": {"terms": {"field": "layer"}, "aggs": {"h": _hist("@timestamp", window)}},
                "k": {"terms": {"field": "kind", "size": 100}},
            },
        },
    )
    for lb in (_aggs(resp).get("l") or {}).get("buckets", []):
        row = layers.setdefault(str(lb["key"]), [0] * len(keys))
        for b in lb["h"]["buckets"]:
            i = idx.get(int(b["key"]))
            if i is not None:
                row[i] = int(b["doc_count"])
    kinds = {b["key"]: int(b["doc_count"]) for b in (_aggs(resp).get("k") or {}).get("buckets", [])}
    anomalies = search(
        f"{prefix}-anomalies-*",
        {
            "size": 0,
            "query": {"bool": {"filter": [*_filters(window, site), {"term": {"anomaly": True}}]}},
            "aggs": {"h": _hist("@timestamp", window)},
        },
    )
    for t, b in _hist_counts(anomalies).items():
        i = idx.get(t)
        if i is not None:
            layers["application"][i] = int(b["doc_count"])
    n_anom = sum(layers["application"])
    if n_anom:
        kinds["anomaly"] = n_anom
    return FindingsChart(keys, layers, kinds)
