"""Health in three layers, evaluated on the top master from what it already receives.

* **Device**: per gateway, from its last signed heartbeat (the relay keeps it): ``gateway_silent``
  (no heartbeat for ``overdue_factor`` heartbeat intervals), ``backlog_growing`` (its spool's
  unsent readings grew over the last ``backlog_n`` heartbeats), ``dropping`` (its spool dropped
  readings since the previous heartbeat), ``broker_disconnected`` (its site broker is not
  connected), ``clock_skew`` (its clock is more than ``skew_s`` off the top master's). Per
  sensor, from its detector model: ``sensor_silent`` (nothing for ``silent_factor`` of its
  usual interval), ``sensor_stuck`` (the same value ``stuck_n`` times in a row, where it
  normally varies).
* **Population**: per site, ``site_outage`` when at least ``outage_min`` gateways of a site
  are silent at once (it replaces their ``gateway_silent`` findings: one site outage, not N
  device failures), and ``sensor_departs`` for a sensor whose level departs from its siblings
  (same metric, same site, at least three of them) by more than ``depart_k`` median absolute
  deviations.
* **Application**: the anomalies the detector found (counted per site in the view).

Findings have a lifecycle (:class:`FindingBook`): raised once, kept open while the condition
holds, cleared when it stops, with durations; each transition is returned for indexing (with
its ``kind``) and for a Salt event ``tributary/health/<kind>/<raised|cleared>``.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.util import sqlite

#: A series: (gateway, sensor, metric).
SeriesKey = tuple[str, str, str]

LAYERS = {
    "gateway_silent": "device",
    "backlog_growing": "device",
    "dropping": "device",
    "broker_disconnected": "device",
    "clock_skew": "device",
    "sensor_silent": "device",
    "sensor_stuck": "device",
    "site_outage": "population",
    "sensor_departs": "population",
}


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_s: float = 30.0  # the tributary_health beacon's interval
    overdue_factor: float = 3.0
    silent_factor: float = 5.0
    min_silent_s: float = 60.0  # a sensor is never silent sooner than this
    stuck_n: int = 30
    skew_s: float = 120.0
    backlog_n: int = 3
    outage_min: int = 2
    depart_k: float = 6.0
    check_s: float = 15.0


@dataclass
class Condition:
    """One unhealthy condition now: what, about whom, why."""

    kind: str
    site: Any
    gateway: str | None = None
    sensor: str | None = None
    metric: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "|".join(
            str(x) for x in (self.kind, self.site, self.gateway, self.sensor, self.metric)
        )


def device_conditions(
    facts: Mapping[str, Mapping[str, Any]],
    history: dict[str, deque],
    now_ms: int,
    cfg: HealthConfig,
) -> list[Condition]:
    """Per gateway, from its last heartbeat (``received_ms`` is when the relay got it);
    ``history`` keeps the last heartbeats' (received_ms, unsent, dropped) per gateway."""
    out = []
    for gw, hb in facts.items():
        site = hb.get("site")
        received = int(hb.get("received_ms") or 0)
        past = history.setdefault(gw, deque(maxlen=max(cfg.backlog_n, 2)))
        sample = (received, int(hb.get("spool_unsent") or 0), int(hb.get("dropped") or 0))
        if not past or past[-1][0] != received:
            past.append(sample)
        age_s = (now_ms - received) / 1000
        if age_s > cfg.overdue_factor * cfg.heartbeat_s:
            out.append(
                Condition("gateway_silent", site, gw, detail={"last_heartbeat_s": round(age_s, 1)})
            )
            continue
        unsent = [p[1] for p in past]
        if len(unsent) >= cfg.backlog_n and all(a < b for a, b in itertools.pairwise(unsent)):
            out.append(Condition("backlog_growing", site, gw, detail={"unsent": unsent}))
        if len(past) >= 2 and past[-1][2] > past[-2][2]:
            out.append(
                Condition("dropping", site, gw, detail={"dropped": past[-1][2] - past[-2][2]})
            )
        if hb.get("broker") == "disconnected" or hb.get("broker_connected") is False:
            out.append(
                Condition("broker_disconnected", site, gw, detail={"broker": hb.get("broker")})
            )
        ts = hb.get("ts_ms")
        if isinstance(ts, int) and received and abs(ts - received) > cfg.skew_s * 1000:
            out.append(
                Condition(
                    "clock_skew", site, gw, detail={"skew_s": round((ts - received) / 1000, 1)}
                )
            )
    return out


def sensor_conditions(
    models: Iterable[tuple[SeriesKey, Any]],
    sites: Mapping[str, Any],
    now_ms: int,
    cfg: HealthConfig,
) -> list[Condition]:
    """Per sensor, from detector models (``seen_ms``: when its last reading arrived)."""
    out = []
    for key, m in models:
        gw, sensor, metric = key
        site = sites.get(gw)
        if m.seen_ms and m.dt:
            limit_s = max(cfg.silent_factor * m.dt / 1000, cfg.min_silent_s)
            quiet_s = (now_ms - m.seen_ms) / 1000
            if quiet_s > limit_s:
                out.append(
                    Condition(
                        "sensor_silent",
                        site,
                        gw,
                        sensor,
                        metric,
                        {"silent_s": round(quiet_s, 1), "usual_interval_s": round(m.dt / 1000, 3)},
                    )
                )
                continue
        if m.same >= cfg.stuck_n and m.var > 1e-12 * (m.mean * m.mean + 1):
            out.append(
                Condition(
                    "sensor_stuck",
                    site,
                    gw,
                    sensor,
                    metric,
                    {"value": m.last_value, "repeats": m.same},
                )
            )
    return out


def population_conditions(
    device: list[Condition],
    models: Iterable[tuple[SeriesKey, Any]],
    sites: Mapping[str, Any],
    gateways_by_site: Mapping[Any, set[str]],
    cfg: HealthConfig,
) -> tuple[list[Condition], list[Condition]]:
    """(population conditions, device conditions left once outages absorbed theirs)."""
    silent: dict[Any, set[str]] = {}
    for c in device:
        if c.kind == "gateway_silent":
            silent.setdefault(c.site, set()).add(str(c.gateway))
    out = []
    absorbed: set[str] = set()
    for site, gws in silent.items():
        if site is not None and len(gws) >= cfg.outage_min:
            total = len(gateways_by_site.get(site, gws))
            out.append(
                Condition(
                    "site_outage", site, detail={"silent_gateways": sorted(gws), "gateways": total}
                )
            )
            absorbed |= gws
    kept = [c for c in device if not (c.kind == "gateway_silent" and c.gateway in absorbed)]
    groups: dict[tuple[Any, str], list[tuple[SeriesKey, float]]] = {}
    for key, m in models:
        gw, _sensor, metric = key
        if m.n >= 50:
            groups.setdefault((sites.get(gw), metric), []).append((key, m.mean))
    for (site, metric), members in groups.items():
        if site is None or len(members) < 3:
            continue
        levels = [v for _, v in members]
        med = statistics.median(levels)
        mad = statistics.median(abs(v - med) for v in levels) or 1e-9
        for (gw, sensor, _m), v in members:
            if abs(v - med) > cfg.depart_k * mad and abs(v - med) > 1e-6 * (abs(med) + 1):
                out.append(
                    Condition(
                        "sensor_departs",
                        site,
                        gw,
                        sensor,
                        metric,
                        {
                            "level": round(v, 6),
                            "siblings_median": round(med, 6),
                            "siblings": len(members),
                        },
                    )
                )
    return out, kept


class FindingBook:
    """Open findings and their transitions (SQLite beside the detector's models)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS findings (key TEXT PRIMARY KEY, kind TEXT NOT NULL,
        layer TEXT NOT NULL, site TEXT, gateway TEXT, sensor TEXT, metric TEXT,
        detail TEXT NOT NULL, raised_ms INTEGER NOT NULL);
    """

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite.connect(path)
        self.db.executescript(self.SCHEMA)

    def update(self, now: list[Condition], now_ms: int) -> list[dict[str, Any]]:
        """Raise what is new, clear what ended; returns the transitions (documents)."""
        current = {c.key: c for c in now}
        open_rows = {
            r[0]: r
            for r in self.db.execute(
                "SELECT key, kind, layer, site, gateway, sensor, metric, detail, raised_ms"
                " FROM findings"
            )
        }
        out = []
        with sqlite.transaction(self.db):
            for key, c in current.items():
                if key in open_rows:
                    continue
                self.db.execute(
                    "INSERT INTO findings VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        key,
                        c.kind,
                        LAYERS[c.kind],
                        None if c.site is None else str(c.site),
                        c.gateway,
                        c.sensor,
                        c.metric,
                        json.dumps(c.detail, default=str),
                        now_ms,
                    ),
                )
                out.append(
                    _doc(
                        c.kind,
                        "raised",
                        c.site,
                        c.gateway,
                        c.sensor,
                        c.metric,
                        c.detail,
                        now_ms,
                        now_ms,
                    )
                )
            for key, row in open_rows.items():
                if key in current:
                    continue
                self.db.execute("DELETE FROM findings WHERE key=?", (key,))
                _, kind, _layer, site, gw, sensor, metric, detail, raised = row
                out.append(
                    _doc(
                        kind,
                        "cleared",
                        site,
                        gw,
                        sensor,
                        metric,
                        json.loads(detail),
                        raised,
                        now_ms,
                    )
                )
        return out

    def open(self) -> list[dict[str, Any]]:
        return [
            {
                "kind": kind,
                "layer": layer,
                "site": site,
                "gateway": gw,
                "sensor": sensor,
                "metric": metric,
                "detail": json.loads(detail),
                "raised_ms": raised,
            }
            for kind, layer, site, gw, sensor, metric, detail, raised in self.db.execute(
                "SELECT kind, layer, site, gateway, sensor, metric, detail, raised_ms"
                " FROM findings ORDER BY raised_ms"
            )
        ]

    def close(self) -> None:
        self.db.close()


def _doc(kind, state, site, gw, sensor, metric, detail, raised_ms, now_ms) -> dict[str, Any]:
    doc = {
        "@timestamp": now_ms,
        "kind": kind,
        "layer": LAYERS.get(kind, "device"),
        "state": state,
        "site": site,
        "gateway": gw,
        "sensor": sensor,
        "metric": metric,
        "detail": detail,
        "raised_at": raised_ms,
    }
    if state == "cleared":
        doc["duration_s"] = round((now_ms - raised_ms) / 1000, 1)
    return doc


def event_tag(doc: Mapping[str, Any]) -> str:
    return f"tributary/health/{doc['kind']}/{doc['state']}"


class HealthMonitor:
    """Evaluates the three layers every ``check_s`` and keeps the findings' lifecycle."""

    def __init__(
        self,
        config: HealthConfig,
        facts: Any,
        book: FindingBook,
    ) -> None:
        #: ``facts() -> {gateway: last heartbeat facts}`` (the relay's heartbeat_facts)
        self.facts = facts
        self.config = config
        self.book = book
        self.history: dict[str, deque] = {}
        self.last_check = 0.0

    def check(
        self, models: Iterable[tuple[SeriesKey, Any]], sites: Mapping[str, Any], now_ms: int
    ) -> list[dict[str, Any]]:
        """The transitions since the last check (raised / cleared finding documents)."""
        cfg = self.config
        facts = self.facts()
        models = list(models)
        by_site: dict[Any, set[str]] = {}
        for gw, hb in facts.items():
            by_site.setdefault(hb.get("site"), set()).add(gw)
        device = device_conditions(facts, self.history, now_ms, cfg)
        device += sensor_conditions(models, sites, now_ms, cfg)
        population, device = population_conditions(device, models, sites, by_site, cfg)
        return self.book.update(device + population, now_ms)
