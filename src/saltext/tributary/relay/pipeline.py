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
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.reading import doc_id
from saltext.tributary.protocol.wire import DecodedBatch, WireError, decode_batch
from saltext.tributary.relay.bulk import classify_bulk_response
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.documents import Docs, batch_key, jnum, jstr, reading_doc
from saltext.tributary.relay.elasticsearch import index_name, precreate_indices
from saltext.tributary.relay.spool import RelaySpool
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

TAG_RE = re.compile(
    r"^(?:syndic/[^/]+/)*salt/beacon/(?P<gw>[^/]+)/(?P<beacon>[^/]+)/(?P<kind>batch|health)$"
)
KEYS_RE = re.compile(r"^(?:syndic/[^/]+/)*tributary/keys/(?P<syndic>[^/]+)$")
SWITCH_INTERVAL_S = 0.0005
#: Only what the relay reads from a bulk answer (a third of the full answer's bytes).
BULK_FILTER = "items.*._index,items.*.status,items.*.error"


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
        self.counters: Counter[Any] = Counter()  # name, or (name, gateway)
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
        batches, readings = self.spool.enforce_budget(self.config.spool_max_bytes)
        if batches:
            self._inc("spool_dropped_batches", batches)
            self._inc("spool_dropped_readings", readings)
            log.error(
                "tributary relay: spool past its budget of %d bytes: dropped the %d oldest"
                " batches (%d readings); the ledger will ask gateways to replay them",
                self.config.spool_max_bytes,
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
            self._inc("rejected", 1, gateway=gateway)
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
        depth = max(1, self.config.bulk.concurrency)
        pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="tributary-bulk")
        inflight: deque[tuple[Docs, Future[set[int]]]] = deque()
        backoff = self.config.backoff.min_s
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
                backoff = self.config.backoff.min_s
                if not inflight and (docs is None or not docs.ids):
                    self._wake.wait(self.config.bulk.max_wait_s)
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
                backoff = min(backoff * 2, self.config.backoff.max_s)
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
        now = now_ms()
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
                idx = index_name(cfg.index_prefix, "health", now, cfg.daily)
                lines.append(dumps({"create": {"_index": idx}}))
                lines.append(dumps(doc, default=str))
                owners.append(row_id)
                originals.append(doc)
                continue
            if self._origin_refused(docs, spool, row_id, gateway, received, data, now, "batch"):
                continue
            ids.append(row_id)
            try:
                batch = decode_batch(data)
            except WireError as exc:
                self._inc(f"rejected:{exc.reason}", 1)
                self._inc("rejected", 1, gateway=gateway)
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
            f'"gateway":{jstr(gateway)},"site":{jstr(batch.site)},'
            f'"epoch":{jstr(batch.epoch)},"relayed_at":{now}}}'
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
                idx = names[day] = json.dumps(
                    index_name(cfg.index_prefix, "readings", ts, cfg.daily)
                )
            key = (r["sensor"], r["metric"], r["unit"])
            frag = frags.get(key)
            if frag is None:
                if len(frags) > 65_536:
                    frags.clear()
                frag = frags[key] = (
                    f'"sensor":{jstr(key[0])},"metric":{jstr(key[1])},"unit":{jstr(key[2])}'
                )
            seq = r["seq"]
            agg = r.get("agg")
            lines.append(f'{{"create":{{"_index":{idx},"_id":{id_head}{seq}"}}}}')
            lines.append(
                f'{{"@timestamp":{ts},{frag},"value":{jnum(r["value"])},"seq":{seq},'
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
        now = now_ms()
        idx = index_name(self.config.index_prefix, "deadletter", now, self.config.daily)
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
        self._inc("dead_lettered", 1, gateway=gateway)
        return [json.dumps({"create": meta}), json.dumps(doc, default=str)]

    def prepare(self, spool: RelaySpool, skip: Collection[int] = ()) -> Docs | None:
        """The next bulk's worth of spooled batches (never splitting one) as bulk ops."""
        if not self.ready and self._setup is not None:
            self._setup()
            self.ready = True
        rows = spool.take(256, self.config.bulk.max_docs, skip)
        if not rows:
            return None
        docs = self.build_docs(rows, spool)
        if docs.held:
            spool.hold(docs.held, now_ms() + 2_000)
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
                        (gw, json.dumps({"received_ms": now_ms(), **data}, default=str)[:8192]),
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

    def metrics_doc(self, spool: RelaySpool) -> dict[str, Any]:
        depth, oldest = spool.depth()
        counters = spool.counters()
        for k, v in self.counters.items():
            if isinstance(k, str):
                counters[k] = counters.get(k, 0) + v
        gaps = spool.ledger.gaps(include_given_up=False)
        return {
            "@timestamp": now_ms(),
            "relay": self.name,
            # fleet counters only: per-gateway ones would grow the mapping with the fleet
            "counters": {k.replace(":", "_"): v for k, v in counters.items()},
            "spool_batches": depth,
            "spool_bytes": spool.used_bytes(),
            "spool_oldest_age_s": round((now_ms() - oldest) / 1000, 1) if oldest else 0,
            "open_gaps": len(gaps),
            "missing_readings": sum(g.size for g in gaps),
        }

    def _maybe_metrics(self, spool: RelaySpool) -> None:
        every = self.config.metrics_interval_s
        if not every or time.monotonic() - self._last_metrics < every or not self.ready:
            return
        self._last_metrics = time.monotonic()
        doc = self.metrics_doc(spool)
        idx = index_name(self.config.index_prefix, "metrics", doc["@timestamp"], self.config.daily)
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
            precreate_indices(self.client, self.config.index_prefix, True)
        except Exception as exc:  # the first bulk of the day creates it otherwise
            log.debug("tributary relay: could not pre-create indices: %s", exc)

    def _inc(self, name: str, n: int = 1, gateway: str | None = None) -> None:
        """Count ``n`` under ``name``, for the fleet or, with ``gateway``, for that gateway."""
        with self._clock:
            self.counters[(name, gateway) if gateway else name] += n

    def _drain_counters(self) -> dict[Any, int]:
        with self._clock:
            out = dict(self.counters)
            self.counters.clear()
        return out

    def _bulk(self, docs: Docs) -> set[int]:
        body = "\n".join(docs.lines) + "\n"
        resp = self.client.bulk(operations=body, refresh=False, filter_path=BULK_FILTER)
        outcome = classify_bulk_response(resp.get("items") or [], docs, self.config.index_prefix)
        second: list[str] = []
        for rej in outcome.rejected:
            orig = reading_doc(docs.originals[rej.op])
            did = None
            if isinstance(docs.originals[rej.op], tuple):
                did = doc_id(orig["gateway"], orig["epoch"], orig["seq"])
            second.extend(
                self._deadletter(
                    orig.get("gateway", "?"), rej.reason, rej.detail, "index", did, orig
                )
            )
        if outcome.counts.get("deadletter_failed"):
            log.error(
                "tributary relay: %d dead letters themselves rejected",
                outcome.counts["deadletter_failed"],
            )
        with self._clock:
            self.counters.update(outcome.counts)
        if second:
            resp2 = self.client.bulk(operations="\n".join(second) + "\n", refresh=False)
            if resp2.get("errors"):
                for item in resp2["items"]:
                    ((_, res),) = item.items()
                    if res.get("status") not in (200, 201, 409):
                        raise RuntimeError(f"dead-letter write failed: {res.get('error')}")
        return outcome.retry_rows


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
