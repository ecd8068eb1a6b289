"""The relay spool: batches as they came off the bus, until Elasticsearch confirmed them.

One SQLite file holds the spooled batches, the counters, the last heartbeat facts per gateway,
the gateway keys that syndics vouched for and (``relay.ledger``) the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple

import msgpack

from saltext.tributary.protocol.wire import row_count
from saltext.tributary.relay.keyring import Keyring
from saltext.tributary.relay.ledger import Ledger
from saltext.tributary.util import sqlite
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, gateway TEXT NOT NULL,
    kind TEXT NOT NULL, ukey TEXT NOT NULL UNIQUE, received INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_counters (gateway TEXT NOT NULL, name TEXT NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (gateway, name));
CREATE TABLE IF NOT EXISTS heartbeat_facts (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_keys (gateway TEXT NOT NULL, source TEXT NOT NULL,
    pem TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (gateway, source));
"""
#: The counters kept per gateway (``gateway_counters``), shown by ``tributary.status``.
PER_GATEWAY_COUNTERS = (
    "indexed",
    "dead_lettered",
    "rejected",
    "replays_requested",
    "id_collisions",
)
#: Columns added after the first release of the spool schema (migrated in place).
EXTRA_COLUMNS = {
    "hold_until": "INTEGER NOT NULL DEFAULT 0",
    "n": "INTEGER NOT NULL DEFAULT 0",
    # 1: origin verified at intake; 0: not yet (no key known then); -1: refused at intake
    "verified": "INTEGER NOT NULL DEFAULT 0",
}


class SpoolRow(NamedTuple):
    """One spooled event as :meth:`RelaySpool.take` returns it."""

    id: int
    gateway: str
    kind: str  # "batch" or "health"
    received: int  # ms
    data: Any  # the event data; {"_undecodable": reason} when the stored body is unreadable
    attempts: int = 0
    verified: int = 0  # see EXTRA_COLUMNS


_LOCKS_GUARD = threading.Lock()
_WRITE_LOCKS: dict[str, threading.RLock] = {}


def _write_lock(path: str) -> threading.RLock:
    """One writer lock per spool file in this process. The bus reader and the shipper write
    through separate SQLite connections; contended, SQLite's busy handler sleeps 1, 2, 5, 10 ms
    ... per retry (py-spy showed intake spending its time there). A Python lock hands over at
    once, and SQLite never sees the two threads collide."""
    with _LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(os.path.abspath(path), threading.RLock())


class RelaySpool:
    """Durable FIFO of received batches (SQLite, WAL)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        #: whether the last :meth:`take` took every shippable row
        self.took_all = False
        self.db = sqlite.connect(path)
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(batches)")}
        for col, decl in EXTRA_COLUMNS.items():
            if col not in have:
                try:
                    self.db.execute(f"ALTER TABLE batches ADD COLUMN {col} {decl}")
                except sqlite3.OperationalError:  # another connection migrated it meanwhile
                    pass
        self.ledger = Ledger(self.db)
        self.keyring = Keyring(self.db)
        self.write_lock = _write_lock(path)
        self._migrate_counters()

    def put(self, gateway: str, kind: str, ukey: str, data: Any, verified: int = 0) -> bool:
        body = msgpack.packb(data, use_bin_type=True, default=str)
        with self.write_lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO batches (gateway, kind, ukey, received, body, n, verified)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    gateway,
                    kind,
                    ukey,
                    now_ms(),
                    body,
                    row_count(data),
                    verified,
                ),
            )
            return cur.rowcount == 1

    def used_bytes(self) -> int:
        return sqlite.used_bytes(self.db)

    def enforce_budget(self, max_bytes: int) -> tuple[int, int]:
        """Past ``max_bytes``, drop batches until the spool fits: first those whose origin
        could not be verified yet (oldest first: anyone can claim any gateway id), then from
        the verified gateway holding the most bytes (so a gateway sending far more than the
        others evicts its own batches, never theirs). Returns (batches, readings) dropped."""
        with self.write_lock:
            return self._enforce_budget(max_bytes)

    def _enforce_budget(self, max_bytes: int) -> tuple[int, int]:
        batches = readings = 0
        if self.used_bytes() <= max_bytes:
            return 0, 0
        shares: dict[str, int] | None = None
        while self.used_bytes() > max_bytes:
            rows = self.db.execute(
                "SELECT id, n FROM batches WHERE verified<=0 ORDER BY id LIMIT 16"
            ).fetchall()
            if not rows:
                if shares is None:
                    shares = dict(
                        self.db.execute(
                            "SELECT gateway, SUM(length(body)) FROM batches GROUP BY gateway"
                        ).fetchall()
                    )
                if not shares:
                    break
                top = max(shares, key=lambda g: shares[g])  # type: ignore[index]
                rows = self.db.execute(
                    "SELECT id, n, length(body) FROM batches WHERE gateway=? ORDER BY id LIMIT 16",
                    (top,),
                ).fetchall()
                if not rows:
                    del shares[top]
                    continue
                shares[top] -= sum(r[2] for r in rows)
            self.db.executemany("DELETE FROM batches WHERE id=?", [(r[0],) for r in rows])
            batches += len(rows)
            readings += sum(r[1] for r in rows)
        return batches, readings

    def hold(self, ids: list[int], until_ms: int) -> None:
        with self.write_lock:
            self.db.executemany(
                "UPDATE batches SET hold_until=? WHERE id=?", [(until_ms, i) for i in ids]
            )

    def release_holds(self) -> None:
        with self.write_lock:
            self.db.execute("UPDATE batches SET hold_until=0 WHERE hold_until>0")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction under the process's writer lock."""
        with self.write_lock, sqlite.transaction(self.db):
            yield

    def depth_by_gateway(self) -> dict[str, tuple[int, int]]:
        return {
            gw: (b, n)
            for gw, b, n in self.db.execute(
                "SELECT gateway, COUNT(*), SUM(n) FROM batches GROUP BY gateway"
            )
        }

    def take(
        self, limit: int, max_docs: int | None = None, skip: Collection[int] = ()
    ) -> list[SpoolRow]:
        """The oldest shippable batches: at most ``limit`` rows and, past the first row, at most
        ``max_docs`` readings, skipping rows in ``skip`` (in flight). Only taken rows are
        unpacked; a row whose body cannot be unpacked comes back as ``{"_undecodable": ...}``
        (to be set aside, never to stop the rows behind it). Afterwards :attr:`took_all` says
        whether that was every shippable row (False: a full bulk's worth or more waited)."""
        cur = self.db.execute(
            "SELECT id, gateway, kind, received, n, attempts, verified, body FROM batches"
            " WHERE hold_until<=? ORDER BY id LIMIT ?",
            (now_ms(), limit + len(skip)),
        )
        out: list[SpoolRow] = []
        docs = seen = 0
        self.took_all = False
        try:
            for i, gw, kind, rec, n, attempts, verified, body in cur:
                seen += 1
                if i in skip:
                    continue
                k = max(n or 0, 1)
                if max_docs is not None and out and docs + k > max_docs:
                    break
                try:
                    data = msgpack.unpackb(body, raw=False, strict_map_key=False)
                except Exception as exc:  # any unpack failure sets the row aside
                    data = {"_undecodable": f"{type(exc).__name__}: {exc}"[:512]}
                out.append(SpoolRow(i, gw, kind, rec, data, attempts, verified))
                docs += k
                if len(out) >= limit:
                    break
            else:
                self.took_all = seen < limit + len(skip)
        finally:
            cur.close()
        return out

    def attempted(self, ids: Collection[int]) -> None:
        """One more failed shipping attempt for each row in ``ids``."""
        with self.write_lock:
            self.db.executemany(
                "UPDATE batches SET attempts = attempts + 1 WHERE id=?", [(i,) for i in ids]
            )

    def done(self, ids: list[int]) -> None:
        self.db.executemany("DELETE FROM batches WHERE id=?", [(i,) for i in ids])

    def depth(self) -> tuple[int, int | None]:
        n, oldest = self.db.execute("SELECT COUNT(*), MIN(received) FROM batches").fetchone()
        return n, oldest

    def bump(self, counts: Mapping[Any, int]) -> None:
        """Add to the fleet counters (``name`` keys) and the per-gateway counters
        (``(name, gateway)`` keys), in the caller's transaction if one is open."""
        per_gw = [(k[1], k[0], n, n) for k, n in counts.items() if isinstance(k, tuple) and n]
        sqlite.bump(self.db, {k: n for k, n in counts.items() if isinstance(k, str)})
        if per_gw:
            self.db.executemany(
                "INSERT INTO gateway_counters VALUES (?, ?, ?)"
                " ON CONFLICT(gateway, name) DO UPDATE SET n = n + ?",
                per_gw,
            )

    def count(self, name: str, n: int = 1, gateway: str | None = None) -> None:
        """Count ``n`` under ``name`` now, for the fleet or for ``gateway``."""
        with self.write_lock:
            self.bump({(name, gateway) if gateway else name: n})

    def counters(self) -> dict[str, int]:
        """The fleet counters."""
        return dict(self.db.execute("SELECT name, n FROM counters").fetchall())

    def gateway_counters(self) -> dict[str, dict[str, int]]:
        """The per-gateway counters: gateway -> name -> n."""
        out: dict[str, dict[str, int]] = {}
        for gw, name, n in self.db.execute("SELECT gateway, name, n FROM gateway_counters"):
            out.setdefault(gw, {})[name] = n
        return out

    def _migrate_counters(self) -> None:
        """Spools written before per-gateway counters had their own table kept them as
        ``<name>@<gateway>`` rows of ``counters``: move them."""
        rows = self.db.execute("SELECT name, n FROM counters WHERE name LIKE '%@%'").fetchall()
        if not rows:
            return
        with self.write_lock, sqlite.transaction(self.db):
            self.bump({tuple(name.split("@", 1)): n for name, n in rows})
            self.db.executemany("DELETE FROM counters WHERE name=?", [(r[0],) for r in rows])

    def close(self) -> None:
        self.db.close()
