"""Alerts: one per (rule, series), with a lifecycle, persisted, silenced on request.

``pending`` (the condition holds, for less than ``for_s``) -> ``firing`` (notified) ->
``resolved`` (the clear condition held ``clear_for_s``; notified) and back to nothing.
Threshold and rate rules are judged in the readings' own time (so a sensor that uploads a
backlog is judged as it was); absence in the top master's time. Every transition is returned
as a document for ``tributary-alerts-*`` and, unless the alert is silenced, as a Salt event
``tributary/alert/<rule>/<state>``. A firing alert is notified again every ``renotify_s``.

Flap damping (a rule's ``flap``): every ``firing`` and ``resolved`` of an alert is counted; the
one that makes ``changes`` within ``window_s`` is replaced by ``flapping`` (notified once). A
flapping alert follows its condition silently; once the condition has not changed for
``stable_s`` (in the readings' time, or the top master's when no reading comes) it settles:
``firing`` if the condition holds, else ``resolved`` (each with ``flapped: true``), and its
count starts again. The counts are persisted with the alerts.

Grains: rules may match on a gateway's grains (``match.grains``); :meth:`RuleEngine.set_grains`
gives the engine what each gateway's last verified heartbeat carried (bounded here again:
at most ``MAX_GRAINS`` paths of scalars or short lists, else ignored).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from saltext.tributary.reaction.rules import MAX_GRAINS, Rule, clears, fires, rate_fires
from saltext.tributary.util import sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (key TEXT PRIMARY KEY, state TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silences (id INTEGER PRIMARY KEY, rule TEXT NOT NULL,
    gateway TEXT NOT NULL, until_ms INTEGER NOT NULL, comment TEXT);
CREATE TABLE IF NOT EXISTS flaps (key TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_history (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL,
    body TEXT NOT NULL);
"""
HISTORY_MAX = 1000
#: A grain value kept for matching: a scalar, or a list of at most this many scalars.
GRAIN_LIST_MAX = 256
GRAIN_STR_MAX = 1024


class AlertBook:
    """Alert states, silences and recent transitions in SQLite."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite.connect(path)
        self.db.executescript(SCHEMA)

    def load(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(b) for k, b in self.db.execute("SELECT key, body FROM alerts")}

    def save(self, key: str, alert: dict[str, Any] | None) -> None:
        if alert is None:
            self.db.execute("DELETE FROM alerts WHERE key=?", (key,))
        else:
            self.db.execute(
                "INSERT OR REPLACE INTO alerts VALUES (?,?,?)",
                (key, alert["state"], json.dumps(alert, default=str)),
            )

    def load_flaps(self) -> dict[str, list[int]]:
        return {k: json.loads(b) for k, b in self.db.execute("SELECT key, body FROM flaps")}

    def save_flaps(self, key: str, changes: list[int] | None) -> None:
        if not changes:
            self.db.execute("DELETE FROM flaps WHERE key=?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO flaps VALUES (?,?)", (key, json.dumps(changes)))

    def record(self, doc: Mapping[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO alert_history (at_ms, body) VALUES (?,?)",
            (doc["@timestamp"], json.dumps(doc, default=str)),
        )
        self.db.execute(
            "DELETE FROM alert_history WHERE id <= (SELECT MAX(id) FROM alert_history) - ?",
            (HISTORY_MAX,),
        )

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return [
            json.loads(b)
            for (b,) in self.db.execute(
                "SELECT body FROM alert_history ORDER BY id DESC LIMIT ?", (limit,)
            )
        ]

    def silence(self, rule: str, gateway: str, until_ms: int, comment: str = "") -> int:
        cur = self.db.execute(
            "INSERT INTO silences (rule, gateway, until_ms, comment) VALUES (?,?,?,?)",
            (rule, gateway, until_ms, comment),
        )
        return int(cur.lastrowid or 0)

    def silences(self, now_ms: int) -> list[dict[str, Any]]:
        self.db.execute("DELETE FROM silences WHERE until_ms < ?", (now_ms,))
        return [
            {"id": i, "rule": r, "gateway": g, "until_ms": u, "comment": c}
            for i, r, g, u, c in self.db.execute("SELECT * FROM silences ORDER BY id")
        ]

    def close(self) -> None:
        self.db.close()


def _key(rule: str, gateway: Any, sensor: Any, metric: Any) -> str:
    return f"{rule}|{gateway}|{sensor}|{metric}"


def _scalar(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, (bool, int, float))
        or (isinstance(v, str) and len(v) <= GRAIN_STR_MAX)
    )


def bounded_grains(grains: Any) -> dict[str, Any] | None:
    """What a heartbeat's ``grains`` may hold, or None: at most ``MAX_GRAINS`` paths, each a
    scalar or a list of at most ``GRAIN_LIST_MAX`` scalars (the gateway bounds it too)."""
    if not isinstance(grains, Mapping) or len(grains) > MAX_GRAINS:
        return None
    out: dict[str, Any] = {}
    for path, val in grains.items():
        if not isinstance(path, str):
            return None
        if isinstance(val, list):
            if len(val) > GRAIN_LIST_MAX or not all(_scalar(v) for v in val):
                return None
        elif not _scalar(val):
            return None
        out[path] = val
    return out


class RuleEngine:
    """Evaluates rules; returns transition documents (see the module docstring)."""

    def __init__(self, rules: Sequence[Rule], book: AlertBook | None = None) -> None:
        self.rules = list(rules)
        self.book = book
        self.alerts: dict[str, dict[str, Any]] = book.load() if book else {}
        flapping = {r.name for r in self.rules if r.flap is not None}
        #: per alert key of a rule with ``flap``: times of its recent state changes
        self._flaps: dict[str, list[int]] = {
            k: v
            for k, v in (book.load_flaps() if book else {}).items()
            if k.split("|", 1)[0] in flapping
        }
        #: per gateway: the grains its last verified heartbeat carried
        self._grains: dict[str, dict[str, Any]] = {}
        #: the top master's time of the call being evaluated (flap stability without readings)
        self._now = 0
        #: per (gateway, sensor, metric): (ts_ms, value) of the previous reading (rates)
        self._prev: dict[tuple[Any, Any, Any], tuple[int, float]] = {}
        #: per alert key of an absence rule: wall ms of the last reading
        self._seen: dict[str, tuple[int, Any]] = {}
        self._silences: list[dict[str, Any]] = []
        self._silences_at = 0
        self._value_rules = [r for r in self.rules if r.when.kind() in ("threshold", "rate")]
        self._absent_rules = [r for r in self.rules if r.when.kind() == "absent"]
        self._anomaly_rules = [r for r in self.rules if r.when.kind() == "anomaly"]
        self._finding_rules = [r for r in self.rules if r.when.kind() == "finding"]
        #: per series: the value and absence rules that match it (rules are static)
        self._matching: dict[tuple[Any, Any, Any, Any], tuple[list[Rule], list[Rule]]] = {}

    # -- inputs ---------------------------------------------------------------------------
    def set_grains(self, by_gateway: Mapping[str, Any]) -> bool:
        """Each gateway's grains (from its heartbeat); True when something changed."""
        grains = {}
        for gw, g in by_gateway.items():
            b = bounded_grains(g)
            if b:
                grains[str(gw)] = b
        if grains == self._grains:
            return False
        changed = {
            gw
            for gw in grains.keys() | self._grains.keys()
            if grains.get(gw) != self._grains.get(gw)
        }
        self._grains = grains
        for skey in [k for k in self._matching if k[0] in changed]:  # matched again
            del self._matching[skey]
        return True

    def readings(self, readings: Iterable[tuple], now_ms: int) -> list[dict[str, Any]]:
        """Confirmed readings ``(gateway, site, epoch, relayed_at, reading)``."""
        out: list[dict[str, Any]] = []
        if not (self._value_rules or self._absent_rules):
            return out
        self._now = now_ms
        grains = self._grains
        for gateway, site, _epoch, _now, r in readings:
            sensor, metric, ts, value = r["sensor"], r["metric"], r["ts_ms"], r["value"]
            skey = (gateway, site, sensor, metric)
            hit = self._matching.get(skey)
            if hit is None:
                if len(self._matching) > 200_000:
                    self._matching.clear()
                g = grains.get(gateway)
                hit = self._matching[skey] = (
                    [x for x in self._value_rules if x.match.matches(*skey, g)],
                    [x for x in self._absent_rules if x.match.matches(*skey, g)],
                )
            values, absents = hit
            prev = self._prev.get((gateway, sensor, metric))
            self._prev[(gateway, sensor, metric)] = (ts, value)
            for rule in absents:
                key = _key(rule.name, gateway, sensor, metric)
                self._seen[key] = (now_ms, site)
                if key in self.alerts:
                    out += self._clear(rule, key, ts, value, now_ms, hold=False)
            for rule in values:
                w = rule.when
                key = _key(rule.name, gateway, sensor, metric)
                if w.kind() == "threshold":
                    on, off = fires(w, value), clears(w, value)
                else:
                    if prev is None or ts <= prev[0]:
                        continue
                    rate = (value - prev[1]) / ((ts - prev[0]) / 1000)
                    on, off = rate_fires(w, rate), not rate_fires(w, rate)
                if on:
                    out += self._hold(rule, key, (gateway, site, sensor, metric), ts, value)
                elif off and key in self.alerts:
                    out += self._clear(rule, key, ts, value, now_ms)
        return out

    def anomaly(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """An anomaly document from the detector (fires at once; resolves on renotify)."""
        out = []
        subject = (doc.get("gateway"), doc.get("site"), doc.get("sensor"), doc.get("metric"))
        grains = self._grains.get(str(subject[0]))
        for rule in self._anomaly_rules:
            if rule.match.matches(*subject, grains) and float(doc.get("score", 0)) >= (
                rule.when.anomaly_score or 0
            ):
                key = _key(rule.name, subject[0], subject[2], subject[3])
                out += self._hold(rule, key, subject, int(doc["@timestamp"]), doc.get("value"))
        return out

    def finding(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A health finding transition (``raised`` fires, ``cleared`` resolves)."""
        out = []
        subject = (doc.get("gateway"), doc.get("site"), doc.get("sensor"), doc.get("metric"))
        grains = self._grains.get(str(subject[0]))
        self._now = int(doc["@timestamp"])
        for rule in self._finding_rules:
            if doc.get("kind") != rule.when.finding or not rule.match.matches(
                *(s if s is not None else "" for s in subject), grains
            ):
                continue
            key = _key(rule.name, subject[0], subject[2], subject[3])
            ts = int(doc["@timestamp"])
            if doc.get("state") == "raised":
                out += self._hold(rule, key, subject, ts, None)
            elif key in self.alerts:
                out += self._clear(rule, key, ts, None, ts, hold=False)
        return out

    def tick(self, now_ms: int) -> list[dict[str, Any]]:
        """Absence, anomaly resolution and re-notification (call every few seconds)."""
        out: list[dict[str, Any]] = []
        self._now = now_ms
        for key, (seen, site) in list(self._seen.items()):
            rule_name, gateway, sensor, metric = key.split("|", 3)
            rule = next((r for r in self._absent_rules if r.name == rule_name), None)
            if rule is None or rule.when.absent_s is None:
                continue
            if now_ms - seen > rule.when.absent_s * 1000:
                if key not in self.alerts:
                    subject = (gateway, site, sensor, metric)
                    out += self._fire(rule, key, subject, now_ms, None, now_ms)
                elif self.alerts[key]["state"] == "flapping":
                    out += self._flap_cond(rule, key, self.alerts[key], True, now_ms, None)
        for key, a in list(self.alerts.items()):
            rule = next((r for r in self.rules if r.name == a["rule"]), None)
            if rule is None:  # the rule was removed from the config
                self.alerts.pop(key)
                if self.book:
                    self.book.save(key, None)
                continue
            if a["state"] == "flapping":
                # stable on the master's clock (or flap damping removed from the rule): settle
                stable_ms = now_ms - int(a.get("stable_wall") or now_ms)
                if rule.flap is None or stable_ms >= rule.flap.stable_s * 1000:
                    out += self._settle(rule, key, a, now_ms)
                continue
            if a["state"] == "firing" and rule.when.kind() == "anomaly":
                if now_ms - a["since"] > max(rule.renotify_s, 600) * 1000:
                    out += self._clear(rule, key, now_ms, None, now_ms, hold=False)
                continue
            if (
                a["state"] == "firing"
                and rule.renotify_s
                and (now_ms - a["notified"] >= rule.renotify_s * 1000)
            ):
                a["notified"] = now_ms
                out.append(self._doc(rule, a, "firing", now_ms, renotify=True))
        for key, changes in list(self._flaps.items()):  # counts that fell out of their window
            rule = next((r for r in self.rules if r.name == key.split("|", 1)[0]), None)
            stale = (
                rule is None or rule.flap is None or now_ms - changes[-1] > rule.flap.window_s * 1e3
            )
            if stale and self.alerts.get(key, {}).get("state") != "flapping":
                self._flaps.pop(key)
                if self.book is not None:
                    self.book.save_flaps(key, None)
        return out

    # -- lifecycle ------------------------------------------------------------------------
    def _hold(self, rule: Rule, key: str, subject: tuple, ts: int, value: Any) -> list[dict]:
        a = self.alerts.get(key)
        if a is None:
            if rule.when.for_s <= 0:
                return self._fire(rule, key, subject, ts, value, ts)
            a = self.alerts[key] = self._new(rule, subject, "pending", ts, value)
            self._persist(key, a)
            return [self._doc(rule, a, "pending", ts)]
        if a["state"] == "flapping":
            return self._flap_cond(rule, key, a, True, ts, value)
        a["value"] = value
        a.pop("clearing_since", None)
        if a["state"] == "pending" and ts - a["since"] >= rule.when.for_s * 1000:
            return self._fire(rule, key, subject, ts, value, a["since"])
        return []

    def _fire(
        self, rule: Rule, key: str, subject: tuple, ts: int, value: Any, since: int
    ) -> list[dict]:
        a = self.alerts.get(key) or self._new(rule, subject, "firing", since, value)
        a.update(state="firing", value=value, notified=ts, fired=ts)
        self.alerts[key] = a
        if self._flapped(rule, key, a, True, ts):
            return [self._doc(rule, a, "flapping", ts)]
        self._persist(key, a)
        return [self._doc(rule, a, "firing", ts)]

    def _clear(
        self, rule: Rule, key: str, ts: int, value: Any, now_ms: int, hold: bool = True
    ) -> list[dict]:
        a = self.alerts[key]
        if a["state"] == "flapping":
            return self._flap_cond(rule, key, a, False, ts, value)
        if a["state"] == "pending":  # never fired: forgotten without a notification
            self.alerts.pop(key)
            self._persist(key, None)
            return []
        if hold and rule.when.clear_for_s > 0:
            start = a.setdefault("clearing_since", ts)
            if ts - start < rule.when.clear_for_s * 1000:
                return []
        a["value"] = value if value is not None else a.get("value")
        if self._flapped(rule, key, a, False, ts):
            return [self._doc(rule, a, "flapping", ts)]
        self.alerts.pop(key)
        self._persist(key, None)
        return [self._doc(rule, a, "resolved", ts)]

    # -- flap damping ---------------------------------------------------------------------
    def _flapped(self, rule: Rule, key: str, a: dict[str, Any], on: bool, ts: int) -> bool:
        """Count a state change; True when it made the alert ``flapping`` (``a`` updated)."""
        if rule.flap is None:
            return False
        changes = [t for t in self._flaps.get(key, []) if ts - t < rule.flap.window_s * 1000]
        changes.append(ts)
        self._flaps[key] = changes
        if self.book is not None:
            self.book.save_flaps(key, changes)
        if len(changes) < rule.flap.changes:
            return False
        a.update(
            state="flapping",
            flapping_since=ts,
            changes=len(changes),
            cond=on,
            stable_since=ts,
            stable_wall=self._now or ts,
            notified=ts,
        )
        a.pop("clearing_since", None)
        self.alerts[key] = a
        self._persist(key, a)
        return True

    def _flap_cond(
        self, rule: Rule, key: str, a: dict[str, Any], on: bool, ts: int, value: Any
    ) -> list[dict]:
        """A flapping alert's condition evaluated: followed silently until it is stable."""
        if value is not None:
            a["value"] = value
        if a.get("cond") != on:
            a.update(cond=on, stable_since=ts, stable_wall=self._now or ts)
            self._persist(key, a)
            return []
        stable_s = rule.flap.stable_s if rule.flap is not None else 0
        if ts - int(a.get("stable_since") or ts) >= stable_s * 1000:
            return self._settle(rule, key, a, ts)
        return []

    def _settle(self, rule: Rule, key: str, a: dict[str, Any], ts: int) -> list[dict]:
        """A flapping alert that has been stable: it fires or resolves, once."""
        self._flaps.pop(key, None)
        if self.book is not None:
            self.book.save_flaps(key, None)
        on = bool(a.get("cond"))
        for k in ("cond", "stable_since", "stable_wall", "changes"):
            a.pop(k, None)
        if on:
            a.update(state="firing", notified=ts, fired=ts)
            self._persist(key, a)
            return [self._doc(rule, a, "firing", ts, flapped=True)]
        self.alerts.pop(key)
        self._persist(key, None)
        return [self._doc(rule, a, "resolved", ts, flapped=True)]

    @staticmethod
    def _new(rule: Rule, subject: tuple, state: str, since: int, value: Any) -> dict[str, Any]:
        gateway, site, sensor, metric = subject
        return {
            "rule": rule.name,
            "state": state,
            "gateway": gateway,
            "site": site,
            "sensor": sensor,
            "metric": metric,
            "severity": rule.severity,
            "since": since,
            "value": value,
            "notified": 0,
        }

    def _persist(self, key: str, a: dict[str, Any] | None) -> None:
        if self.book is not None:
            self.book.save(key, a)

    def _doc(
        self,
        rule: Rule,
        a: Mapping[str, Any],
        state: str,
        ts: int,
        renotify: bool = False,
        flapped: bool = False,
    ) -> dict:
        doc = {
            "@timestamp": ts,
            "rule": rule.name,
            "state": state,
            "kind": rule.when.kind(),
            "severity": rule.severity,
            "gateway": a.get("gateway"),
            "site": a.get("site"),
            "sensor": a.get("sensor"),
            "metric": a.get("metric"),
            "value": a.get("value"),
            "since": a.get("since"),
            "renotify": renotify,
        }
        if state == "resolved":
            doc["duration_s"] = round((ts - int(a.get("since") or ts)) / 1000, 1)
        if state == "flapping" and rule.flap is not None:
            doc.update(changes=a.get("changes"), window_s=rule.flap.window_s)
        if flapped:
            doc["flapped"] = True
        doc["silenced"] = self.silenced(doc, ts)
        if self.book is not None:
            self.book.record(doc)
        return doc

    def silenced(self, doc: Mapping[str, Any], now_ms: int) -> bool:
        if self.book is None:
            return False
        if now_ms - self._silences_at > 5000 or not self._silences_at:
            self._silences = self.book.silences(now_ms)
            self._silences_at = now_ms
        return any(
            s["until_ms"] >= now_ms
            and fnmatch.fnmatchcase(str(doc.get("rule")), s["rule"])
            and fnmatch.fnmatchcase(str(doc.get("gateway")), s["gateway"])
            for s in self._silences
        )


def event_tag(doc: Mapping[str, Any]) -> str:
    return f"tributary/alert/{doc['rule']}/{doc['state']}"
