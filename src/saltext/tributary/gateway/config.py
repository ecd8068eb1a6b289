"""Gateway beacon configuration: Salt's list-of-dicts to a mapping, validation with key paths,
the spool location."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from saltext.tributary.gateway.bandwidth import parse_bandwidth
from saltext.tributary.gateway.filters import FilterConfigError, compile_filters
from saltext.tributary.gateway.sources.mqtt import parse_broker
from saltext.tributary.gateway.sources.payload import ConfigError, compile_rules
from saltext.tributary.gateway.sources.sysfs import SysfsConfigError, compile_sources
from saltext.tributary.util import schema
from saltext.tributary.util.schema import option

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 32_768
#: One beacon run's output stays far below the 256 KiB that wedged a minion here.
DEFAULT_RUN_BYTES = 98_304
HARD_RUN_BYTES = 131_072


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


#: Keys Salt itself reads from any beacon's configuration.
SALT_BEACON_KEYS = frozenset({"interval", "disable_during_state_run", "beacon_module"})
#: Keys every Tributary beacon takes.
COMMON_KEYS = frozenset({"site", "spool", "batch", "filters", "bandwidth"})


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


def validate_common(cfg: Mapping[str, Any], own_keys: frozenset[str] = frozenset()) -> list[str]:
    """Checks shared by the beacons: unknown keys, spool, batch, site, filters, bandwidth."""
    errors = schema.unknown_options(
        (k for k in cfg if not (isinstance(k, str) and k.startswith("_"))),
        SALT_BEACON_KEYS | COMMON_KEYS | own_keys,
    )
    errors += schema.parse(SpoolOptions, cfg.get("spool"), "spool")[1]
    errors += schema.parse(BatchOptions, cfg.get("batch"), "batch")[1]
    if "site" in cfg and (
        not isinstance(cfg["site"], str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cfg["site"])
    ):
        errors.append("site: must be a short name ([A-Za-z0-9_.:-]{1,64})")
    try:
        compile_filters(cfg.get("filters"))
    except FilterConfigError as exc:
        errors.append(str(exc))
    errors.extend(validate_bandwidth(cfg.get("bandwidth")))
    return errors


def validate_bandwidth(bw: Any) -> list[str]:
    return [] if bw is None else parse_bandwidth(bw)[1]


def _validated(
    name: str,
    config: Any,
    checks: Callable[[dict[str, Any]], list[str]],
    own_keys: frozenset[str],
) -> tuple[bool, str]:
    """The shared shape of a beacon ``validate()``: never raises, names every bad key."""
    try:
        if not isinstance(config, (list, Mapping)):
            return False, f"{name}: configuration must be a list of mappings"
        cfg = config_to_dict(config)
        errors = validate_common(cfg, own_keys) + checks(cfg)
        if errors:
            return False, f"{name}: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:  # validate() must never raise
        return False, f"{name}: invalid configuration: {exc}"


def _sysfs_checks(cfg: dict[str, Any]) -> list[str]:
    errors = []
    root = cfg.get("root", "/")
    if not isinstance(root, str) or not root:
        errors.append("root: must be a directory path string")
    try:
        compile_sources(cfg.get("sources"))
    except SysfsConfigError as exc:
        errors.append(str(exc))
    return errors


def _health_checks(cfg: dict[str, Any]) -> list[str]:
    errors = []
    for key in ("root", "disk_path", "sensor"):
        if key in cfg and (not isinstance(cfg[key], str) or not cfg[key]):
            errors.append(f"{key}: must be a non-empty string")
    if "spool_metrics" in cfg and not isinstance(cfg["spool_metrics"], bool):
        errors.append("spool_metrics: must be true or false")
    if "grains" in cfg:
        errors += _grain_paths_errors(cfg["grains"])
    return errors


def _grain_paths_errors(paths: Any) -> list[str]:
    """``grains``: the grain paths the heartbeat carries for the top master's alert rules."""
    from saltext.tributary.gateway.sources.health import GRAINS_MAX_PATHS

    if not isinstance(paths, list) or len(paths) > GRAINS_MAX_PATHS:
        return [f"grains: must be a list of at most {GRAINS_MAX_PATHS} grain paths"]
    return [
        f"grains[{i}]: a grain path such as role or tributary:devices, got {p!r}"
        for i, p in enumerate(paths)
        if not isinstance(p, str)
        or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}(:[A-Za-z0-9_.-]{1,64}){0,7}", p)
    ]


def _mqtt_checks(cfg: dict[str, Any]) -> list[str]:
    errors = []
    errors += parse_broker(cfg.get("broker"))[1]
    try:
        compile_rules(cfg.get("topics"))
    except ConfigError as exc:
        errors.append(str(exc))
    return errors


def validate_sysfs(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_sysfs`` beacon config; never raises."""
    return _validated("tributary_sysfs", config, _sysfs_checks, frozenset({"root", "sources"}))


def validate_health(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_health`` beacon config; never raises."""
    return _validated(
        "tributary_health",
        config,
        _health_checks,
        frozenset({"root", "disk_path", "sensor", "spool_metrics", "grains"}),
    )


def validate_mqtt(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_mqtt`` beacon config; never raises."""
    return _validated("tributary_mqtt", config, _mqtt_checks, frozenset({"broker", "topics"}))
