"""The relay: top master event bus -> durable relay spool -> Elasticsearch bulk.

``Relay.accept`` is called for every event on the master bus. It takes Tributary batches
(``salt/beacon/<gateway>/<beacon>/batch``, also when they arrive a second time as
``syndic/<syndic>/salt/beacon/...``), appends them to the relay spool and returns at once.
A shipper thread reads the spool oldest first, bulk-creates documents with the deterministic
id ``<gateway>:<epoch>:<seq>`` and deletes a batch from the spool only once every one of its
documents is confirmed: created, already present (409), or written to the dead-letter index.
The gateway id is the one in the event tag (Salt sets it from the authenticated minion id),
never a value inside the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack

from saltext.tributary import signing
from saltext.tributary.es import index_name, precreate_indices
from saltext.tributary.ledger import Ledger
from saltext.tributary.reading import doc_id
from saltext.tributary.wire import DecodedBatch, WireError, decode_batch

log = logging.getLogger(__name__)

TAG_RE = re.compile(
    r"^(?:syndic/[^/]+/)*salt/beacon/(?P<gw>[^/]+)/(?P<beacon>[^/]+)/(?P<kind>batch|health)$"
)
KEYS_RE = re.compile(r"^(?:syndic/[^/]+/)*tributary/keys/(?P<syndic>[^/]+)$")
RETRYABLE = {429, 500, 502, 503, 504}
SWITCH_INTERVAL_S = 0.0005
#: Only what the relay reads from a bulk answer (a third of the full answer's bytes).
BULK_FILTER = "items.*._index,items.*.status,items.*.error"

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, gateway TEXT NOT NULL,
    kind TEXT NOT NULL, ukey TEXT NOT NULL UNIQUE, received INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeat_facts (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_keys (gateway TEXT NOT NULL, source TEXT NOT NULL,
    pem TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (gateway, source));
"""
#: Columns added after the first release of the spool schema (migrated in place).
EXTRA_COLUMNS = {
    "hold_until": "INTEGER NOT NULL DEFAULT 0",
    "n": "INTEGER NOT NULL DEFAULT 0",
}


_LOCKS_GUARD = threading.Lock()
_WRITE_LOCKS: dict[str, threading.RLock] = {}


def _write_lock(path: str) -> threading.RLock:
    """One writer lock per spool file in this process. The bus reader and the shipper write
    through separate SQLite connections; contended, SQLite's busy handler sleeps 1, 2, 5, 10 ms
    ... per retry (py-spy showed intake spending its time there). A Python lock hands over at
    once, and SQLite never sees the two threads collide."""
    with _LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(os.path.abspath(path), threading.RLock())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _jstr(value: str | None) -> str:
    """JSON for a string (or null)."""
    return json.dumps(value)


def _jnum(value: float) -> str:
    """JSON for a finite number (decode_batch has already refused non-finite values)."""
    if type(value) is float:
        return repr(value)
    return json.dumps(value)


def reading_doc(original: Any) -> dict[str, Any]:
    """The Elasticsearch document of a bulk op's original (a reading tuple or a dict)."""
    if not isinstance(original, tuple):
        return original
    gateway, site, epoch, now, r = original
    doc = {
        "@timestamp": r["ts_ms"],
        "gateway": gateway,
        "site": site,
        "sensor": r["sensor"],
        "metric": r["metric"],
        "value": r["value"],
        "unit": r["unit"],
        "seq": r["seq"],
        "epoch": epoch,
        "relayed_at": now,
    }
    if r.get("agg"):
        doc["agg"] = r["agg"]
    return doc


@dataclass
class RelayConfig:
    prefix: str = "tributary"
    spool_path: str = "/var/cache/salt/master/tributary/relay.db"
    bulk_max_docs: int = 5_000
    bulk_max_bytes: int = 8 * 1024 * 1024
    bulk_max_wait_s: float = 0.2
    #: Bulks in flight at once (the next is built while Elasticsearch indexes these).
    bulk_concurrency: int = 2
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    daily: bool = True
    dedup_window: int = 20_000
    #: Relay spool disk budget; past it the oldest batches are dropped (counted, logged).
    max_spool_bytes: int = 2 * 1024**3
    #: The top master's own pki_dir (accepted keys of directly attached gateways, syndics).
    pki_dir: str = "/etc/salt/pki/master"
    #: Accept unsigned batches (migrations only); mis-signed batches are still refused.
    allow_unsigned: bool = False
    #: How long a batch whose gateway key is not known yet waits for a key set.
    key_wait_s: float = 120.0
    #: Gap repair: grace period, request backoff, rate limit, attempts, request size.
    gap_grace_s: float = 60.0
    gap_check_s: float = 5.0
    replay_backoff_s: float = 30.0
    replay_backoff_max_s: float = 600.0
    replay_per_minute: int = 6
    replay_max_attempts: int = 8
    replay_max_readings: int = 20_000
    replay_timeout_s: float = 60.0
    #: Pipeline self-metrics into ``<prefix>-metrics-*`` every so often (0 = off).
    metrics_interval_s: float = 30.0


class RelaySpool:
    """Durable FIFO of received batches (SQLite, WAL)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(batches)")}
        for col, decl in EXTRA_COLUMNS.items():
            if col not in have:
                try:
                    self.db.execute(f"ALTER TABLE batches ADD COLUMN {col} {decl}")
                except sqlite3.OperationalError:  # another connection migrated it meanwhile
                    pass
        self.ledger = Ledger(self.db)
        self._puts = 0
        self.write_lock = _write_lock(path)

    def put(self, gateway: str, kind: str, ukey: str, data: Any) -> bool:
        body = msgpack.packb(data, use_bin_type=True, default=str)
        rows = data.get("r") if isinstance(data, Mapping) else None
        with self.write_lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO batches (gateway, kind, ukey, received, body, n)"
                " VALUES (?,?,?,?,?,?)",
                (gateway, kind, ukey, _now_ms(), body, len(rows) if isinstance(rows, list) else 0),
            )
            return cur.rowcount == 1

    def used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def enforce_budget(self, max_bytes: int) -> tuple[int, int]:
        """Drop the oldest batches until the spool fits ``max_bytes``: (batches, readings)."""
        with self.write_lock:
            return self._enforce_budget(max_bytes)

    def _enforce_budget(self, max_bytes: int) -> tuple[int, int]:
        batches = readings = 0
        while self.used_bytes() > max_bytes:
            rows = self.db.execute("SELECT id, n FROM batches ORDER BY id LIMIT 4").fetchall()
            if not rows:
                break
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
        with self.write_lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def set_keys(self, source: str, keys: Mapping[str, str]) -> None:
        """Replace the accepted keys published by ``source`` (a syndic id)."""
        now = time.time()
        with self.transaction():
            self.db.execute("DELETE FROM gateway_keys WHERE source=?", (source,))
            self.db.executemany(
                "INSERT INTO gateway_keys VALUES (?,?,?,?)",
                [(gw, source, pem, now) for gw, pem in keys.items()],
            )

    def keys_for(self, gateway: str) -> list[str]:
        return [
            r[0]
            for r in self.db.execute("SELECT pem FROM gateway_keys WHERE gateway=?", (gateway,))
        ]

    def key_sources(self) -> dict[str, int]:
        return dict(
            self.db.execute("SELECT source, COUNT(*) FROM gateway_keys GROUP BY source").fetchall()
        )

    def depth_by_gateway(self) -> dict[str, tuple[int, int]]:
        return {
            gw: (b, n)
            for gw, b, n in self.db.execute(
                "SELECT gateway, COUNT(*), SUM(n) FROM batches GROUP BY gateway"
            )
        }

    def take(
        self, limit: int, max_docs: int | None = None, skip: Collection[int] = ()
    ) -> list[tuple[int, str, str, int, Any]]:
        """The oldest shippable batches: at most ``limit`` rows and, past the first row, at most
        ``max_docs`` readings, skipping rows in ``skip`` (in flight). Only taken rows are
        unpacked."""
        cur = self.db.execute(
            "SELECT id, gateway, kind, received, n, body FROM batches WHERE hold_until<=?"
            " ORDER BY id LIMIT ?",
            (_now_ms(), limit + len(skip)),
        )
        out: list[tuple[int, str, str, int, Any]] = []
        docs = 0
        try:
            for i, gw, kind, rec, n, body in cur:
                if i in skip:
                    continue
                k = max(n or 0, 1)
                if max_docs is not None and out and docs + k > max_docs:
                    break
                out.append(
                    (i, gw, kind, rec, msgpack.unpackb(body, raw=False, strict_map_key=False))
                )
                docs += k
                if len(out) >= limit:
                    break
        finally:
            cur.close()
        return out

    def done(self, ids: list[int]) -> None:
        self.db.executemany("DELETE FROM batches WHERE id=?", [(i,) for i in ids])

    def depth(self) -> tuple[int, int | None]:
        n, oldest = self.db.execute("SELECT COUNT(*), MIN(received) FROM batches").fetchone()
        return n, oldest

    def bump(self, counts: Mapping[str, int]) -> None:
        for name, n in counts.items():
            if n:
                self.db.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = n + ?",
                    (name, n, n),
                )

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, n FROM counters").fetchall())

    def close(self) -> None:
        self.db.close()


@dataclass
class Docs:
    """Bulk operations for some spooled batches, and which batch each op belongs to."""

    lines: list[str]
    owners: list[int]  # spool row id per operation
    #: per op: the document (dict) or, for readings, (gateway, site, epoch, now, reading)
    originals: list[Any]
    ids: list[int]
    #: per spool row: (gateway, epoch, first, last) accounted for once the row is done
    ranges: dict[int, tuple[str, str, int, int]] = field(default_factory=dict)
    #: per spool row: (gateway, epoch, last_seq) from a health heartbeat
    heartbeats: dict[int, tuple[str, str, int]] = field(default_factory=dict)
    facts: dict[int, tuple[str, Any]] = field(default_factory=dict)
    #: rows waiting for their gateway's key (not shipped now)
    held: list[int] = field(default_factory=list)


def batch_key(gateway: str, data: Mapping[str, Any]) -> str:
    """Identity of one emission of a batch (a replay request is a new emission).

    It includes a digest of the signature: the identity is checked before the signature is
    (intake only spools), so a forged batch claiming a genuine batch's range must not make the
    genuine one look like a duplicate. The syndic's second copy carries the same signature."""
    key = f"{gateway}:{data.get('epoch')}:{data.get('first')}:{data.get('last')}"
    if data.get("replay"):
        key = f"{key}:r{data['replay']}"
    sig = data.get("sig")
    if sig is not None:
        key += ":" + hashlib.blake2b(repr(sig).encode(), digest_size=8).hexdigest()
    return key


class Relay:
    """Accepts events, ships spooled batches to Elasticsearch."""

    def __init__(
        self, client: Any, config: RelayConfig, setup: Callable[[], None] | None = None
    ) -> None:
        self.client = client
        self._setup = setup
        self.ready = setup is None
        self.config = config
        self.spool = RelaySpool(config.spool_path)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        self._clock = threading.Lock()
        self.last_error: str | None = None
        self._puts = 0
        self._last_metrics = time.monotonic()
        self.name = "relay"
        self._index_names: dict[int, str] = {}
        self._last_precreate = time.monotonic()  # the engine's set-up created today's
        self._fragments: dict[tuple[Any, Any, Any], str] = {}

    # -- intake (event loop thread) -------------------------------------------------------
    def accept(self, tag: str, data: Any) -> bool:
        """Spool one bus event if it is a Tributary batch; True if it was taken."""
        m = TAG_RE.match(tag)
        if m is None:
            k = KEYS_RE.match(tag)
            if k is not None:
                return self.accept_keys(k.group("syndic"), data)
            return False
        gateway, kind = m.group("gw"), m.group("kind")
        self._inc("events_in", 1)
        if isinstance(data, Mapping) and "v" not in data and isinstance(data.get("data"), Mapping):
            # A single event sent with event.fire_master arrives as the whole request load
            # (masterapi._minion_event fires the load itself): the batch is its "data".
            data = data["data"]
        if not isinstance(data, Mapping):
            data = {"_raw": repr(data)[:4096]}
        ukey = f"{kind}:{batch_key(gateway, data)}"
        if kind == "health":
            ukey += f":{data.get('_stamp')}"
        if ukey in self._recent:
            self._inc("duplicate_events", 1)
            return False
        self._recent[ukey] = None
        if len(self._recent) > self.config.dedup_window:
            self._recent.popitem(last=False)
        payload = {k: v for k, v in data.items() if k not in ("_stamp",)}
        if self.spool.put(gateway, kind, ukey, payload):
            self._inc("batches_in", 1)
            self._puts += 1
            if self._puts % 64 == 0:
                self.check_budget()
            self._wake.set()
            return True
        self._inc("duplicate_events", 1)
        return False

    def check_budget(self) -> None:
        """Past the disk budget, drop the oldest spooled batches: counted, logged loudly."""
        batches, readings = self.spool.enforce_budget(self.config.max_spool_bytes)
        if batches:
            self._inc("spool_dropped_batches", batches)
            self._inc("spool_dropped_readings", readings)
            log.error(
                "tributary relay: spool past its budget of %d bytes: dropped the %d oldest"
                " batches (%d readings); the ledger will ask gateways to replay them",
                self.config.max_spool_bytes,
                batches,
                readings,
            )

    def accept_keys(self, syndic_id: str, data: Any) -> bool:
        """A syndic master's accepted gateway keys, signed by that syndic's own key."""
        if (
            isinstance(data, Mapping)
            and "keys" not in data
            and isinstance(data.get("data"), Mapping)
        ):
            data = data["data"]
        digest = repr(data.get("sig") if isinstance(data, Mapping) else data)
        if digest in self._recent:
            return False
        self._recent[digest] = None
        try:
            keys = signing.verify_keyset(syndic_id, data, self.local_key(syndic_id))
        except signing.SignatureError as exc:
            self._inc(f"keyset_rejected:{exc.reason}", 1)
            log.error("tributary relay: key set claiming syndic %s refused: %s", syndic_id, exc)
            return False
        self.spool.set_keys(syndic_id, keys)
        self.spool.release_holds()
        self._inc("keysets_in", 1)
        self._wake.set()
        return True

    def local_key(self, minion_id: str) -> str | None:
        """The key this master itself accepted for ``minion_id`` (None if not accepted)."""
        if not minion_id or minion_id in (".", "..") or os.sep in minion_id:
            return None
        path = os.path.join(self.config.pki_dir, "minions", minion_id)
        try:
            with open(path, encoding="ascii") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError):
            return None

    def check_origin(self, spool: RelaySpool, gateway: str, data: Mapping[str, Any]) -> None:
        """Raise SignatureError unless the batch is signed by ``gateway``'s accepted key."""
        pems = [p for p in [self.local_key(gateway), *spool.keys_for(gateway)] if p]
        if data.get("sig") is None and self.config.allow_unsigned:
            self._inc("unsigned_accepted", 1)
            return
        if not pems:
            signing.verify_batch(gateway, data, None)
        last: signing.SignatureError | None = None
        for pem in pems:
            try:
                signing.verify_batch(gateway, data, pem)
                return
            except signing.SignatureError as exc:
                last = exc
        assert last is not None
        raise last

    def _origin_refused(
        self,
        docs: Docs,
        spool: RelaySpool,
        row_id: int,
        gateway: str,
        received: int,
        data: Mapping[str, Any],
        now: int,
        what: str = "heartbeat",
    ) -> bool:
        """:meth:`check_origin` for one spooled row, with the batches' consequences: True when
        the row is not to be used, because it waits for its gateway's key (``docs.held``, for
        ``key_wait_s``) or is refused (counted, dead-lettered with the reason, done)."""
        try:
            self.check_origin(spool, gateway, data)
        except signing.SignatureError as exc:
            if exc.reason == "unknown_key" and now - received < self.config.key_wait_s * 1000:
                docs.held.append(row_id)  # the syndic's key set may not have arrived yet
                return True
            docs.ids.append(row_id)
            self._inc(f"rejected:{exc.reason}", 1)
            self._inc(f"rejected@{gateway}", 1)
            log.warning("tributary relay: %s under %s set aside: %s", what, gateway, exc)
            docs.lines.extend(
                self._deadletter(gateway, exc.reason, exc.detail, "origin", None, _brief(data))
            )
            docs.owners.append(row_id)
            docs.originals.append(dict(data))
            return True
        return False

    # -- shipping (shipper thread) --------------------------------------------------------
    def start(self) -> None:
        # The engine process holds two busy threads: the bus reader (I/O, many small waits) and
        # the shipper (CPU while it builds a bulk). With CPython's default 5 ms GIL switch
        # interval the reader waits up to 5 ms for the GIL after every socket read, and intake
        # fell to ~30 ms per 1,000-reading event while a bulk was being built (measured with
        # make bench). A 0.5 ms interval keeps the bus drained; the engine is its own process.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._ship_loop, name="tributary-ship", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _ship_loop(self) -> None:
        """Pipelined shipping: while Elasticsearch works on up to ``bulk_concurrency`` bulks,
        the next one is taken from the spool and built. Bulks are confirmed (:meth:`finish`:
        ledger, then the rows leave the spool) strictly in the order they were taken; a
        failure drops what was in flight back to the spool (re-sent ops answer 409)."""
        spool = RelaySpool(self.config.spool_path)
        depth = max(1, self.config.bulk_concurrency)
        pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="tributary-bulk")
        inflight: deque[tuple[Docs, Future[set[int]]]] = deque()
        backoff = self.config.backoff_min_s
        while not self._stop.is_set():
            try:
                self._maybe_metrics(spool)
                self._maybe_precreate()
                docs = None
                if len(inflight) < depth:
                    skip = {i for d, _ in inflight for i in d.ids}
                    docs = self.prepare(spool, skip=skip)
                    if docs is not None and docs.lines:
                        inflight.append((docs, pool.submit(self._bulk, docs)))
                    elif docs is not None:
                        self.finish(spool, docs, set())
                if inflight and (len(inflight) >= depth or docs is None or inflight[0][1].done()):
                    prev, fut = inflight.popleft()
                    self.finish(spool, prev, fut.result())
                backoff = self.config.backoff_min_s
                if not inflight and (docs is None or not docs.ids):
                    self._wake.wait(self.config.bulk_max_wait_s)
                    self._wake.clear()
            except Exception as exc:
                for _, fut in inflight:  # let them land; their rows stay spooled (409 on resend)
                    fut.exception()
                inflight.clear()
                self._inc("retried", 1)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "tributary relay: shipping failed (%s); retrying in %.1fs",
                    self.last_error,
                    backoff,
                )
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.config.backoff_max_s)
        try:
            while inflight:
                prev, fut = inflight.popleft()
                self.finish(spool, prev, fut.result(timeout=30))
        except Exception as exc:  # stays spooled: shipped again (409) at the next start
            log.info("tributary relay: last bulks not confirmed at stop: %s", exc)
        pool.shutdown(wait=True)
        spool.close()

    def build_docs(
        self, rows: list[tuple[int, str, str, int, Any]], spool: RelaySpool | None = None
    ) -> Docs:
        cfg = self.config
        spool = spool or self.spool
        now = _now_ms()
        lines: list[str] = []
        owners: list[int] = []
        originals: list[Any] = []
        ids: list[int] = []
        docs = Docs(lines, owners, originals, ids)
        dumps = json.dumps
        for row_id, gateway, kind, received, data in rows:
            if kind == "health":
                # A heartbeat's epoch/last_seq move the ledger (lost-tail detection): its origin
                # is proven like a batch's before it is believed, indexed or kept as facts.
                if self._origin_refused(docs, spool, row_id, gateway, received, data, now):
                    continue
                ids.append(row_id)
                data = {k: v for k, v in data.items() if k != "sig"}
                epoch, last_seq = data.get("epoch"), data.get("last_seq")
                if (
                    isinstance(epoch, str)
                    and isinstance(last_seq, int)
                    and not isinstance(last_seq, bool)
                ):
                    docs.heartbeats[row_id] = (gateway, epoch, last_seq)
                docs.facts[row_id] = (gateway, data)
                doc = {
                    "@timestamp": now,
                    "gateway": gateway,
                    **{k: v for k, v in data.items() if k not in ("tag", "id")},
                }
                idx = index_name(cfg.prefix, "health", now, cfg.daily)
                lines.append(dumps({"create": {"_index": idx}}))
                lines.append(dumps(doc, default=str))
                owners.append(row_id)
                originals.append(doc)
                continue
            try:
                self.check_origin(spool, gateway, data)
            except signing.SignatureError as exc:
                if exc.reason == "unknown_key" and now - received < cfg.key_wait_s * 1000:
                    docs.held.append(row_id)  # the syndic's key set may not have arrived yet
                    continue
                ids.append(row_id)
                self._inc(f"rejected:{exc.reason}", 1)
                self._inc(f"rejected@{gateway}", 1)
                log.warning("tributary relay: batch under %s set aside: %s", gateway, exc)
                lines.extend(
                    self._deadletter(gateway, exc.reason, exc.detail, "origin", None, _brief(data))
                )
                owners.append(row_id)
                originals.append(data)
                continue
            ids.append(row_id)
            try:
                batch = decode_batch(data)
            except WireError as exc:
                self._inc(f"rejected:{exc.reason}", 1)
                self._inc(f"rejected@{gateway}", 1)
                dl = self._deadletter(gateway, exc.reason, exc.detail, "wire", None, _brief(data))
                lines.extend(dl)
                owners.append(row_id)
                originals.append(data)
                continue
            docs.ranges[row_id] = (gateway, batch.epoch, batch.first, batch.last)
            for bad in batch.rejected:
                self._inc(f"rejected:{bad['reason']}")
                did = doc_id(gateway, batch.epoch, bad["seq"])
                lines.extend(
                    self._deadletter(gateway, bad["reason"], bad["detail"], "wire", did, bad)
                )
                owners.append(row_id)
                originals.append(bad)
            self._inc("readings_in", len(batch.readings))
            self._reading_lines(gateway, batch, now, row_id, docs)
        return docs

    def _reading_lines(
        self, gateway: str, batch: DecodedBatch, now: int, row_id: int, docs: Docs
    ) -> None:
        """Append one create op + document per reading (the hot loop: JSON built from cached
        fragments; the document dict is only materialised for a dead letter)."""
        cfg = self.config
        head = (
            f'"gateway":{_jstr(gateway)},"site":{_jstr(batch.site)},'
            f'"epoch":{_jstr(batch.epoch)},"relayed_at":{now}}}'
        )
        id_head = json.dumps(f"{gateway}:{batch.epoch}:")[:-1]
        lines, owners, originals = docs.lines, docs.owners, docs.originals
        names = self._index_names
        frags = self._fragments
        for r in batch.readings:
            ts = r["ts_ms"]
            day = ts // 86_400_000
            idx = names.get(day)
            if idx is None:
                if len(names) > 64:
                    names.clear()
                idx = names[day] = json.dumps(index_name(cfg.prefix, "readings", ts, cfg.daily))
            key = (r["sensor"], r["metric"], r["unit"])
            frag = frags.get(key)
            if frag is None:
                if len(frags) > 65_536:
                    frags.clear()
                frag = frags[key] = (
                    f'"sensor":{_jstr(key[0])},"metric":{_jstr(key[1])},"unit":{_jstr(key[2])}'
                )
            seq = r["seq"]
            agg = r.get("agg")
            lines.append(f'{{"create":{{"_index":{idx},"_id":{id_head}{seq}"}}}}')
            lines.append(
                f'{{"@timestamp":{ts},{frag},"value":{_jnum(r["value"])},"seq":{seq},'
                + (f'"agg":{json.dumps(agg)},' if agg else "")
                + head
            )
            owners.append(row_id)
            originals.append((gateway, batch.site, batch.epoch, now, r))

    def _deadletter(
        self,
        gateway: str,
        reason: str,
        detail: str,
        stage: str,
        did: str | None,
        original: Any,
    ) -> list[str]:
        now = _now_ms()
        idx = index_name(self.config.prefix, "deadletter", now, self.config.daily)
        meta: dict[str, Any] = {"_index": idx}
        if did:
            meta["_id"] = f"{did}:{stage}"
        doc = {
            "@timestamp": now,
            "gateway": gateway,
            "reason": reason,
            "detail": detail,
            "stage": stage,
            "doc_id": did,
            "original": original if isinstance(original, Mapping) else {"value": repr(original)},
        }
        self._inc("dead_lettered", 1)
        self._inc(f"dead_lettered@{gateway}", 1)
        return [json.dumps({"create": meta}), json.dumps(doc, default=str)]

    def prepare(self, spool: RelaySpool, skip: Collection[int] = ()) -> Docs | None:
        """The next bulk's worth of spooled batches (never splitting one) as bulk ops."""
        if not self.ready and self._setup is not None:
            self._setup()
            self.ready = True
        rows = spool.take(256, self.config.bulk_max_docs, skip)
        if not rows:
            return None
        docs = self.build_docs(rows, spool)
        if docs.held:
            spool.hold(docs.held, _now_ms() + 2_000)
        return docs

    def finish(self, spool: RelaySpool, docs: Docs, retry_rows: set[int]) -> int:
        """Account for a confirmed bulk: ledger ranges, heartbeats, then the rows leave the
        spool (except those with retryable documents, which raise after the rest is done)."""
        done = [i for i in docs.ids if i not in retry_rows]
        with spool.transaction():  # ledger, deletions and counters commit together
            for i in done:
                if i in docs.ranges:
                    gw, epoch, first, last = docs.ranges[i]
                    spool.ledger.add_range(gw, epoch, first, last)
                if i in docs.heartbeats:
                    spool.ledger.heartbeat(*docs.heartbeats[i])
                if i in docs.facts:
                    gw, data = docs.facts[i]
                    spool.db.execute(
                        "INSERT OR REPLACE INTO heartbeat_facts VALUES (?,?)",
                        (gw, json.dumps({"received_ms": _now_ms(), **data}, default=str)[:8192]),
                    )
            spool.done(done)
            spool.bump(self._drain_counters())
        if not done and docs.held:
            return 0
        if retry_rows:
            raise RuntimeError(
                f"{len(retry_rows)} batches need a retry (429/5xx on some documents)"
            )
        return len(done)

    def ship_once(self, spool: RelaySpool) -> int:
        """Ship one bulk's worth from the spool; returns the number of batches completed."""
        docs = self.prepare(spool)
        if docs is None:
            return 0
        return self.finish(spool, docs, self._bulk(docs) if docs.lines else set())

    def metrics_doc(self, spool: RelaySpool) -> dict[str, Any]:
        depth, oldest = spool.depth()
        counters = spool.counters()
        for k, v in self.counters.items():
            counters[k] = counters.get(k, 0) + v
        gaps = spool.ledger.gaps(include_given_up=False)
        return {
            "@timestamp": _now_ms(),
            "relay": self.name,
            # fleet counters only: per-gateway names would grow the mapping with the fleet
            "counters": {k.replace(":", "_"): v for k, v in counters.items() if "@" not in k},
            "spool_batches": depth,
            "spool_bytes": spool.used_bytes(),
            "spool_oldest_age_s": round((_now_ms() - oldest) / 1000, 1) if oldest else 0,
            "open_gaps": len(gaps),
            "missing_readings": sum(g.size for g in gaps),
        }

    def _maybe_metrics(self, spool: RelaySpool) -> None:
        every = self.config.metrics_interval_s
        if not every or time.monotonic() - self._last_metrics < every or not self.ready:
            return
        self._last_metrics = time.monotonic()
        doc = self.metrics_doc(spool)
        idx = index_name(self.config.prefix, "metrics", doc["@timestamp"], self.config.daily)
        try:
            self.client.index(index=idx, document=doc, op_type="create")
        except Exception as exc:  # metrics never stop the shipping
            log.debug("tributary relay: metrics not indexed: %s", exc)

    def _maybe_precreate(self) -> None:
        """Every ten minutes, make sure tomorrow's daily index exists before midnight."""
        if not self.ready or not self.config.daily or self.client is None:
            return
        if time.monotonic() - self._last_precreate < 600:
            return
        self._last_precreate = time.monotonic()
        try:
            precreate_indices(self.client, self.config.prefix, True)
        except Exception as exc:  # the first bulk of the day creates it otherwise
            log.debug("tributary relay: could not pre-create indices: %s", exc)

    def _inc(self, name: str, n: int = 1) -> None:
        with self._clock:
            self.counters[name] += n

    def _drain_counters(self) -> dict[str, int]:
        with self._clock:
            out = dict(self.counters)
            self.counters.clear()
        return out

    def _bulk(self, docs: Docs) -> set[int]:
        body = "\n".join(docs.lines) + "\n"
        resp = self.client.bulk(operations=body, refresh=False, filter_path=BULK_FILTER)
        items = resp.get("items") or []
        if len(items) != len(docs.owners):
            raise RuntimeError(f"bulk answered {len(items)} items for {len(docs.owners)} ops")
        retry: set[int] = set()
        second: list[str] = []
        counts: Counter[str] = Counter()
        readings_idx = f"{self.config.prefix}-readings"
        for n, item in enumerate(items):
            ((_op, res),) = item.items()
            status = res.get("status", 0)
            if status in (200, 201):
                index = str(res.get("_index", ""))
                if readings_idx in index:
                    orig = docs.originals[n]
                    gw = orig[0] if isinstance(orig, tuple) else orig.get("gateway", "?")
                    counts["indexed"] += 1
                    counts[f"indexed@{gw}"] += 1
                elif "-health" in index:
                    counts["health_indexed"] += 1
            elif status == 409:
                counts["already_present"] += 1
            elif status in RETRYABLE:
                counts["retried_docs"] += 1
                retry.add(docs.owners[n])
            else:
                err = res.get("error") or {}
                reason = (
                    err.get("type", f"status_{status}") if isinstance(err, Mapping) else str(err)
                )
                detail = err.get("reason", "") if isinstance(err, Mapping) else ""
                orig = reading_doc(docs.originals[n])
                if f"{self.config.prefix}-deadletter" in str(res.get("_index", "")):
                    log.error("tributary relay: dead letter itself rejected: %s %s", reason, detail)
                    counts["deadletter_failed"] += 1
                    continue
                did = None
                if isinstance(docs.originals[n], tuple):
                    did = doc_id(orig["gateway"], orig["epoch"], orig["seq"])
                second.extend(
                    self._deadletter(orig.get("gateway", "?"), reason, detail, "index", did, orig)
                )
        with self._clock:
            self.counters.update(counts)
        if second:
            resp2 = self.client.bulk(operations="\n".join(second) + "\n", refresh=False)
            if resp2.get("errors"):
                for item in resp2["items"]:
                    ((_, res),) = item.items()
                    if res.get("status") not in (200, 201, 409):
                        raise RuntimeError(f"dead-letter write failed: {res.get('error')}")
        return retry

    def status(self) -> dict[str, Any]:
        depth, oldest = self.spool.depth()
        return {
            "spool_batches": depth,
            "spool_oldest_age_s": round((_now_ms() - oldest) / 1000, 1) if oldest else 0,
            "counters": {**self.spool.counters()},
            "last_error": self.last_error,
        }


def _brief(data: Any, rows: int = 20) -> Any:
    """A dead letter's copy of a whole batch: everything but at most ``rows`` rows."""
    if isinstance(data, Mapping) and isinstance(data.get("r"), list) and len(data["r"]) > rows:
        return {**data, "r": data["r"][:rows], "r_total": len(data["r"])}
    return data


def take_event(relay: Relay, tag: Any, data: Any) -> None:
    """Hand one bus event to the relay; an error is logged and never ends the engine."""
    try:
        relay.accept(tag if isinstance(tag, str) else "", data)
    except Exception:
        log.exception("tributary relay: could not spool event %s", tag)


def _num(
    errors: list[str], block: Mapping[str, Any], key: str, name: str, lo: float, hi: float
) -> None:
    if key not in block:
        return
    val = block[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not lo <= val <= hi:
        errors.append(f"{name}: must be a number in {lo:g}..{hi:g}, got {val!r}")


GAP_KEYS = {
    "grace_s": ("gap_grace_s", 0, 86400 * 30),
    "check_s": ("gap_check_s", 0.1, 3600),
    "backoff_s": ("replay_backoff_s", 0, 86400),
    "backoff_max_s": ("replay_backoff_max_s", 0, 86400 * 7),
    "per_minute": ("replay_per_minute", 1, 10_000),
    "max_attempts": ("replay_max_attempts", 1, 1000),
    "max_readings": ("replay_max_readings", 1, 10_000_000),
    "timeout_s": ("replay_timeout_s", 1, 3600),
}


def validate_relay(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_relay`` engine config; never raises."""
    from saltext.tributary.es import validate_es_config

    try:
        if not isinstance(config, Mapping):
            return False, "tributary_relay: configuration must be a mapping"
        errors = validate_es_config(config.get("elasticsearch"))
        prefix = config.get("index_prefix", "tributary")
        if not isinstance(prefix, str) or not re.match(r"^[a-z0-9][a-z0-9_-]*$", prefix):
            errors.append("index_prefix: lowercase letters, digits, '-' and '_' only")
        for key in ("spool_path", "pki_dir"):
            if key in config and not isinstance(config[key], str):
                errors.append(f"{key}: must be a string")
        bulk = config.get("bulk", {})
        if not isinstance(bulk, Mapping):
            errors.append("bulk: must be a mapping (max_docs, max_wait_s, concurrency)")
        else:
            cc = bulk.get("concurrency", 1)
            if isinstance(cc, bool) or not isinstance(cc, int) or not 1 <= cc <= 8:
                errors.append("bulk.concurrency: must be an integer in 1..8")
            md = bulk.get("max_docs", 1)
            if isinstance(md, bool) or not isinstance(md, int) or not 1 <= md <= 100_000:
                errors.append("bulk.max_docs: must be an integer in 1..100000")
            mw = bulk.get("max_wait_s", 0.1)
            if isinstance(mw, bool) or not isinstance(mw, (int, float)) or mw < 0:
                errors.append("bulk.max_wait_s: must be a non-negative number")
        if config.get("indices", "daily") not in ("daily", "single", "data_stream"):
            errors.append("indices: must be 'daily', 'single' or 'data_stream'")
        if not isinstance(config.get("allow_unsigned", False), bool):
            errors.append("allow_unsigned: must be true or false")
        _num(errors, config, "spool_max_bytes", "spool_max_bytes", 1024 * 1024, 2**50)
        _num(errors, config, "key_wait_s", "key_wait_s", 0, 86400)
        _num(errors, config, "metrics_interval_s", "metrics_interval_s", 0, 86400)
        backoff = config.get("backoff", {})
        if not isinstance(backoff, Mapping):
            errors.append("backoff: must be a mapping (min_s, max_s)")
        else:
            _num(errors, backoff, "min_s", "backoff.min_s", 0.01, 3600)
            _num(errors, backoff, "max_s", "backoff.max_s", 0.01, 86400)
        gaps = config.get("gaps", {})
        if not isinstance(gaps, Mapping):
            errors.append("gaps: must be a mapping (grace_s, backoff_s, per_minute, ...)")
        else:
            for key, (_, lo, hi) in GAP_KEYS.items():
                _num(errors, gaps, key, f"gaps.{key}", lo, hi)
            unknown = set(gaps) - set(GAP_KEYS) - {"enabled"}
            if unknown:
                errors.append(f"gaps: unknown keys {sorted(unknown)}")
            if not isinstance(gaps.get("enabled", True), bool):
                errors.append("gaps.enabled: must be true or false")
        if errors:
            return False, "tributary_relay: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:
        return False, f"tributary_relay: invalid configuration: {exc}"


def relay_config(
    config: Mapping[str, Any], cachedir: str, pki_dir: str | None = None
) -> RelayConfig:
    bulk = config.get("bulk") or {}
    backoff = config.get("backoff") or {}
    rc = RelayConfig(
        prefix=config.get("index_prefix", "tributary"),
        spool_path=config.get("spool_path") or os.path.join(cachedir, "tributary", "relay.db"),
        bulk_max_docs=bulk.get("max_docs", RelayConfig.bulk_max_docs),
        bulk_max_wait_s=bulk.get("max_wait_s", RelayConfig.bulk_max_wait_s),
        bulk_concurrency=int(bulk.get("concurrency", RelayConfig.bulk_concurrency)),
        backoff_min_s=backoff.get("min_s", RelayConfig.backoff_min_s),
        backoff_max_s=backoff.get("max_s", RelayConfig.backoff_max_s),
        daily=config.get("indices", "daily") == "daily",
        max_spool_bytes=int(config.get("spool_max_bytes", RelayConfig.max_spool_bytes)),
        pki_dir=config.get("pki_dir") or pki_dir or RelayConfig.pki_dir,
        allow_unsigned=bool(config.get("allow_unsigned", False)),
        key_wait_s=float(config.get("key_wait_s", RelayConfig.key_wait_s)),
        metrics_interval_s=float(config.get("metrics_interval_s", RelayConfig.metrics_interval_s)),
    )
    for key, (attr, _, _) in GAP_KEYS.items():
        val = (config.get("gaps") or {}).get(key)
        if val is not None:
            setattr(rc, attr, type(getattr(rc, attr))(val))
    return rc


def engine_config(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary_relay`` engine block from master opts ({} if not configured)."""
    for entry in opts.get("engines") or []:
        if isinstance(entry, Mapping) and "tributary_relay" in entry:
            return dict(entry["tributary_relay"] or {})
    return {}


def check_elasticsearch(es_cfg: Any) -> dict[str, Any]:
    """Can the relay reach and authenticate to Elasticsearch with this config? Never raises."""
    from saltext.tributary.es import make_client, validate_es_config

    errors = validate_es_config(es_cfg)
    if errors:
        return {"reachable": False, "error": "; ".join(errors)}
    try:
        client = make_client({**es_cfg, "request_timeout": es_cfg.get("request_timeout", 10)})
        # cluster health needs only monitor rights and exists on every distribution (the
        # integ-test zip answers GET / with 405)
        health = client.cluster.health()
        return {
            "reachable": True,
            "cluster": health.get("cluster_name"),
            "status": health.get("status"),
        }
    except Exception as exc:  # report, never raise
        return {"reachable": False, "error": describe_error(exc)}


def describe_error(exc: BaseException) -> str:
    """An exception with its causes (the client's TLS errors say only "TLS error")."""
    parts = [f"{type(exc).__name__}: {exc}"]
    seen = {id(exc)}
    cur: BaseException | None = exc
    while cur is not None:
        nxt = cur.__cause__ or cur.__context__
        errors = getattr(cur, "errors", None)
        if nxt is None and isinstance(errors, (list, tuple)) and errors:
            nxt = errors[0] if isinstance(errors[0], BaseException) else None
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        parts.append(f"{type(nxt).__name__}: {nxt}")
        cur = nxt
    return " <- ".join(parts)[:2000]


def open_status_spool(opts: Mapping[str, Any]) -> tuple[RelayConfig, RelaySpool | None]:
    cfg = engine_config(opts)
    rcfg = relay_config(
        cfg, str(opts.get("cachedir", "/var/cache/salt/master")), opts.get("pki_dir")
    )
    if not os.path.exists(rcfg.spool_path):
        return rcfg, None
    return rcfg, RelaySpool(rcfg.spool_path)


def status_from_opts(opts: Mapping[str, Any], check_es: bool = True) -> dict[str, Any]:
    """What ``salt-run tributary.status`` reports: per gateway, fleet totals, Elasticsearch."""
    cfg = engine_config(opts)
    out: dict[str, Any] = {}
    if not cfg:
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    if check_es:
        out["elasticsearch"] = check_elasticsearch(cfg.get("elasticsearch"))
    rcfg, spool = open_status_spool(opts)
    out["spool_path"] = rcfg.spool_path
    if spool is None:
        out["error"] = "no relay spool yet (engine not started or no batch received)"
        out["result"] = bool(out.get("elasticsearch", {}).get("reachable", True))
        return out
    try:
        now = time.time()
        depth, oldest = spool.depth()
        counters = spool.counters()
        ledger = spool.ledger
        ledger.refresh(now)
        gateways = ledger.summary(now)
        per_gw_depth = spool.depth_by_gateway()
        for gw in set(per_gw_depth) | {k.split("@", 1)[1] for k in counters if "@" in k}:
            gateways.setdefault(gw, {"epochs": {}, "open_gaps": 0, "missing": 0})
        for gw, entry in gateways.items():
            b, n = per_gw_depth.get(gw, (0, 0))
            entry["relay_spool"] = {"batches": b, "readings": n or 0}
            for name in ("indexed", "dead_lettered", "rejected", "replays_requested"):
                entry[name] = counters.get(f"{name}@{gw}", 0)
            entry["gateway_spool"] = entry.pop("gateway_spool", None)
        for gw, hb in _last_heartbeats(spool).items():
            if gw in gateways:
                gateways[gw]["gateway_spool"] = hb
        totals = {k: v for k, v in counters.items() if "@" not in k}
        out.update(
            result=bool(out.get("elasticsearch", {}).get("reachable", True)),
            # the relay itself, as the skeleton's status reported it
            relay={
                "spool_batches": depth,
                "spool_oldest_age_s": round((_now_ms() - oldest) / 1000, 1) if oldest else 0,
                "counters": counters,
            },
            gateways=gateways,
            fleet={
                "gateways": len(gateways),
                "open_gaps": sum(g.get("open_gaps", 0) for g in gateways.values()),
                "missing_readings": sum(g.get("missing", 0) for g in gateways.values()),
                "given_up_gaps": sum(g.get("given_up_gaps", 0) for g in gateways.values()),
                "relay_spool_batches": depth,
                "relay_spool_bytes": spool.used_bytes(),
                "relay_spool_oldest_age_s": round((_now_ms() - oldest) / 1000, 1) if oldest else 0,
                "key_sets": spool.key_sources(),
                "counters": totals,
            },
        )
    finally:
        spool.close()
    return out


def _last_heartbeats(spool: RelaySpool) -> dict[str, Any]:
    """Gateway spool facts from the last heartbeat each gateway sent (kept as a counter row)."""
    out: dict[str, Any] = {}
    for name, body in (
        spool.db.execute("SELECT name, body FROM heartbeat_facts").fetchall()
        if _has_table(spool.db, "heartbeat_facts")
        else []
    ):
        try:
            out[name] = json.loads(body)
        except ValueError:
            continue
    return out


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        is not None
    )
