"""Linux sysfs sensors: hwmon, thermal zones, IIO and 1-Wire DS18B20.

Every path is taken under a configurable ``root`` (``/`` on a gateway, a fake tree in tests).

- hwmon (``sys/class/hwmon/hwmon*/``): ``temp*_input`` (m°C -> C), ``in*_input`` (mV -> V),
  ``fan*_input`` (RPM), ``power*_input`` (µW -> W), named by ``*_label`` when present. Sensor
  ``<chip name>-<label or channel>``, metric temperature / voltage / fan / power.
- thermal (``sys/class/thermal/thermal_zone*/``): ``temp`` (m°C -> C), sensor = ``type``.
- IIO (``sys/bus/iio/devices/iio:device*/``): ``in_<chan>_input`` (already processed), or
  ``in_<chan>_raw`` with ``_scale`` and ``_offset`` (channel-specific or shared by type) as
  the kernel ABI defines them: ``value = (raw + offset) * scale``; then the IIO base unit is
  converted (temperature m°C -> C, voltage mV -> V, humidityrelative m% -> %). Sensor
  ``<device name>-<chan>`` (or the device name for unnumbered channels).
- 1-Wire (``sys/bus/w1/devices/28-*/w1_slave``, DS18B20): both lines parsed; the scratchpad's
  Dallas CRC-8 is checked here (not only the kernel's ``YES``), and the power-on reset value
  85.000 °C (scratchpad ``50 05``) is rejected. Sensor = the device id, metric temperature.

Each configured source has its own interval; :class:`SysfsSource` reads a sensor only when due.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from saltext.tributary.protocol.reading import Reading, RejectedReading, make_reading
from saltext.tributary.util import clock, schema
from saltext.tributary.util.schema import REQUIRED, option

KINDS = ("hwmon", "thermal", "iio", "w1")
_SAFE = re.compile(r"[^A-Za-z0-9_.:@-]+")

HWMON_TYPES: dict[str, tuple[str, str, float]] = {
    # prefix: (metric, unit, factor)
    "temp": ("temperature", "C", 0.001),
    "in": ("voltage", "V", 0.001),
    "fan": ("fan", "rpm", 1.0),
    "power": ("power", "W", 0.000001),
}
IIO_TYPES: dict[str, tuple[str, str, float]] = {
    # channel type: (metric, unit, factor from the IIO base unit)
    "temp": ("temperature", "C", 0.001),
    "voltage": ("voltage", "V", 0.001),
    "humidityrelative": ("humidity", "%", 0.001),
    "pressure": ("pressure", "kPa", 1.0),
    "illuminance": ("illuminance", "lx", 1.0),
    "current": ("current", "A", 0.001),
}
W1_POWER_ON_MILLI = 85_000


class SysfsConfigError(ValueError):
    """A bad sysfs source config; the message names the key."""


def _safe(name: str) -> str:
    return _SAFE.sub("_", name.strip())[:128] or "unnamed"


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read(4096)


def _text(path: str, fallback: str) -> str:
    """A sysfs text attribute (a chip's name, a zone's type), or ``fallback`` when unreadable."""
    try:
        return _read(path).strip()
    except OSError:
        return fallback


def _scaled(path: str, factor: float) -> float:
    return _read_num(path) * factor


def _read_w1(path: str) -> float:
    return parse_w1_slave(_read(path))


def _read_num(path: str) -> float:
    text = _read(path).strip()
    try:
        return float(text)
    except ValueError:
        raise RejectedReading("not_numeric", f"{path}: {text[:40]!r}")


@dataclass
class SysfsSensor:
    """One discovered sensor: how to read it and when it is next due."""

    kind: str
    sensor: str
    metric: str
    unit: str
    read: Callable[[], float]
    interval_s: float
    path: str
    next_due: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.sensor}/{self.metric}"


@dataclass(frozen=True)
class SourceSpec:
    """One item of a ``tributary_sysfs`` beacon's ``sources`` list (its YAML names)."""

    kind: str = option(REQUIRED, choices=KINDS, doc="which sysfs class to discover")
    interval_s: float = option(10.0, positive=True, doc="seconds between two reads of a sensor")
    match: str = option("*", doc="fnmatch pattern on <sensor>/<metric>")


#: The ``sources`` list's own checks (the items' are :class:`SourceSpec`'s).
SOURCES_CHECKS: dict[str, Any] = {"items_doc": "sources"}


def compile_sources(raw: Any, where: str = "sources") -> list[SourceSpec]:
    """The ``sources`` list of a ``tributary_sysfs`` config on its own; raises
    SysfsConfigError naming every bad key (``sources[0].kind: ...``)."""
    specs, errors = schema.parse_items(SourceSpec, raw, where, **SOURCES_CHECKS)
    if specs is None:
        raise SysfsConfigError("; ".join(errors))
    return specs


# -- hwmon ---------------------------------------------------------------------------------------
def discover_hwmon(root: str, interval_s: float) -> list[SysfsSensor]:
    out = []
    for d in sorted(glob.glob(os.path.join(root, "sys/class/hwmon/hwmon*"))):
        chip = _text(os.path.join(d, "name"), os.path.basename(d))
        for prefix, (metric, unit, factor) in HWMON_TYPES.items():
            for inp in sorted(glob.glob(os.path.join(d, f"{prefix}[0-9]*_input"))):
                chan = os.path.basename(inp)[: -len("_input")]
                label = _text(os.path.join(d, f"{chan}_label"), chan) or chan
                out.append(
                    SysfsSensor(
                        "hwmon",
                        _safe(f"{chip}-{label}"),
                        metric,
                        unit,
                        partial(_scaled, inp, factor),
                        interval_s,
                        inp,
                    )
                )
    return out


# -- thermal -------------------------------------------------------------------------------------
def discover_thermal(root: str, interval_s: float) -> list[SysfsSensor]:
    out = []
    for d in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        temp = os.path.join(d, "temp")
        if not os.path.exists(temp):
            continue
        ztype = _text(os.path.join(d, "type"), os.path.basename(d))
        out.append(
            SysfsSensor(
                "thermal",
                _safe(ztype),
                "temperature",
                "C",
                partial(_scaled, temp, 0.001),
                interval_s,
                temp,
            )
        )
    return out


# -- IIO -----------------------------------------------------------------------------------------
_IIO_CHAN = re.compile(r"^in_([a-z]+?)(\d*)(?:_([a-z0-9]+))?_(raw|input)$")


def _iio_value(dev: str, chan: str, ctype: str, kind: str, factor: float) -> float:
    if kind == "input":
        return _read_num(os.path.join(dev, f"in_{chan}_input")) * factor
    raw = _read_num(os.path.join(dev, f"in_{chan}_raw"))
    scale = _first_num(dev, (f"in_{chan}_scale", f"in_{ctype}_scale"), 1.0)
    offset = _first_num(dev, (f"in_{chan}_offset", f"in_{ctype}_offset"), 0.0)
    return (raw + offset) * scale * factor


def _first_num(dev: str, names: tuple[str, ...], default: float) -> float:
    """The number in the first of ``names`` that exists in ``dev`` (channel before type)."""
    for name in names:
        path = os.path.join(dev, name)
        if os.path.exists(path):
            return _read_num(path)
    return default


def discover_iio(root: str, interval_s: float) -> list[SysfsSensor]:
    out = []
    for dev in sorted(glob.glob(os.path.join(root, "sys/bus/iio/devices/iio:device*"))):
        name = _text(os.path.join(dev, "name"), os.path.basename(dev).replace(":", ""))
        chans: dict[str, tuple[str, str]] = {}
        for f in sorted(os.listdir(dev)):
            m = _IIO_CHAN.match(f)
            if not m:
                continue
            ctype, num, mod, kind = m.groups()
            if ctype not in IIO_TYPES:
                continue
            chan = f"{ctype}{num}" + (f"_{mod}" if mod else "")
            # a processed _input wins over _raw for the same channel
            if chan not in chans or kind == "input":
                chans[chan] = (ctype, kind)
        for chan, (ctype, kind) in chans.items():
            metric, unit, factor = IIO_TYPES[ctype]
            sensor = name if chan == ctype else f"{name}-{chan}"
            out.append(
                SysfsSensor(
                    "iio",
                    _safe(sensor),
                    metric,
                    unit,
                    partial(_iio_value, dev, chan, ctype, kind, factor),
                    interval_s,
                    os.path.join(dev, f"in_{chan}_{kind}"),
                )
            )
    return out


# -- 1-Wire DS18B20 ------------------------------------------------------------------------------
def crc8_dallas(data: bytes) -> int:
    """Dallas/Maxim 1-Wire CRC-8 (polynomial x^8 + x^5 + x^4 + 1, reflected 0x8C)."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


def parse_w1_slave(text: str) -> float:
    """Parse a DS18B20 ``w1_slave`` file into °C; raises RejectedReading with the reason."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) < 2 or "crc=" not in lines[0] or "t=" not in lines[1]:
        raise RejectedReading("w1_format", f"unexpected w1_slave content {text[:80]!r}")
    try:
        scratch = bytes(int(x, 16) for x in lines[0].split(":")[0].split())
    except ValueError:
        raise RejectedReading("w1_format", f"bad scratchpad {lines[0][:60]!r}")
    if len(scratch) != 9:
        raise RejectedReading("w1_format", f"scratchpad has {len(scratch)} bytes, not 9")
    if not lines[0].endswith("YES") or crc8_dallas(scratch[:8]) != scratch[8]:
        raise RejectedReading("w1_crc", f"CRC mismatch in {lines[0][:60]!r}")
    try:
        milli = int(lines[1].rsplit("t=", 1)[1])
    except ValueError:
        raise RejectedReading("w1_format", f"bad temperature line {lines[1][:60]!r}")
    raw = int.from_bytes(scratch[0:2], "little", signed=True)
    if milli == W1_POWER_ON_MILLI or raw == 0x0550:
        raise RejectedReading("w1_power_on", "85.000 C is the DS18B20 power-on reset value")
    return milli / 1000.0


def discover_w1(root: str, interval_s: float) -> list[SysfsSensor]:
    out = []
    for d in sorted(glob.glob(os.path.join(root, "sys/bus/w1/devices/28-*"))):
        path = os.path.join(d, "w1_slave")
        if not os.path.exists(path):
            continue
        out.append(
            SysfsSensor(
                "w1",
                _safe(os.path.basename(d)),
                "temperature",
                "C",
                partial(_read_w1, path),
                interval_s,
                path,
            )
        )
    return out


DISCOVER: dict[str, Callable[[str, float], list[SysfsSensor]]] = {
    "hwmon": discover_hwmon,
    "thermal": discover_thermal,
    "iio": discover_iio,
    "w1": discover_w1,
}


def discover(root: str, specs: list[SourceSpec]) -> list[SysfsSensor]:
    """Every sensor the configured sources find under ``root`` (first source wins a key)."""
    seen: dict[str, SysfsSensor] = {}
    for spec in specs:
        for s in DISCOVER[spec.kind](root, spec.interval_s):
            if fnmatch.fnmatchcase(s.key, spec.match) and s.key not in seen:
                seen[s.key] = s
    return list(seen.values())


class SysfsSource:
    """Polls discovered sensors, each at its own interval; rediscovers now and then."""

    REDISCOVER_S = 60.0

    def __init__(self, root: str, specs: list[SourceSpec]) -> None:
        self.root = root
        self.specs = specs
        self.sensors: list[SysfsSensor] = []
        self._discovered_at = -1e18

    def _refresh(self, mono: float) -> None:
        if mono - self._discovered_at < self.REDISCOVER_S:
            return
        due = {s.key: s.next_due for s in self.sensors}
        self.sensors = discover(self.root, self.specs)
        for s in self.sensors:
            s.next_due = due.get(s.key, 0.0)
        self._discovered_at = mono

    def poll(
        self,
        now_ms: int | None = None,
        mono: float | None = None,
        *,
        force: bool = False,
        match: str | None = None,
    ) -> tuple[list[Reading], list[RejectedReading]]:
        """Read the sensors that are due (all with ``force``); returns (readings, rejects)."""
        now_ms = now_ms if now_ms is not None else clock.now_ms()
        mono = mono if mono is not None else time.monotonic()
        self._refresh(mono)
        readings: list[Reading] = []
        rejects: list[RejectedReading] = []
        for s in self.sensors:
            if match and not (
                fnmatch.fnmatchcase(s.sensor, match) or fnmatch.fnmatchcase(s.key, match)
            ):
                continue
            if not force:
                if mono < s.next_due:
                    continue
                s.next_due = mono + s.interval_s
            try:
                value = s.read()
                readings.append(make_reading(s.sensor, s.metric, round(value, 6), now_ms, s.unit))
            except RejectedReading as exc:
                rejects.append(exc)
            except OSError as exc:
                rejects.append(RejectedReading("read_error", f"{s.path}: {exc}"))
        return readings, rejects
