"""What the runner shows of the detector: anomalies found, and what a model expects now."""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections.abc import Mapping
from typing import Any

from saltext.tributary.analysis.detector import DetectorConfig
from saltext.tributary.analysis.store import ModelStore

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def span_ms(text: Any) -> int:
    """``"24h"``, ``"30m"``, ``"7d"``, ``"2w"`` or a number of seconds, in ms (ValueError)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text * 1000)
    m = _SPAN.match(str(text))
    if not m:
        raise ValueError(f"since: {text!r} is not like 30m, 24h, 7d or 2w")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


def anomalies_query(
    now_ms: int,
    since: Any = "24h",
    gateway: str | None = None,
    site: str | None = None,
    sensor: str | None = None,
    size: int = 100,
) -> dict[str, Any]:
    """The Elasticsearch search for recent anomalies (newest first)."""
    must: list[dict[str, Any]] = [
        {"range": {"@timestamp": {"gte": now_ms - span_ms(since), "format": "epoch_millis"}}}
    ]
    for field, value in (("gateway", gateway), ("site", site), ("sensor", sensor)):
        if value:
            must.append({"wildcard": {field: {"value": str(value)}}})
    return {
        "size": max(1, min(int(size), 10_000)),
        "sort": [{"@timestamp": "desc"}],
        "query": {"bool": {"filter": must}},
    }


def anomalies_from(resp: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [h.get("_source", {}) for h in (resp.get("hits") or {}).get("hits", [])]


def model_view(
    store: ModelStore, gateway: str, series: str, now_ms: int, config: DetectorConfig
) -> dict[str, Any]:
    """What the saved model of ``gateway``'s ``sensor/metric`` expects now, and why."""
    sensor, sep, metric = str(series).rpartition("/")
    if not sep:
        return {"result": False, "error": f"series {series!r} is not <sensor>/<metric>"}
    model = store.get((gateway, sensor, metric))
    if model is None:
        return {
            "result": False,
            "error": f"no model saved for {gateway} {sensor}/{metric} (not seen yet, or the"
            " relay has not saved its models since: they are saved every persist_s)",
        }
    return {
        "result": True,
        "gateway": gateway,
        "sensor": sensor,
        "metric": metric,
        "at_ms": now_ms,
        **model.expect(now_ms, config),
        "last_seen_ms": model.last_ts,
        "usual_interval_s": round(model.dt / 1000, 3) if model.dt else None,
        "state_bytes": model.size(),
    }


def health_view(
    findings: list[dict[str, Any]],
    facts: Mapping[str, Mapping[str, Any]],
    anomalies_by_site: Mapping[Any, int],
    now_ms: int,
    heartbeat_s: float,
    overdue_factor: float,
    detail: bool = True,
    site: str | None = None,
    oldest: int = 10,
) -> dict[str, Any]:
    """``salt-run tributary.health``: per site, the device, population and application layers
    at a glance: gateways and how many report, the state, open findings counted per layer and
    kind, the anomalies of the last hour; the ``oldest`` open findings of the fleet. With
    ``detail`` (or for the sites matching the ``site`` glob) each site also lists its open
    findings (``device``, ``population``) with how long each has been open."""
    sites: dict[str, dict[str, Any]] = {}
    lists: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def site_entry(name: Any) -> dict[str, Any]:
        key = str(name)
        if key not in sites:
            sites[key] = {
                "gateways": 0,
                "gateways_reporting": 0,
                "open": {"device": {}, "population": {}},
                "anomalies_last_hour": 0,
            }
            lists[key] = {"device": [], "population": []}
        return sites[key]

    for hb in facts.values():
        e = site_entry(hb.get("site"))
        e["gateways"] += 1
        age_s = (now_ms - int(hb.get("received_ms") or 0)) / 1000
        e["gateways_reporting"] += age_s <= overdue_factor * heartbeat_s
    shown = []
    for f in findings:
        e = site_entry(f.get("site"))
        by_kind = e["open"][f["layer"]]
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
        item = {k: f[k] for k in ("kind", "gateway", "sensor", "metric", "detail") if f.get(k)} | {
            "open_s": round((now_ms - f["raised_ms"]) / 1000, 1)
        }
        lists[str(f.get("site"))][f["layer"]].append(item)
        shown.append((f["raised_ms"], str(f.get("site")), f["layer"], item))
    for name, n in anomalies_by_site.items():
        site_entry(name)["anomalies_last_hour"] = n
    for e in sites.values():
        e["state"] = (
            "outage"
            if e["open"]["population"].get("site_outage")
            else ("degraded" if e["open"]["device"] or e["open"]["population"] else "ok")
        )
    picked = {
        name: e | lists[name] if detail or site else e
        for name, e in sorted(sites.items())
        if not site or fnmatch.fnmatchcase(name, str(site))
    }
    return {
        "result": True,
        "fleet": {
            "sites": len(sites),
            "states": {
                s: sum(1 for e in sites.values() if e["state"] == s)
                for s in ("outage", "degraded", "ok")
            },
            "gateways": sum(e["gateways"] for e in sites.values()),
            "gateways_reporting": sum(e["gateways_reporting"] for e in sites.values()),
            "open_findings": len(findings),
            "sites_in_outage": sorted(s for s, e in sites.items() if e["state"] == "outage"),
            "anomalies_last_hour": sum(anomalies_by_site.values()),
        },
        "oldest": [
            {"site": name, "layer": layer, **item}
            for _, name, layer, item in heapq.nsmallest(
                max(0, int(oldest)), shown, key=lambda x: (x[0], x[1], x[2])
            )
        ],
        "sites": picked,
    }


def anomalies_by_site_query(now_ms: int, span: Any = "1h") -> dict[str, Any]:
    """Anomalies per site over ``span`` (an aggregation: no documents are fetched)."""
    return {
        "size": 0,
        "query": {
            "range": {"@timestamp": {"gte": now_ms - span_ms(span), "format": "epoch_millis"}}
        },
        "aggs": {"sites": {"terms": {"field": "site", "size": 1000, "missing": "None"}}},
    }
