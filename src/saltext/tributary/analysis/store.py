"""Detector state on disk: one SQLite file beside the relay spool, so a top-master restart
does not send every series back to learning."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
from collections.abc import Hashable, Iterable, Iterator

from saltext.tributary.analysis.detector import SeriesModel
from saltext.tributary.util import sqlite
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

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
    """Series models by key, most recently seen first.

    A saved state this detector cannot read (an older version's, or damaged) is discarded:
    deleted, counted in ``discarded``, and its series learns again; it never stops a load."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite.connect(path)
        self.db.executescript(SCHEMA)
        #: saved states dropped because this detector cannot read them
        self.discarded = 0

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
        bad = []
        for text, blob in rows:
            try:
                yield key_value(text), SeriesModel.from_bytes(blob)
            except (ValueError, TypeError, struct.error, sqlite3.Error):
                bad.append(text)  # an unreadable state relearns
        self._discard(bad)

    def get(self, key: Hashable) -> SeriesModel | None:
        text = key_text(key)
        row = self.db.execute("SELECT state FROM models WHERE key=?", (text,)).fetchone()
        if not row:
            return None
        try:
            return SeriesModel.from_bytes(row[0])
        except (ValueError, TypeError, struct.error):
            self._discard([text])
            return None

    def _discard(self, texts: list[str]) -> None:
        if not texts:
            return
        self.discarded += len(texts)
        log.warning(
            "tributary anomalies: %d saved models of another detector version discarded"
            " (those series learn again)",
            len(texts),
        )
        with sqlite.transaction(self.db):
            self.db.executemany("DELETE FROM models WHERE key=?", [(t,) for t in texts])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM models").fetchone()[0])

    def close(self) -> None:
        self.db.close()
