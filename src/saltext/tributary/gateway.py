"""Gateway-side glue shared by the beacons and the ``tributary`` execution module.

The beacon loader modules stay thin: they turn Salt's list-of-dicts config into a dict, call
:func:`validate_mqtt` and :func:`run_mqtt_beacon`. Long-lived parts (the MQTT subscriber
threads, the spool connection used for emitting) live in this module's registry, which is a
normal Python import: it survives Salt reloading the beacon modules (``saltutil.sync_*``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from saltext.tributary.payload import ConfigError, Mapper, compile_rules
from saltext.tributary.spool import GatewaySpool

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 32_768
#: One beacon run's output stays far below the 256 KiB that wedged a minion here.
DEFAULT_RUN_BYTES = 98_304
HARD_RUN_BYTES = 131_072

_registry_lock = threading.Lock()
_sources: dict[str, tuple[str, Any]] = {}
_spools: dict[str, GatewaySpool] = {}


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
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        return f"{key}: must be an integer in {lo}..{hi}, got {val!r}"
    return None


def validate_common(cfg: Mapping[str, Any]) -> list[str]:
    """Checks shared by the beacons: spool and batch options."""
    errors = []
    spool = cfg.get("spool", {})
    if not isinstance(spool, Mapping):
        errors.append("spool: must be a mapping (path, max_bytes, max_age_s)")
    else:
        for key in ("max_bytes", "max_age_s"):
            val = spool.get(key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
                errors.append(f"spool.{key}: must be a number, got {val!r}")
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
    if "site" in cfg and not isinstance(cfg["site"], str):
        errors.append("site: must be a string")
    return errors


def validate_mqtt(config: Any) -> tuple[bool, str]:
    """Validate a ``tributary_mqtt`` beacon config; never raises."""
    try:
        if not isinstance(config, (list, Mapping)):
            return False, "tributary_mqtt: configuration must be a list of mappings"
        cfg = config_to_dict(config)
        errors = validate_common(cfg)
        broker = cfg.get("broker", {})
        if not isinstance(broker, Mapping):
            errors.append("broker: must be a mapping (host, port, ...)")
        else:
            if "host" in broker and not isinstance(broker["host"], str):
                errors.append("broker.host: must be a string")
            err = _check_int(broker, "port", 1, 65535)
            if err:
                errors.append(f"broker.{err}")
            if broker.get("password") is not None and not broker.get("username"):
                errors.append("broker.username: required when broker.password is set")
        try:
            compile_rules(cfg.get("topics"))
        except ConfigError as exc:
            errors.append(str(exc))
        if errors:
            return False, "tributary_mqtt: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:  # validate() must never raise
        return False, f"tributary_mqtt: invalid configuration: {exc}"


def _fingerprint(cfg: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def ensure_mqtt_source(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
    """Start (or restart on a config change) the subscriber for this beacon config."""
    from saltext.tributary.mqtt import BrokerConfig, MqttSource

    path = spool_path(cfg, opts)
    name = str(cfg.get("_beacon_name", "tributary_mqtt"))
    key = f"{path}|{name}"
    fp = _fingerprint({k: v for k, v in cfg.items() if k != "interval"})
    with _registry_lock:
        current = _sources.get(key)
        if current and current[0] == fp:
            return current[1]
        if current:
            log.info("tributary mqtt: configuration changed, restarting the subscriber")
            current[1].stop()
        broker_cfg = dict(cfg.get("broker") or {})
        broker_cfg.setdefault("client_id", f"tributary-{opts.get('id', 'gateway')}-{name}")
        source = MqttSource(
            BrokerConfig(**broker_cfg),
            Mapper(compile_rules(cfg["topics"])),
            path,
            **spool_options(cfg),
        )
        source.start()
        _sources[key] = (fp, source)
        return source


def stop_sources() -> None:
    """Stop every subscriber (beacon ``close``, tests)."""
    with _registry_lock:
        for _, source in _sources.values():
            source.stop()
        _sources.clear()
        for spool in _spools.values():
            spool.close()
        _spools.clear()


def emitting_spool(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> GatewaySpool:
    path = spool_path(cfg, opts)
    with _registry_lock:
        spool = _spools.get(path)
        if spool is None:
            spool = _spools[path] = GatewaySpool(path, **spool_options(cfg))
        return spool


def emit(cfg: Mapping[str, Any], opts: Mapping[str, Any], grains: Mapping[str, Any]) -> list[dict]:
    """The beacon's output: the next unsent batches within the byte caps, as events."""
    spool = emitting_spool(cfg, opts)
    batch_cfg = cfg.get("batch") or {}
    site = cfg.get("site") or grains.get("site")
    batches = spool.next_batches(
        max_batch_bytes=batch_cfg.get("max_bytes", DEFAULT_BATCH_BYTES),
        max_run_bytes=min(batch_cfg.get("max_run_bytes", DEFAULT_RUN_BYTES), HARD_RUN_BYTES),
        site=str(site) if site else None,
    )
    return [{"tag": "batch", **b} for b in batches]


def run_mqtt_beacon(config: Any, opts: Mapping[str, Any], grains: Mapping[str, Any]) -> list[dict]:
    cfg = config_to_dict(config)
    ensure_mqtt_source(cfg, opts)
    return emit(cfg, opts, grains)


def find_beacon_configs(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> dict[str, dict]:
    """Tributary beacon configs from minion opts and pillar (as the minion merges them)."""
    merged: dict[str, Any] = {}
    for src in (pillar.get("beacons") or {}, opts.get("beacons") or {}):
        if isinstance(src, Mapping):
            merged.update(src)
    out = {}
    for name, conf in merged.items():
        cfg = config_to_dict(conf)
        module = cfg.get("beacon_module", name)
        if str(module).startswith("tributary_"):
            cfg["_beacon_name"] = name
            cfg["_module"] = module
            out[name] = cfg
    return out


def status(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> dict[str, Any]:
    """What ``tributary.status`` returns on a gateway."""
    configs = find_beacon_configs(opts, pillar)
    sources = {}
    paths: set[str] = set()
    for name, cfg in configs.items():
        path = spool_path(cfg, opts)
        paths.add(path)
        entry: dict[str, Any] = {"module": cfg["_module"], "spool": path}
        if cfg["_module"] == "tributary_mqtt":
            broker = cfg.get("broker") or {}
            entry["broker"] = f"{broker.get('host', '127.0.0.1')}:{broker.get('port', 1883)}"
            entry["topics"] = [
                t.get("topic") for t in cfg.get("topics") or [] if isinstance(t, Mapping)
            ]
        sources[name] = entry
    if not paths:
        paths.add(spool_path({}, opts))
    spools: dict[str, dict[str, Any]] = {}
    for path in sorted(paths):
        if not os.path.exists(path):
            spools[path] = {"error": "no spool yet (no reading accepted)"}
            continue
        spool = GatewaySpool(path)
        try:
            spools[path] = spool.status()
        finally:
            spool.close()
    out: dict[str, Any] = {"gateway": opts.get("id"), "sources": sources, "spools": spools}
    if len(spools) == 1:
        only = next(iter(spools.values()))
        for key in ("epoch", "last_seq", "unsent", "counters", "state"):
            if key in only:
                out[key] = only[key]
        out["spool_depth"] = only.get("held", {}).get("count", 0)
    return out


def open_spool(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> GatewaySpool:
    """The gateway spool named by the first Tributary beacon config (or the default path)."""
    configs = find_beacon_configs(opts, pillar)
    cfg = next(iter(configs.values()), {})
    return GatewaySpool(spool_path(cfg, opts), **spool_options(cfg))


def replay_batches(
    opts: Mapping[str, Any],
    pillar: Mapping[str, Any],
    grains: Mapping[str, Any],
    epoch: str,
    from_seq: int,
    to_seq: int,
) -> list[dict[str, Any]]:
    """Batches re-encoding a held range (raises SpoolError saying what is held)."""
    spool = open_spool(opts, pillar)
    try:
        batches = spool.replay(epoch, int(from_seq), int(to_seq))
    finally:
        spool.close()
    site = grains.get("site")
    # A replay is a new request: its batches carry a request id, so the relay's intake
    # de-duplication (which folds the syndic's second copy of an event) lets them through.
    request = uuid.uuid4().hex[:8]
    for b in batches:
        b["replay"] = request
        if site:
            b["site"] = str(site)
    return batches
