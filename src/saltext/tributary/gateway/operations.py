"""The ``tributary`` execution module's operations on a gateway: status, replay, read, tail,
trim, reset counters."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from saltext.tributary.gateway.beacons import finalize_batch, site_of
from saltext.tributary.gateway.config import (
    config_to_dict,
    parse_health,
    parse_sysfs,
    spool_options,
    spool_path,
)
from saltext.tributary.gateway.sources import health as health_mod
from saltext.tributary.gateway.sources.sysfs import SysfsSource
from saltext.tributary.gateway.spool import GatewaySpool
from saltext.tributary.util import clock

log = logging.getLogger(__name__)


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
    site = site_of({}, grains)
    # A replay is a new request: its batches carry a request id, so the relay's intake
    # de-duplication (which folds the syndic's second copy of an event) lets them through.
    request = uuid.uuid4().hex[:8]
    for b in batches:
        b["replay"] = request
        if site:
            b["site"] = str(site)
    return [finalize_batch(b, opts) for b in batches]


def read_now(
    opts: Mapping[str, Any], pillar: Mapping[str, Any], sensor: str | None = None
) -> dict[str, Any]:
    """Read the sources now without spooling or emitting (``tributary.read``)."""
    configs = find_beacon_configs(opts, pillar)
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, cfg in configs.items():
        if cfg["_module"] == "tributary_sysfs":
            sysfs, problems = parse_sysfs(cfg)
            if sysfs is None:
                errors[name] = "; ".join(problems)
                continue
            src = SysfsSource(sysfs.root, sysfs.sources)
            readings, rejects = src.poll(force=True, match=sensor)
            for r in readings:
                out[r.key] = {"value": r.value, "unit": r.unit, "ts_ms": r.ts_ms, "source": name}
            for rej in rejects:
                errors[f"{name}:{rej.detail.split(':')[0]}"] = f"{rej.reason}: {rej.detail}"
        elif cfg["_module"] == "tributary_health":
            health, problems = parse_health(cfg)
            if health is None:
                errors[name] = "; ".join(problems)
                continue
            metrics = health_mod.collect({}, root=health.root)
            for r in health_mod.readings(metrics, clock.now_ms(), health.sensor):
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


def tail(
    opts: Mapping[str, Any], pillar: Mapping[str, Any], n: int = 10, aside: bool = False
) -> list[dict]:
    """The last ``n`` readings of the spool, or (``aside``) the last ``n`` set aside as
    implausible, with their reason."""
    spool = open_spool(opts, pillar)
    n = max(1, min(int(n), 10_000))
    try:
        return spool.set_aside(n) if aside else spool.tail(n)
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


#: An audit record keeps at most this much of a payload or an answer (JSON bytes).
AUDIT_MAX_BYTES = 2048


def _bounded(value: Any) -> Any:
    """``value`` if its JSON fits :data:`AUDIT_MAX_BYTES`, else the start of its JSON text."""
    try:
        text = json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= AUDIT_MAX_BYTES:
        return value
    return {"truncated": text[:AUDIT_MAX_BYTES], "bytes": len(text)}


def commands_config(opts: Mapping[str, Any], pillar: Mapping[str, Any]) -> Any:
    """The raw ``tributary:commands`` block: pillar first, else the minion config."""
    raw = (pillar.get("tributary") or {}).get("commands")
    if raw is None:
        raw = (opts.get("tributary") or {}).get("commands")
    return raw


def command(
    opts: Mapping[str, Any],
    pillar: Mapping[str, Any],
    device: str,
    name: str,
    payload: Any = None,
    timeout: float | None = None,
    *,
    test: bool = False,
    user: str | None = None,
    jid: str | None = None,
) -> dict[str, Any]:
    """``tributary.command``: check ``name`` for ``device`` against the allow-list and the
    per-device rate limit, send it through the site broker (or, with ``test``, say what would
    be sent), and record the command and its outcome in the gateway spool, from where the
    beacons ship it (signed, numbered, replayable) to ``tributary-commands-*``."""
    from saltext.tributary.gateway import commands as cmds
    from saltext.tributary.gateway.sources.mqtt import parse_broker

    started = clock.now_ms()
    cfg, errors = cmds.parse_commands(commands_config(opts, pillar))
    out: dict[str, Any]
    spool: GatewaySpool | None = None
    try:
        spool = open_spool(opts, pillar)
    except Exception as exc:  # the audit is said to have failed below; the check still runs
        log.error("tributary.command: the gateway spool cannot be opened: %s", exc)
    if cfg is None:
        why = "; ".join(errors)
        out = {"result": False, "outcome": "error", "reason": why, "error": why}
    else:
        verdict = cmds.check_command(cfg, device, name, payload)
        out = {"rule": verdict.rule} if verdict.rule else {}
        if not verdict.allowed:
            out.update(result=False, outcome="refused", reason=verdict.reason)
        elif spool is None:
            why = "the gateway spool (the audit) cannot be opened: nothing is sent unaudited"
            out.update(result=False, outcome="error", reason=why)
        elif test:
            seen = spool.reserve_command(device, cfg.rate.max, cfg.rate.window_s, dry=True)
            out.update(result=None, outcome="test", **cmds.plan_command(cfg, device, name, payload))
            out["reason"] = (
                cmds.rate_reason(cfg, device, seen) + ": it would be refused"
                if seen is not None
                else f"would be sent ({verdict.reason})"
            )
        else:
            seen = spool.reserve_command(device, cfg.rate.max, cfg.rate.window_s)
            if seen is not None:
                out.update(
                    result=False, outcome="refused", reason=cmds.rate_reason(cfg, device, seen)
                )
            else:
                mqtt = [
                    c
                    for c in find_beacon_configs(opts, pillar).values()
                    if c["_module"] == "tributary_mqtt"
                ]
                broker, errs = parse_broker((mqtt[0].get("broker") if mqtt else None) or {})
                if broker is None:
                    why = "tributary_mqtt broker: " + "; ".join(errs)
                    out.update(result=False, outcome="error", reason=why)
                else:
                    out.update(cmds.send_command(broker, cfg, device, name, payload, timeout))
    if out.get("outcome") != "test" and "error" not in out and out.get("result") is False:
        out["error"] = out.get("reason")
    record = {
        "device": str(device),
        "command": str(name),
        "payload": _bounded(payload),
        "correlation_id": out.get("id"),  # only what was sent to the device
        "outcome": out.get("outcome"),
        "reason": out.get("reason"),
        "rule": out.get("rule"),
        "answer": _bounded(out.get("answer")),
        "latency_ms": out.get("latency_ms"),
        "user": user,
        "jid": jid,
        "topic": out.get("topic"),
        "qos": cfg.qos if cfg is not None else None,
    }
    record = {k: v for k, v in record.items() if v is not None}
    if spool is None:
        out["audit"] = {"recorded": False, "error": "the gateway spool cannot be opened"}
        return out
    try:
        seq = spool.append_record("command", started, record)
        out["audit"] = {"recorded": True, "epoch": spool.epoch, "seq": seq}
    except Exception as exc:
        log.error("tributary.command: audit record not written: %s", exc)
        out["audit"] = {"recorded": False, "error": str(exc)}
    finally:
        spool.close()
    return out
