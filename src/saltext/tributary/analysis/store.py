"""Detector state on disk: one SQLite file beside the relay spool, so a top-master restart
does not send every series back to learning."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Hashable, Iterable, Iterator

from saltext.tributary.analysis.detector import SeriesModel
from saltext.tributary.util import sqlite
from saltext.tributary.util.clock import now_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (key TEXT PRIMARY KEY, seen INTEGER NOT NULL,
    state BLOB NOT NULL);
"""


def key_text(key: Hashable) -> str:
    """A series key as stored: ``["gateway", "sensor", "metric"]`` in JSON."""
    return json.dumps(list(key) if isinstance(key, tuple) else key)


def key_value(text: str) -> Hashable:
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


class ModelStore:
    """Series models by key, most recently seen first."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite.connect(path)
        self.db.executescript(SCHEMA)

    def save(self, models: Iterable[tuple[Hashable, SeriesModel]]) -> int:
        now = now_ms()
        rows = [(key_text(k), now, m.to_bytes()) for k, m in models]
        with sqlite.transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO models VALUES (?,?,?)", rows)
        return len(rows)

    def forget(self, keys: Iterable[Hashable]) -> None:
        with sqlite.transaction(self.db):
            self.db.executemany("DELETE FROM models WHERE key=?", [(key_text(k),) for k in keys])

    def load(self, limit: int) -> Iterator[tuple[Hashable, SeriesModel]]:
        """The ``limit`` most recently saved models, least recent first (LRU order)."""
        rows = self.db.execute(
            "SELECT key, state FROM (SELECT key, seen, state FROM models ORDER BY seen DESC"
            " LIMIT ?) ORDER BY seen",
            (limit,),
        ).fetchall()
        for text, blob in rows:
            try:
                yield key_value(text), SeriesModel.from_bytes(blob)
            except (ValueError, sqlite3.Error):
                continue  # an unreadable state relearns

    def get(self, key: Hashable) -> SeriesModel | None:
        row = self.db.execute("SELECT state FROM models WHERE key=?", (key_text(key),)).fetchone()
        return SeriesModel.from_bytes(row[0]) if row else None

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM models").fetchone()[0])

    def close(self) -> None:
        self.db.close()
