"""Gateway beacon configuration: one schema per beacon (:class:`MqttBeaconOptions`,
:class:`SysfsBeaconOptions`, :class:`HealthBeaconOptions`), parsed once by ``parse_<beacon>``
for both the loader's ``validate()`` and the beacon run, and the spool location."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from saltext.tributary.gateway.bandwidth import BandwidthOptions, parse_bandwidth
from saltext.tributary.gateway.filters import FilterConfigError, compile_filters
from saltext.tributary.gateway.sources.health import GRAINS_MAX_PATHS
from saltext.tributary.gateway.sources.mqtt import BrokerConfig
from saltext.tributary.gateway.sources.payload import TOPICS_CHECKS, TopicOptions
from saltext.tributary.gateway.sources.sysfs import SOURCES_CHECKS, SourceSpec
from saltext.tributary.util import schema
from saltext.tributary.util.schema import REQUIRED, option

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 32_768
#: One beacon run's output. Salt fires it from the minion's event loop as one message on the
#: minion's own event socket and waits for the write to finish, while that same loop is the
#: socket's reader: a run larger than the socket's send buffer never finishes and the minion
#: stops for good (measured: 512 KiB runs, BENCHMARKS.md "The beacon's ceiling").
DEFAULT_RUN_BYTES = 98_304
HARD_RUN_BYTES = 131_072
#: One request of a backlog drain (``gateway/drain.py``): sent to the master directly, not
#: through the minion's event socket, so the socket's buffer does not bound it.
DRAIN_RUN_BYTES = 524_288
#: the kernel's default send buffer of a socket (Linux), which Salt's event socket keeps
WMEM_DEFAULT = "/proc/sys/net/core/wmem_default"


@functools.lru_cache(maxsize=4)
def run_bytes_cap(path: str = WMEM_DEFAULT) -> int:
    """The most one beacon run may emit on this machine: :data:`HARD_RUN_BYTES`, or half the
    kernel's default socket send buffer where that is smaller (a small board's kernel may set
    it lower; half leaves room for Salt's envelope and the kernel's own accounting)."""
    try:
        with open(path, encoding="ascii") as f:
            wmem = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return HARD_RUN_BYTES
    return max(1024, min(HARD_RUN_BYTES, wmem // 2))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Salt passes beacon config as a list of one-key dicts; merge it into one dict."""
    if isinstance(config, Mapping):
        return dict(config)
    out: dict[str, Any] = {}
    if isinstance(config, list):
        for item in config:
            if isinstance(item, Mapping):
                out.update(item)
    return out


@dataclass(frozen=True)
class SpoolOptions:
    """The ``spool`` block every Tributary beacon takes (one spool per minion)."""

    path: str | None = option(None, doc="default: <cachedir>/tributary/spool.db")
    max_bytes: int = option(512 * 1024**2, range=(1024**2, 2**50), doc="retention by size")
    max_age_s: float = option(7 * 86400.0, range=(60, 86400 * 3650), doc="retention by age")


@dataclass(frozen=True)
class BatchOptions:
    """The ``batch`` block: how large one batch and one beacon run's output may be."""

    max_bytes: int = option(DEFAULT_BATCH_BYTES, range=(1024, HARD_RUN_BYTES))
    max_run_bytes: int = option(DEFAULT_RUN_BYTES, range=(1024, HARD_RUN_BYTES))
    drain: bool = option(
        True, doc="send a backlog past one run a second from a thread of its own (README)"
    )
    drain_run_bytes: int = option(DRAIN_RUN_BYTES, range=(1024, 4 * 1024 * 1024))


SITE_PATTERN = r"[A-Za-z0-9_.:-]{1,64}"
GRAIN_PATH_PATTERN = r"[A-Za-z0-9_.-]{1,64}(:[A-Za-z0-9_.-]{1,64}){0,7}"


def spool_path(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> str:
    spool = cfg.get("spool") or {}
    path = spool.get("path") if isinstance(spool, Mapping) else None
    if path:
        return str(path)
    return os.path.join(
        str(opts.get("cachedir", "/var/cache/salt/minion")), "tributary", "spool.db"
    )


def spool_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    opts, _ = schema.parse(SpoolOptions, cfg.get("spool"), "spool")
    opts = opts or SpoolOptions()
    return {"max_bytes": opts.max_bytes, "max_age_s": opts.max_age_s}


def batch_options(cfg: Mapping[str, Any]) -> BatchOptions:
    opts, _ = schema.parse(BatchOptions, cfg.get("batch"), "batch")
    return opts or BatchOptions()


def _filters(value: Any, key: str) -> tuple[Any, list[str]]:
    try:
        compile_filters(value, key)
    except FilterConfigError as exc:
        return None, [str(exc)]
    return value, []


def _bandwidth(value: Any, key: str) -> tuple[Any, list[str]]:
    return parse_bandwidth(value)


@dataclass(frozen=True, kw_only=True)
class BeaconOptions:
    """The keys every Tributary beacon takes (Salt's own first)."""

    interval: Any = option(None, doc="(Salt) seconds between runs")
    disable_during_state_run: Any = option(None, doc="(Salt)")
    beacon_module: Any = option(None, doc="(Salt) for a beacon under another name")
    site: str | None = option(
        None, pattern=SITE_PATTERN, pattern_doc=f"must be a short name ({SITE_PATTERN})"
    )
    spool: SpoolOptions = option(SpoolOptions)
    batch: BatchOptions = option(BatchOptions)
    #: checked by :func:`~saltext.tributary.gateway.filters.compile_filters`
    filters: list[dict[str, Any]] | None = option(None, parser=_filters)
    #: checked by :func:`~saltext.tributary.gateway.bandwidth.parse_bandwidth`
    bandwidth: BandwidthOptions | None = option(None, parser=_bandwidth)


@dataclass(frozen=True, kw_only=True)
class MqttBeaconOptions(BeaconOptions):
    """A ``tributary_mqtt`` beacon's configuration, under its YAML names."""

    broker: BrokerConfig = option(BrokerConfig)
    topics: list[TopicOptions] = option(REQUIRED, **TOPICS_CHECKS)


@dataclass(frozen=True, kw_only=True)
class SysfsBeaconOptions(BeaconOptions):
    """A ``tributary_sysfs`` beacon's configuration, under its YAML names."""

    root: str = option("/", nonempty=True, doc="where sys/ is (a fake tree in tests)")
    sources: list[SourceSpec] = option(REQUIRED, **SOURCES_CHECKS)


@dataclass(frozen=True, kw_only=True)
class HealthBeaconOptions(BeaconOptions):
    """A ``tributary_health`` beacon's configuration, under its YAML names."""

    root: str = option("/", nonempty=True, doc="where proc/ and sys/ are")
    disk_path: str | None = option(None, nonempty=True, doc="default: the spool's directory")
    sensor: str = option("health", nonempty=True, doc="the sensor of the spooled metrics")
    spool_metrics: bool = option(True, doc="spool the numeric metrics as readings")
    grains: list[str] | None = option(
        None,
        doc="grain paths the heartbeat carries, for alert rules on the top master",
        pattern=GRAIN_PATH_PATTERN,
        pattern_doc="a grain path such as role or tributary:devices",
        min_items=0,
        max_items=GRAINS_MAX_PATHS,
        items_doc="grain paths",
    )


B = TypeVar("B", bound=BeaconOptions)


def parse_beacon(cls: type[B], config: Any) -> tuple[B | None, list[str]]:
    """A beacon's configuration (Salt's list of one-key mappings, or a mapping) as ``cls``, or
    every problem with its key path; keys starting with ``_`` are Salt's or the caller's."""
    if not isinstance(config, (list, Mapping)):
        return None, ["configuration must be a list of mappings"]
    cfg = {
        k: v
        for k, v in config_to_dict(config).items()
        if not (isinstance(k, str) and k.startswith("_"))
    }
    return schema.parse(cls, cfg)


def parse_mqtt(config: Any) -> tuple[MqttBeaconOptions | None, list[str]]:
    """The one parse of a ``tributary_mqtt`` config: ``validate()`` and the run use it."""
    return parse_beacon(MqttBeaconOptions, config)


def parse_sysfs(config: Any) -> tuple[SysfsBeaconOptions | None, list[str]]:
    """The one parse of a ``tributary_sysfs`` config: ``validate()`` and the run use it."""
    return parse_beacon(SysfsBeaconOptions, config)


def parse_health(config: Any) -> tuple[HealthBeaconOptions | None, list[str]]:
    """The one parse of a ``tributary_health`` config: ``validate()`` and the run use it."""
    return parse_beacon(HealthBeaconOptions, config)


def parsed(name: str, parse_fn: Callable[[Any], tuple[B | None, list[str]]], config: Any) -> B:
    """The parsed config of a beacon run; raises ValueError naming every problem (Salt runs a
    beacon only once its ``validate()`` passed, so this is a config changed under it)."""
    opts, errors = parse_fn(config)
    if opts is None:
        raise ValueError(f"{name}: " + "; ".join(errors))
    return opts


#: Salt calls a beacon's ``validate()`` before every run (once a second); a verdict is kept
#: this long per distinct config, so a file a config names (a CA, a password file) that goes
#: away is still noticed within a minute.
VERDICT_TTL_S = 60.0
_VERDICTS: dict[tuple[str, str], tuple[float, tuple[bool, str]]] = {}


def cached_verdict(
    label: str, parse_fn: Callable[[Any], tuple[Any, list[str]]], config: Any
) -> tuple[bool, str]:
    """:func:`schema.verdict`, remembered for :data:`VERDICT_TTL_S` per config; never raises."""
    try:
        key = (label, repr(config))
    except Exception:  # an object whose repr fails: no caching
        return schema.verdict(label, parse_fn, config)
    now = time.monotonic()
    hit = _VERDICTS.get(key)
    if hit is not None and now < hit[0]:
        return hit[1]
    result = schema.verdict(label, parse_fn, config)
    if len(_VERDICTS) >= 64:
        _VERDICTS.clear()
    _VERDICTS[key] = (now + VERDICT_TTL_S, result)
    return result


def validate_sysfs(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_sysfs`` beacon config; never raises."""
    return cached_verdict("tributary_sysfs", parse_sysfs, config)


def validate_health(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_health`` beacon config; never raises."""
    return cached_verdict("tributary_health", parse_health, config)


def validate_mqtt(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_mqtt`` beacon config; never raises."""
    return cached_verdict("tributary_mqtt", parse_mqtt, config)
