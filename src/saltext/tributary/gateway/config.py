"""Gateway beacon configuration: Salt's list-of-dicts to a mapping, validation with key paths,
the spool location."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from saltext.tributary.gateway.filters import FilterConfigError, compile_filters
from saltext.tributary.gateway.sources.mqtt import parse_broker
from saltext.tributary.gateway.sources.payload import ConfigError, compile_rules
from saltext.tributary.gateway.sources.sysfs import SysfsConfigError, compile_sources
from saltext.tributary.util.schema import number_error

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


def spool_path(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> str:
    spool = cfg.get("spool") or {}
    path = spool.get("path") if isinstance(spool, Mapping) else None
    if path:
        return str(path)
    return os.path.join(
        str(opts.get("cachedir", "/var/cache/salt/minion")), "tributary", "spool.db"
    )


def spool_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    spool = cfg.get("spool") or {}
    return {
        "max_bytes": spool.get("max_bytes", 512 * 1024 * 1024),
        "max_age_s": spool.get("max_age_s", 7 * 86400),
    }


def _check_int(cfg: Mapping[str, Any], key: str, lo: int, hi: int) -> str | None:
    if key not in cfg:
        return None
    return number_error(cfg[key], key, integer=True, lo=lo, hi=hi)


def validate_common(cfg: Mapping[str, Any]) -> list[str]:
    """Checks shared by the beacons: spool and batch options."""
    errors = []
    spool = cfg.get("spool", {})
    if not isinstance(spool, Mapping):
        errors.append("spool: must be a mapping (path, max_bytes, max_age_s)")
    else:
        for key in ("max_bytes", "max_age_s"):
            val = spool.get(key)
            err = None if val is None else number_error(val, f"spool.{key}")
            if err:
                errors.append(err)
        if spool.get("path") is not None and not isinstance(spool.get("path"), str):
            errors.append("spool.path: must be a string")
    batch = cfg.get("batch", {})
    if not isinstance(batch, Mapping):
        errors.append("batch: must be a mapping (max_bytes, max_run_bytes)")
    else:
        for key in ("max_bytes", "max_run_bytes"):
            err = _check_int(batch, key, 1024, HARD_RUN_BYTES)
            if err:
                errors.append(f"batch.{err}")
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
    if bw is None:
        return []
    if not isinstance(bw, Mapping):
        return ["bandwidth: must be a mapping (bytes_per_s, window_s, burst_s)"]
    errors = []
    if "bytes_per_s" not in bw:
        errors.append("bandwidth.bytes_per_s: required")
    for key in ("bytes_per_s", "window_s", "burst_s", "max_window_s"):
        val = bw.get(key)
        err = None if val is None else number_error(val, f"bandwidth.{key}", positive=True)
        if err:
            errors.append(err)
    unknown = sorted(set(bw) - {"bytes_per_s", "window_s", "burst_s", "max_window_s"})
    if unknown:
        errors.append(f"bandwidth.{unknown[0]}: unknown key")
    return errors


def _validated(
    name: str, config: Any, checks: Callable[[dict[str, Any]], list[str]]
) -> tuple[bool, str]:
    """The shared shape of a beacon ``validate()``: never raises, names every bad key."""
    try:
        if not isinstance(config, (list, Mapping)):
            return False, f"{name}: configuration must be a list of mappings"
        cfg = config_to_dict(config)
        errors = validate_common(cfg) + checks(cfg)
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
    return errors


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
    return _validated("tributary_sysfs", config, _sysfs_checks)


def validate_health(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_health`` beacon config; never raises."""
    return _validated("tributary_health", config, _health_checks)


def validate_mqtt(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_mqtt`` beacon config; never raises."""
    return _validated("tributary_mqtt", config, _mqtt_checks)
