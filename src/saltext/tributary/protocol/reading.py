"""The reading model: one sensor value at one instant, and its document id.

A reading is identified end to end by ``(gateway, epoch, seq)``: the gateway is the minion id,
the epoch names the gateway spool that numbered it, and ``seq`` is its position in that spool.
``doc_id`` turns that triple into the Elasticsearch ``_id``, so a replayed or duplicated batch
rewrites nothing (bulk ``create`` answers 409 for a document already present).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from saltext.tributary.protocol.errors import ReasonError

#: Timestamps outside this window (2000-01-01 .. 2100-01-01 UTC, in ms) are rejected: they are
#: almost always a seconds/milliseconds mix-up or an unset RTC on the sensor.
TS_MIN_MS = 946_684_800_000
TS_MAX_MS = 4_102_444_800_000

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


class RejectedReading(ReasonError):
    """A reading that cannot be accepted."""


class Reading(NamedTuple):
    """One accepted sensor value, before it gets its sequence number (immutable; a named
    tuple because one is built per reading on the gateway: 0.4 µs against 2.0 µs for a frozen
    dataclass)."""

    sensor: str
    metric: str
    value: float
    ts_ms: int
    unit: str | None = None

    @property
    def key(self) -> str:
        """The batch dictionary key: ``<sensor>/<metric>``."""
        return f"{self.sensor}/{self.metric}"


#: Names already checked (a gateway has a few hundred sensors at most; bounded all the same).
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 4096


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a usable sensor or metric name, else raise RejectedReading."""
    if type(name) is str and name in _GOOD_NAMES:
        return name
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RejectedReading(
            f"bad_{kind}", f"{kind} name {name!r} is not [A-Za-z0-9_.:@-]{{1,128}}"
        )
    if type(name) is str and len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(name)
    return name


def check_value(value: object) -> float:
    """Coerce a numeric value to float; reject booleans, strings, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RejectedReading("not_numeric", f"value {value!r} is not a number")
    out = float(value)
    if not math.isfinite(out):
        raise RejectedReading("not_finite", f"value {value!r} is not finite")
    return out


def check_ts(ts_ms: object) -> int:
    """Validate a UTC timestamp in milliseconds."""
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        raise RejectedReading("bad_timestamp", f"timestamp {ts_ms!r} is not integer milliseconds")
    if not TS_MIN_MS <= ts_ms < TS_MAX_MS:
        raise RejectedReading("bad_timestamp", f"timestamp {ts_ms} ms is outside 2000..2100")
    return ts_ms


#: Longest unit a reading may carry.
MAX_UNIT_CHARS = 32


def check_unit(unit: object) -> str | None:
    """A unit is absent or a short string (it is stored and indexed with every reading)."""
    if unit is None or unit == "":
        return None
    if not isinstance(unit, str) or len(unit) > MAX_UNIT_CHARS or not unit.isprintable():
        raise RejectedReading("bad_unit", f"unit {str(unit)[:40]!r} is not a short text")
    return unit


def make_reading(
    sensor: object,
    metric: object,
    value: object,
    ts_ms: object,
    unit: object = None,
) -> Reading:
    """Build a validated Reading, raising RejectedReading with a reason otherwise."""
    return Reading(
        sensor=check_name("sensor", sensor),
        metric=check_name("metric", metric),
        value=check_value(value),
        ts_ms=check_ts(ts_ms),
        unit=check_unit(unit),
    )


def doc_id(gateway: str, epoch: str, seq: int) -> str:
    """The Elasticsearch ``_id`` of a reading: ``<gateway>:<epoch>:<seq>``."""
    return f"{gateway}:{epoch}:{seq}"


def parse_doc_id(value: str) -> tuple[str, str, int]:
    """Inverse of :func:`doc_id` (the gateway id may itself contain colons)."""
    gateway, epoch, seq = value.rsplit(":", 2)
    return gateway, epoch, int(seq)
