"""The one way Tributary talks to SQLite: WAL connections, write transactions, counters, bytes.

Both spools (the gateway's and the relay's) and the relay's ledger are SQLite files written by
more than one thread or process; they share these helpers so every write transaction is taken
the same way (``BEGIN IMMEDIATE``: the write lock up front, no deadlock on upgrade) and every
counter is bumped with the same upsert.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping

COUNTERS_TABLE = "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);"


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, NORMAL sync
    (durable at each checkpoint, never corrupt), 30 s busy timeout, usable from any thread."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=30000")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, or part of the caller's when one is open (the relay commits a
    bulk's ledger ranges with its spool deletions in one). Rolled back on any error."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def bump(db: sqlite3.Connection, counts: Mapping[str, int]) -> None:
    """Add ``counts`` to the named counters of the ``counters`` table (zeros skipped)."""
    rows = [(name, n, n) for name, n in counts.items() if n]
    if rows:
        db.executemany(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = n + ?", rows
        )


def used_bytes(db: sqlite3.Connection) -> int:
    """Bytes in pages that hold data: the file does not shrink when rows go (freed pages are
    reused), so byte budgets apply to this, not to the file size."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)
