"""Gateway-side glue shared by the beacons and the ``tributary`` execution module.

The beacon loader modules stay thin: they turn Salt's list-of-dicts config into a dict, call
:func:`validate_mqtt` and :func:`run_mqtt_beacon`. Long-lived parts (the MQTT subscriber
threads, the spool connection used for emitting) live in this module's registry, which is a
normal Python import: it survives Salt reloading the beacon modules (``saltutil.sync_*``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from saltext.tributary import health as health_mod
from saltext.tributary.filters import FilterConfigError, Filters, compile_filters
from saltext.tributary.payload import ConfigError, Mapper, compile_rules
from saltext.tributary.reading import Reading, RejectedReading
from saltext.tributary.spool import GatewaySpool, SpoolFull
from saltext.tributary.sysfs import SysfsConfigError, SysfsSource, compile_sources

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 32_768
#: One beacon run's output stays far below the 256 KiB that wedged a minion here.
DEFAULT_RUN_BYTES = 98_304
HARD_RUN_BYTES = 131_072

_registry_lock = threading.Lock()
_sources: dict[str, tuple[str, Any]] = {}
_spools: dict[str, GatewaySpool] = {}
_filters: dict[str, tuple[str, Filters]] = {}
_last_trim: dict[str, float] = {}
#: How often a beacon run applies the retention budget (seconds).
TRIM_EVERY_S = 60.0


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
        if val is not None and (
            isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0
        ):
            errors.append(f"bandwidth.{key}: must be a positive number, got {val!r}")
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
            Filters(compile_filters(cfg.get("filters"))),
            **spool_options(cfg),
        )
        source.start()
        _sources[key] = (fp, source)
        return source


def stop_sources() -> None:
    """Stop every subscriber (beacon ``close``, tests)."""
    with _registry_lock:
        for _, source in _sources.values():
            if hasattr(source, "stop"):
                source.stop()
        _sources.clear()
        _filters.clear()
        _budgets.clear()
        _last_trim.clear()
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


def _filters_for(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Filters:
    key = f"{spool_path(cfg, opts)}|{cfg.get('_beacon_name', '')}"
    fp = _fingerprint({"filters": cfg.get("filters") or []})
    with _registry_lock:
        cur = _filters.get(key)
        if cur is None or cur[0] != fp:
            cur = _filters[key] = (fp, Filters(compile_filters(cfg.get("filters"))))
        return cur[1]


def spool_readings(
    cfg: Mapping[str, Any],
    opts: Mapping[str, Any],
    readings: list[Reading],
    rejects: list[RejectedReading],
    extra_counts: Mapping[str, int] | None = None,
) -> tuple[int, int]:
    """Filter and append readings of an in-process source (sysfs, health) to the spool."""
    counts: dict[str, int] = {"received": len(readings) + len(rejects), **(extra_counts or {})}
    counts["readings"] = len(readings)
    for exc in rejects:
        counts[f"rejected:{exc.reason}"] = counts.get(f"rejected:{exc.reason}", 0) + 1
    kept, fcounts, aside = _filters_for(cfg, opts).apply(readings)
    for k, v in fcounts.items():
        counts[k] = counts.get(k, 0) + v
    spool = emitting_spool(cfg, opts)
    try:
        return spool.append(kept, counts, aside)
    except SpoolFull:
        # No broker to hold them: these readings are lost, so say so (counted, logged).
        spool_count_safely(spool, {"dropped:disk_full": len(kept)})
        return 0, 0


def spool_count_safely(spool: GatewaySpool, counts: Mapping[str, int]) -> None:
    try:
        spool.count(counts)
    except Exception as exc:  # a full disk may refuse even this
        log.error("tributary: could not record counters %s: %s", dict(counts), exc)


def maybe_trim(spool: GatewaySpool, now: float | None = None) -> int:
    """Apply the retention budget at most every TRIM_EVERY_S seconds; returns dropped."""
    import time

    now = time.monotonic() if now is None else now
    last = _last_trim.get(spool.path)
    if last is not None and now - last < TRIM_EVERY_S:
        return 0
    _last_trim[spool.path] = now
    return spool.trim()


def finalize_batch(batch: dict[str, Any], opts: Mapping[str, Any]) -> dict[str, Any]:
    """The single place where an outgoing batch (beacon or replay) is finalised."""
    # Origin authentication (relay issue 4): sign with this minion's own key, last of all.
    from saltext.tributary import signing

    return signing.sign_batch(batch, opts)


_budgets: dict[str, Any] = {}


def _budget_for(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
    """The gateway's bandwidth budget: one per spool, whichever beacon configures it.

    Every beacon emitting from the spool goes through it (a beacon without a ``bandwidth`` key
    uses the one another beacon set), and a config change adjusts the rate without refilling
    the bucket.
    """
    from saltext.tributary.bandwidth import Budget

    path = spool_path(cfg, opts)
    bw = cfg.get("bandwidth")
    with _registry_lock:
        cur = _budgets.get(path)
        if not bw:
            return cur[1] if cur else None
        fp = _fingerprint(bw)
        if cur is None:
            cur = _budgets[path] = (fp, Budget.from_config(bw))
        elif cur[0] != fp:
            new = Budget.from_config(bw)
            new.tokens, new.last = min(cur[1].tokens, new.tokens), cur[1].last
            cur = _budgets[path] = (fp, new)
        return cur[1]


def emit(cfg: Mapping[str, Any], opts: Mapping[str, Any], grains: Mapping[str, Any]) -> list[dict]:
    """The beacon's output: the next unsent batches within the byte caps, as events.

    With a ``bandwidth`` budget, batches that would exceed it are replaced by per-sensor
    window aggregates (``agg`` = window seconds) instead of being dropped.
    """
    spool = emitting_spool(cfg, opts)
    try:
        maybe_trim(spool)
    except Exception as exc:  # retention must never stop emitting
        log.warning("tributary: retention trim failed: %s", exc)
    batch_cfg = cfg.get("batch") or {}
    site = cfg.get("site") or grains.get("site")
    max_batch = batch_cfg.get("max_bytes", DEFAULT_BATCH_BYTES)
    max_run = min(batch_cfg.get("max_run_bytes", DEFAULT_RUN_BYTES), HARD_RUN_BYTES)
    budget = _budget_for(cfg, opts)
    if budget is not None:
        batches = budget.emit(spool, max_batch_bytes=max_batch, site=str(site) if site else None)
    else:
        batches = spool.next_batches(
            max_batch_bytes=max_batch, max_run_bytes=max_run, site=str(site) if site else None
        )
    return [{"tag": "batch", **finalize_batch(b, opts)} for b in batches]


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
        elif cfg["_module"] == "tributary_sysfs":
            entry["root"] = cfg.get("root", "/")
            entry["kinds"] = [
                s.get("kind") for s in cfg.get("sources") or [] if isinstance(s, Mapping)
            ]
        if cfg.get("bandwidth"):
            entry["bandwidth"] = dict(cfg["bandwidth"])
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
        for key in ("epoch", "last_seq", "unsent", "dropped", "counters", "state"):
            if key in only:
                out[key] = only[key]
        out["spool_depth"] = only.get("held", {}).get("count", 0)
        out["spool_bytes"] = only.get("bytes", 0)
        out["spool_oldest_age_s"] = only.get("oldest_age_s", 0)
        out["broker"] = (only.get("state") or {}).get("broker", "n/a")
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
    return [finalize_batch(b, opts) for b in batches]


# -- sysfs and health beacons ---------------------------------------------------------------
def sysfs_source(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> SysfsSource:
    """The (registry-held) sysfs poller for this beacon config."""
    path = spool_path(cfg, opts)
    key = f"{path}|{cfg.get('_beacon_name', 'tributary_sysfs')}"
    fp = _fingerprint({"root": cfg.get("root", "/"), "sources": cfg.get("sources")})
    with _registry_lock:
        current = _sources.get(key)
        if current and current[0] == fp:
            return current[1]
        source = SysfsSource(str(cfg.get("root", "/")), compile_sources(cfg.get("sources")))
        _sources[key] = (fp, source)
        return source


def run_sysfs_beacon(config: Any, opts: Mapping[str, Any], grains: Mapping[str, Any]) -> list[dict]:
    """One ``tributary_sysfs`` run: read the due sensors, spool them, emit batches."""
    cfg = config_to_dict(config)
    cfg.setdefault("_beacon_name", "tributary_sysfs")
    readings, rejects = sysfs_source(cfg, opts).poll()
    for exc in rejects:
        log.info("tributary sysfs: rejected: %s", exc)
    if readings or rejects:
        spool_readings(cfg, opts, readings, rejects)
    return emit(cfg, opts, grains)


def run_health_beacon(
    config: Any, opts: Mapping[str, Any], grains: Mapping[str, Any]
) -> list[dict]:
    """One ``tributary_health`` run: spool the health metrics, emit batches, then heartbeat."""
    cfg = config_to_dict(config)
    cfg.setdefault("_beacon_name", "tributary_health")
    spool = emitting_spool(cfg, opts)
    now = health_mod.now_ms()
    metrics = health_mod.collect(
        spool.status(),
        root=str(cfg.get("root", "/")),
        disk_path=str(cfg.get("disk_path") or os.path.dirname(spool.path) or "/"),
    )
    if cfg.get("spool_metrics", True):
        spool_readings(
            cfg, opts, health_mod.readings(metrics, now, str(cfg.get("sensor", "health"))), []
        )
    out = emit(cfg, opts, grains)
    st = spool.status()
    metrics.update(
        spool_unsent=st["unsent"],
        spool_held=st["held"]["count"],
        dropped=st["dropped"],
        counters=st["counters"],
    )
    heartbeat = health_mod.event(spool.epoch, st["last_seq"], metrics, now)
    site = cfg.get("site") or grains.get("site")
    if site:
        heartbeat["site"] = str(site)
    # Origin authentication: the heartbeat feeds the top master's ledger (lost-tail detection),
    # so it is signed like a batch, with this minion's own key, last of all.
    from saltext.tributary import signing

    out.append(signing.sign_event(heartbeat, opts))
    return out


# -- execution module helpers ---------------------------------------------------------------
def read_now(
    opts: Mapping[str, Any], pillar: Mapping[str, Any], sensor: str | None = None
) -> dict[str, Any]:
    """Read the sources now without spooling or emitting (``tributary.read``)."""
    configs = find_beacon_configs(opts, pillar)
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, cfg in configs.items():
        if cfg["_module"] == "tributary_sysfs":
            try:
                src = SysfsSource(str(cfg.get("root", "/")), compile_sources(cfg.get("sources")))
                readings, rejects = src.poll(force=True, match=sensor)
            except SysfsConfigError as exc:
                errors[name] = str(exc)
                continue
            for r in readings:
                out[r.key] = {"value": r.value, "unit": r.unit, "ts_ms": r.ts_ms, "source": name}
            for rej in rejects:
                errors[f"{name}:{rej.detail.split(':')[0]}"] = f"{rej.reason}: {rej.detail}"
        elif cfg["_module"] == "tributary_health":
            metrics = health_mod.collect({}, root=str(cfg.get("root", "/")))
            for r in health_mod.readings(metrics, health_mod.now_ms(), cfg.get("sensor", "health")):
                if (
                    sensor is None
                    or fnmatch.fnmatchcase(r.sensor, sensor)
                    or fnmatch.fnmatchcase(r.key, sensor)
                ):
                    out[r.key] = {
                        "value": r.value,
                        "unit": r.unit,
                        "ts_ms": r.ts_ms,
                        "source": name,
                    }
        elif cfg["_module"] == "tributary_mqtt":
            # MQTT sensors push; "now" is the newest reading the broker delivered.
            path = spool_path(cfg, opts)
            if not os.path.exists(path):
                continue
            spool = GatewaySpool(path)
            try:
                for key, row in spool.latest().items():
                    if sensor is not None and not (
                        fnmatch.fnmatchcase(key.rsplit("/", 1)[0], sensor)
                        or fnmatch.fnmatchcase(key, sensor)
                    ):
                        continue
                    if key.startswith("health/") or key in out:
                        continue
                    out[key] = {
                        "value": row["value"],
                        "unit": row["unit"],
                        "ts_ms": row["ts_ms"],
                        "source": f"{name} (last received)",
                    }
            finally:
                spool.close()
    result: dict[str, Any] = {"readings": out}
    if errors:
        result["errors"] = errors
    return result


def tail(opts: Mapping[str, Any], pillar: Mapping[str, Any], n: int = 10) -> list[dict]:
    spool = open_spool(opts, pillar)
    try:
        return spool.tail(max(1, min(int(n), 10_000)))
    finally:
        spool.close()


def trim(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> dict[str, Any]:
    spool = open_spool(opts, pillar)
    try:
        before = spool.held()
        dropped = spool.trim()
        after = spool.held()
        return {
            "dropped_unsent": dropped,
            "held_before": before,
            "held_after": after,
            "budget": {"max_bytes": spool.max_bytes, "max_age_s": spool.max_age_s},
        }
    finally:
        spool.close()


def reset_counters(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> dict[str, Any]:
    spool = open_spool(opts, pillar)
    try:
        return {"reset": True, "previous": spool.reset_counters()}
    finally:
        spool.close()


# -- grains ---------------------------------------------------------------------------------
def hardware_model(root: str = "/") -> str:
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        try:
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip("\x00\n ")
            if text:
                return text
        except OSError:
            continue
    import platform

    return platform.machine() or "unknown"


def grains(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary`` grain: site, role, hardware model and the sensors present.

    ``sensors`` lists metric kinds (``temperature``, ``humidity``, ...), so
    ``salt -G 'tributary:sensors:temperature'`` targets gateways with a temperature sensor;
    ``sensor_ids`` lists ``<sensor>/<metric>`` keys.
    """
    static = opts.get("grains") or {}
    configs = find_beacon_configs(opts, {})
    keys: set[str] = set()
    metrics: set[str] = set()
    site = static.get("site")
    for cfg in configs.values():
        site = site or cfg.get("site")
        mod = cfg["_module"]
        try:
            if mod == "tributary_sysfs":
                src = SysfsSource(str(cfg.get("root", "/")), compile_sources(cfg.get("sources")))
                src._refresh(0.0)
                keys.update(s.key for s in src.sensors)
            elif mod == "tributary_mqtt":
                for rule in compile_rules(cfg.get("topics")):
                    if rule.metric and "{" not in rule.metric:
                        metrics.add(rule.metric)
                    metrics.update(f.metric for f in rule.fields)
            path = spool_path(cfg, opts)
            if os.path.exists(path) and mod != "tributary_health":
                spool = GatewaySpool(path)
                try:
                    keys.update(k for k in spool.sensor_keys() if not k.startswith("health/"))
                finally:
                    spool.close()
        except Exception as exc:  # grains must never fail the minion
            log.warning("tributary grains: %s: %s", cfg.get("_beacon_name"), exc)
    metrics.update(k.rsplit("/", 1)[1] for k in keys)
    return {
        "site": site,
        "role": static.get("role") or ("gateway" if configs else None),
        "hardware": hardware_model(),
        "sensors": sorted(metrics),
        "sensor_ids": sorted(keys),
        "sources": sorted(c["_module"] for c in configs.values()),
    }
