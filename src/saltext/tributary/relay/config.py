"""The ``tributary_relay`` engine configuration: validation and the typed settings."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


@dataclass
class RelayConfig:
    prefix: str = "tributary"
    spool_path: str = "/var/cache/salt/master/tributary/relay.db"
    bulk_max_docs: int = 5_000
    bulk_max_wait_s: float = 0.2
    #: Bulks in flight at once (the next is built while Elasticsearch indexes these).
    bulk_concurrency: int = 2
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    daily: bool = True
    dedup_window: int = 20_000
    #: Relay spool disk budget; past it the oldest batches are dropped (counted, logged).
    max_spool_bytes: int = 2 * 1024**3
    #: The top master's own pki_dir (accepted keys of directly attached gateways, syndics).
    pki_dir: str = "/etc/salt/pki/master"
    #: Accept unsigned batches (migrations only); mis-signed batches are still refused.
    allow_unsigned: bool = False
    #: How long a batch whose gateway key is not known yet waits for a key set.
    key_wait_s: float = 120.0
    #: Gap repair: grace period, request backoff, rate limit, attempts, request size.
    gap_grace_s: float = 60.0
    gap_check_s: float = 5.0
    replay_backoff_s: float = 30.0
    replay_backoff_max_s: float = 600.0
    replay_per_minute: int = 6
    replay_max_attempts: int = 8
    replay_max_readings: int = 20_000
    replay_timeout_s: float = 60.0
    #: Pipeline self-metrics into ``<prefix>-metrics-*`` every so often (0 = off).
    metrics_interval_s: float = 30.0


def _num(
    errors: list[str], block: Mapping[str, Any], key: str, name: str, lo: float, hi: float
) -> None:
    if key not in block:
        return
    val = block[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not lo <= val <= hi:
        errors.append(f"{name}: must be a number in {lo:g}..{hi:g}, got {val!r}")


GAP_KEYS = {
    "grace_s": ("gap_grace_s", 0, 86400 * 30),
    "check_s": ("gap_check_s", 0.1, 3600),
    "backoff_s": ("replay_backoff_s", 0, 86400),
    "backoff_max_s": ("replay_backoff_max_s", 0, 86400 * 7),
    "per_minute": ("replay_per_minute", 1, 10_000),
    "max_attempts": ("replay_max_attempts", 1, 1000),
    "max_readings": ("replay_max_readings", 1, 10_000_000),
    "timeout_s": ("replay_timeout_s", 1, 3600),
}


def validate_relay(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_relay`` engine config; never raises."""
    from saltext.tributary.relay.elasticsearch import validate_es_config

    try:
        if not isinstance(config, Mapping):
            return False, "tributary_relay: configuration must be a mapping"
        errors = validate_es_config(config.get("elasticsearch"))
        prefix = config.get("index_prefix", "tributary")
        if not isinstance(prefix, str) or not re.match(r"^[a-z0-9][a-z0-9_-]*$", prefix):
            errors.append("index_prefix: lowercase letters, digits, '-' and '_' only")
        for key in ("spool_path", "pki_dir"):
            if key in config and not isinstance(config[key], str):
                errors.append(f"{key}: must be a string")
        bulk = config.get("bulk", {})
        if not isinstance(bulk, Mapping):
            errors.append("bulk: must be a mapping (max_docs, max_wait_s, concurrency)")
        else:
            cc = bulk.get("concurrency", 1)
            if isinstance(cc, bool) or not isinstance(cc, int) or not 1 <= cc <= 8:
                errors.append("bulk.concurrency: must be an integer in 1..8")
            md = bulk.get("max_docs", 1)
            if isinstance(md, bool) or not isinstance(md, int) or not 1 <= md <= 100_000:
                errors.append("bulk.max_docs: must be an integer in 1..100000")
            mw = bulk.get("max_wait_s", 0.1)
            if isinstance(mw, bool) or not isinstance(mw, (int, float)) or mw < 0:
                errors.append("bulk.max_wait_s: must be a non-negative number")
        if config.get("indices", "daily") not in ("daily", "single", "data_stream"):
            errors.append("indices: must be 'daily', 'single' or 'data_stream'")
        if not isinstance(config.get("allow_unsigned", False), bool):
            errors.append("allow_unsigned: must be true or false")
        _num(errors, config, "spool_max_bytes", "spool_max_bytes", 1024 * 1024, 2**50)
        _num(errors, config, "key_wait_s", "key_wait_s", 0, 86400)
        _num(errors, config, "metrics_interval_s", "metrics_interval_s", 0, 86400)
        backoff = config.get("backoff", {})
        if not isinstance(backoff, Mapping):
            errors.append("backoff: must be a mapping (min_s, max_s)")
        else:
            _num(errors, backoff, "min_s", "backoff.min_s", 0.01, 3600)
            _num(errors, backoff, "max_s", "backoff.max_s", 0.01, 86400)
        gaps = config.get("gaps", {})
        if not isinstance(gaps, Mapping):
            errors.append("gaps: must be a mapping (grace_s, backoff_s, per_minute, ...)")
        else:
            for key, (_, lo, hi) in GAP_KEYS.items():
                _num(errors, gaps, key, f"gaps.{key}", lo, hi)
            unknown = set(gaps) - set(GAP_KEYS) - {"enabled"}
            if unknown:
                errors.append(f"gaps: unknown keys {sorted(unknown)}")
            if not isinstance(gaps.get("enabled", True), bool):
                errors.append("gaps.enabled: must be true or false")
        if errors:
            return False, "tributary_relay: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:
        return False, f"tributary_relay: invalid configuration: {exc}"


def relay_config(
    config: Mapping[str, Any], cachedir: str, pki_dir: str | None = None
) -> RelayConfig:
    bulk = config.get("bulk") or {}
    backoff = config.get("backoff") or {}
    rc = RelayConfig(
        prefix=config.get("index_prefix", "tributary"),
        spool_path=config.get("spool_path") or os.path.join(cachedir, "tributary", "relay.db"),
        bulk_max_docs=bulk.get("max_docs", RelayConfig.bulk_max_docs),
        bulk_max_wait_s=bulk.get("max_wait_s", RelayConfig.bulk_max_wait_s),
        bulk_concurrency=int(bulk.get("concurrency", RelayConfig.bulk_concurrency)),
        backoff_min_s=backoff.get("min_s", RelayConfig.backoff_min_s),
        backoff_max_s=backoff.get("max_s", RelayConfig.backoff_max_s),
        daily=config.get("indices", "daily") == "daily",
        max_spool_bytes=int(config.get("spool_max_bytes", RelayConfig.max_spool_bytes)),
        pki_dir=config.get("pki_dir") or pki_dir or RelayConfig.pki_dir,
        allow_unsigned=bool(config.get("allow_unsigned", False)),
        key_wait_s=float(config.get("key_wait_s", RelayConfig.key_wait_s)),
        metrics_interval_s=float(config.get("metrics_interval_s", RelayConfig.metrics_interval_s)),
    )
    for key, (attr, _, _) in GAP_KEYS.items():
        val = (config.get("gaps") or {}).get(key)
        if val is not None:
            setattr(rc, attr, type(getattr(rc, attr))(val))
    return rc


def engine_config(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary_relay`` engine block from master opts ({} if not configured)."""
    for entry in opts.get("engines") or []:
        if isinstance(entry, Mapping) and "tributary_relay" in entry:
            return dict(entry["tributary_relay"] or {})
    return {}
