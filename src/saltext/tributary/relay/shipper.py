"""The relay's shipper thread: relay spool -> Elasticsearch bulk, confirmed before deletion.

The spool is read oldest first; a bulk creates documents with the deterministic id
``<gateway>:<epoch>:<seq>``, and a spool row is deleted only once every one of its documents is
confirmed: created, already present (409), or written to the dead-letter index. Nothing one row
carries can stop the others:

* per-document 429/5xx: the row is retried with its attempt count; after
  ``bulk.max_attempts`` the documents still refused go to the dead-letter index;
* a request Elasticsearch refuses as a whole (413 too large, another 4xx) is split in halves
  until the one operation it refuses is found, and that one is dead-lettered;
* Elasticsearch unreachable, or 429/5xx for the whole request: everything stays spooled and
  the bulk is retried with backoff (the rows are not to blame, so no attempt is counted).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from saltext.tributary.protocol.reading import doc_id
from saltext.tributary.relay.bulk import (
    RETRYABLE,
    BulkOutcome,
    Rejected,
    classify_bulk_response,
    merge,
)
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.documents import BulkPlan, reading_doc
from saltext.tributary.relay.elasticsearch import index_name, precreate_indices
from saltext.tributary.relay.planner import Planner
from saltext.tributary.relay.spool import RelaySpool
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
#: Only what the relay reads from a bulk answer: each item's status and error (the index of
#: an operation is known from its action line), and whether any item failed.
BULK_FILTER = "errors,items.*.status,items.*.error"
#: Rows taken per bulk at most (each is one spooled batch).
ROWS_PER_BULK = 256
#: What makes a reading the same reading (a 409 with other values is an id collision).
IDENTITY = ("@timestamp", "sensor", "metric", "value")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an Elasticsearch client error (None: no answer, e.g. unreachable)."""
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "meta", None), "status", None)
    return status if isinstance(status, int) else None


class Shipper:
    """Ships the spool to Elasticsearch on its own thread."""

    def __init__(
        self,
        client: Any,
        config: RelayConfig,
        counters: Counters,
        planner: Planner,
        wake: threading.Event,
        setup: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.counters = counters
        self.planner = planner
        self._wake = wake
        self._setup = setup
        self.ready = setup is None
        self.name = "relay"
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_metrics = time.monotonic()
        self._last_precreate = time.monotonic()  # the engine's set-up created today's
        #: receives the readings of each confirmed bulk (see :mod:`~.tap`)
        self.tap: Any = None

    def start(self) -> None:
        # The engine process holds two busy threads: the bus reader (I/O, many small waits) and
        # the shipper (CPU while it builds a bulk). With CPython's default 5 ms GIL switch
        # interval the reader waits up to 5 ms for the GIL after every socket read, and intake
        # fell to ~30 ms per 1,000-reading event while a bulk was being built (measured with
        # make bench). A 0.5 ms interval keeps the bus drained; the engine is its own process.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._loop, name="tributary-ship", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        """Pipelined shipping: while Elasticsearch works on up to ``bulk.concurrency`` bulks,
        the next one is taken from the spool and built, when a full bulk's worth waits
        (otherwise what waits goes when the oldest bulk in flight is answered). Bulks are
        confirmed (:meth:`finish`: ledger, then the rows leave the spool) strictly in the order
        they were taken; a failure drops what was in flight back to the spool (re-sent ops
        answer 409)."""
        spool = RelaySpool(self.config.spool_path or "")
        depth = max(1, self.config.bulk.concurrency)
        pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="tributary-bulk")
        inflight: deque[tuple[BulkPlan, Future[set[int]]]] = deque()
        backoff = self.config.backoff.min_s
        while not self._stop.is_set():
            try:
                self._maybe_metrics(spool)
                self._maybe_precreate()
                plan = None
                if len(inflight) < depth:
                    skip = {i for p, _ in inflight for i in p.rows}
                    plan = self.prepare(spool, skip=skip, only_full=bool(inflight))
                    if plan is not None and plan.ops:
                        inflight.append((plan, pool.submit(self.send, plan)))
                    elif plan is not None:
                        self.finish(spool, plan, set())
                if inflight and (len(inflight) >= depth or plan is None or inflight[0][1].done()):
                    prev, fut = inflight.popleft()
                    self.finish(spool, prev, fut.result())
                backoff = self.config.backoff.min_s
                if not inflight and (plan is None or not plan.rows):
                    self._wake.wait(self.config.bulk.max_wait_s)
                    self._wake.clear()
            except Exception as exc:  # shipping goes on after any failure
                for _, fut in inflight:  # let them land; their rows stay spooled (409 on resend)
                    fut.exception()
                inflight.clear()
                self.counters.inc("retried")
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
        except Exception as exc:  # stays spooled: shipped again (409) next start
            log.info("tributary relay: last bulks not confirmed at stop: %s", exc)
        pool.shutdown(wait=True)
        spool.close()

    def prepare(
        self, spool: RelaySpool, skip: Collection[int] = (), only_full: bool = False
    ) -> BulkPlan | None:
        """The next bulk's worth of spooled batches (never splitting one) as bulk ops. With
        ``only_full`` (a bulk is in flight), None unless a full bulk's worth waits: the rest
        goes once that bulk is answered, with what arrived meanwhile. A second bulk in flight
        is for a backlog; many small bulks cost Elasticsearch more per document (a translog
        sync per request, a segment per writing thread) than the wait saves."""
        if not self.ready and self._setup is not None:
            self._setup()
            self.ready = True
        rows = spool.take(ROWS_PER_BULK, self.config.bulk.max_docs, skip)
        if not rows or (only_full and spool.took_all):
            return None
        plan = self.planner.build(rows, spool)
        if plan.held:
            spool.hold(plan.held, now_ms() + 2_000)
        return plan

    def finish(self, spool: RelaySpool, plan: BulkPlan, retry_rows: set[int]) -> int:
        """Account for a confirmed bulk: ledger ranges, heartbeats, then the rows leave the
        spool (except those with retryable documents, which raise after the rest is done).
        A row whose ledger entry cannot be written still leaves (its documents are indexed):
        the failure is counted and logged, and the rest of the bulk is recorded."""
        done = [i for i in plan.rows if i not in retry_rows]
        with spool.transaction():  # ledger, deletions and counters commit together
            for i in done:
                rp = plan.rows[i]
                spool.db.execute("SAVEPOINT row")
                try:
                    if rp.range is not None:
                        spool.ledger.add_range(*rp.range)
                    if rp.heartbeat is not None:
                        spool.ledger.heartbeat(*rp.heartbeat)
                    if rp.facts is not None:
                        gw, data = rp.facts
                        body = json.dumps({"received_ms": now_ms(), **data}, default=str)
                        spool.db.execute(
                            "INSERT OR REPLACE INTO heartbeat_facts VALUES (?,?)",
                            (gw, body[:8192]),
                        )
                    spool.db.execute("RELEASE row")
                except Exception as exc:  # one row never stops the others
                    spool.db.execute("ROLLBACK TO row")
                    spool.db.execute("RELEASE row")
                    self.counters.inc("ledger_failed")
                    log.error(
                        "tributary relay: spool row %d not recorded in the ledger: %s", i, exc
                    )
            spool.done(done)
            spool.bump(self.counters.drain())
        if self.tap is not None and done:
            self._offer(plan, set(done))
        if retry_rows:
            spool.attempted(retry_rows)
            raise RuntimeError(
                f"{len(retry_rows)} batches need a retry (429/5xx on some documents)"
            )
        return len(done)

    def _offer(self, plan: BulkPlan, done: set[int]) -> None:
        """The readings this bulk created (not those already present or dead-lettered)."""
        skip = plan.not_created
        self.tap.offer(
            [
                original
                for n, (row, original) in enumerate(plan.ops)
                if row in done and type(original) is tuple and n not in skip
            ]
        )

    def send(self, plan: BulkPlan) -> set[int]:
        """Send ``plan``; dead-letter what Elasticsearch refuses for good; the rows to retry."""
        outcome = self._send(plan, 0, len(plan.ops))
        exhausted = {
            r
            for r in outcome.retry_rows
            if plan.rows[r].attempts + 1 >= self.config.bulk.max_attempts
        }
        for n in outcome.retry_ops:
            if plan.ops[n][0] in exhausted:
                outcome.rejected.append(
                    Rejected(n, "retries_exhausted", f"{self.config.bulk.max_attempts} attempts")
                )
        outcome.retry_rows -= exhausted
        if outcome.present_ops:
            collisions = self._collisions(plan, outcome.present_ops)
            # a 409 for another reading is a collision, never counted as already present
            outcome.counts["already_present"] -= len(collisions)
            outcome.rejected += collisions
        plan.not_created = {*outcome.present_ops, *(r.op for r in outcome.rejected)}
        second: list[str] = []
        for rej in outcome.rejected:
            original = plan.ops[rej.op][1]
            doc = reading_doc(original)
            did = None
            if isinstance(original, tuple):
                did = doc_id(doc["gateway"], doc["epoch"], doc["seq"])
            action, source, _ = self.planner.deadletter(
                str(doc.get("gateway", "?")), rej.reason, rej.detail, "index", did, doc
            )
            second += (action, source)
        if outcome.counts.get("deadletter_failed"):
            log.error(
                "tributary relay: %d dead letters themselves rejected",
                outcome.counts["deadletter_failed"],
            )
        self.counters.update(outcome.counts)
        if second:
            self._write_deadletters(second)
        return outcome.retry_rows

    def _collisions(self, plan: BulkPlan, ops: list[int]) -> list[Rejected]:
        """Readings answered 409 whose stored document is not the one sent: two different
        readings claim one id (a gateway spool restored from a backup, say). Each is counted
        and dead-lettered with what is stored, never taken for a duplicate."""
        out: list[Rejected] = []
        for lo in range(0, len(ops), 1000):
            chunk = ops[lo : lo + 1000]
            docs = [json.loads(plan.lines[2 * n])["create"] for n in chunk]
            resp = self.client.mget(
                docs=[{"_index": d["_index"], "_id": d["_id"]} for d in docs],
                source_includes=list(IDENTITY),
            )
            for n, found in zip(chunk, resp.get("docs") or [], strict=False):
                stored = found.get("_source") if found.get("found") else None
                sent = reading_doc(plan.ops[n][1])
                if stored is None or all(stored.get(k) == sent.get(k) for k in IDENTITY):
                    continue
                gateway = str(sent.get("gateway"))
                self.counters.inc("id_collisions")
                self.counters.inc("id_collisions", 1, gateway=gateway)
                log.error(
                    "tributary relay: id %s is taken by another reading (stored %s, sent %s)",
                    found.get("_id"),
                    {k: stored.get(k) for k in IDENTITY},
                    {k: sent.get(k) for k in IDENTITY},
                )
                out.append(Rejected(n, "id_collision", json.dumps(stored, default=str)[:1024]))
        return out

    def _send(self, plan: BulkPlan, start: int, stop: int) -> BulkOutcome:
        """One bulk request for operations ``start..stop``, split in halves while Elasticsearch
        refuses the request as a whole (413, or another non-retryable 4xx)."""
        try:
            resp = self.client.bulk(
                operations=plan.body(start, stop), refresh=False, filter_path=BULK_FILTER
            )
        except Exception as exc:
            status = http_status(exc)
            if status is None or status in RETRYABLE or status < 400:
                raise  # Elasticsearch's trouble, not the documents': retried whole
            if stop - start > 1:
                self.counters.inc("bulks_split")
                mid = (start + stop) // 2
                return merge(self._send(plan, start, mid), self._send(plan, mid, stop))
            out = BulkOutcome()
            out.rejected.append(Rejected(start, f"request_refused_{status}", str(exc)[:2048]))
            return out
        return classify_bulk_response(
            resp.get("items") or [], plan, self.config.index_prefix, start, stop, resp.get("errors")
        )

    def _write_deadletters(self, lines: list[str]) -> None:
        """Write dead letters; a retryable refusal raises (the bulk is retried), any other is
        counted and logged with the dead letter (it is never silently dropped)."""
        try:
            resp = self.client.bulk(operations="\n".join(lines) + "\n", refresh=False)
        except Exception as exc:
            refused = http_status(exc)
            if refused is None or refused in RETRYABLE or refused < 400:
                raise
            items: list[Any] = [{"create": {"status": refused, "error": str(exc)[:512]}}] * (
                len(lines) // 2
            )
        else:
            if not resp.get("errors"):
                return
            items = resp["items"]
        for n, item in enumerate(items):
            ((_, res),) = item.items()
            if res.get("status") in (200, 201, 409):
                continue
            if res.get("status") in RETRYABLE:
                raise RuntimeError(f"dead-letter write failed: {res.get('error')}")
            self.counters.inc("deadletter_failed")
            log.error(
                "tributary relay: dead letter refused (%s): %s",
                res.get("error"),
                lines[2 * n + 1][:4096],
            )

    def metrics_doc(self, spool: RelaySpool) -> dict[str, Any]:
        depth, oldest = spool.depth()
        counters = spool.counters()
        for k, v in self.counters.fleet().items():
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
