"""What an Elasticsearch bulk answer means for the spooled batches it carried (pure).

The relay sends one bulk per plan (:class:`~saltext.tributary.relay.documents.BulkPlan`: the
operations and, per operation, the spool row it came from). Its answer is read here, apart from
the I/O, as elasticsearch-py separates ``_process_bulk_chunk`` from interpreting its result:

* 200/201: created (counted per gateway for readings, and health documents);
* 409: already present (a replay or the syndic's second copy): done, counted;
* 429 and 5xx: the row goes back to the spool and the whole batch is retried later;
* any other document-level status: the document is dead-lettered with its reason, and never
  stalls the rest of its batch; a dead letter that is itself refused is counted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.relay.documents import BulkPlan

RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass
class Rejected:
    """One document Elasticsearch refused for good: its op index and the reason it gave."""

    op: int
    reason: str
    detail: str


@dataclass
class BulkOutcome:
    #: spool rows with at least one document to retry (429/5xx)
    retry_rows: set[int] = field(default_factory=set)
    #: the operations to retry (indexes into ``plan.ops``)
    retry_ops: list[int] = field(default_factory=list)
    #: documents to dead-letter
    rejected: list[Rejected] = field(default_factory=list)
    #: readings answered 409 (already present): checked against what is stored
    present_ops: list[int] = field(default_factory=list)
    #: fleet counters by name, per-gateway ones by ``(name, gateway)``
    counts: Counter = field(default_factory=Counter)


def _gateway(original: Any) -> str:
    if isinstance(original, tuple):
        return str(original[0])
    return str(original.get("gateway", "?")) if isinstance(original, Mapping) else "?"


def classify_bulk_response(
    items: Sequence[Mapping[str, Any]],
    plan: BulkPlan,
    prefix: str,
    start: int = 0,
    stop: int | None = None,
    errors: Any = None,
) -> BulkOutcome:
    """Interpret a bulk answer's ``items`` for the operations ``start..stop`` of ``plan``
    (raises ValueError when the answer does not have one item per operation: nothing of it can
    be trusted then). :attr:`Rejected.op` indexes ``plan.ops``. ``errors``: the answer's own
    ``errors`` flag; ``False`` (no item failed, the usual answer) lets the readings be counted
    per gateway from the plan instead of item by item."""
    stop = len(plan.ops) if stop is None else stop
    sent = stop - start
    if len(items) != sent:
        raise ValueError(f"bulk answered {len(items)} items for {sent} ops")
    out = BulkOutcome()
    readings_idx = f"{prefix}-readings"
    deadletter_idx = f"{prefix}-deadletter"
    if errors is False:
        _count_created(out, items, plan, readings_idx, start, stop)
        return out
    for n, item in enumerate(items, start):
        ((_op, res),) = item.items()
        row, original = plan.ops[n]
        status = res.get("status", 0)
        if status in (200, 201):
            if type(original) is tuple:  # a reading: always created in the readings index
                out.counts["indexed"] += 1
                out.counts[("indexed", str(original[0]))] += 1
                continue
            index = op_index(plan, n, res)
            if readings_idx in index:
                out.counts["indexed"] += 1
                out.counts[("indexed", _gateway(original))] += 1
            elif "-health" in index:
                out.counts["health_indexed"] += 1
        elif status == 409:
            out.counts["already_present"] += 1
            if isinstance(original, tuple):
                out.present_ops.append(n)
        elif status in RETRYABLE:
            out.counts["retried_docs"] += 1
            out.retry_rows.add(row)
            out.retry_ops.append(n)
        elif deadletter_idx in op_index(plan, n, res):
            out.counts["deadletter_failed"] += 1
        else:
            err = res.get("error") or {}
            if isinstance(err, Mapping):
                reason, detail = (
                    str(err.get("type", f"status_{status}")),
                    str(err.get("reason", "")),
                )
            else:
                reason, detail = str(err), ""
            out.rejected.append(Rejected(n, reason, detail))
    return out


def op_index(plan: BulkPlan, n: int, res: Mapping[str, Any]) -> str:
    """The index of operation ``n``: as answered, or (the relay asks for answers without it:
    a third of their bytes) as its action line names it; for a data stream the answer names
    a backing index (``.ds-<stream>-...``), which contains the stream's name as well."""
    index = res.get("_index")
    if index is None:
        try:
            (meta,) = json.loads(plan.lines[2 * n]).values()
            index = meta.get("_index")
        except (ValueError, AttributeError, IndexError):
            index = None
    return str(index or "")


def _count_created(
    out: BulkOutcome,
    items: Sequence[Mapping[str, Any]],
    plan: BulkPlan,
    readings_idx: str,
    start: int,
    stop: int,
) -> None:
    """Every operation created (``errors: false``): a reading op (a tuple original) is always
    a create in the readings index, so they are counted per gateway in one pass; the few other
    operations (heartbeats, records, dead letters) are looked at one by one, as
    :func:`classify_bulk_response` does."""
    ops = plan.ops[start:stop] if start or stop != len(plan.ops) else plan.ops
    gateways = [o[0] for _, o in ops if type(o) is tuple]
    if gateways:
        out.counts["indexed"] += len(gateways)
        for gw, k in Counter(gateways).items():
            out.counts[("indexed", str(gw))] += k
    if len(gateways) == len(ops):
        return
    for n, (_row, original) in enumerate(ops):
        if type(original) is tuple:
            continue
        ((_op, res),) = items[n].items()
        index = op_index(plan, start + n, res)
        if readings_idx in index:
            out.counts["indexed"] += 1
            out.counts[("indexed", _gateway(original))] += 1
        elif "-health" in index:
            out.counts["health_indexed"] += 1


def merge(a: BulkOutcome, b: BulkOutcome) -> BulkOutcome:
    """The outcome of a bulk sent in two parts."""
    return BulkOutcome(
        a.retry_rows | b.retry_rows,
        a.retry_ops + b.retry_ops,
        a.rejected + b.rejected,
        a.present_ops + b.present_ops,
        a.counts + b.counts,
    )
