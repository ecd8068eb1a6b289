"""Elasticsearch documents and bulk plans built from spooled batches (pure functions)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.protocol.wire import WireError, rows_of

#: A dead letter keeps at most this much of its original (JSON bytes), so that a huge junk
#: event cannot make its own dead letter too large to index.
ORIGINAL_MAX_BYTES = 16_384
#: ... and at most this many rows of a whole batch.
ORIGINAL_MAX_ROWS = 20


def jstr(value: str | None) -> str:
    """JSON for a string (or null)."""
    return json.dumps(value)


def jnum(value: float) -> str:
    """JSON for a finite number (decode_batch has already refused non-finite values)."""
    if type(value) is float:
        return repr(value)
    if type(value) is int:  # json.dumps writes an int as its repr, at many times the cost
        return repr(value)
    return json.dumps(value)


def hops(ts: int, emit: int | None, received: int, relayed: int) -> dict[str, int]:
    """A reading's lag per hop (ms), as indexed in its ``hop_ms``: ``gateway`` (its timestamp
    to the gateway emitting its batch), ``uplink`` (that emission to the relay's intake: the
    gateway's master, syndics, the top master's event bus; two clocks), ``relay`` (intake to
    the bulk request that indexes it). Without an emit time only ``relay`` is known."""
    if emit is None:
        return {"relay": relayed - received}
    return {"gateway": emit - ts, "uplink": received - emit, "relay": relayed - received}


def hops_tail(emit: int | None, received: int, relayed: int) -> str:
    """The part of ``hop_ms``'s JSON shared by every reading of a batch (after ``gateway``)."""
    if emit is None:
        return f'"relay":{relayed - received}}},'
    return f'"uplink":{received - emit},"relay":{relayed - received}}},'


def reading_doc(original: Any, hops_of: tuple[int | None, int] | None = None) -> dict[str, Any]:
    """The Elasticsearch document of a bulk op's original (a reading tuple or a dict); with
    ``hops_of`` (its row's :attr:`RowPlan.hops`), its ``hop_ms`` as indexed."""
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
    if hops_of is not None:
        doc["hop_ms"] = hops(r["ts_ms"], hops_of[0], hops_of[1] or now, now)
    return doc


#: Fields of a command record and the type each must have to be indexed as it is (others,
#: and fields of another type, are dropped from the document; ``payload`` travels as JSON text).
COMMAND_FIELDS: dict[str, tuple[type, ...]] = {
    "device": (str,),
    "command": (str,),
    "correlation_id": (str,),
    "outcome": (str,),
    "reason": (str,),
    "rule": (str,),
    "latency_ms": (int, float),
    "user": (str,),
    "jid": (str,),
    "topic": (str,),
    "qos": (int,),
}


def command_doc(
    gateway: str,
    site: str | None,
    epoch: str,
    seq: int,
    ts_ms: int,
    body: Mapping[str, Any],
    now: int,
) -> dict[str, Any]:
    """The ``tributary-commands-*`` document of one command record. The gateway is the one
    the batch's tag and signature prove, never a field of the record."""
    doc: dict[str, Any] = {"@timestamp": ts_ms, "gateway": gateway, "site": site}
    for key, types in COMMAND_FIELDS.items():
        val = body.get(key)
        if isinstance(val, types) and not isinstance(val, bool):
            doc[key] = val[:2048] if isinstance(val, str) else val
    payload = body.get("payload")
    doc["payload"] = None if payload is None else json.dumps(payload, sort_keys=True, default=str)
    if isinstance(payload, (int, float)) and not isinstance(payload, bool):
        doc["payload_value"] = payload
    answer = body.get("answer")
    if answer is not None:
        doc["answer"] = dict(answer) if isinstance(answer, Mapping) else {"value": answer}
    doc.update(epoch=epoch, seq=seq, relayed_at=now)
    return doc


#: One bulk operation: the spool row it came from, and its original (the document as a dict,
#: or for a reading the tuple ``(gateway, site, epoch, relayed_at, reading)``; see
#: :func:`reading_doc`).
Op = tuple[int, Any]


@dataclass
class RowPlan:
    """What one spool row moves once all its documents are confirmed."""

    attempts: int = 0
    #: (gateway, epoch, first, last[, now, agg]): the sequence range the ledger records
    #: (:meth:`~saltext.tributary.relay.ledger.Ledger.add_range`'s arguments)
    range: tuple[Any, ...] | None = None
    #: (gateway, epoch, last_seq) from a health heartbeat
    heartbeat: tuple[str, str, int] | None = None
    #: (gateway, heartbeat) kept as the gateway's last known facts
    facts: tuple[str, Mapping[str, Any]] | None = None
    #: (the batch's emit_ms, when intake spooled it): its readings' ``hop_ms``
    hops: tuple[int | None, int] | None = None


@dataclass
class BulkPlan:
    """One bulk request: its operations (two NDJSON lines each: action, source) and, per
    operation, the spool row it belongs to. A row leaves the spool once every operation it
    owns is confirmed (``rows``); ``held`` rows wait for their gateway's key."""

    lines: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    rows: dict[int, RowPlan] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)
    #: operations Elasticsearch did not create (already present, dead-lettered): set by the
    #: shipper once the bulk is answered
    not_created: set[int] = field(default_factory=set)

    def add(self, row: int, action: str, source: str, original: Any) -> None:
        self.lines.append(action)
        self.lines.append(source)
        self.ops.append((row, original))

    def truncate(self, n_ops: int) -> None:
        """Forget every operation after the first ``n_ops``."""
        del self.ops[n_ops:]
        del self.lines[2 * n_ops :]

    def body(self, start: int = 0, stop: int | None = None) -> str:
        """The NDJSON bulk body of operations ``start..stop``."""
        end = None if stop is None else 2 * stop
        return "\n".join(self.lines[2 * start : end]) + "\n"

    def size(self, start: int = 0) -> int:
        """Bytes of the body from operation ``start`` on (newlines included)."""
        lines = self.lines[2 * start :]
        return sum(map(len, lines)) + len(lines)


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


def bounded(original: Any) -> dict[str, Any]:
    """A dead letter's copy of an original: a mapping of bounded size (a whole batch keeps at
    most :data:`ORIGINAL_MAX_ROWS` rows; anything still over :data:`ORIGINAL_MAX_BYTES` of JSON
    is kept as the start of its JSON text)."""
    if not isinstance(original, Mapping):
        original = {"value": repr(original)[:ORIGINAL_MAX_BYTES]}
    if "rb" in original:  # packed rows: kept readable (or, when they do not decode, as repr)
        try:
            original = {**{k: v for k, v in original.items() if k != "rb"}, "r": rows_of(original)}
        except WireError:
            original = {**original, "rb": repr(original["rb"])[:ORIGINAL_MAX_BYTES]}
    rows = original.get("r")
    if isinstance(rows, list) and len(rows) > ORIGINAL_MAX_ROWS:
        original = {**original, "r": rows[:ORIGINAL_MAX_ROWS], "r_total": len(rows)}
    try:
        text = json.dumps(original, default=str)
    except (TypeError, ValueError) as exc:  # e.g. keys json cannot write
        text = repr(original)
        original = {"unserialisable": str(exc)}
    if len(text) > ORIGINAL_MAX_BYTES:
        return {"truncated": text[:ORIGINAL_MAX_BYTES], "bytes": len(text)}
    return dict(original)
