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

import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from saltext.tributary.es import index_name
from saltext.tributary.reading import doc_id
from saltext.tributary.wire import WireError, decode_batch

log = logging.getLogger(__name__)

TAG_RE = re.compile(
    r"^(?:syndic/[^/]+/)*salt/beacon/(?P<gw>[^/]+)/(?P<beacon>[^/]+)/(?P<kind>batch|health)$"
)
RETRYABLE = {429, 500, 502, 503, 504}

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, gateway TEXT NOT NULL,
    kind TEXT NOT NULL, ukey TEXT NOT NULL UNIQUE, received INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RelayConfig:
    prefix: str = "tributary"
    spool_path: str = "/var/cache/salt/master/tributary/relay.db"
    bulk_max_docs: int = 5_000
    bulk_max_bytes: int = 8 * 1024 * 1024
    bulk_max_wait_s: float = 0.2
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    daily: bool = True
    dedup_window: int = 20_000


class RelaySpool:
    """Durable FIFO of received batches (SQLite, WAL)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def put(self, gateway: str, kind: str, ukey: str, data: Any) -> bool:
        body = msgpack.packb(data, use_bin_type=True, default=str)
        cur = self.db.execute(
            "INSERT OR IGNORE INTO batches (gateway, kind, ukey, received, body)"
            " VALUES (?,?,?,?,?)",
            (gateway, kind, ukey, _now_ms(), body),
        )
        return cur.rowcount == 1

    def take(self, limit: int) -> list[tuple[int, str, str, int, Any]]:
        rows = self.db.execute(
            "SELECT id, gateway, kind, received, body FROM batches ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [
            (i, gw, kind, rec, msgpack.unpackb(body, raw=False, strict_map_key=False))
            for i, gw, kind, rec, body in rows
        ]

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
    originals: list[dict[str, Any]]
    ids: list[int]


def batch_key(gateway: str, data: Mapping[str, Any]) -> str:
    """Identity of one emission of a batch (a replay request is a new emission)."""
    key = f"{gateway}:{data.get('epoch')}:{data.get('first')}:{data.get('last')}"
    return f"{key}:r{data['replay']}" if data.get("replay") else key


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

    # -- intake (event loop thread) -------------------------------------------------------
    def accept(self, tag: str, data: Any) -> bool:
        """Spool one bus event if it is a Tributary batch; True if it was taken."""
        m = TAG_RE.match(tag)
        if m is None:
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
            self._wake.set()
            return True
        self._inc("duplicate_events", 1)
        return False

    # -- shipping (shipper thread) --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._ship_loop, name="tributary-ship", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _ship_loop(self) -> None:
        spool = RelaySpool(self.config.spool_path)
        backoff = self.config.backoff_min_s
        while not self._stop.is_set():
            try:
                shipped = self.ship_once(spool)
                backoff = self.config.backoff_min_s
                if not shipped:
                    self._wake.wait(self.config.bulk_max_wait_s)
                    self._wake.clear()
            except Exception as exc:
                self._inc("retried", 1)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "tributary relay: shipping failed (%s); retrying in %.1fs",
                    self.last_error,
                    backoff,
                )
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.config.backoff_max_s)
        spool.close()

    def build_docs(self, rows: list[tuple[int, str, str, int, Any]]) -> Docs:
        cfg = self.config
        now = _now_ms()
        lines: list[str] = []
        owners: list[int] = []
        originals: list[dict[str, Any]] = []
        ids: list[int] = []
        dumps = json.dumps
        for row_id, gateway, kind, _received, data in rows:
            ids.append(row_id)
            if kind == "health":
                doc = {
                    "@timestamp": now,
                    "gateway": gateway,
                    **{k: v for k, v in data.items() if k not in ("tag", "id")},
                }
                idx = index_name(cfg.prefix, "health", now, cfg.daily)
                lines.append(dumps({"index": {"_index": idx}}))
                lines.append(dumps(doc, default=str))
                owners.append(row_id)
                originals.append(doc)
                continue
            try:
                batch = decode_batch(data)
            except WireError as exc:
                self._inc(f"rejected:{exc.reason}", 1)
                dl = self._deadletter(gateway, exc.reason, exc.detail, "wire", None, data)
                lines.extend(dl)
                owners.append(row_id)
                originals.append(data)
                continue
            site = batch.site
            for bad in batch.rejected:
                self._inc(f"rejected:{bad['reason']}")
                did = doc_id(gateway, batch.epoch, bad["seq"])
                lines.extend(
                    self._deadletter(gateway, bad["reason"], bad["detail"], "wire", did, bad)
                )
                owners.append(row_id)
                originals.append(bad)
            self._inc("readings_in", len(batch.readings))
            for r in batch.readings:
                did = doc_id(gateway, batch.epoch, r["seq"])
                doc = {
                    "@timestamp": r["ts_ms"],
                    "gateway": gateway,
                    "site": site,
                    "sensor": r["sensor"],
                    "metric": r["metric"],
                    "value": r["value"],
                    "unit": r["unit"],
                    "seq": r["seq"],
                    "epoch": batch.epoch,
                    "relayed_at": now,
                }
                idx = index_name(cfg.prefix, "readings", r["ts_ms"], cfg.daily)
                lines.append(f'{{"create":{{"_index":"{idx}","_id":{dumps(did)}}}}}')
                lines.append(dumps(doc))
                owners.append(row_id)
                originals.append(doc)
        return Docs(lines, owners, originals, ids)

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
        return [json.dumps({"create": meta}), json.dumps(doc, default=str)]

    def ship_once(self, spool: RelaySpool) -> int:
        """Ship one bulk's worth from the spool; returns the number of batches completed."""
        if not self.ready and self._setup is not None:
            self._setup()
            self.ready = True
        rows: list[tuple[int, str, str, int, Any]] = []
        n = 0
        # Bound the bulk by documents, never splitting a batch.
        for row in spool.take(256):
            data = row[4]
            k = len(data.get("r") or ()) if isinstance(data, Mapping) else 1
            if rows and n + k > self.config.bulk_max_docs:
                break
            rows.append(row)
            n += k
        if not rows:
            return 0
        docs = self.build_docs(rows)
        if not docs.lines:
            spool.done(docs.ids)
            return len(docs.ids)
        retry_rows = self._bulk(docs)
        done = [i for i in docs.ids if i not in retry_rows]
        spool.done(done)
        spool.bump(self._drain_counters())
        if retry_rows:
            raise RuntimeError(
                f"{len(retry_rows)} batches need a retry (429/5xx on some documents)"
            )
        return len(done)

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
        resp = self.client.bulk(operations=body, refresh=False)
        items = resp["items"]
        retry: set[int] = set()
        second: list[str] = []
        for n, item in enumerate(items):
            ((op, res),) = item.items()
            status = res.get("status", 0)
            if status in (200, 201):
                self._inc("indexed" if op == "create" else "health_indexed", 1)
            elif status == 409:
                self._inc("already_present", 1)
            elif status in RETRYABLE:
                retry.add(docs.owners[n])
            else:
                err = res.get("error") or {}
                reason = (
                    err.get("type", f"status_{status}") if isinstance(err, Mapping) else str(err)
                )
                detail = err.get("reason", "") if isinstance(err, Mapping) else ""
                orig = docs.originals[n]
                did = res.get("_id")
                if str(res.get("_index", "")).startswith(f"{self.config.prefix}-deadletter"):
                    log.error("tributary relay: dead letter itself rejected: %s %s", reason, detail)
                    self._inc("deadletter_failed", 1)
                    continue
                second.extend(
                    self._deadletter(orig.get("gateway", "?"), reason, detail, "index", did, orig)
                )
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


def run(
    events: Callable[[], Mapping[str, Any] | None],
    relay: Relay,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Engine main loop: drain the bus into the spool; the shipper runs beside it."""
    relay.start()
    try:
        while not should_stop():
            ev = events()
            if ev is None:
                continue
            try:
                relay.accept(ev.get("tag", ""), ev.get("data"))
            except Exception:
                log.exception("tributary relay: could not spool event %s", ev.get("tag"))
    finally:
        relay.stop()


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
        if "spool_path" in config and not isinstance(config["spool_path"], str):
            errors.append("spool_path: must be a string")
        bulk = config.get("bulk", {})
        if not isinstance(bulk, Mapping):
            errors.append("bulk: must be a mapping (max_docs, max_wait_s)")
        else:
            md = bulk.get("max_docs", 1)
            if isinstance(md, bool) or not isinstance(md, int) or not 1 <= md <= 100_000:
                errors.append("bulk.max_docs: must be an integer in 1..100000")
            mw = bulk.get("max_wait_s", 0.1)
            if isinstance(mw, bool) or not isinstance(mw, (int, float)) or mw < 0:
                errors.append("bulk.max_wait_s: must be a non-negative number")
        if config.get("indices", "daily") not in ("daily", "single"):
            errors.append("indices: must be 'daily' or 'single'")
        if errors:
            return False, "tributary_relay: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:
        return False, f"tributary_relay: invalid configuration: {exc}"


def relay_config(config: Mapping[str, Any], cachedir: str) -> RelayConfig:
    bulk = config.get("bulk") or {}
    return RelayConfig(
        prefix=config.get("index_prefix", "tributary"),
        spool_path=config.get("spool_path") or os.path.join(cachedir, "tributary", "relay.db"),
        bulk_max_docs=bulk.get("max_docs", RelayConfig.bulk_max_docs),
        bulk_max_wait_s=bulk.get("max_wait_s", RelayConfig.bulk_max_wait_s),
        daily=config.get("indices", "daily") == "daily",
    )


def engine_config(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary_relay`` engine block from master opts ({} if not configured)."""
    for entry in opts.get("engines") or []:
        if isinstance(entry, Mapping) and "tributary_relay" in entry:
            return dict(entry["tributary_relay"] or {})
    return {}


def status_from_opts(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What ``salt-run tributary.status`` reports about the relay on this master."""
    cfg = engine_config(opts)
    rcfg = relay_config(cfg, str(opts.get("cachedir", "/var/cache/salt/master")))
    out: dict[str, Any] = {"spool_path": rcfg.spool_path}
    if not os.path.exists(rcfg.spool_path):
        out["error"] = "no relay spool yet (engine not started or no batch received)"
        return out
    spool = RelaySpool(rcfg.spool_path)
    try:
        depth, oldest = spool.depth()
        out.update(
            spool_batches=depth,
            spool_oldest_age_s=round((_now_ms() - oldest) / 1000, 1) if oldest else 0,
            counters=spool.counters(),
        )
    finally:
        spool.close()
    return out
