"""Alerts at work on the top master: rules evaluated on confirmed readings (the relay's tap),
on the detector's anomalies and on health findings; every transition indexed in
``<prefix>-alerts-*`` and, unless silenced, fired as ``tributary/alert/<rule>/<state>`` on the
top master's bus, where Salt's reactor acts on it (``salt/reactor/``).

Rules on grains: ``facts()`` returns each gateway's last verified heartbeat (the relay keeps
them, signed by the gateway's own key, also through syndics); its ``grains`` are given to the
engine every ``grains_s`` seconds."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saltext.tributary.reaction.alerts import AlertBook, RuleEngine, event_tag
from saltext.tributary.reaction.rules import Rule, uses_grains
from saltext.tributary.util import clock

log = logging.getLogger(__name__)

PENDING_MAX = 10_000


class AlertService:
    def __init__(
        self,
        rules: Sequence[Rule],
        book: AlertBook,
        bulk: Callable[[str], Any] | None,
        fire: Callable[[dict[str, Any], str], Any] | None,
        index: Callable[[int], str],
        count: Callable[[str, int], None],
        tick_s: float = 1.0,
        facts: Callable[[], Mapping[str, Any]] | None = None,
        grains_s: float = 5.0,
    ) -> None:
        self.engine = RuleEngine(rules, book)
        self.facts = facts if uses_grains(rules) else None
        self.grains_s = grains_s
        self._grains_at = 0.0
        self.bulk = bulk
        self.fire = fire
        self.index = index
        self.count = count
        self.tick_s = tick_s
        self._last_tick = 0.0
        self._pending: deque[str] = deque()

    def readings(self, readings: Sequence[tuple]) -> None:
        self.refresh_grains()
        self._out(self.engine.readings(readings, clock.now_ms()))
        self.tick()

    def anomaly(self, doc: Mapping[str, Any]) -> None:
        self._out(self.engine.anomaly(doc))

    def finding(self, doc: Mapping[str, Any]) -> None:
        self._out(self.engine.finding(doc))

    def refresh_grains(self, force: bool = False) -> None:
        """Each gateway's heartbeat grains to the engine (every ``grains_s``)."""
        if self.facts is None or (not force and time.monotonic() - self._grains_at < self.grains_s):
            return
        self._grains_at = time.monotonic()
        try:
            facts = self.facts()
        except Exception as exc:  # the relay spool may be busy: the next refresh tries again
            log.warning("tributary alerts: gateway grains not read: %s", exc)
            return
        grains = {gw: f.get("grains") for gw, f in facts.items() if isinstance(f, Mapping)}
        if self.engine.set_grains(grains):
            self.count("alerts_grains_refreshed", 1)

    def tick(self) -> None:
        if time.monotonic() - self._last_tick < self.tick_s:
            return
        self._last_tick = time.monotonic()
        self._out(self.engine.tick(clock.now_ms()))
        if self._pending:
            self._flush()

    def _out(self, docs: list[dict[str, Any]]) -> None:
        if not docs:
            return
        for doc in docs:
            self.count(f"alerts_{doc['state']}", 1)
            if self.fire is not None and not doc.get("silenced") and doc["state"] != "pending":
                try:
                    self.fire(doc, event_tag(doc))
                except Exception as exc:  # the bus is the master's: log, go on
                    log.warning("tributary alerts: event not fired: %s", exc)
            meta = {"create": {"_index": self.index(doc["@timestamp"])}}
            self._pending.append(json.dumps(meta) + "\n" + json.dumps(doc, default=str))
        while len(self._pending) > PENDING_MAX:
            self._pending.popleft()
            self.count("alerts_unindexed", 1)
        self._flush()

    def _flush(self) -> None:
        if self.bulk is None or not self._pending:
            return
        lines = list(self._pending)
        try:
            self.bulk("\n".join(lines) + "\n")
        except Exception as exc:  # kept for the next try
            log.warning("tributary alerts: %d documents not indexed yet: %s", len(lines), exc)
            return
        self._pending.clear()

    def close(self) -> None:
        self._flush()
        if self.engine.book is not None:
            self.engine.book.close()
