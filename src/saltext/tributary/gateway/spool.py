"""The gateway spool: a durable, numbered log of accepted readings (SQLite, WAL).

Every accepted reading is appended with the next sequence number of the spool's epoch before
it can be emitted. The epoch is created with the file and changes only when the file is lost
or found corrupt (it is then moved aside and a new epoch starts). A cursor remembers the last
emitted sequence; sent readings stay for the retention budget so the top master can ask for a
replay. Counters (received, rejected by reason, spooled, emitted, dropped) live in the same
file, so ``tributary.status`` in another process sees them and they survive restarts.

Records (the audit of each command sent to a device, kind ``command``) are numbered in the
same sequence as readings (a ``readings`` row whose sensor key is ``"@<kind>"``, its content in
``records``), so they are emitted, signed, replayed and accounted for exactly like readings
(see the wire format's "Records").

One ``GatewaySpool`` object per thread; several processes may open the same file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from saltext.tributary.protocol.reading import Reading
from saltext.tributary.protocol.wire import (
    SpooledReading,
    encode_batch,
    is_record_key,
    packed_size,
)
from saltext.tributary.util import clock, sqlite

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sensors (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL,
                                    unit TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY, sid INTEGER NOT NULL,
                                     ts INTEGER NOT NULL, value REAL NOT NULL,
                                     added INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inflight (src TEXT NOT NULL, mid INTEGER NOT NULL, digest BLOB NOT NULL,
                                     acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (src, mid));
CREATE TABLE IF NOT EXISTS inflight_flushes (id INTEGER PRIMARY KEY, src TEXT NOT NULL,
                                             mids BLOB NOT NULL, digests BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                                    body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS command_rate (device TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS command_rate_device ON command_rate (device, ts);
CREATE TABLE IF NOT EXISTS aside (id INTEGER PRIMARY KEY, key TEXT NOT NULL, ts INTEGER NOT NULL,
                                  value REAL NOT NULL, reason TEXT NOT NULL,
                                  added INTEGER NOT NULL);
"""
#: Readings set aside (implausible values) kept for inspection; the oldest go first.
ASIDE_KEEP = 1000
#: Bytes of a broker message's digest kept for redelivery checks (the MQTT source's blake2b-64).
DIGEST_BYTES = 8
#: Commits whose broker messages are remembered at most (a commit whose acknowledgements were
#: never sent, before a crash, is only needed until the broker redelivers them on reconnect).
INFLIGHT_KEEP = 1024


class Appended(NamedTuple):
    """What :meth:`GatewaySpool.append_messages` committed: the sequence range (0, 0 if none)
    and the ids of its in-flight records (one per message source), to settle later."""

    first: int
    last: int
    inflight_ids: tuple[int, ...] = ()


#: Floor for the on-disk bytes per reading used by the byte budget (the budget itself uses the
#: measured pages in use per row; bench/gateway.py measured ~60 B/reading incl. the WAL).
ROW_BYTES = 32


class SpoolError(RuntimeError):
    """A request the spool cannot satisfy (unknown epoch, range no longer held)."""


class SpoolFull(RuntimeError):
    """The spool's filesystem is full: nothing of the failed append was committed.

    Callers keep the readings (the MQTT source does not acknowledge them, so the broker keeps
    them) and retry; readings committed earlier are untouched.
    """


def _is_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "full" in text or "no space" in text


class GatewaySpool:
    """Durable numbered reading log for one gateway."""

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int | None = None,
        max_age_s: float | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._sensor_ids: dict[str, int] = {}
        #: wire bytes per reading of the last batch emitted: how many the next one may hold
        self._bytes_per_reading = 0.0
        #: whether the last ``next_batches`` stopped at its run's byte cap (not for want of rows)
        self.last_run_full = False
        self.db = self._open()
        self.epoch: str = self._meta("epoch") or ""
        if self._rewound():
            self.db.close()
            self._move_aside("rewound")
            self.db = self._connect()
            self.epoch = self._meta("epoch") or ""

    # -- opening, corruption ---------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite.connect(self.path)
        db.executescript(SCHEMA)
        with sqlite.transaction(db):
            if db.execute("SELECT v FROM meta WHERE k='epoch'").fetchone() is None:
                epoch = uuid.uuid4().hex[:12]
                db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('last_seq', '0')")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('cursor', '0')")
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(clock.now_ms()),)
                )
                log.info("tributary spool %s: new epoch %s", self.path, epoch)
        return db

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            db = self._connect()
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                db.close()
                raise sqlite3.DatabaseError(f"quick_check: {row}")
            return db
        except sqlite3.DatabaseError as exc:
            aside = self._move_aside("corrupt")
            log.error(
                "tributary spool %s is corrupt (%s): moved aside to %s, starting a new epoch",
                self.path,
                exc,
                aside,
            )
            return self._connect()

    def _move_aside(self, why: str) -> str:
        aside = f"{self.path}.{why}-{int(time.time())}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        return aside

    # -- the high-water mark: sequences never go backwards within an epoch --------------------
    @property
    def _hwm_path(self) -> str:
        return self.path + ".hwm"

    def _rewound(self) -> bool:
        """Has this spool gone back in time (restored from a backup or a snapshot)? The mark
        file beside it holds the last sequence emitted in this epoch; a spool whose numbering
        is behind it would give new readings ids that were already used for other readings,
        so it starts a new epoch instead (the old file is kept, moved aside)."""
        try:
            with open(self._hwm_path, encoding="ascii") as fh:
                epoch, seq = fh.read().split()
            emitted = int(seq)
        except (OSError, ValueError):
            return False
        last = int(self._meta("last_seq") or 0)
        if epoch != self.epoch or emitted <= last:
            return False
        log.error(
            "tributary spool %s: epoch %s had emitted up to sequence %d but the spool is at %d"
            " (restored from a backup?): starting a new epoch",
            self.path,
            epoch,
            emitted,
            last,
        )
        return True

    def _mark_high_water(self, seq: int) -> None:
        tmp = f"{self._hwm_path}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{self.epoch} {seq}\n")
            os.replace(tmp, self._hwm_path)
        except OSError as exc:  # a read-only or full disk: the spool itself reports that
            log.warning("tributary spool %s: high-water mark not written: %s", self.path, exc)

    def close(self) -> None:
        self.db.close()

    # -- meta and counters -----------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def _bump(self, counts: Mapping[str, int]) -> None:
        sqlite.bump(self.db, counts)

    def count(self, counts: Mapping[str, int]) -> None:
        """Add to named counters (e.g. ``{"rejected:not_numeric": 1}``)."""
        with self._lock, sqlite.transaction(self.db):
            self._bump(counts)

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, n FROM counters ORDER BY name").fetchall())

    def reset_counters(self) -> dict[str, int]:
        """Zero every counter; returns the values they had."""
        with self._lock:
            before = self.counters()
            self.db.execute("DELETE FROM counters")
        return before

    def committed_unacked(self, src: str, mid: int, digest: bytes) -> bool:
        """True if this broker message was committed but its acknowledgement is not known to
        have left: the newest commit that holds packet id ``mid`` of ``src`` decides (packet
        ids are reused), and the message is that one if its digest matches."""
        want_mid, want = struct.pack(">H", mid), _digest(digest)
        with self._lock:
            rows = self.db.execute(
                "SELECT mids, digests FROM inflight_flushes WHERE src=? ORDER BY id DESC", (src,)
            )
            for mids, digests in rows:
                pos = _last_mid(mids, want_mid)
                if pos is not None:
                    return bool(digests[pos * DIGEST_BYTES : (pos + 1) * DIGEST_BYTES] == want)
            # a spool written before in-flight records were kept per commit
            row = self.db.execute(
                "SELECT 1 FROM inflight WHERE src=? AND mid=? AND digest=? AND acked=0",
                (src, mid, digest),
            ).fetchone()
        return row is not None

    def set_state(self, key: str, value: str) -> None:
        """Store a runtime fact (broker connection, last error) for status readers."""
        self.db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            (f"state:{key}", value),
        )

    # -- appending ---------------------------------------------------------------------------
    def _sensor_id(self, key: str, unit: str) -> int:
        sid = self._sensor_ids.get(key)
        if sid is None:
            row = self.db.execute("SELECT id FROM sensors WHERE key=?", (key,)).fetchone()
            if row is None:
                cur = self.db.execute("INSERT INTO sensors (key, unit) VALUES (?, ?)", (key, unit))
                sid = int(cur.lastrowid or 0)
            else:
                sid = row[0]
            self._sensor_ids[key] = sid
        return sid

    def append(
        self,
        readings: Sequence[Reading],
        counts: Mapping[str, int] | None = None,
        aside: Sequence[tuple[Reading, str]] = (),
    ) -> tuple[int, int]:
        """Append readings in one transaction; returns (first_seq, last_seq) (0, 0 if none).

        ``counts`` are added to the counters in the same transaction, so a crash never leaves
        counters and data disagreeing. ``aside`` are readings set aside with their reason
        (implausible values), kept for inspection but never numbered or emitted. A full disk
        raises :class:`SpoolFull` with nothing committed.
        """
        done = self.append_messages(readings, counts, aside)
        return done.first, done.last

    def append_messages(
        self,
        readings: Sequence[Reading],
        counts: Mapping[str, int] | None = None,
        aside: Sequence[tuple[Reading, str]] = (),
        inflight: Sequence[tuple[str, int, bytes]] = (),
        acked: Sequence[int] = (),
    ) -> Appended:
        """:meth:`append`, with the broker messages the readings came from.

        ``inflight`` records those messages ``(source, packet id, digest)`` in the same
        transaction (one record per source per commit; its ids are returned) until ``acked``
        (in-flight record ids of earlier commits whose acknowledgements have left) settles
        them: a QoS 1 message the broker redelivers after a crash between commit and
        acknowledgement is recognised by :meth:`committed_unacked` instead of being numbered
        twice.
        """
        try:
            return self._append(readings, counts, aside, inflight, acked)
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                log.error("tributary spool %s: filesystem full, append refused: %s", self.path, exc)
                raise SpoolFull(f"spool {self.path}: filesystem full ({exc})") from exc
            raise

    def _append(
        self,
        readings: Sequence[Reading],
        counts: Mapping[str, int] | None,
        aside: Sequence[tuple[Reading, str]],
        inflight: Sequence[tuple[str, int, bytes]] = (),
        acked: Sequence[int] = (),
    ) -> Appended:
        with self._lock:
            try:
                with sqlite.transaction(self.db):
                    return self._insert(readings, counts, aside, inflight, acked)
            except BaseException:
                self._sensor_ids.clear()  # ids handed out inside the rolled-back transaction
                raise

    def _insert(
        self,
        readings: Sequence[Reading],
        counts: Mapping[str, int] | None,
        aside: Sequence[tuple[Reading, str]],
        inflight: Sequence[tuple[str, int, bytes]],
        acked: Sequence[int],
    ) -> Appended:
        last = int(self._meta("last_seq") or 0)
        first = last + 1
        now = clock.now_ms()
        rows = []
        for r in readings:
            last += 1
            rows.append((last, self._sensor_id(r.key, r.unit or ""), r.ts_ms, r.value, now))
        if rows:
            self.db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("UPDATE meta SET v=? WHERE k='last_seq'", (str(last),))
        if aside:
            self.db.executemany(
                "INSERT INTO aside (key, ts, value, reason, added) VALUES (?, ?, ?, ?, ?)",
                [(r.key, r.ts_ms, r.value, why, now) for r, why in aside],
            )
            self.db.execute(
                "DELETE FROM aside WHERE id <= (SELECT MAX(id) FROM aside) - ?",
                (ASIDE_KEEP,),
            )
        if acked:
            self.db.executemany("DELETE FROM inflight_flushes WHERE id=?", [(i,) for i in acked])
        ids: tuple[int, ...] = ()
        if inflight:
            ids = self._record_inflight(inflight)
        self._bump({"spooled": len(rows), **(counts or {})})
        return Appended(first, last, ids) if rows else Appended(0, 0, ids)

    def _record_inflight(self, inflight: Sequence[tuple[str, int, bytes]]) -> tuple[int, ...]:
        """One row per source: its packet ids and digests packed (far cheaper than a row per
        message); rows beyond the newest :data:`INFLIGHT_KEEP` are forgotten."""
        by_src: dict[str, tuple[list[int], list[bytes]]] = {}
        for src, mid, digest in inflight:
            mids, digests = by_src.setdefault(src, ([], []))
            mids.append(mid)
            digests.append(_digest(digest))
        ids = []
        for src, (mids, digests) in by_src.items():
            cur = self.db.execute(
                "INSERT INTO inflight_flushes (src, mids, digests) VALUES (?, ?, ?)",
                (src, struct.pack(f">{len(mids)}H", *mids), b"".join(digests)),
            )
            ids.append(int(cur.lastrowid or 0))
        self.db.execute("DELETE FROM inflight_flushes WHERE id <= ?", (ids[-1] - INFLIGHT_KEEP,))
        return tuple(ids)

    # -- records (command audit) ---------------------------------------------------------------
    def append_record(self, kind: str, ts_ms: int, body: Mapping[str, Any]) -> int:
        """Number one record (``body``: a JSON-able mapping) in the reading sequence; returns
        its sequence number. A full disk raises :class:`SpoolFull`."""
        text = json.dumps(body, sort_keys=True, default=str)
        try:
            with self._lock:
                try:
                    with sqlite.transaction(self.db):
                        last = int(self._meta("last_seq") or 0) + 1
                        sid = self._sensor_id(f"@{kind}", "")
                        self.db.execute(
                            "INSERT INTO readings VALUES (?, ?, ?, 0, ?)",
                            (last, sid, int(ts_ms), clock.now_ms()),
                        )
                        self.db.execute(
                            "INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (last, kind, text)
                        )
                        self.db.execute("UPDATE meta SET v=? WHERE k='last_seq'", (str(last),))
                        self._bump({f"records:{kind}": 1})
                        return last
                except BaseException:
                    self._sensor_ids.clear()
                    raise
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise SpoolFull(f"spool {self.path}: filesystem full ({exc})") from exc
            raise

    def reserve_command(
        self,
        device: str,
        max_n: int,
        window_s: float,
        now_ms: int | None = None,
        *,
        dry: bool = False,
    ) -> int | None:
        """The per-device rate limit, shared by every process on this gateway: None (and one
        more command counted for ``device``, unless ``dry``) when fewer than ``max_n`` were
        reserved within the last ``window_s``; otherwise how many were (nothing counted)."""
        now_ms = clock.now_ms() if now_ms is None else now_ms
        since = now_ms - int(window_s * 1000)
        with self._lock, sqlite.transaction(self.db):
            self.db.execute("DELETE FROM command_rate WHERE ts < ?", (since,))
            (n,) = self.db.execute(
                "SELECT COUNT(*) FROM command_rate WHERE device=? AND ts >= ?", (device, since)
            ).fetchone()
            if n >= max_n:
                return int(n)
            if not dry:
                self.db.execute("INSERT INTO command_rate VALUES (?, ?)", (device, now_ms))
        return None

    def records(self, kind: str | None = None, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` records (of ``kind``), newest last, with their sequence numbers."""
        rows = self.db.execute(
            "SELECT seq, kind, body FROM records WHERE ? IS NULL OR kind = ?"
            " ORDER BY seq DESC LIMIT ?",
            (kind, kind, n),
        ).fetchall()
        return [{"seq": q, "kind": k, **json.loads(b)} for q, k, b in reversed(rows)]

    # -- reading back --------------------------------------------------------------------------
    def _rows(self, lo: int, hi: int | None, limit: int) -> list[SpooledReading]:
        if hi is None:
            hi = 2**62
        # the sensor's key and unit joined in SQLite; rows built without a Python step each
        cur = self.db.execute(
            "SELECT r.seq, s.key, s.unit, r.ts, r.value, NULL FROM readings r"
            " JOIN sensors s ON s.id = r.sid WHERE r.seq >= ? AND r.seq <= ?"
            " ORDER BY r.seq LIMIT ?",
            (lo, hi, limit),
        )
        out = list(map(SpooledReading._make, cur))
        if out:
            # records (command audit entries) carry a body; they are few
            bodies = self.db.execute(
                "SELECT seq, body FROM records WHERE seq >= ? AND seq <= ?",
                (out[0].seq, out[-1].seq),
            ).fetchall()
            first = out[0].seq
            where: dict[int, int] | None = None
            for seq, body in bodies:
                n = seq - first
                if not (0 <= n < len(out) and out[n].seq == seq):  # a hole before it
                    if where is None:
                        where = {r.seq: i for i, r in enumerate(out)}
                    n = where.get(seq, -1)
                if n >= 0 and out[n].key[:1] == "@":
                    out[n] = out[n]._replace(body=json.loads(body or "{}"))
        return out

    def _batch_within(
        self, rows: list[SpooledReading], max_bytes: int, guess: int | None = None, **kw: Any
    ) -> tuple[dict[str, Any], int] | None:
        """Largest contiguous prefix of ``rows`` whose batch packs within ``max_bytes`` (to
        about 5 %), tried first at ``guess`` readings when given (the previous batch's bytes
        per reading tell how many fit: one encoding instead of two or three)."""
        # Contiguity: stop at the first hole (a hole only appears where retention dropped rows).
        if rows and rows[-1].seq - rows[0].seq != len(rows) - 1:
            for n in range(1, len(rows)):
                if rows[n].seq != rows[n - 1].seq + 1:
                    rows = rows[:n]
                    break
        n = len(rows) if guess is None else max(1, min(len(rows), guess))
        while n > 0:
            batch = encode_batch(self.epoch, rows[:n], **kw)
            size = packed_size(batch)
            if size <= max_bytes or n == 1:
                # One reading over the cap goes alone (intake bounds a reading's size, so it is
                # small): waiting for it to fit would stop emission for good.
                return batch, size
            n = max(1, min(n - 1, int(n * max_bytes / size * 0.95)))
        return None

    def peek_unsent(self, max_rows: int = 8_000) -> tuple[list[SpooledReading], int]:
        """The next unsent readings (contiguous, oldest first) and the not-yet-reported drops."""
        cursor = int(self._meta("cursor") or 0)
        oldest = self.db.execute("SELECT MIN(seq) FROM readings").fetchone()[0]
        rows = self._rows(max(cursor + 1, oldest or 0), None, max_rows)
        for n in range(1, len(rows)):
            if rows[n].seq != rows[n - 1].seq + 1:
                rows = rows[:n]
                break
        return rows, int(self._meta("undelivered_dropped") or 0)

    @property
    def bytes_per_reading(self) -> float:
        """Wire bytes per reading of the last full batch this connection emitted (0: none)."""
        return self._bytes_per_reading

    def unsent(self) -> int:
        """Readings numbered and not yet emitted (two meta reads)."""
        return max(0, int(self._meta("last_seq") or 0) - int(self._meta("cursor") or 0))

    def mark_emitted(self, batch: Mapping[str, Any], readings: int) -> None:
        """Move the cursor past ``batch`` and count it (one transaction)."""
        with self._lock, sqlite.transaction(self.db):
            self.db.execute("UPDATE meta SET v=? WHERE k='cursor'", (str(batch["last"]),))
            if batch.get("dropped"):
                self.db.execute(
                    "UPDATE meta SET v=CAST(MAX(0, CAST(v AS INTEGER) - ?) AS TEXT)"
                    " WHERE k='undelivered_dropped'",
                    (int(batch["dropped"]),),
                )
            counts = {"emitted": readings, "batches": 1}
            if batch.get("agg"):
                counts.update(aggregated=readings, agg_batches=1, agg_rows=len(batch["r"]))
            self._bump(counts)
        self._mark_high_water(int(batch["last"]))

    def next_batches(
        self,
        *,
        max_batch_bytes: int = 32_768,
        max_run_bytes: int = 98_304,
        read_rows: int = 8_000,
        site: str | None = None,
    ) -> list[dict[str, Any]]:
        """The next unsent readings as batches within the byte caps; moves the cursor.

        Rows are read from the spool at least ``read_rows`` at a time, more (up to 50,000)
        when the last full batch's bytes per reading say the rest of the run needs them.
        The cursor moves in the same call: an emitted batch that never reaches the top master
        is found as a gap there and replayed from this spool.
        """
        out: list[dict[str, Any]] = []
        spent = 0
        rows: list[SpooledReading] = []
        per_row = self._bytes_per_reading  # of the last batch emitted
        self.last_run_full = False
        while spent < max_run_bytes:
            cap = min(max_batch_bytes, max_run_bytes - spent)
            guess = int(cap / per_row * 0.97) if per_row else None
            # the rows read for one batch serve the next while enough of them are left
            if not rows or (guess is not None and len(rows) < guess):
                # enough for the rest of the run at once when its bytes per reading are known
                want = int((max_run_bytes - spent) / per_row * 1.05) if per_row else 0
                rows, dropped = self.peek_unsent(min(max(read_rows, want), 50_000))
                if not rows:
                    break
            else:
                dropped = int(self._meta("undelivered_dropped") or 0)
            got = self._batch_within(rows, cap, guess, site=site, dropped=dropped)
            if got is None:
                break
            batch, size = got
            n = len(batch["r"])
            self.mark_emitted(batch, n)
            out.append(batch)
            spent += size
            if cap == max_batch_bytes and n >= 64:  # a full batch, not mostly its envelope
                per_row = self._bytes_per_reading = size / n
            rows = rows[n:]
            if cap < max_batch_bytes:
                # that batch took what was left of the run's bytes: no crumbs after it
                self.last_run_full = True
                break
        else:
            self.last_run_full = True
        return out

    def replay(
        self, epoch: str, from_seq: int, to_seq: int, *, max_batch_bytes: int = 32_768
    ) -> list[dict[str, Any]]:
        """Batches re-encoding what is held of ``[from_seq, to_seq]`` of ``epoch`` (the cursor
        does not move); SpoolError when none of it is held."""
        held = self.held()
        holds = (
            f"epoch {self.epoch}, sequences {held['first']}..{held['last']}"
            if held["first"] is not None
            else f"epoch {self.epoch}, no readings"
        )
        if epoch != self.epoch:
            raise SpoolError(f"unknown epoch {epoch!r}: this spool holds {holds}")
        if from_seq > to_seq:
            raise SpoolError(f"empty range {from_seq}..{to_seq}")
        if held["first"] is None or to_seq < held["first"] or from_seq > held["last"]:
            raise SpoolError(
                f"range {from_seq}..{to_seq} of epoch {epoch} is not held: this spool holds {holds}"
            )
        # What is held of the range is replayed; the rest (trimmed by retention) is then the
        # only part still missing, and the next request for it is answered "not held".
        from_seq, to_seq = max(from_seq, held["first"]), min(to_seq, held["last"])
        out = []
        lo = from_seq
        while lo <= to_seq:
            rows = self._rows(lo, to_seq, 8_000)
            if not rows:
                break
            got = self._batch_within(rows, max_batch_bytes)
            if got is None:
                break
            out.append(got[0])
            lo = got[0]["last"] + 1
        return out

    @staticmethod
    def _held_count(lo: int | None, hi: int | None) -> int:
        """Rows held: sequences are contiguous (numbered in one transaction, and retention only
        ever cuts the oldest), so this is ``last - first + 1`` without counting the table."""
        return 0 if lo is None or hi is None else hi - lo + 1

    def _last_added_before(self, cutoff_ms: int) -> int:
        """The last sequence spooled before ``cutoff_ms`` (0 if none), found by bisecting the
        sequence: rows are spooled in time order, so this reads about 2 log2(n) rows instead of
        scanning the table (a wall clock stepped back can leave a few rows kept a little
        longer than the age budget, never dropped early)."""
        lo, hi = self._seq_range()
        if lo is None or hi is None:
            return 0
        found = 0
        while lo <= hi:
            mid = (lo + hi) // 2
            row = self.db.execute(
                "SELECT seq, added FROM readings WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
            ).fetchone()
            if row is None:
                hi = mid - 1
            elif row[1] < cutoff_ms:
                found, lo = row[0], row[0] + 1
            else:
                hi = mid - 1
        return found

    def _seq_range(self) -> tuple[int | None, int | None]:
        """First and last held sequence. Two queries on purpose: SQLite answers a lone MIN or
        MAX from the primary key's b-tree, but ``SELECT MIN(seq), MAX(seq)`` scans the table
        (5 ms at 60,000 rows, growing with the spool)."""
        lo = self.db.execute("SELECT MIN(seq) FROM readings").fetchone()[0]
        hi = self.db.execute("SELECT MAX(seq) FROM readings").fetchone()[0]
        return lo, hi

    def held(self) -> dict[str, Any]:
        lo, hi = self._seq_range()
        return {"epoch": self.epoch, "first": lo, "last": hi}

    def set_aside(self, n: int = 20) -> list[dict[str, Any]]:
        """The last readings set aside (implausible), newest last."""
        rows = self.db.execute(
            "SELECT key, ts, value, reason FROM aside ORDER BY id DESC LIMIT ?", (n,)
        ).fetchall()
        return [
            {"key": k, "ts_ms": ts, "value": v, "reason": why} for k, ts, v, why in reversed(rows)
        ]

    def latest(self) -> dict[str, dict[str, Any]]:
        """The newest held reading of every sensor key."""
        rows = self.db.execute(
            "SELECT s.key, s.unit, r.seq, r.ts, r.value FROM readings r JOIN sensors s"
            " ON s.id = r.sid WHERE r.seq IN (SELECT MAX(seq) FROM readings GROUP BY sid)"
        ).fetchall()
        return {
            k: {"unit": u or None, "seq": seq, "ts_ms": ts, "value": v}
            for k, u, seq, ts, v in rows
            if not is_record_key(k)
        }

    def sensor_keys(self) -> list[str]:
        """Every sensor key this spool has numbered (``<sensor>/<metric>``)."""
        rows = self.db.execute("SELECT key FROM sensors ORDER BY key")
        return [k for (k,) in rows if not is_record_key(k)]

    def tail(self, n: int = 10) -> list[dict[str, Any]]:
        last = int(self._meta("last_seq") or 0)
        rows = self._rows(max(1, last - n + 1), None, n)
        return [
            {"seq": r.seq, "key": r.key, "unit": r.unit, "ts_ms": r.ts_ms, "value": r.value}
            for r in rows
        ]

    def _bytes_per_row(self, n: int) -> float:
        """Measured bytes per held reading (used pages of the file / rows), at least ROW_BYTES.

        The file does not shrink when rows go (freed pages are reused), so the byte budget is
        applied to the pages in use, not to the file size.
        """
        if n <= 0:
            return float(ROW_BYTES)
        return max(float(ROW_BYTES), sqlite.used_bytes(self.db) / n)

    # -- retention -------------------------------------------------------------------------
    def trim(self, now_ms: int | None = None) -> int:
        """Apply the age and byte budgets; drop oldest first, count what was never emitted."""
        now_ms = now_ms or clock.now_ms()
        dropped = 0
        with self._lock, sqlite.transaction(self.db):
            cursor = int(self._meta("cursor") or 0)
            cut = 0
            if self.max_age_s is not None:
                cut = max(cut, self._last_added_before(now_ms - int(self.max_age_s * 1000)))
            if self.max_bytes is not None:
                lo, hi = self._seq_range()
                n = self._held_count(lo, hi)
                over = n - int(self.max_bytes // self._bytes_per_row(n))
                if over > 0 and lo is not None:
                    cut = max(cut, lo + over - 1)
            if cut:
                cur = self.db.execute("DELETE FROM readings WHERE seq <= ?", (cut,))
                self.db.execute("DELETE FROM records WHERE seq <= ?", (cut,))
                removed = cur.rowcount
                unsent = self.db.execute(
                    "SELECT ? - ?", (min(cut, int(self._meta("last_seq") or 0)), cursor)
                ).fetchone()[0]
                if unsent > 0:
                    # Never emitted: a real loss. Count it, tell the next batch, move on.
                    dropped = unsent
                    self._bump({"dropped": unsent})
                    prev = int(self._meta("undelivered_dropped") or 0)
                    self.db.execute(
                        "INSERT INTO meta VALUES ('undelivered_dropped', ?) "
                        "ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                        (str(prev + unsent),),
                    )
                    self.db.execute("UPDATE meta SET v=? WHERE k='cursor'", (str(cut),))
                    log.warning(
                        "tributary spool %s: retention dropped %d never-sent readings",
                        self.path,
                        unsent,
                    )
                self._bump({"trimmed": removed})
        return dropped

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        held = self.held()
        n = self._held_count(held["first"], held["last"])
        row = self.db.execute("SELECT added FROM readings ORDER BY seq LIMIT 1").fetchone()
        oldest_added = row[0] if row else None
        last = int(self._meta("last_seq") or 0)
        cursor = int(self._meta("cursor") or 0)
        states = dict(
            (k[len("state:") :], v)
            for k, v in self.db.execute("SELECT k, v FROM meta WHERE k LIKE 'state:%'")
        )
        try:
            size = sum(
                os.path.getsize(self.path + s)
                for s in ("", "-wal")
                if os.path.exists(self.path + s)
            )
        except OSError:
            size = 0
        counters = self.counters()
        return {
            "path": self.path,
            "epoch": self.epoch,
            "last_seq": last,
            "cursor": cursor,
            "unsent": max(0, last - cursor),
            "held": {"first": held["first"], "last": held["last"], "count": n},
            "oldest_age_s": round((clock.now_ms() - oldest_added) / 1000, 1) if oldest_added else 0,
            "bytes": size,
            "dropped": counters.get("dropped", 0),
            "dropped_not_yet_reported": int(self._meta("undelivered_dropped") or 0),
            "budget": {"max_bytes": self.max_bytes, "max_age_s": self.max_age_s},
            "counters": counters,
            "state": states,
        }


def _digest(digest: bytes) -> bytes:
    return bytes(digest[:DIGEST_BYTES]).ljust(DIGEST_BYTES, b"\0")


def _last_mid(mids: bytes, want: bytes) -> int | None:
    """Index of the last packed 16-bit packet id ``want`` in ``mids``, or None."""
    i = mids.rfind(want)
    while i > 0 and i % 2:
        i = mids.rfind(want, 0, i + 1)
    return None if i < 0 else i // 2
