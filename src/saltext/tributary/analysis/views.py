"""What the runner shows of the detector: anomalies found, and what a model expects now."""

from __future__ import annotations

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
