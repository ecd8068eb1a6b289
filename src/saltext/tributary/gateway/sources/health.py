"""Gateway health: the heartbeat that also tells the top master the gateway's last sequence.

:func:`collect` gathers CPU temperature, load, memory, disk, uptime, broker connectivity and
the spool's depth/age/bytes, epoch, last sequence and counters. The health beacon spools the
numeric metrics as ordinary readings (sensor ``health``), so they are numbered, retained and
replayable like any other, then returns one event tagged ``health`` whose data is::

    {"v": 1, "epoch": "<spool epoch>", "last_seq": <int>, "ts_ms": <int>, "_stamp": <int>,
     "cpu_temp_c": 48.2, "load1": 0.3, "load5": ..., "load15": ...,
     "mem_total_bytes": ..., "mem_available_bytes": ..., "mem_used_pct": ...,
     "disk_total_bytes": ..., "disk_free_bytes": ..., "disk_used_pct": ...,
     "uptime_s": ..., "broker": "subscribed|connected|disconnected|unknown",
     "broker_connected": true, "spool_unsent": ..., "spool_held": ..., "spool_bytes": ...,
     "spool_oldest_age_s": ..., "dropped": ..., "counters": {...}}

``last_seq`` is the last sequence the gateway has *emitted* (its spool cursor), read after
this run's batches were built, so it covers them too; ``numbered_seq`` is the last one it has
numbered. Readings numbered but held back (by the bandwidth budget, say) are a backlog, not a
gap: the top master only looks for what was emitted and never arrived. The
beacon then adds ``site`` (when configured), ``grains`` (the grain paths its ``grains`` option
lists, see :func:`pick_grains`: what alert rules on the top master may match on) and, last of
all, ``sig``: the heartbeat is signed
with the gateway's own minion key exactly like a batch
(:func:`~saltext.tributary.protocol.signing.sign_event`), and the relay dead-letters a heartbeat
whose signature does not verify against the gateway's accepted key, so no gateway can speak for
another's ``epoch`` and ``last_seq``.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping
from typing import Any

from saltext.tributary.protocol.reading import Reading, RejectedReading, make_reading

#: metric name -> unit, for the numeric metrics spooled as readings of sensor "health".
SPOOLED: dict[str, str | None] = {
    "cpu_temp_c": "C",
    "load1": None,
    "mem_used_pct": "%",
    "disk_used_pct": "%",
    "uptime_s": "s",
    "broker_connected": None,
    "spool_unsent": None,
    "spool_bytes": "B",
    "dropped": None,
}


def cpu_temp(root: str = "/") -> float | None:
    """The hottest thermal zone (°C), or None when the machine has none."""
    best: float | None = None
    for path in glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*/temp")):
        try:
            with open(path, encoding="ascii") as fh:
                val = int(fh.read().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if best is None or val > best:
            best = val
    return best


def meminfo(root: str = "/") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(os.path.join(root, "proc/meminfo"), encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def uptime(root: str = "/") -> float | None:
    try:
        with open(os.path.join(root, "proc/uptime"), encoding="ascii") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def collect(spool_status: Mapping[str, Any], *, root: str = "/", disk_path: str = "/") -> dict:
    """Health metrics of this gateway from the OS and the spool's ``status()``."""
    out: dict[str, Any] = {}
    t = cpu_temp(root)
    if t is not None:
        out["cpu_temp_c"] = round(t, 3)
    try:
        l1, l5, l15 = os.getloadavg()
        out.update(load1=round(l1, 3), load5=round(l5, 3), load15=round(l15, 3))
    except OSError:
        pass
    mem = meminfo(root)
    if "MemTotal" in mem:
        avail = mem.get("MemAvailable", mem.get("MemFree", 0))
        out.update(
            mem_total_bytes=mem["MemTotal"],
            mem_available_bytes=avail,
            mem_used_pct=round(100.0 * (1 - avail / mem["MemTotal"]), 2),
        )
    try:
        du = shutil.disk_usage(disk_path)
        out.update(
            disk_total_bytes=du.total,
            disk_free_bytes=du.free,
            disk_used_pct=round(100.0 * (du.total - du.free) / du.total, 2) if du.total else 0,
        )
    except OSError:
        pass
    up = uptime(root)
    if up is not None:
        out["uptime_s"] = round(up, 1)
    broker = (spool_status.get("state") or {}).get("broker", "unknown")
    out["broker"] = broker
    if broker != "unknown":
        out["broker_connected"] = broker in ("connected", "subscribed")
    held = spool_status.get("held") or {}
    out.update(
        spool_unsent=int(spool_status.get("unsent", 0)),
        spool_held=int(held.get("count") or 0),
        spool_bytes=int(spool_status.get("bytes", 0)),
        spool_oldest_age_s=spool_status.get("oldest_age_s", 0),
        dropped=int(spool_status.get("dropped", 0)),
        counters=dict(spool_status.get("counters") or {}),
    )
    return out


def readings(metrics: Mapping[str, Any], now_ms: int, sensor: str = "health") -> list[Reading]:
    """The numeric health metrics as readings (booleans become 0/1)."""
    out = []
    for name, unit in SPOOLED.items():
        val = metrics.get(name)
        if val is None:
            continue
        if isinstance(val, bool):
            val = int(val)
        try:
            out.append(make_reading(sensor, name, val, now_ms, unit))
        except RejectedReading:
            continue
    return out


#: Bounds of the grains a heartbeat carries (the top master checks them again).
GRAINS_MAX_PATHS = 16
GRAINS_LIST_MAX = 256
GRAINS_STR_MAX = 1024
GRAINS_MAX_BYTES = 4096


def _grain(grains: Mapping[str, Any], path: str) -> Any:
    """The value at a ``:``-separated grain path (``tributary:devices``), or KeyError."""
    val: Any = grains
    for part in path.split(":"):
        if not isinstance(val, Mapping) or part not in val:
            raise KeyError(path)
        val = val[part]
    return val


def _scalar(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, (bool, int, float))
        or (isinstance(v, str) and len(v) <= GRAINS_STR_MAX)
    )


def pick_grains(grains: Mapping[str, Any], paths: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The configured grain paths for the heartbeat, and what was left out and why.

    A value must be a scalar or a list of scalars (at most ``GRAINS_LIST_MAX``, strings of at
    most ``GRAINS_STR_MAX`` characters); a mapping is left out (name the leaf path instead).
    The whole stays under ``GRAINS_MAX_BYTES`` of JSON: paths past it are left out."""
    import json

    out: dict[str, Any] = {}
    skipped: list[str] = []
    size = 2
    for path in paths[:GRAINS_MAX_PATHS]:
        try:
            val = _grain(grains, path)
        except KeyError:
            continue  # not set on this gateway: rules on it do not match
        if isinstance(val, (list, tuple)):
            val = list(val)
            if len(val) > GRAINS_LIST_MAX or not all(_scalar(v) for v in val):
                skipped.append(f"{path}: a list of more than {GRAINS_LIST_MAX} scalars")
                continue
        elif not _scalar(val):
            skipped.append(f"{path}: not a scalar or a list of scalars")
            continue
        add = len(json.dumps({path: val}, default=str))
        if size + add > GRAINS_MAX_BYTES:
            skipped.append(f"{path}: past {GRAINS_MAX_BYTES} bytes of grains")
            continue
        size += add
        out[path] = val
    return out, skipped


def event(epoch: str, last_seq: int, metrics: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """The health beacon event (the beacon adds nothing but Salt's tag prefix)."""
    return {
        "tag": "health",
        "v": 1,
        "epoch": epoch,
        "last_seq": int(last_seq),
        "ts_ms": now_ms,
        "_stamp": now_ms,
        **metrics,
    }
