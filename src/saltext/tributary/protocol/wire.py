"""The batch wire format: one Salt event carries many readings, compactly.

Version 1 (README's "Wire format" shows a batch and what each field costs on the wire)::

    {"v": 1, "epoch": "<id>", "first": <seq>, "last": <seq>,
     "sensors": ["t1/temperature", ...],   # dictionary for this batch
     "units": ["C", ...],                   # unit per dictionary entry ("" = none)
     "t0": <ts ms>,                         # base timestamp; rows carry offsets from it
     "d": [2, null, ...],                   # decimals per sensor: row values are integers
                                            # v * 10**d, or plain floats where d is null
     "r": [[<sensor index>, <ts - t0>, <value>], ...],  # seq = first + row
     "dropped": <n>, "agg": <window s or null>, "site": "<site>",
     "emit_ms": <ts ms>}                    # when the gateway emitted this batch (signed)

A gateway sends the rows packed (``rb``, :func:`pack_rows`): the same list as one msgpack
value behind the prefix ``0xFF 0x01``, which Salt's transport carries as one bytes value instead
of walking it row by row on every hop (README, "Wire format": packed rows); :func:`rows_of`
reads either form.

Salt serialises events with msgpack, so integers cost 1-5 bytes where a float64 costs 9 and an
absolute millisecond timestamp 9: offsets and decimal mantissas bring a raw reading to about
6-8 bytes on the wire instead of about 20.

``emit_ms`` (optional, a compatible extension) is the gateway's clock when it finalised and
signed the batch for this emission (a replay gets its own): with the reading timestamps and the
relay's receive time it gives the lag of each hop. A relay that does not know it ignores it
(the signature covers it like any other field); a value that is not a plausible timestamp is
ignored, never a reason to refuse the batch.

Aggregated batches (bandwidth budget exceeded, ``agg`` = window seconds, a number): each row
summarises the readings of one sensor in one window::

    [<sensor index>, <first ts - t0>, <mean>, <min>, <max>, <count>, <last ts - t0>, <seq off>]

``mean``/``min``/``max`` are encoded like raw values (mantissas with the sensor's decimals
``d``; the mean is rounded to those decimals). ``first + seq off`` is the sequence number of
the *last* raw reading in the group and becomes the document's ``seq`` (unique: every raw
reading belongs to exactly one group). An aggregated batch covers ``first..last`` entirely:
the counts add up to ``last - first + 1``. :func:`decode_batch` returns each aggregate as a
reading dict with ``value`` = mean, ``ts_ms`` = first timestamp and an extra ``agg`` key:
``{"window_s", "min", "max", "count", "first", "last"}`` (first/last: timestamps in ms).
Raw batches decode exactly as before.

Records (wire v1, compatible extension): a gateway also numbers *records* in the same
sequence as its readings, today only the audit of a command sent to a device (kind
``command``). A record's dictionary entry is ``"@<kind>"`` (no ``/``, so it can never be a
``<sensor>/<metric>`` key), its unit ``""``, its decimals null, and its row carries the record
itself where a reading carries its value::

    "sensors": ["boiler-1/temperature", "@command"], "d": [1, null],
    "r": [[0, 0, 655], [1, 40, {"device": "boiler-1", "command": "setpoint", ...}]]

In an aggregated batch a record is a group of its own: ``[i, dt, {record}, null, null, 1, dt,
seq off]``. :func:`decode_batch` returns records in ``DecodedBatch.records`` (``seq``, ``kind``,
``ts_ms``, ``body``); a record of a kind it does not know is set aside with reason
``unknown_kind`` (the relay dead-letters it). A relay older than records sets every record row
aside as ``bad_sensor`` (its entry is not ``sensor/metric``): dead-lettered with the record in
the dead letter, never a crash, and the sequence range is still accounted for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from saltext.tributary.protocol.errors import ReasonError
from saltext.tributary.protocol.reading import TS_MAX_MS, TS_MIN_MS

VERSION = 1
#: Refuse batches with more rows than this (a sane beacon run is far below it).
MAX_ROWS = 50_000
MAX_SENSORS = 4_096
MAX_DECIMALS = 6
#: Sequence numbers, time offsets and counts stay exact in a double and in SQLite's INTEGER.
MAX_INT = 2**53
#: Longest sensor key (``<sensor>/<metric>``) and unit a batch may carry.
MAX_KEY_CHARS = 256
EPOCH_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Record kinds this version decodes (``"@<kind>"`` dictionary entries).
RECORD_KINDS = frozenset({"command"})
#: Largest record body (JSON bytes) a batch may carry; the gateway keeps its records smaller.
MAX_RECORD_BYTES = 8_192


#: ``rb``: a batch's rows packed as one msgpack array behind this prefix (README, "Wire
#: format": packed rows). Salt's transport turns every bytes value it can decode as UTF-8 into
#: text and walks every list of an event in Python on each hop (each master's request worker
#: and every subscriber of its event bus); one bytes value is one step of that walk, where a
#: list of rows is one per row. 0xFF never occurs in UTF-8, so the blob stays bytes.
PACKED_PREFIX = b"\xff\x01"


class WireError(ReasonError):
    """A batch whose structure is unusable."""


def pack_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as a gateway sends it: its rows (``r``) packed into ``rb``, one bytes value."""
    out = {k: v for k, v in batch.items() if k != "r"}
    out["rb"] = PACKED_PREFIX + msgpack.packb(batch["r"], use_bin_type=True)
    return out


def rows_of(data: dict[str, Any]) -> list[Any]:
    """A batch's rows: ``r`` as sent, or ``rb`` unpacked; WireError when neither is usable."""
    if "rb" not in data:
        return _req(data, "r", list)
    if "r" in data:
        raise WireError("bad_field", "batch has both 'r' and 'rb'")
    blob = data["rb"]
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(PACKED_PREFIX):
        raise WireError("bad_field", "batch field 'rb' is not packed rows")
    if row_count(data) > MAX_ROWS:  # read from the array's header: refused before unpacking
        raise WireError("oversized", f"{row_count(data)} rows")
    try:
        rows = msgpack.unpackb(
            memoryview(blob)[len(PACKED_PREFIX) :], raw=False, strict_map_key=False
        )
    except Exception as exc:  # anything a forged blob can make msgpack raise
        raise WireError("bad_field", f"packed rows do not decode: {exc}") from None
    if not isinstance(rows, list):
        raise WireError("bad_field", f"packed rows are a {type(rows).__name__}, not a list")
    return rows


def row_count(data: Any) -> int:
    """How many rows a batch carries (read from the packed rows' array header, without
    unpacking them); 0 for anything that is not a batch."""
    if not isinstance(data, dict):
        return 0
    rows = data.get("r")
    if isinstance(rows, list):
        return len(rows)
    blob = data.get("rb")
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(PACKED_PREFIX):
        return 0
    head = blob[len(PACKED_PREFIX) : len(PACKED_PREFIX) + 5]
    if head and 0x90 <= head[0] <= 0x9F:
        return head[0] & 0x0F
    if len(head) >= 3 and head[0] == 0xDC:
        return int.from_bytes(head[1:3], "big")
    if len(head) == 5 and head[0] == 0xDD:
        return int.from_bytes(head[1:5], "big")
    return 0


class SpooledReading(NamedTuple):
    """A reading as stored in a spool: numbered, keyed by ``<sensor>/<metric>`` (a named tuple,
    as :class:`~saltext.tributary.protocol.reading.Reading`: one is built per reading emitted)."""

    seq: int
    key: str
    unit: str
    ts_ms: int
    value: float
    #: a record's content (``key`` is then ``"@<kind>"``); None for a reading
    body: Any = None


def is_record_key(key: Any) -> bool:
    """True for a record's dictionary entry (``"@<kind>"``)."""
    return isinstance(key, str) and key.startswith("@")


_POW10 = [10**d for d in range(MAX_DECIMALS + 1)]


def _decimals(value: float, start: int = 0) -> int | None:
    """Smallest d in start..MAX_DECIMALS such that value == round(value * 10**d) / 10**d."""
    if not math.isfinite(value):
        return None
    for d in range(start, MAX_DECIMALS + 1):
        scale = _POW10[d]
        mant = round(value * scale)
        if abs(mant) < 2**53 and mant / scale == value:
            return d
    return None


def _widen(d: int, value: float) -> int | None:
    """The decimals a sensor needs once ``value`` joins values that needed ``d``: ``d`` if
    ``value`` is exact with ``d`` decimals (then it needs no more: one test, the common case),
    else the smallest larger count that holds it (None: none does)."""
    if math.isfinite(value):
        scale = _POW10[d]
        mant = round(value * scale)
        if abs(mant) < 2**53 and mant / scale == value:
            return d
    return _decimals(value, d + 1)


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
    mags: list[float] = []
    t0 = min(r.ts_ms for r in rows)
    for r in rows:
        i = index.get(r.key)
        if i is None:
            i = index[r.key] = len(sensors)
            sensors.append(r.key)
            units.append(r.unit or "")
            decs.append(None if r.body is not None else 0)
            mags.append(0.0)
        d = decs[i]
        if d is not None:
            decs[i] = _widen(d, r.value)
            if abs(r.value) > mags[i]:
                mags[i] = abs(r.value)
    # Every mantissa must stay an exact integer (and fit msgpack's int64): a sensor whose
    # largest value would pass 2**53 at the decimals another of its values needs keeps floats.
    for i, d in enumerate(decs):
        if d is not None and round(mags[i] * _POW10[d]) >= 2**53:
            decs[i] = None
    out_rows: list[list[Any]] = []
    for n, r in enumerate(rows):
        if r.seq != first + n:
            raise ValueError(f"batch rows are not contiguous at seq {r.seq}")
        i = index[r.key]
        if r.body is not None:
            out_rows.append([i, r.ts_ms - t0, r.body])
            continue
        d = decs[i]
        v: float | int = round(r.value * 10**d) if d is not None else r.value
        out_rows.append([i, r.ts_ms - t0, v])
    return _batch(
        epoch, first, rows[-1].seq, sensors, units, t0, decs, out_rows, dropped, agg, site
    )


def encode_agg_batch(
    epoch: str,
    rows: Sequence[SpooledReading],
    window_s: float,
    *,
    dropped: int = 0,
    site: str | None = None,
) -> dict[str, Any]:
    """Aggregate contiguous spooled readings per sensor and ``window_s`` window (see above)."""
    if not rows:
        raise ValueError("empty batch")
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    first = rows[0].seq
    win_ms = max(1, round(window_s * 1000))
    groups: dict[tuple[str, int], list[Any]] = {}
    for n, r in enumerate(rows):
        if r.seq != first + n:
            raise ValueError(f"batch rows are not contiguous at seq {r.seq}")
        if r.body is not None:  # a record is never summarised: a group of its own
            groups[(r.key, -r.seq)] = [r.unit, r.ts_ms, r.ts_ms, r.body, None, None, 1, r.seq]
            continue
        g = groups.get((r.key, r.ts_ms // win_ms))
        if g is None:
            # [unit, first ts, last ts, sum, min, max, count, last seq]
            groups[(r.key, r.ts_ms // win_ms)] = [
                r.unit,
                r.ts_ms,
                r.ts_ms,
                r.value,
                r.value,
                r.value,
                1,
                r.seq,
            ]
        else:
            g[1] = min(g[1], r.ts_ms)
            g[2] = max(g[2], r.ts_ms)
            g[3] += r.value
            g[4] = min(g[4], r.value)
            g[5] = max(g[5], r.value)
            g[6] += 1
            g[7] = r.seq
    index: dict[str, int] = {}
    sensors: list[str] = []
    units: list[str] = []
    decs: list[int | None] = []
    mags: list[float] = []
    for (key, _w), g in groups.items():
        i = index.get(key)
        if i is None:
            i = index[key] = len(sensors)
            sensors.append(key)
            units.append(g[0] or "")
            decs.append(None if is_record_key(key) else 0)
            mags.append(0.0)
        d = decs[i]
        if d is not None and not is_record_key(key):
            for v in (g[4], g[5]):
                rd = _decimals(v)
                d = None if rd is None or d is None else max(d, rd)
            decs[i] = d
            mags[i] = max(mags[i], abs(g[4]), abs(g[5]))
    # A mean carries one decimal more than the readings it summarises (20 and 21 -> 20.5);
    # min and max stay exact at that scale. Mantissas stay below 2**53 (see encode_batch).
    decs = [
        None if d is None or d >= MAX_DECIMALS or round(mags[i] * _POW10[d + 1]) >= 2**53 else d + 1
        for i, d in enumerate(decs)
    ]
    t0 = min(g[1] for g in groups.values())
    out_rows: list[list[Any]] = []
    for (key, _w), g in sorted(groups.items(), key=lambda kv: kv[1][7]):
        i = index[key]
        if is_record_key(key):
            out_rows.append([i, g[1] - t0, g[3], None, None, 1, g[2] - t0, g[7] - first])
            continue
        d = decs[i]
        mean = g[3] / g[6]

        def enc(v: float, d: int | None = d) -> float | int:
            return round(v * 10**d) if d is not None else v

        out_rows.append(
            [i, g[1] - t0, enc(mean), enc(g[4]), enc(g[5]), g[6], g[2] - t0, g[7] - first]
        )
    return _batch(
        epoch, first, rows[-1].seq, sensors, units, t0, decs, out_rows, dropped, window_s, site
    )


def _batch(
    epoch: str,
    first: int,
    last: int,
    sensors: list[str],
    units: list[str],
    t0: int,
    decs: list[int | None],
    rows: list[list[Any]],
    dropped: int,
    agg: float | None,
    site: str | None,
) -> dict[str, Any]:
    """The v1 batch envelope shared by raw and aggregated batches."""
    batch: dict[str, Any] = {
        "v": VERSION,
        "epoch": epoch,
        "first": first,
        "last": last,
        "sensors": sensors,
        "units": units,
        "t0": t0,
        "d": decs,
        "r": rows,
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
    #: records (``seq``, ``kind``, ``ts_ms``, ``body``) of the kinds this version knows
    records: list[dict[str, Any]] = field(default_factory=list)
    #: the gateway's emit time (ms), None when the batch has none or an implausible one
    emit_ms: int | None = None


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
    if not EPOCH_RE.fullmatch(epoch):
        # no ':' in an epoch: <gateway>:<epoch>:<seq> then names one reading only
        raise WireError("bad_field", "epoch must be 1..64 of A-Z a-z 0-9 _ -")
    first = _req(data, "first", int)
    last = _req(data, "last", int)
    if not 0 <= first <= last < MAX_INT:
        raise WireError("bad_range", f"first={first} last={last} outside 0..2**53")
    sensors = _req(data, "sensors", list)
    rows = rows_of(data)
    t0 = data.get("t0", 0)
    if isinstance(t0, bool) or not isinstance(t0, int) or not -MAX_INT < t0 < MAX_INT:
        raise WireError("bad_field", "batch field 't0' is not an integer in -2**53..2**53")
    if len(rows) > MAX_ROWS or len(sensors) > MAX_SENSORS:
        raise WireError("oversized", f"{len(rows)} rows / {len(sensors)} sensors")
    agg = data.get("agg")
    is_agg = isinstance(agg, (int, float)) and not isinstance(agg, bool) and agg > 0
    if is_agg:
        total = 0
        for row in rows:
            if isinstance(row, (list, tuple)) and len(row) == 8:
                c = row[5]
                total += c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else 0
        if first < 0 or last < first or total != last - first + 1:
            raise WireError(
                "bad_range", f"first={first} last={last} but aggregates count {total} readings"
            )
    elif first < 0 or last - first + 1 != len(rows):
        raise WireError("bad_range", f"first={first} last={last} but {len(rows)} rows")
    units = data.get("units") or [""] * len(sensors)
    decs = data.get("d") or [None] * len(sensors)
    if not isinstance(units, list) or not isinstance(decs, list):
        raise WireError("bad_field", "units/d must be lists")
    if len(units) != len(sensors) or len(decs) != len(sensors):
        raise WireError("bad_field", "units/d do not match the sensor dictionary")
    for d in decs:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 15):
            raise WireError("bad_field", f"decimals {d!r} not an integer in 0..15")
    for u in units:
        if u is not None and (not isinstance(u, str) or len(u) > MAX_KEY_CHARS):
            raise WireError("bad_field", f"unit {str(u)[:40]!r} is not a short string")
    entries = [_entry_of(s, u, d) for s, u, d in zip(sensors, units, decs, strict=True)]
    site = data.get("site")
    dropped = data.get("dropped") or 0
    if isinstance(dropped, bool) or not isinstance(dropped, int) or not 0 <= dropped < MAX_INT:
        dropped = 0
    out: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    if is_agg:
        _decode_agg(
            rows, first, last, t0, entries, sensors, float(agg or 0), out, rejected, records
        )
    # The usual row (a list of an in-range index of a reading's entry, an in-range integer
    # offset and a finite number) takes the inlined path below; every other row takes the
    # checks of _entry/_ts/_reading, which say why it is set aside. Both give the same
    # reading (unit test: rows as tuples take only the checked path).
    n_entries = len(entries)
    dt_lo, dt_hi = max(TS_MIN_MS - t0, 1 - MAX_INT), min(TS_MAX_MS - t0, MAX_INT)
    isfinite = math.isfinite
    for n, row in enumerate(rows if not is_agg else []):
        seq = first + n
        if type(row) is list and len(row) == 3:
            idx, dt, val = row
            if (
                type(idx) is int
                and 0 <= idx < n_entries
                and type(dt) is int
                and dt_lo <= dt < dt_hi
            ):
                entry = entries[idx]
                tv = type(val)
                if type(entry) is tuple and (
                    tv is float or (tv is int and -MAX_INT < val < MAX_INT)
                ):
                    scale = entry[3]
                    value = float(val) / scale if scale else float(val)
                    if isfinite(value):
                        out.append(
                            {
                                "seq": seq,
                                "sensor": entry[0],
                                "metric": entry[1],
                                "unit": entry[2],
                                "ts_ms": t0 + dt,
                                "value": value,
                            }
                        )
                        continue
        try:
            if not isinstance(row, (list, tuple)) or len(row) != 3:
                raise WireError("bad_row", "row is not [sensor, dt, value]")
            idx, dt, val = row
            entry = _entry(entries, sensors, idx)
            if isinstance(entry, str):
                records.append(_record(entry, seq, t0, dt, val))
            else:
                out.append(_reading(seq, entry, t0, dt, val))
        except WireError as exc:
            rejected.append({"seq": seq, "reason": exc.reason, "detail": exc.detail, "row": row})
    emit = data.get("emit_ms")
    if isinstance(emit, bool) or not isinstance(emit, int) or not TS_MIN_MS <= emit < TS_MAX_MS:
        emit = None
    return DecodedBatch(
        epoch=epoch,
        first=first,
        last=last,
        site=site if isinstance(site, str) else None,
        dropped=dropped if isinstance(dropped, int) else 0,
        agg=agg if isinstance(agg, (int, float)) else None,
        readings=out,
        rejected=rejected,
        records=records,
        emit_ms=emit,
    )


#: A reading's dictionary entry as its rows use it: sensor, metric, unit or None, and the
#: divisor of its row values (``10**decimals``; None for plain floats).
Key = tuple[str, str, str | None, int | None]
#: A dictionary entry: a reading's :data:`Key`, a record's kind, or None when it is neither.
Entry = Key | str | None


def _entry_of(key: Any, unit: Any, decimals: Any) -> Entry:
    """One dictionary entry, read once per batch."""
    if is_record_key(key):
        return str(key[1:])
    scale = 10**decimals if decimals else None
    if isinstance(key, str) and "/" in key and len(key) <= MAX_KEY_CHARS:
        sensor, metric = key.rsplit("/", 1)
        return (sensor, metric, unit if isinstance(unit, str) and unit else None, scale)
    return None


def _entry(entries: list[Entry], sensors: list[Any], idx: Any) -> Key | str:
    """The entry a row names (a reading's or a record's); WireError when there is none."""
    if type(idx) is not int or not 0 <= idx < len(entries):  # exactly int: never a bool
        raise WireError("bad_row", f"sensor index {idx!r} out of range")
    entry = entries[idx]
    if entry is None:
        raise WireError("bad_sensor", f"sensor entry {sensors[idx]!r} is not sensor/metric")
    return entry


def _ts(t0: int, dt: Any) -> int:
    """A row's timestamp from its offset; WireError when either is out of range."""
    if type(dt) is not int or not -MAX_INT < dt < MAX_INT:
        raise WireError("bad_timestamp", f"time offset {dt!r} is not an integer")
    ts = t0 + dt
    if not TS_MIN_MS <= ts < TS_MAX_MS:
        raise WireError("bad_timestamp", f"timestamp {ts} ms is outside 2000..2100")
    return ts


def _reading(seq: int, entry: Key, t0: int, dt: Any, val: Any) -> dict[str, Any]:
    """One reading row, validated (WireError with the reason otherwise)."""
    ts = _ts(t0, dt)
    return {
        "seq": seq,
        "sensor": entry[0],
        "metric": entry[1],
        "unit": entry[2],
        "ts_ms": ts,
        "value": _scaled(val, entry[3]),
    }


def _record(kind: str, seq: int, t0: int, dt: Any, body: Any) -> dict[str, Any]:
    """One record row, validated (WireError with the reason otherwise)."""
    if kind not in RECORD_KINDS:
        raise WireError("unknown_kind", f"record kind {kind[:40]!r} is not known to this relay")
    ts = _ts(t0, dt)
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise WireError("bad_record", f"a {kind} record is not a mapping")
    if packed_size(body) > MAX_RECORD_BYTES:
        raise WireError("bad_record", f"a {kind} record over {MAX_RECORD_BYTES} bytes")
    return {"seq": seq, "kind": kind, "ts_ms": ts, "body": body}


def _decode_agg(
    rows: list[Any],
    first: int,
    last: int,
    t0: int,
    entries: list[Entry],
    sensors: list[Any],
    window_s: float,
    out: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    records: list[dict[str, Any]],
) -> None:
    """Aggregate rows: each a reading (its mean) with an ``agg`` summary, or a record."""
    for row in rows:
        seq = first
        try:
            if not isinstance(row, (list, tuple)) or len(row) != 8:
                raise WireError(
                    "bad_row",
                    "aggregate row is not [sensor, dt, mean, min, max, count, dt_last, seq_off]",
                )
            idx, dt, mean, lo, hi, count, dt_last, seq_off = row
            if isinstance(seq_off, bool) or not isinstance(seq_off, int):
                raise WireError("bad_row", f"seq offset {seq_off!r} is not an integer")
            seq = first + seq_off
            if not first <= seq <= last:
                raise WireError("bad_row", f"seq offset {seq_off} outside the batch")
            entry = _entry(entries, sensors, idx)
            if isinstance(entry, str):
                records.append(_record(entry, seq, t0, dt, mean))
                continue
            if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < MAX_INT:
                raise WireError("bad_row", f"aggregate count {count!r} is not a positive integer")
            ts_last = _ts(t0, dt_last)
            reading = _reading(seq, entry, t0, dt, mean)
            reading["agg"] = {
                "window_s": window_s,
                "min": _scaled(lo, entry[3]),
                "max": _scaled(hi, entry[3]),
                "count": count,
                "first": reading["ts_ms"],
                "last": ts_last,
            }
            out.append(reading)
        except (WireError, ValueError) as exc:
            reason = getattr(exc, "reason", "bad_row")
            rejected.append(
                {"seq": seq, "reason": reason, "detail": getattr(exc, "detail", ""), "row": row}
            )


def _scaled(val: Any, scale: int | None) -> float:
    """A row's number as a float (divided by its sensor's ``10**decimals``); WireError when it
    is not a number, not finite or too large for a float."""
    if type(val) is not float and type(val) is not int:
        raise WireError("not_numeric", f"value {val!r} is not a number")
    try:
        value = float(val) / scale if scale else float(val)
    except OverflowError:
        raise WireError("not_finite", f"value {val!r} does not fit a float") from None
    if not math.isfinite(value):
        raise WireError("not_finite", f"value {val!r} is not finite")
    return value


def bytes_per_reading(batches: Iterable[dict[str, Any]]) -> float:
    """Mean msgpack bytes per reading over some batches."""
    total = n = 0
    for b in batches:
        total += packed_size(b)
        n += row_count(b)
    return total / n if n else 0.0
