"""The relay's ledger: which sequence ranges of each (gateway, epoch) are accounted for.

A range is *accounted for* once Elasticsearch confirmed every reading of a batch (created,
already present, or dead-lettered). The ledger keeps merged ranges durably in SQLite (the relay
spool's file), the last sequence each gateway's health heartbeat reported, and the open gaps
with their repair state:

* a gap is a hole between two ranges, the readings before the first range (sequences start at
  1), or the tail between the last range and the heartbeat's ``last_seq`` (a lost tail);
* a gap open longer than ``grace_s`` is due for a replay request; each request backs off
  exponentially (capped); a gap is given up with a recorded reason when the gateway says it no
  longer holds the range, or after ``max_attempts`` requests went unanswered.

Pure logic over an ``sqlite3`` connection: no Salt, no Elasticsearch; unit tested directly.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from saltext.tributary.util import sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_ranges (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, PRIMARY KEY (gateway, epoch, lo));
CREATE TABLE IF NOT EXISTS ledger_heads (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    hb_last INTEGER NOT NULL DEFAULT 0, hb_at REAL NOT NULL DEFAULT 0,
    indexed_at REAL NOT NULL DEFAULT 0, PRIMARY KEY (gateway, epoch));
CREATE TABLE IF NOT EXISTS ledger_gaps (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, opened REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'open', reason TEXT, PRIMARY KEY (gateway, epoch, lo));
"""


@dataclass
class Gap:
    gateway: str
    epoch: str
    lo: int
    hi: int
    opened: float
    attempts: int = 0
    next_try: float = 0.0
    state: str = "open"  # open | given_up
    reason: str | None = None

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "gateway": self.gateway,
            "epoch": self.epoch,
            "from": self.lo,
            "to": self.hi,
            "readings": self.size,
            "open_s": round(now - self.opened, 1),
            "attempts": self.attempts,
            "state": self.state,
            "reason": self.reason,
        }


class Ledger:
    """Durable per-(gateway, epoch) sequence ranges, heartbeats and gaps."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)

    # -- facts ------------------------------------------------------------------------------
    def add_range(
        self, gateway: str, epoch: str, lo: int, hi: int, now: float | None = None
    ) -> None:
        """Record that ``lo..hi`` of (gateway, epoch) is accounted for (merges neighbours)."""
        if hi < lo:
            return
        now = time.time() if now is None else now
        db = self.db
        with sqlite.transaction(db):
            rows = db.execute(
                "SELECT lo, hi FROM ledger_ranges WHERE gateway=? AND epoch=? AND lo<=? AND hi>=?",
                (gateway, epoch, hi + 1, lo - 1),
            ).fetchall()
            for rlo, rhi in rows:
                lo, hi = min(lo, rlo), max(hi, rhi)
            db.executemany(
                "DELETE FROM ledger_ranges WHERE gateway=? AND epoch=? AND lo=?",
                [(gateway, epoch, r[0]) for r in rows],
            )
            db.execute("INSERT INTO ledger_ranges VALUES (?,?,?,?)", (gateway, epoch, lo, hi))
            db.execute(
                "INSERT INTO ledger_heads (gateway, epoch, indexed_at) VALUES (?,?,?)"
                " ON CONFLICT(gateway, epoch) DO UPDATE SET indexed_at=excluded.indexed_at",
                (gateway, epoch, now),
            )

    def heartbeat(self, gateway: str, epoch: str, last_seq: int, now: float | None = None) -> None:
        """The gateway reports it has numbered readings up to ``last_seq`` in ``epoch``."""
        now = time.time() if now is None else now
        self.db.execute(
            "INSERT INTO ledger_heads (gateway, epoch, hb_last, hb_at) VALUES (?,?,?,?)"
            " ON CONFLICT(gateway, epoch) DO UPDATE SET"
            " hb_last=max(hb_last, excluded.hb_last), hb_at=excluded.hb_at",
            (gateway, epoch, int(last_seq), now),
        )

    def ranges(self, gateway: str, epoch: str) -> list[tuple[int, int]]:
        return [
            (lo, hi)
            for lo, hi in self.db.execute(
                "SELECT lo, hi FROM ledger_ranges WHERE gateway=? AND epoch=? ORDER BY lo",
                (gateway, epoch),
            )
        ]

    # -- gaps -------------------------------------------------------------------------------
    def holes(self, gateway: str, epoch: str) -> list[tuple[int, int]]:
        """Missing ranges of (gateway, epoch) given the ranges and the heartbeat."""
        out: list[tuple[int, int]] = []
        nxt = 1
        for lo, hi in self.ranges(gateway, epoch):
            if lo > nxt:
                out.append((nxt, lo - 1))
            nxt = max(nxt, hi + 1)
        row = self.db.execute(
            "SELECT hb_last FROM ledger_heads WHERE gateway=? AND epoch=?", (gateway, epoch)
        ).fetchone()
        if row and row[0] >= nxt:
            out.append((nxt, row[0]))
        return out

    def refresh(self, now: float | None = None) -> list[Gap]:
        """Recompute the gaps from the ranges; keep the repair state of overlapping old gaps."""
        now = time.time() if now is None else now
        db = self.db
        with sqlite.transaction(db):
            old = [Gap(*r) for r in db.execute("SELECT * FROM ledger_gaps").fetchall()]
            pairs = db.execute("SELECT gateway, epoch FROM ledger_heads").fetchall()
            new: list[Gap] = []
            for gateway, epoch in pairs:
                for lo, hi in self.holes(gateway, epoch):
                    gap = Gap(gateway, epoch, lo, hi, opened=now)
                    for o in old:
                        if o.gateway == gateway and o.epoch == epoch and o.lo <= hi and o.hi >= lo:
                            gap.opened = min(gap.opened, o.opened)
                            gap.attempts = max(gap.attempts, o.attempts)
                            gap.next_try = max(gap.next_try, o.next_try)
                            if o.state == "given_up" and o.lo <= lo and o.hi >= hi:
                                gap.state, gap.reason = o.state, o.reason
                    new.append(gap)
            db.execute("DELETE FROM ledger_gaps")
            db.executemany(
                "INSERT INTO ledger_gaps VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        g.gateway,
                        g.epoch,
                        g.lo,
                        g.hi,
                        g.opened,
                        g.attempts,
                        g.next_try,
                        g.state,
                        g.reason,
                    )
                    for g in new
                ],
            )
        return new

    def gaps(self, gateway: str | None = None, include_given_up: bool = True) -> list[Gap]:
        sql = "SELECT * FROM ledger_gaps"
        args: tuple[Any, ...] = ()
        conds = []
        if gateway:
            conds.append("gateway=?")
            args = (gateway,)
        if not include_given_up:
            conds.append("state='open'")
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        return [Gap(*r) for r in self.db.execute(sql + " ORDER BY gateway, epoch, lo", args)]

    def due(self, grace_s: float, now: float | None = None) -> list[Gap]:
        """Open gaps older than the grace period whose next attempt time has come."""
        now = time.time() if now is None else now
        return [
            Gap(*r)
            for r in self.db.execute(
                "SELECT * FROM ledger_gaps WHERE state='open' AND opened<=? AND next_try<=?"
                " ORDER BY opened, gateway, lo",
                (now - grace_s, now),
            )
        ]

    def requested(
        self, gap: Gap, backoff_s: float, backoff_max_s: float, now: float | None = None
    ) -> None:
        """A replay was requested for ``gap``: count it and schedule the next try."""
        now = time.time() if now is None else now
        attempts = gap.attempts + 1
        delay = min(backoff_s * (2 ** (attempts - 1)), backoff_max_s)
        self.db.execute(
            "UPDATE ledger_gaps SET attempts=?, next_try=? WHERE gateway=? AND epoch=? AND lo=?",
            (attempts, now + delay, gap.gateway, gap.epoch, gap.lo),
        )
        gap.attempts, gap.next_try = attempts, now + delay

    def give_up(self, gap: Gap, reason: str) -> None:
        self.db.execute(
            "UPDATE ledger_gaps SET state='given_up', reason=?"
            " WHERE gateway=? AND epoch=? AND lo=?",
            (reason, gap.gateway, gap.epoch, gap.lo),
        )
        gap.state, gap.reason = "given_up", reason

    # -- reporting --------------------------------------------------------------------------
    def summary(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per gateway: epochs, last accounted sequence, heartbeat, lag, open/given-up gaps."""
        now = time.time() if now is None else now
        out: dict[str, dict[str, Any]] = {}
        for gateway, epoch, hb_last, hb_at, indexed_at in self.db.execute(
            "SELECT gateway, epoch, hb_last, hb_at, indexed_at FROM ledger_heads"
        ).fetchall():
            ranges = self.ranges(gateway, epoch)
            entry = out.setdefault(gateway, {"epochs": {}})
            last = ranges[-1][1] if ranges else 0
            entry["epochs"][epoch] = {
                "last_seq": last,
                "accounted": sum(hi - lo + 1 for lo, hi in ranges),
                "ranges": len(ranges),
                "heartbeat_last_seq": hb_last or None,
                "heartbeat_age_s": round(now - hb_at, 1) if hb_at else None,
                "last_indexed_age_s": round(now - indexed_at, 1) if indexed_at else None,
            }
            latest = entry.get("_latest", 0.0)
            if max(indexed_at, hb_at) >= latest:
                entry["_latest"] = max(indexed_at, hb_at)
                entry["epoch"] = epoch
                entry["last_seq"] = last
                entry["lag_s"] = round(now - indexed_at, 1) if indexed_at else None
                entry["behind"] = max(0, hb_last - last) if hb_last else 0
        for gap in self.gaps():
            entry = out.setdefault(gap.gateway, {"epochs": {}})
            key = "open_gaps" if gap.state == "open" else "given_up_gaps"
            entry[key] = entry.get(key, 0) + 1
            if gap.state == "open":
                entry["missing"] = entry.get("missing", 0) + gap.size
        for entry in out.values():
            entry.pop("_latest", None)
            entry.setdefault("open_gaps", 0)
            entry.setdefault("given_up_gaps", 0)
            entry.setdefault("missing", 0)
        return out
