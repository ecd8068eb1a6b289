"""Bulk planning: spooled rows -> one :class:`~saltext.tributary.relay.documents.BulkPlan`.

Each row is verified (origin), decoded and turned into bulk operations on its own: whatever
goes wrong with one row (a refused signature, a malformed batch, an exception nobody foresaw)
sets that row aside in the dead-letter index with its reason, and the rest of the bulk goes on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.reading import doc_id
from saltext.tributary.protocol.wire import (
    EPOCH_RE,
    MAX_INT,
    DecodedBatch,
    WireError,
    decode_batch,
)
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.documents import (
    BulkPlan,
    RowPlan,
    bounded,
    command_doc,
    hops_tail,
    jnum,
    jstr,
    reading_doc,
)
from saltext.tributary.relay.elasticsearch import index_name
from saltext.tributary.relay.origin import OriginVerifier
from saltext.tributary.relay.spool import RelaySpool, SpoolRow
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

#: Per-gateway counters of rows whose gateway id is not proven (no key known, unsigned) go
#: here: anyone can claim any id, and one counter row per claimed id would grow without bound.
UNVERIFIED = "(unverified)"
#: Refusals that prove the claimed id has a key (so it names a real gateway).
KNOWN_ID_REASONS = frozenset({"bad_signature"})


class Planner:
    """Builds bulk plans; counts what it refuses."""

    def __init__(self, config: RelayConfig, counters: Counters, origin: OriginVerifier) -> None:
        self.config = config
        self.counters = counters
        self.origin = origin
        self._index_names: dict[int, str] = {}
        self._fragments: dict[tuple[Any, Any, Any], str] = {}

    def build(self, rows: list[SpoolRow], spool: RelaySpool) -> BulkPlan:
        """The plan for ``rows``, oldest first, stopping (never inside a row) once the body
        reaches ``bulk.max_bytes``; rows not planned stay in the spool for the next bulk."""
        plan = BulkPlan()
        now = now_ms()
        budget = self.config.bulk.max_bytes
        size = 0
        for row in rows:
            first_op = len(plan.ops)
            try:
                self._plan_row(plan, spool, row, now)
            except Exception as exc:  # one row never stops the others
                log.exception("tributary relay: spool row %d of %s set aside", row.id, row.gateway)
                plan.truncate(first_op)
                plan.rows.pop(row.id, None)
                self._set_aside(plan, row, "relay_error", f"{type(exc).__name__}: {exc}", "relay")
            added = plan.size(first_op)
            if size + added > budget and first_op:
                plan.truncate(first_op)  # the next bulk starts with this row
                plan.rows.pop(row.id, None)
                if row.id in plan.held:
                    plan.held.remove(row.id)
                break
            if added > budget:
                self._split_oversized(plan, row, first_op)
                added = plan.size(first_op)
            size += added
        return plan

    def _plan_row(self, plan: BulkPlan, spool: RelaySpool, row: SpoolRow, now: int) -> None:
        data = row.data
        if not isinstance(data, Mapping) or "_undecodable" in data:
            detail = data.get("_undecodable") if isinstance(data, Mapping) else repr(data)
            self._set_aside(plan, row, "undecodable", str(detail), "spool")
            return
        # A heartbeat's epoch/last_seq move the ledger (lost-tail detection): its origin is
        # proven like a batch's before it is believed, indexed or kept as facts.
        if not self._origin_ok(plan, spool, row, now):
            return
        if row.kind == "health":
            self._plan_heartbeat(plan, row, now)
            return
        try:
            batch = decode_batch(data)  # type: ignore[arg-type]
        except WireError as exc:
            self._refuse(plan, row, exc.reason, exc.detail, "wire")
            return
        rp = plan.rows[row.id] = RowPlan(row.attempts)
        rp.range = (row.gateway, batch.epoch, batch.first, batch.last)
        rp.hops = (batch.emit_ms, row.received)
        for bad in batch.rejected:
            self.counters.inc(f"rejected:{bad['reason']}")
            did = doc_id(row.gateway, batch.epoch, bad["seq"])
            plan.add(
                row.id,
                *self.deadletter(row.gateway, bad["reason"], bad["detail"], "wire", did, bad),
            )
        self.counters.inc("readings_in", len(batch.readings))
        # An aggregate never lands over sequences already indexed, and raw readings never over
        # an aggregate of them (a replay crossing a late batch of the same range): Elasticsearch
        # would hold both, counting those sequences twice. (A raw replay over raw readings is
        # left to the document ids: it re-creates what Elasticsearch lost, 409 for the rest.)
        agg = batch.agg is not None
        if agg:
            rp.range = (row.gateway, batch.epoch, batch.first, batch.last, None, True)
        covered = spool.ledger.covering(
            row.gateway, batch.epoch, batch.first, batch.last, agg=not agg
        )
        if covered:
            batch = self._uncovered(batch, covered)
        self._reading_ops(plan, row.id, row.gateway, batch, now, row.received)
        if batch.records:
            self._record_ops(plan, row.id, row.gateway, batch, now)

    def _uncovered(self, batch: DecodedBatch, covered: list[tuple[int, int]]) -> DecodedBatch:
        """``batch`` without the readings and records in ``covered`` (counted as already
        present): a late aggregate is neither indexed beside the raw replay of its range nor
        taken for an id collision, and a raw replay adds nothing beside an aggregate."""

        def new(seq: int) -> bool:
            return not any(lo <= seq <= hi for lo, hi in covered)

        readings = [r for r in batch.readings if new(r["seq"])]
        records = [r for r in batch.records if new(r["seq"])]
        skipped = len(batch.readings) - len(readings) + len(batch.records) - len(records)
        if not skipped:
            return batch
        self.counters.inc("already_present", skipped)
        return replace(batch, readings=readings, records=records)

    def _record_ops(
        self, plan: BulkPlan, row_id: int, gateway: str, batch: DecodedBatch, now: int
    ) -> None:
        """One create op per record (today: commands, into ``<prefix>-commands-*``), with the
        reading id scheme: a replayed record rewrites nothing."""
        cfg = self.config
        lo = now - int(cfg.max_age_s * 1000)
        hi = now + int(cfg.max_future_s * 1000)
        for rec in batch.records:
            did = doc_id(gateway, batch.epoch, rec["seq"])
            ts = rec["ts_ms"]
            doc = command_doc(gateway, batch.site, batch.epoch, rec["seq"], ts, rec["body"], now)
            if not lo <= ts <= hi:
                self.counters.inc("rejected:out_of_window")
                detail = f"timestamp {ts} ms is outside now-max_age_s..now+max_future_s"
                plan.add(
                    row_id, *self.deadletter(gateway, "out_of_window", detail, "relay", did, doc)
                )
                continue
            self.counters.inc(f"records_in:{rec['kind']}")
            idx = index_name(cfg.index_prefix, "commands", ts, cfg.daily)
            plan.add(
                row_id,
                json.dumps({"create": {"_index": idx, "_id": did}}),
                json.dumps(doc, default=str),
                doc,
            )

    def _origin_ok(self, plan: BulkPlan, spool: RelaySpool, row: SpoolRow, now: int) -> bool:
        """The one origin path: True when the row may be used; otherwise it waits for its
        gateway's key (``plan.held``, for ``key_wait_s``) or is refused (dead-lettered).
        Intake has checked most rows already (``row.verified``)."""
        if row.verified == 1:
            return True
        if row.verified == -1:
            data = row.data
            self._refuse(
                plan,
                row._replace(data=data.get("original")),
                str(data.get("_refused")),
                str(data.get("_detail")),
                "origin",
            )
            return False
        try:
            self.origin.verify(spool, row.gateway, row.data, row.received)
        except signing.SignatureError as exc:
            if exc.reason == "unknown_key" and now - row.received < self.config.key_wait_s * 1000:
                plan.held.append(row.id)  # the syndic's key set may not have arrived yet
                return False
            what = "heartbeat" if row.kind == "health" else "batch"
            log.warning("tributary relay: %s under %s set aside: %s", what, row.gateway, exc)
            self._refuse(plan, row, exc.reason, exc.detail, "origin")
            return False
        return True

    def _refuse(self, plan: BulkPlan, row: SpoolRow, reason: str, detail: str, stage: str) -> None:
        """A whole row refused for ``reason``: counted for the fleet and its gateway."""
        self.counters.inc(f"rejected:{reason}")
        who = row.gateway if stage != "origin" or reason in KNOWN_ID_REASONS else UNVERIFIED
        self.counters.inc("rejected", 1, gateway=who)
        plan.rows[row.id] = RowPlan(row.attempts)
        plan.add(row.id, *self.deadletter(row.gateway, reason, detail, stage, None, row.data, who))

    def _set_aside(
        self, plan: BulkPlan, row: SpoolRow, reason: str, detail: str, stage: str
    ) -> None:
        plan.rows[row.id] = RowPlan(row.attempts)
        plan.add(row.id, *self.deadletter(row.gateway, reason, detail, stage, None, row.data))

    def _plan_heartbeat(self, plan: BulkPlan, row: SpoolRow, now: int) -> None:
        data = {k: v for k, v in row.data.items() if k != "sig"}
        epoch, last_seq = data.get("epoch"), data.get("last_seq")
        if not (
            isinstance(epoch, str)
            and EPOCH_RE.fullmatch(epoch)
            and type(last_seq) is int
            and 0 <= last_seq < MAX_INT
        ):
            # the ledger would chase a tail that cannot exist (or a 2**62-reading gap)
            detail = f"epoch {str(epoch)[:80]!r} / last_seq {str(last_seq)[:40]} out of range"
            self._refuse(plan, row, "bad_heartbeat", detail, "wire")
            return
        rp = plan.rows[row.id] = RowPlan(row.attempts)
        rp.heartbeat = (row.gateway, epoch, last_seq)
        rp.facts = (row.gateway, data)
        doc = {
            "@timestamp": now,
            "gateway": row.gateway,
            **{k: v for k, v in data.items() if k not in ("tag", "id")},
        }
        idx = index_name(self.config.index_prefix, "health", now, self.config.daily)
        plan.add(row.id, json.dumps({"create": {"_index": idx}}), json.dumps(doc, default=str), doc)

    def _reading_ops(
        self,
        plan: BulkPlan,
        row_id: int,
        gateway: str,
        batch: DecodedBatch,
        now: int,
        received: int = 0,
    ) -> None:
        """One create op + document per reading (the hot loop: JSON built from cached
        fragments; the document dict is only materialised for a dead letter). ``received``:
        when intake spooled the batch (the hops in ``hop_ms``, see :func:`hops`)."""
        cfg = self.config
        emit = batch.emit_ms
        head = (
            hops_tail(emit, received or now, now)
            + f'"gateway":{jstr(gateway)},"site":{jstr(batch.site)},'
            f'"epoch":{jstr(batch.epoch)},"relayed_at":{now}}}'
        )
        hop_open = '"hop_ms":{"gateway":' if emit is not None else '"hop_ms":{'
        # without emit_ms every document ends the same way after its seq
        tail = hop_open + head
        id_head = json.dumps(f"{gateway}:{batch.epoch}:")[:-1]
        add_line, add_op = plan.lines.append, plan.ops.append
        site, epoch = batch.site, batch.epoch
        names = self._index_names
        frags = self._fragments
        lo = now - int(cfg.max_age_s * 1000)
        hi = now + int(cfg.max_future_s * 1000)
        last_day, idx = None, ""
        for r in batch.readings:
            ts = r["ts_ms"]
            if not lo <= ts <= hi:  # a broken clock must not create an index per day it claims
                self.counters.inc("rejected:out_of_window")
                plan.add(
                    row_id,
                    *self.deadletter(
                        gateway,
                        "out_of_window",
                        f"timestamp {ts} ms is outside now-max_age_s..now+max_future_s",
                        "relay",
                        doc_id(gateway, epoch, r["seq"]),
                        reading_doc((gateway, site, epoch, now, r), (emit, received)),
                    ),
                )
                continue
            day = ts // 86_400_000
            if day != last_day:
                idx = names.get(day) or ""
                if not idx:
                    if len(names) > 64:
                        names.clear()
                    idx = names[day] = json.dumps(
                        index_name(cfg.index_prefix, "readings", ts, cfg.daily)
                    )
                last_day = day
            key = (r["sensor"], r["metric"], r["unit"])
            frag = frags.get(key)
            if frag is None:
                if len(frags) > 65_536:
                    frags.clear()
                frag = frags[key] = (
                    f'"sensor":{jstr(key[0])},"metric":{jstr(key[1])},"unit":{jstr(key[2])}'
                )
            seq = r["seq"]
            value = r["value"]
            num = repr(value) if type(value) is float else jnum(value)
            add_line(f'{{"create":{{"_index":{idx},"_id":{id_head}{seq}"}}}}')
            agg = r.get("agg")
            if agg:
                add_line(
                    f'{{"@timestamp":{ts},{frag},"value":{num},"seq":{seq},'
                    f'"agg":{json.dumps(agg)},'
                    + (f"{hop_open}{emit - ts}," if emit is not None else hop_open)
                    + head
                )
            elif emit is None:
                add_line(f'{{"@timestamp":{ts},{frag},"value":{num},"seq":{seq},{tail}')
            else:
                add_line(
                    f'{{"@timestamp":{ts},{frag},"value":{num},"seq":{seq},'
                    f"{hop_open}{emit - ts},{head}"
                )
            add_op((row_id, (gateway, site, epoch, now, r)))

    def _split_oversized(self, plan: BulkPlan, row: SpoolRow, first_op: int) -> None:
        """A lone row whose operations exceed ``bulk.max_bytes``: dead-letter each document
        that alone exceeds it (it could never be indexed), keep the others."""
        budget = self.config.bulk.max_bytes
        kept = BulkPlan()
        for n in range(first_op, len(plan.ops)):
            action, source = plan.lines[2 * n], plan.lines[2 * n + 1]
            if len(action) + len(source) + 2 > budget:
                self.counters.inc("rejected:oversized_document")
                kept.add(
                    row.id,
                    *self.deadletter(
                        row.gateway,
                        "oversized_document",
                        f"{len(source)} bytes, over bulk.max_bytes={budget}",
                        "relay",
                        None,
                        plan.ops[n][1],
                    ),
                )
            else:
                kept.add(row.id, action, source, plan.ops[n][1])
        plan.truncate(first_op)
        plan.lines.extend(kept.lines)
        plan.ops.extend(kept.ops)

    def deadletter(
        self,
        gateway: str,
        reason: str,
        detail: str,
        stage: str,
        did: str | None,
        original: Any,
        count_as: str | None = None,
    ) -> tuple[str, str, dict[str, Any]]:
        """A dead-letter operation: (action line, source line, document). The original is
        kept whole up to :data:`ORIGINAL_MAX_BYTES`, else as a trimmed JSON text. It is
        counted for ``count_as`` (default: ``gateway``)."""
        now = now_ms()
        idx = index_name(self.config.index_prefix, "deadletter", now, self.config.daily)
        meta: dict[str, Any] = {"_index": idx}
        if did:
            meta["_id"] = f"{did}:{stage}"
        doc = {
            "@timestamp": now,
            "gateway": gateway,
            "reason": reason,
            "detail": str(detail)[:2048],
            "stage": stage,
            "doc_id": did,
            "original": bounded(original),
        }
        self.counters.inc("dead_lettered")
        self.counters.inc("dead_lettered", 1, gateway=count_as or gateway)
        return json.dumps({"create": meta}), json.dumps(doc, default=str), doc
