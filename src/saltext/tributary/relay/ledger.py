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

Each refresh counts, in the ``counters`` table of the same file and in the same transaction
(so exactly once, whichever process refreshes), the gaps it saw open (``gaps_opened``: a hole
overlapping no earlier gap) and close: ``gaps_repaired`` when every reading of the gap arrived
after a replay request was sent (or after it was given up), ``gaps_filled`` when they arrived
late without one (out of order, a slow path). The relay's self-metrics documents carry these
counters, and the fleet report charts their deltas.

Pure logic over an ``sqlite3`` connection: no Salt, no Elasticsearch; unit tested directly.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from saltext.tributary.util import sqlite

SCHEMA = (
    sqlite.COUNTERS_TABLE
    + """
CREATE TABLE IF NOT EXISTS ledger_ranges (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, PRIMARY KEY (gateway, epoch, lo));
CREATE TABLE IF NOT EXISTS ledger_agg (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, PRIMARY KEY (gateway, epoch, lo));
CREATE TABLE IF NOT EXISTS ledger_heads (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    hb_last INTEGER NOT NULL DEFAULT 0, hb_at REAL NOT NULL DEFAULT 0,
    indexed_at REAL NOT NULL DEFAULT 0, PRIMARY KEY (gateway, epoch));
CREATE TABLE IF NOT EXISTS ledger_gaps (gateway TEXT NOT NULL, epoch TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL, opened REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'open', reason TEXT, PRIMARY KEY (gateway, epoch, lo));
"""
)
#: Columns added to ``ledger_gaps`` after its first release (migrated in place): how many
#: requests the gateway answered (re-emitted), and the outcome of the last one.
GAP_COLUMNS = {
    "answered": "INTEGER NOT NULL DEFAULT 0",
    "last": "TEXT",
}
GAP_FIELDS = "gateway, epoch, lo, hi, opened, attempts, next_try, state, reason, answered, last"


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
    #: requests the gateway answered by re-emitting (a gap still open after several of those
    #: is given up); the others went unanswered (retried while the gateway may hold the range)
    answered: int = 0
    #: outcome of the last request: ok | retry, or asked while one is in flight
    last: str | None = None

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
            "answered": self.answered,
            "state": self.state,
            "reason": self.reason,
        }


class Ledger:
    """Durable per-(gateway, epoch) sequence ranges, heartbeats and gaps."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        have = {r[1] for r in db.execute("PRAGMA table_info(ledger_gaps)")}
        for col, decl in GAP_COLUMNS.items():
            if col not in have:
                try:
                    db.execute(f"ALTER TABLE ledger_gaps ADD COLUMN {col} {decl}")
                except sqlite3.OperationalError:  # another connection migrated it meanwhile
                    pass

    # -- facts ------------------------------------------------------------------------------
    def add_range(
        self,
        gateway: str,
        epoch: str,
        lo: int,
        hi: int,
        now: float | None = None,
        agg: bool = False,
    ) -> None:
        """Record that ``lo..hi`` of (gateway, epoch) is accounted for (merges neighbours);
        ``agg``: by an aggregated batch (its sequences are summarised, not one document each)."""
        if hi < lo:
            return
        now = time.time() if now is None else now
        db = self.db
        with sqlite.transaction(db):
            if agg:
                db.execute(
                    "INSERT OR REPLACE INTO ledger_agg VALUES (?,?,?,?)", (gateway, epoch, lo, hi)
                )
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
            self._alive(gateway)

    def _alive(self, gateway: str) -> None:
        """The gateway is reachable again (its batch or heartbeat arrived): a gap whose last
        request went unanswered is asked for again at once, not after its backoff."""
        self.db.execute(
            "UPDATE ledger_gaps SET next_try=0 WHERE gateway=? AND state='open' AND last='retry'",
            (gateway,),
        )

    def heartbeat(self, gateway: str, epoch: str, last_seq: int, now: float | None = None) -> None:
        """The gateway reports it has emitted readings up to ``last_seq`` in ``epoch``."""
        now = time.time() if now is None else now
        self.db.execute(
            "INSERT INTO ledger_heads (gateway, epoch, hb_last, hb_at) VALUES (?,?,?,?)"
            " ON CONFLICT(gateway, epoch) DO UPDATE SET"
            " hb_last=max(hb_last, excluded.hb_last), hb_at=excluded.hb_at",
            (gateway, epoch, int(last_seq), now),
        )
        self._alive(gateway)

    def covering(
        self, gateway: str, epoch: str, lo: int, hi: int, agg: bool = False
    ) -> list[tuple[int, int]]:
        """The recorded ranges of (gateway, epoch) that overlap ``lo..hi`` (an index seek);
        with ``agg`` only those recorded by aggregated batches."""
        table = "ledger_agg" if agg else "ledger_ranges"
        return self.db.execute(
            f"SELECT lo, hi FROM {table} WHERE gateway=? AND epoch=? AND lo<=? AND hi>=?",
            (gateway, epoch, hi, lo),
        ).fetchall()

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
        row = self.db.execute(
            "SELECT hb_last FROM ledger_heads WHERE gateway=? AND epoch=?", (gateway, epoch)
        ).fetchone()
        return _holes(self.ranges(gateway, epoch), row[0] if row else 0)

    def refresh(self, now: float | None = None) -> list[Gap]:
        """Recompute the gaps from the ranges; keep the repair state of overlapping old gaps.

        One ordered pass over the ranges, old gaps looked up by (gateway, epoch): linear in the
        size of the ledger, so a fleet with thousands of gaps keeps the write transaction
        short."""
        now = time.time() if now is None else now
        db = self.db
        with sqlite.transaction(db):
            old: dict[tuple[str, str], list[Gap]] = {}
            for r in db.execute(f"SELECT {GAP_FIELDS} FROM ledger_gaps"):
                g = Gap(*r)
                old.setdefault((g.gateway, g.epoch), []).append(g)
            heads = {
                (gw, ep): hb
                for gw, ep, hb in db.execute("SELECT gateway, epoch, hb_last FROM ledger_heads")
            }
            ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
            for gw, ep, lo, hi in db.execute(
                "SELECT gateway, epoch, lo, hi FROM ledger_ranges ORDER BY gateway, epoch, lo"
            ):
                ranges.setdefault((gw, ep), []).append((lo, hi))
            new: list[Gap] = []
            counts = {"gaps_opened": 0, "gaps_repaired": 0, "gaps_filled": 0}
            for key, hb_last in heads.items():
                before = old.get(key, ())
                holes = _holes(ranges.get(key, []), hb_last)
                for o in before:  # an earlier gap that no hole overlaps any more has closed
                    if not any(o.lo <= hi and o.hi >= lo for lo, hi in holes):
                        replayed = o.attempts > 0 or o.state == "given_up" or o.last == "asked"
                        counts["gaps_repaired" if replayed else "gaps_filled"] += 1
                for lo, hi in holes:
                    gap = Gap(key[0], key[1], lo, hi, opened=now)
                    if not any(o.lo <= hi and o.hi >= lo for o in before):
                        counts["gaps_opened"] += 1
                    for o in before:
                        if o.lo <= hi and o.hi >= lo:
                            gap.opened = min(gap.opened, o.opened)
                            gap.attempts = max(gap.attempts, o.attempts)
                            gap.answered = max(gap.answered, o.answered)
                            gap.next_try = max(gap.next_try, o.next_try)
                            gap.last = o.last or gap.last
                            if o.state == "given_up" and o.lo <= lo and o.hi >= hi:
                                gap.state, gap.reason = o.state, o.reason
                    new.append(gap)
            db.execute("DELETE FROM ledger_gaps")
            db.executemany(
                f"INSERT INTO ledger_gaps ({GAP_FIELDS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
                        g.answered,
                        g.last,
                    )
                    for g in new
                ],
            )
            sqlite.bump(db, counts)
        return new

    def counts(self) -> dict[str, int]:
        """The gap counters so far (``gaps_opened``, ``gaps_repaired``, ``gaps_filled``)."""
        return dict(
            self.db.execute("SELECT name, n FROM counters WHERE name LIKE 'gaps_%'").fetchall()
        )

    def prune(self, keep_s: float, now: float | None = None) -> int:
        """Forget epochs with no open gap and no activity for ``keep_s`` (a gateway's
        retired spools), except each gateway's latest epoch, and given-up gaps as old; returns
        how many epochs went."""
        now = time.time() if now is None else now
        cut = now - keep_s
        db = self.db
        with sqlite.transaction(db):
            latest = {
                gw: ep
                for gw, ep, _ in db.execute(
                    "SELECT gateway, epoch, MAX(max(indexed_at, hb_at)) FROM ledger_heads"
                    " GROUP BY gateway"
                )
            }
            stale = [
                (gw, ep)
                for gw, ep in db.execute(
                    "SELECT gateway, epoch FROM ledger_heads WHERE max(indexed_at, hb_at) < ?",
                    (cut,),
                )
                if latest.get(gw) != ep
            ]
            open_pairs = set(
                db.execute("SELECT DISTINCT gateway, epoch FROM ledger_gaps WHERE state='open'")
            )
            stale = [p for p in stale if p not in open_pairs]
            for table in ("ledger_ranges", "ledger_agg", "ledger_heads", "ledger_gaps"):
                db.executemany(f"DELETE FROM {table} WHERE gateway=? AND epoch=?", stale)
            db.execute("DELETE FROM ledger_gaps WHERE state='given_up' AND opened < ?", (cut,))
        return len(stale)

    def gaps(self, gateway: str | None = None, include_given_up: bool = True) -> list[Gap]:
        sql = f"SELECT {GAP_FIELDS} FROM ledger_gaps"
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
                f"SELECT {GAP_FIELDS} FROM ledger_gaps"
                " WHERE state='open' AND opened<=? AND next_try<=?"
                " ORDER BY opened, gateway, lo",
                (now - grace_s, now),
            )
        ]

    def requested(
        self,
        gap: Gap,
        backoff_s: float,
        backoff_max_s: float,
        now: float | None = None,
        outcome: str = "ok",
    ) -> None:
        """A replay was requested for ``gap`` (``outcome``: ``ok`` re-emitted, ``retry`` no
        usable answer): count it and schedule the next try."""
        now = time.time() if now is None else now
        attempts = gap.attempts + 1
        answered = gap.answered + (outcome == "ok")
        delay = min(backoff_s * (2 ** (attempts - 1)), backoff_max_s)
        self.db.execute(
            "UPDATE ledger_gaps SET attempts=?, answered=?, last=?, next_try=?"
            " WHERE gateway=? AND epoch=? AND lo=?",
            (attempts, answered, outcome, now + delay, gap.gateway, gap.epoch, gap.lo),
        )
        gap.attempts, gap.answered, gap.last, gap.next_try = (
            attempts,
            answered,
            outcome,
            now + delay,
        )

    def asking(self, gap: Gap) -> None:
        """A replay request for ``gap`` is on its way (its readings can be indexed before the
        answer is back): a gap closing now was repaired, not filled late."""
        self.db.execute(
            "UPDATE ledger_gaps SET last='asked' WHERE gateway=? AND epoch=? AND lo=?",
            (gap.gateway, gap.epoch, gap.lo),
        )
        gap.last = "asked"

    def reopen(self, gateway: str | None = None) -> int:
        """Given-up gaps (of ``gateway``, or all) become open again, with a fresh count."""
        sql = (
            "UPDATE ledger_gaps SET state='open', reason=NULL, attempts=0, answered=0,"
            " last=NULL, next_try=0 WHERE state='given_up'"
        )
        args: tuple[Any, ...] = ()
        if gateway:
            sql += " AND gateway=?"
            args = (gateway,)
        return self.db.execute(sql, args).rowcount

    def give_up(self, gap: Gap, reason: str) -> None:
        self.db.execute(
            "UPDATE ledger_gaps SET state='given_up', reason=?"
            " WHERE gateway=? AND epoch=? AND lo=?",
            (reason, gap.gateway, gap.epoch, gap.lo),
        )
        gap.state, gap.reason = "given_up", reason

    # -- reporting --------------------------------------------------------------------------
    def summary(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per gateway: epochs, last accounted sequence, heartbeat, lag, open/given-up gaps.

        Three aggregate queries whatever the fleet size (ranges and gaps are grouped by
        SQLite, not read one (gateway, epoch) at a time)."""
        now = time.time() if now is None else now
        db = self.db
        accounted = {
            (gw, ep): (last, n, count)
            for gw, ep, last, n, count in db.execute(
                "SELECT gateway, epoch, MAX(hi), SUM(hi - lo + 1), COUNT(*) FROM ledger_ranges"
                " GROUP BY gateway, epoch"
            )
        }
        out: dict[str, dict[str, Any]] = {}
        latest: dict[str, float] = {}
        for gateway, epoch, hb_last, hb_at, indexed_at in db.execute(
            "SELECT gateway, epoch, hb_last, hb_at, indexed_at FROM ledger_heads"
        ):
            last, n, count = accounted.get((gateway, epoch), (0, 0, 0))
            entry = out.setdefault(gateway, {"epochs": {}})
            entry["epochs"][epoch] = {
                "last_seq": last,
                "accounted": n,
                "ranges": count,
                "heartbeat_last_seq": hb_last or None,
                "heartbeat_age_s": round(now - hb_at, 1) if hb_at else None,
                "last_indexed_age_s": round(now - indexed_at, 1) if indexed_at else None,
            }
            seen = max(indexed_at, hb_at)
            if seen >= latest.get(gateway, 0.0):
                latest[gateway] = seen
                entry["epoch"] = epoch
                entry["last_seq"] = last
                entry["lag_s"] = round(now - indexed_at, 1) if indexed_at else None
                entry["behind"] = max(0, hb_last - last) if hb_last else 0
        for gateway, state, n, missing in db.execute(
            "SELECT gateway, state, COUNT(*), SUM(hi - lo + 1) FROM ledger_gaps"
            " GROUP BY gateway, state"
        ):
            entry = out.setdefault(gateway, {"epochs": {}})
            if state == "open":
                entry["open_gaps"] = entry.get("open_gaps", 0) + n
                entry["missing"] = entry.get("missing", 0) + missing
            else:
                entry["given_up_gaps"] = entry.get("given_up_gaps", 0) + n
        for entry in out.values():
            entry.setdefault("open_gaps", 0)
            entry.setdefault("given_up_gaps", 0)
            entry.setdefault("missing", 0)
        return out


def _holes(ranges: list[tuple[int, int]], hb_last: int) -> list[tuple[int, int]]:
    """The holes before, between and after sorted ``ranges`` (up to the heartbeat's
    ``hb_last``)."""
    out: list[tuple[int, int]] = []
    nxt = 1
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if hb_last and hb_last >= nxt:
        out.append((nxt, hb_last))
    return out
