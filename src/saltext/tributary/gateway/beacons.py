"""What one beacon run does on a gateway: read or take readings, spool them, emit batches.

Long-lived parts (the MQTT subscriber threads, the spool connection used for emitting) live in
this module's registry, a normal Python import: it survives Salt reloading the beacon modules
(``saltutil.sync_*``). The beacon loader modules stay thin and call :func:`run_mqtt_beacon`,
:func:`run_sysfs_beacon` and :func:`run_health_beacon`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from saltext.tributary.gateway.config import (
    SITE_PATTERN,
    batch_options,
    config_to_dict,
    parse_health,
    parse_mqtt,
    parse_sysfs,
    parsed,
    run_bytes_cap,
    spool_options,
    spool_path,
)
from saltext.tributary.gateway.drain import Drain, MasterSender, can_drain
from saltext.tributary.gateway.filters import Filters, compile_filters
from saltext.tributary.gateway.registry import Registry
from saltext.tributary.gateway.sources import health as health_mod
from saltext.tributary.gateway.sources.payload import Mapper, TopicRule
from saltext.tributary.gateway.sources.sysfs import SysfsSource
from saltext.tributary.gateway.spool import GatewaySpool, SpoolFull
from saltext.tributary.protocol.reading import Reading, RejectedReading
from saltext.tributary.util import clock

log = logging.getLogger(__name__)


REGISTRY = Registry()
_last_trim: dict[str, float] = {}
#: How often a beacon run applies the retention budget (seconds).
TRIM_EVERY_S = 60.0


def ensure_mqtt_source(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
    """Start (or restart on a config change) the subscriber for this beacon config."""
    from saltext.tributary.gateway.sources.mqtt import MqttSource

    path = spool_path(cfg, opts)
    name = str(cfg.get("_beacon_name", "tributary_mqtt"))

    def build(previous: Any) -> Any:
        if previous is not None:
            log.info("tributary mqtt: configuration changed, restarted the subscriber")
        mqtt = parsed("tributary_mqtt", parse_mqtt, cfg)
        broker = mqtt.broker
        if "client_id" not in (cfg.get("broker") or {}):
            broker = replace(broker, client_id=f"tributary-{opts.get('id', 'gateway')}-{name}")
        source = MqttSource(
            broker,
            Mapper([TopicRule.from_options(t) for t in mqtt.topics]),
            path,
            Filters(compile_filters(cfg.get("filters"))),
            **spool_options(cfg),
        )
        source.start()
        return source

    config = {k: v for k, v in cfg.items() if k != "interval"}
    return REGISTRY.ensure("source", f"{path}|{name}", config, build)


def close_beacon(config: Any, opts: Mapping[str, Any], module: str) -> None:
    """Stop what one beacon started: its subscriber or poller and its filters. Other beacons'
    parts keep running, and the spool they share stays open (Salt calls a beacon's ``close``
    when that beacon alone is removed or disabled)."""
    cfg = config_to_dict(config)
    key = f"{spool_path(cfg, opts)}|{cfg.get('_beacon_name') or module}"
    REGISTRY.drop("source", key)
    REGISTRY.drop("filters", key)


def stop_sources() -> None:
    """Stop every subscriber and close every spool (tests, shutdown)."""
    REGISTRY.clear()
    _last_trim.clear()


def emitting_spool(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> GatewaySpool:
    path = spool_path(cfg, opts)
    return REGISTRY.ensure("spool", path, None, lambda _: GatewaySpool(path, **spool_options(cfg)))


def _filters_for(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Filters:
    key = f"{spool_path(cfg, opts)}|{cfg.get('_beacon_name', '')}"
    rules = cfg.get("filters") or []
    return REGISTRY.ensure("filters", key, rules, lambda _: Filters(compile_filters(rules)))


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
    """The single place where an outgoing batch (beacon or replay) is finalised: its rows
    packed into one value (``rb``, README "Wire format"), stamped with its emit time
    (``emit_ms``, the first hop's end in the relay's lag per hop) and signed."""
    # Origin authentication: sign with this minion's own key, last of all.
    from saltext.tributary.protocol import signing
    from saltext.tributary.protocol.wire import pack_rows
    from saltext.tributary.util.clock import now_ms

    out = pack_rows(batch)
    out["emit_ms"] = now_ms()
    return signing.sign_batch(out, opts)


def _budget_for(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
    """The gateway's bandwidth budget: one per spool, whichever beacon configures it.

    Every beacon emitting from the spool goes through it (a beacon without a ``bandwidth`` key
    uses the one another beacon set), and a config change adjusts the rate without refilling
    the bucket.
    """
    from saltext.tributary.gateway.bandwidth import Budget

    path = spool_path(cfg, opts)
    bw = cfg.get("bandwidth")
    if not bw:
        return REGISTRY.get("budget", path)

    def build(previous: Any) -> Any:
        new = Budget.from_config(bw)
        if previous is not None:
            new.tokens, new.last = min(previous.tokens, new.tokens), previous.last
        return new

    return REGISTRY.ensure("budget", path, bw, build)


#: the lowered run caps already logged (once each per minion process)
_WARNED_CAPS: set[int] = set()


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
    batch = batch_options(cfg)
    site = site_of(cfg, grains)
    max_batch = batch.max_bytes
    max_run = min(batch.max_run_bytes, run_bytes_cap())
    if max_run < batch.max_run_bytes and max_run not in _WARNED_CAPS:
        _WARNED_CAPS.add(max_run)
        log.warning(
            "tributary: batch.max_run_bytes %d lowered to %d, half this kernel's default socket"
            " send buffer (net.core.wmem_default): a larger beacon run would stop the minion",
            batch.max_run_bytes,
            max_run,
        )
    budget = _budget_for(cfg, opts)
    site_s = str(site) if site else None
    if budget is not None:
        batches = budget.emit(spool, max_batch_bytes=max_batch, site=site_s)
        return [{"tag": "batch", **finalize_batch(b, opts)} for b in batches]
    drain = _drain_for(cfg, opts) if batch.drain else None
    if drain is None:
        batches = spool.next_batches(max_batch_bytes=max_batch, max_run_bytes=max_run, site=site_s)
        return [{"tag": "batch", **finalize_batch(b, opts)} for b in batches]
    if drain.running():
        return []  # the drain is sending the spool's next readings
    with drain.lock:
        batches = spool.next_batches(max_batch_bytes=max_batch, max_run_bytes=max_run, site=site_s)
        behind = spool.last_run_full and spool.unsent() > 0
    if behind:  # the run carried all it may and more is waiting: send it from a thread
        take = _drain_take(drain, cfg, opts, max_batch, batch.drain_run_bytes, max_run, site_s)
        drain.start(take, lambda: MasterSender(opts), opts.get("master_uri"))
    return [{"tag": "batch", **finalize_batch(b, opts)} for b in batches]


def _drain_for(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> Drain | None:
    """The spool's backlog drain (``gateway/drain.py``), on a minion that can send one."""
    if not can_drain(opts):
        return None
    path = spool_path(cfg, opts)
    return REGISTRY.ensure(
        "drain", path, None, lambda _: Drain(GatewaySpool(path, **spool_options(cfg)))
    )


def _drain_take(
    drain: Drain,
    cfg: Mapping[str, Any],
    opts: Mapping[str, Any],
    max_batch: int,
    run_bytes: int,
    beacon_run_bytes: int,
    site: str | None,
) -> Callable[[bool], list[dict[str, Any]]]:
    """One drain request's events: the next batches, tagged as this beacon's run would be;
    none once less than a beacon run's bytes wait, so a drain sends full batches while a
    backlog lasts. ``take(True)``, the drain's last request, takes what is left (up to a
    request's bytes): the tail of a burst leaves without waiting for the next beacon run, and
    the drain does not chase the readings that arrive after it (beacon runs carry those)."""
    gateway = str(opts["id"])
    tag = f"salt/beacon/{gateway}/{cfg.get('_beacon_name') or 'tributary_mqtt'}/batch"

    def take(final: bool = False) -> list[dict[str, Any]]:
        per = drain.spool.bytes_per_reading  # 0 before the drain's first full batch
        if not final and per and drain.spool.unsent() * per < beacon_run_bytes:
            return []
        batches = drain.spool.next_batches(
            max_batch_bytes=max_batch, max_run_bytes=run_bytes, site=site
        )
        return [{"tag": tag, "data": {**finalize_batch(b, opts), "id": gateway}} for b in batches]

    return take


SITE_RE = re.compile(SITE_PATTERN)


def site_of(cfg: Mapping[str, Any], grains: Mapping[str, Any]) -> str | None:
    """The site batches carry: the beacon's ``site`` or the ``site`` grain, when it is a short
    name (a grain is whatever the minion sets; an odd one is logged and left out)."""
    site = cfg.get("site") or grains.get("site")
    if site is None or (isinstance(site, str) and SITE_RE.fullmatch(site)):
        return site
    log.warning("tributary: site %r is not a short name ([A-Za-z0-9_.:-]{1,64}); left out", site)
    return None


def run_mqtt_beacon(config: Any, opts: Mapping[str, Any], grains: Mapping[str, Any]) -> list[dict]:
    cfg = config_to_dict(config)
    ensure_mqtt_source(cfg, opts)
    return emit(cfg, opts, grains)


def sysfs_source(cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> SysfsSource:
    """The (registry-held) sysfs poller for this beacon config."""
    key = f"{spool_path(cfg, opts)}|{cfg.get('_beacon_name', 'tributary_sysfs')}"
    config = {"root": cfg.get("root", "/"), "sources": cfg.get("sources")}

    def build(_: Any) -> SysfsSource:
        sysfs = parsed("tributary_sysfs", parse_sysfs, cfg)
        return SysfsSource(sysfs.root, sysfs.sources)

    return REGISTRY.ensure("source", key, config, build)


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
    health = parsed("tributary_health", parse_health, cfg)
    spool = emitting_spool(cfg, opts)
    now = clock.now_ms()
    metrics = health_mod.collect(
        spool.status(),
        root=health.root,
        disk_path=health.disk_path or os.path.dirname(spool.path) or "/",
    )
    if health.spool_metrics:
        spool_readings(cfg, opts, health_mod.readings(metrics, now, health.sensor), [])
    out = emit(cfg, opts, grains)
    st = spool.status()
    metrics.update(
        spool_unsent=st["unsent"],
        spool_held=st["held"]["count"],
        dropped=st["dropped"],
        counters=st["counters"],
    )
    # last_seq: the last sequence *emitted* (the cursor), not the last numbered: a backlog
    # the bandwidth budget holds back is not lost, and must not look like a lost tail.
    metrics["numbered_seq"] = st["last_seq"]
    heartbeat = health_mod.event(spool.epoch, st["cursor"], metrics, now)
    site = site_of(cfg, grains)
    if site:
        heartbeat["site"] = str(site)
    if health.grains:  # what alert rules on the top master may match on (bounded)
        picked, skipped = health_mod.pick_grains(grains, list(health.grains))
        heartbeat["grains"] = picked
        for why in skipped:
            log.warning("tributary_health: grain left out of the heartbeat: %s", why)
    # Origin authentication: the heartbeat feeds the top master's ledger (lost-tail detection),
    # so it is signed like a batch, with this minion's own key, last of all.
    from saltext.tributary.protocol import signing

    out.append(signing.sign_event(heartbeat, opts))
    return out
