"""The batch wire format: one Salt event carries many readings, compactly.

Version 1 (DESIGN.md, with two size refinements documented in README's architecture)::

    {"v": 1, "epoch": "<id>", "first": <seq>, "last": <seq>,
     "sensors": ["t1/temperature", ...],   # dictionary for this batch
     "units": ["C", ...],                   # unit per dictionary entry ("" = none)
     "t0": <ts ms>,                         # base timestamp; rows carry offsets from it
     "d": [2, null, ...],                   # decimals per sensor: row values are integers
                                            # v * 10**d, or plain floats where d is null
     "r": [[<sensor index>, <ts - t0>, <value>], ...],  # seq = first + row
     "dropped": <n>, "agg": <window s or null>, "site": "<site>"}

Salt serialises events with msgpack, so integers cost 1-5 bytes where a float64 costs 9 and an
absolute millisecond timestamp 9: offsets and decimal mantissas bring a raw reading to about
6-8 bytes on the wire instead of about 20.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from saltext.tributary.reading import TS_MAX_MS, TS_MIN_MS

VERSION = 1
#: Refuse batches with more rows than this (a sane beacon run is far below it).
MAX_ROWS = 50_000
MAX_SENSORS = 4_096
MAX_DECIMALS = 6


class WireError(ValueError):
    """A batch whose structure is unusable; ``reason`` is a countable slug."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SpooledReading:
    """A reading as stored in a spool: numbered, keyed by ``<sensor>/<metric>``."""

    seq: int
    key: str
    unit: str
    ts_ms: int
    value: float


def _decimals(value: float) -> int | None:
    """Smallest d <= MAX_DECIMALS such that value == round(value * 10**d) / 10**d."""
    if not math.isfinite(value):
        return None
    for d in range(MAX_DECIMALS + 1):
        scale = 10**d
        mant = round(value * scale)
        if abs(mant) < 2**53 and mant / scale == value:
            return d
    return None


def encode_batch(
    epoch: str,
    rows: Sequence[SpooledReading],
    *,
    dropped: int = 0,
    agg: float | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """Build a v1 batch from contiguous spooled readings (seq = first + row index)."""
    if not rows:
        raise ValueError("empty batch")
    first = rows[0].seq
    index: dict[str, int] = {}
    sensors: list[str] = []
    units: list[str] = []
    decs: list[int | None] = []
    t0 = min(r.ts_ms for r in rows)
    for r in rows:
        i = index.get(r.key)
        if i is None:
            i = index[r.key] = len(sensors)
            sensors.append(r.key)
            units.append(r.unit or "")
            decs.append(0)
        d = decs[i]
        if d is not None:
            rd = _decimals(r.value)
            decs[i] = None if rd is None else max(d, rd)
    out_rows: list[list[Any]] = []
    for n, r in enumerate(rows):
        if r.seq != first + n:
            raise ValueError(f"batch rows are not contiguous at seq {r.seq}")
        i = index[r.key]
        d = decs[i]
        v: float | int = round(r.value * 10**d) if d is not None else r.value
        out_rows.append([i, r.ts_ms - t0, v])
    batch: dict[str, Any] = {
        "v": VERSION,
        "epoch": epoch,
        "first": first,
        "last": rows[-1].seq,
        "sensors": sensors,
        "units": units,
        "t0": t0,
        "d": decs,
        "r": out_rows,
        "dropped": int(dropped),
        "agg": agg,
    }
    if site:
        batch["site"] = site
    return batch


def packed_size(batch: dict[str, Any]) -> int:
    """Bytes of the batch as msgpack (what Salt puts on the wire for the event data)."""
    return len(msgpack.packb(batch, use_bin_type=True))


@dataclass(slots=True)
class DecodedBatch:
    """A validated batch: good readings plus rows set aside with their reason."""

    epoch: str
    first: int
    last: int
    site: str | None
    dropped: int
    agg: float | None
    readings: list[dict[str, Any]]
    rejected: list[dict[str, Any]]


def _req(data: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise WireError("missing_field", f"batch has no {key!r}")
    val = data[key]
    if isinstance(val, bool) or not isinstance(val, types):
        raise WireError("bad_field", f"batch field {key!r} has type {type(val).__name__}")
    return val


def decode_batch(data: dict[str, Any]) -> DecodedBatch:
    """Validate and expand a batch. Structural faults raise WireError; a bad row is set aside."""
    if not isinstance(data, dict):
        raise WireError("not_a_batch", f"event data is {type(data).__name__}")
    if data.get("v") != VERSION:
        raise WireError("bad_version", f"wire version {data.get('v')!r} is not {VERSION}")
    epoch = _req(data, "epoch", str)
    if not 0 < len(epoch) <= 64:
        raise WireError("bad_field", "epoch must be 1..64 characters")
    first = _req(data, "first", int)
    last = _req(data, "last", int)
    sensors = _req(data, "sensors", list)
    rows = _req(data, "r", list)
    t0 = data.get("t0", 0)
    if isinstance(t0, bool) or not isinstance(t0, int):
        raise WireError("bad_field", "batch field 't0' is not an integer")
    if len(rows) > MAX_ROWS or len(sensors) > MAX_SENSORS:
        raise WireError("oversized", f"{len(rows)} rows / {len(sensors)} sensors")
    if first < 0 or last - first + 1 != len(rows):
        raise WireError("bad_range", f"first={first} last={last} but {len(rows)} rows")
    units = data.get("units") or [""] * len(sensors)
    decs = data.get("d") or [None] * len(sensors)
    if not isinstance(units, list) or not isinstance(decs, list):
        raise WireError("bad_field", "units/d must be lists")
    if len(units) != len(sensors) or len(decs) != len(sensors):
        raise WireError("bad_field", "units/d do not match the sensor dictionary")
    keys: list[tuple[str, str] | None] = []
    for s in sensors:
        if isinstance(s, str) and s.count("/") >= 1:
            sensor, metric = s.rsplit("/", 1)
            keys.append((sensor, metric))
        else:
            keys.append(None)
    site = data.get("site")
    dropped = data.get("dropped") or 0
    agg = data.get("agg")
    out: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for n, row in enumerate(rows):
        seq = first + n
        try:
            if not isinstance(row, (list, tuple)) or len(row) != 3:
                raise WireError("bad_row", "row is not [sensor, dt, value]")
            idx, dt, val = row
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(keys):
                raise WireError("bad_row", f"sensor index {idx!r} out of range")
            key = keys[idx]
            if key is None:
                raise WireError("bad_sensor", f"sensor entry {sensors[idx]!r} is not sensor/metric")
            if isinstance(dt, bool) or not isinstance(dt, int):
                raise WireError("bad_timestamp", f"time offset {dt!r} is not an integer")
            ts = t0 + dt
            if not TS_MIN_MS <= ts < TS_MAX_MS:
                raise WireError("bad_timestamp", f"timestamp {ts} ms is outside 2000..2100")
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise WireError("not_numeric", f"value {val!r} is not a number")
            d = decs[idx]
            value = float(val) / 10**d if isinstance(d, int) and d > 0 else float(val)
            if not math.isfinite(value):
                raise WireError("not_finite", f"value {val!r} is not finite")
            unit = units[idx] if isinstance(units[idx], str) else ""
            out.append(
                {
                    "seq": seq,
                    "sensor": key[0],
                    "metric": key[1],
                    "unit": unit or None,
                    "ts_ms": ts,
                    "value": value,
                }
            )
        except WireError as exc:
            rejected.append({"seq": seq, "reason": exc.reason, "detail": exc.detail, "row": row})
    return DecodedBatch(
        epoch=epoch,
        first=first,
        last=last,
        site=site if isinstance(site, str) else None,
        dropped=dropped if isinstance(dropped, int) else 0,
        agg=agg if isinstance(agg, (int, float)) else None,
        readings=out,
        rejected=rejected,
    )


def bytes_per_reading(batches: Iterable[dict[str, Any]]) -> float:
    """Mean msgpack bytes per reading over some batches."""
    total = n = 0
    for b in batches:
        total += packed_size(b)
        n += len(b["r"])
    return total / n if n else 0.0
