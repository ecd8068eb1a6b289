"""Elasticsearch documents and bulk plans built from spooled batches (pure functions)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def jstr(value: str | None) -> str:
    """JSON for a string (or null)."""
    return json.dumps(value)


def jnum(value: float) -> str:
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
