"""The detector at work on the top master: confirmed readings in, anomalies out.

:class:`AnomalyService` is a relay subscriber (``Relay.subscribe``): it runs on the tap's
thread, feeds each confirmed reading to the :class:`~.detector.Detector` and, for each anomaly,
writes a document to ``<prefix>-anomalies-*`` (the explanation included) and fires a Salt event
``tributary/anomaly/<gateway>/<sensor>/<metric>`` on the top master's bus for the reactor.
Models are saved every ``persist_s`` and at stop, and restored at start.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from saltext.tributary.analysis.detector import Detector, DetectorConfig, Finding
from saltext.tributary.analysis.health import HealthMonitor
from saltext.tributary.analysis.health import event_tag as health_tag
from saltext.tributary.analysis.store import ModelStore
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

#: Anomaly documents kept for a retry while Elasticsearch refuses them (oldest dropped, counted).
PENDING_MAX = 10_000


@dataclass
class Sinks:
    """Where anomalies go: ``bulk(lines) -> response`` (Elasticsearch), ``fire(data, tag)``
    (the master bus), ``index(ts_ms) -> index name``, ``count(name, n)`` (relay counters)."""

    bulk: Callable[[str], Any] | None
    fire: Callable[[dict[str, Any], str], Any] | None
    index: Callable[[int], str]
    count: Callable[[str, int], None]


def anomaly_doc(gateway: str, site: Any, sensor: str, metric: str, ts_ms: int, f: Finding) -> dict:
    return {
        "@timestamp": ts_ms,
        "gateway": gateway,
        "site": site,
        "sensor": sensor,
        "metric": metric,
        **f.as_dict(),
        "detected_at": now_ms(),
    }


def event_tag(gateway: str, sensor: str, metric: str) -> str:
    return f"tributary/anomaly/{gateway}/{sensor}/{metric}"


class AnomalyService:
    """Detector + store + sinks; ``handle`` is the relay tap's handler."""

    def __init__(
        self,
        config: DetectorConfig,
        sinks: Sinks,
        store: ModelStore | None = None,
        max_series: int = 100_000,
        persist_s: float = 60.0,
        health: HealthMonitor | None = None,
        findings_index: Callable[[int], str] | None = None,
        on_anomaly: Callable[[dict[str, Any]], None] | None = None,
        on_finding: Callable[[dict[str, Any]], None] | None = None,
        point_interval_s: float = 0.0,
    ) -> None:
        self.health = health
        #: readings of one series closer together than this are scored as one point (ms;
        #: 0: every reading is a point)
        self.point_ms = int(point_interval_s * 1000)
        #: called with each anomaly / health transition (the engine feeds the alert rules)
        self.on_anomaly = on_anomaly
        self.on_finding = on_finding
        self.findings_index = findings_index or sinks.index
        self.detector = Detector(
            config, max_series=max_series, loader=store.get if store is not None else None
        )
        self.sinks = sinks
        self.store = store
        self.persist_s = persist_s
        self._dirty: set[Hashable] = set()
        self._last_save = time.monotonic()
        self._pending: deque[str] = deque()
        #: the site each gateway's readings last named
        self.sites: dict[str, Any] = {}
        #: (wall ms, gateway, site) of recent anomalies (the application layer of health)
        self.recent: deque[tuple[int, str, Any]] = deque(maxlen=10_000)
        #: saved models discarded by the store so far (reported as ``models_discarded``)
        self._discarded = 0
        if store is not None:
            for key, model in store.load(max_series):
                self.detector.models[key] = model
            self._count_discarded()
            if self.detector.models:
                log.info(
                    "tributary anomalies: %d series models restored", len(self.detector.models)
                )

    def handle(self, readings: Sequence[tuple]) -> None:
        """Score confirmed readings ``(gateway, site, epoch, relayed_at, reading)``.

        With ``point_interval_s``, the readings of one series that fall within that interval
        of the first of them (by their own timestamps) are scored as one point, their mean at
        the first one's time; the intervals still open when the batch ends are scored then.
        A series slower than that is scored reading by reading, exactly as without it."""
        model = self.detector.model
        cfg = self.detector.config
        dirty = self._dirty
        sites = self.sites
        found: list[dict[str, Any]] = []
        evicted = self.detector.evicted
        now = now_ms()
        step = self.point_ms
        #: per series, its interval still open: [first ts, sum, readings, model, gateway,
        #: site, sensor, metric]
        opened: dict[tuple[str, str, str], list[Any]] = {}
        b: list[Any] | None = None
        points = 0
        # a batch holds runs of readings of one series: the model is looked up once a run
        key: tuple[str, str, str] = ("", "", "")
        m = None
        last_site: Any = None
        for gateway, site, _epoch, _now, r in readings:
            sensor, metric = r["sensor"], r["metric"]
            if m is None or sensor != key[1] or metric != key[2] or gateway != key[0]:
                key = (gateway, sensor, metric)
                m = model(key)
                m.seen_ms = now
                dirty.add(key)
                sites[gateway] = site
                b = opened.get(key)
            elif site is not last_site:  # (a site is the same object throughout a batch)
                sites[gateway] = site
            last_site = site
            ts, value = r["ts_ms"], r["value"]
            if step:
                if b is not None:
                    if 0 <= ts - b[0] < step:
                        b[1] += value
                        b[2] += 1
                        continue
                    points += 1
                    self._point(b, cfg, found)  # the interval before this reading
                b = opened[key] = [ts, value, 1, m, gateway, site, sensor, metric]
                continue
            points += 1
            f = m.observe(ts, value, cfg)
            if f.anomaly:
                found.append(anomaly_doc(gateway, site, sensor, metric, ts, f))
        for b in opened.values():
            points += 1
            self._point(b, cfg, found)
        self.sinks.count("analysed_points", points)
        self.sinks.count("analysed", len(readings))
        if self.detector.evicted > evicted:
            self.sinks.count("series_evicted", self.detector.evicted - evicted)
        self._count_discarded()
        if found:
            self.sinks.count("anomalies", len(found))
            self.recent.extend((now, d["gateway"], d["site"]) for d in found)
            self._emit(found)
        elif self._pending:
            self._flush()
        if time.monotonic() - self._last_save > self.persist_s:
            self.save()
        self.check_health()

    @staticmethod
    def _point(b: list[Any], cfg: DetectorConfig, found: list[dict[str, Any]]) -> None:
        """Score one interval of a series (see :meth:`handle`)."""
        ts, total, n, m, gateway, site, sensor, metric = b
        f = m.observe(ts, total if n == 1 else total / n, cfg)
        if f.anomaly:
            doc = anomaly_doc(gateway, site, sensor, metric, ts, f)
            if n > 1:
                doc["readings"] = n  # the point is their mean
            found.append(doc)

    def _count_discarded(self) -> None:
        """Count saved models the store could not read (another detector version's)."""
        n = self.store.discarded if self.store is not None else 0
        if n > self._discarded:
            self.sinks.count("models_discarded", n - self._discarded)
            self._discarded = n

    def _emit(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            if self.on_anomaly is not None:
                self.on_anomaly(doc)
            if self.sinks.fire is not None:
                try:
                    self.sinks.fire(doc, event_tag(doc["gateway"], doc["sensor"], doc["metric"]))
                except Exception as exc:  # the bus is the master's: log, go on
                    log.warning("tributary anomalies: event not fired: %s", exc)
            meta = {"create": {"_index": self.sinks.index(doc["@timestamp"])}}
            self._pending.append(json.dumps(meta) + "\n" + json.dumps(doc, default=str))
        while len(self._pending) > PENDING_MAX:
            self._pending.popleft()
            self.sinks.count("anomalies_dropped", 1)
        self._flush()

    def _flush(self) -> None:
        if self.sinks.bulk is None or not self._pending:
            return
        lines = list(self._pending)
        try:
            resp = self.sinks.bulk("\n".join(lines) + "\n")
        except Exception as exc:  # kept for the next try
            log.warning("tributary anomalies: %d documents not indexed yet: %s", len(lines), exc)
            return
        self._pending.clear()
        failed = [
            i for i in (resp.get("items") or []) if next(iter(i.values())).get("status", 0) >= 300
        ]
        if failed:
            self.sinks.count("anomalies_unindexed", len(failed))
            log.error("tributary anomalies: %d documents refused: %s", len(failed), failed[:1])

    def tick(self) -> None:
        """Timers while no reading arrives: retry pending documents, save models when due,
        evaluate health when due."""
        if self._pending:
            self._flush()
        if time.monotonic() - self._last_save > self.persist_s:
            self.save()
        self.check_health()

    def check_health(self, force: bool = False) -> list[dict[str, Any]]:
        """Evaluate the health layers (every ``check_s``); transitions are indexed and fired."""
        h = self.health
        if h is None or (not force and time.monotonic() - h.last_check < h.config.check_s):
            return []
        h.last_check = time.monotonic()
        docs = h.check(self.detector.models.items(), self.sites, now_ms())
        for doc in docs:
            if self.on_finding is not None:
                self.on_finding(doc)
            if self.sinks.fire is not None:
                try:
                    self.sinks.fire(doc, health_tag(doc))
                except Exception as exc:  # the bus is the master's: log, go on
                    log.warning("tributary health: event not fired: %s", exc)
            meta = {"create": {"_index": self.findings_index(doc["@timestamp"])}}
            self._pending.append(json.dumps(meta) + "\n" + json.dumps(doc, default=str))
            self.sinks.count(f"findings_{doc['state']}", 1)
        if docs:
            self._flush()
        return docs

    def save(self) -> int:
        """Write the models seen since the last save."""
        self._last_save = time.monotonic()
        if self.store is None or not self._dirty:
            return 0
        models = self.detector.models
        keys = [k for k in self._dirty if k in models]
        self._dirty.clear()
        return self.store.save((k, models[k]) for k in keys)

    def close(self) -> None:
        self._flush()
        self.save()
        if self.store is not None:
            self.store.close()
        if self.health is not None:
            self.health.book.close()
