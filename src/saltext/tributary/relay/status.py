"""What ``salt-run tributary.status`` reports: the runner's read model of the relay spool."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from saltext.tributary.relay.config import RelayConfig, engine_config, relay_config
from saltext.tributary.relay.spool import PER_GATEWAY_COUNTERS, RelaySpool
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)


def check_elasticsearch(es_cfg: Any) -> dict[str, Any]:
    """Can the relay reach and authenticate to Elasticsearch with this config? Never raises."""
    from saltext.tributary.relay.elasticsearch import make_client, validate_es_config

    errors = validate_es_config(es_cfg)
    if errors:
        return {"reachable": False, "error": "; ".join(errors)}
    try:
        client = make_client({**es_cfg, "request_timeout": es_cfg.get("request_timeout", 10)})
        # cluster health needs only monitor rights and exists on every distribution (the
        # integ-test zip answers GET / with 405)
        health = client.cluster.health()
        return {
            "reachable": True,
            "cluster": health.get("cluster_name"),
            "status": health.get("status"),
        }
    except Exception as exc:  # report, never raise
        return {"reachable": False, "error": describe_error(exc)}


def describe_error(exc: BaseException) -> str:
    """An exception with its causes (the client's TLS errors say only "TLS error")."""
    parts = [f"{type(exc).__name__}: {exc}"]
    seen = {id(exc)}
    cur: BaseException | None = exc
    while cur is not None:
        nxt = cur.__cause__ or cur.__context__
        errors = getattr(cur, "errors", None)
        if nxt is None and isinstance(errors, (list, tuple)) and errors:
            nxt = errors[0] if isinstance(errors[0], BaseException) else None
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        parts.append(f"{type(nxt).__name__}: {nxt}")
        cur = nxt
    return " <- ".join(parts)[:2000]


def resolved_config(opts: Mapping[str, Any]) -> RelayConfig:
    """The relay engine's settings on this master, paths resolved (raises ValueError)."""
    return relay_config(
        engine_config(opts),
        str(opts.get("cachedir", "/var/cache/salt/master")),
        opts.get("pki_dir"),
    )


def open_status_spool(opts: Mapping[str, Any]) -> tuple[RelayConfig, RelaySpool | None]:
    rcfg = resolved_config(opts)
    if not os.path.exists(rcfg.spool_path):
        return rcfg, None
    return rcfg, RelaySpool(rcfg.spool_path)


def status_from_opts(opts: Mapping[str, Any], check_es: bool = True) -> dict[str, Any]:
    """What ``salt-run tributary.status`` reports: per gateway, fleet totals, Elasticsearch."""
    cfg = engine_config(opts)
    out: dict[str, Any] = {}
    if not cfg:
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    if check_es:
        out["elasticsearch"] = check_elasticsearch(cfg.get("elasticsearch"))
    rcfg, spool = open_status_spool(opts)
    out["spool_path"] = rcfg.spool_path
    if spool is None:
        out["error"] = "no relay spool yet (engine not started or no batch received)"
        out["result"] = bool(out.get("elasticsearch", {}).get("reachable", True))
        return out
    try:
        now = time.time()
        depth, oldest = spool.depth()
        counters = spool.counters()
        ledger = spool.ledger
        ledger.refresh(now)
        gateways = ledger.summary(now)
        per_gw_depth = spool.depth_by_gateway()
        per_gw_counters = spool.gateway_counters()
        for gw in set(per_gw_depth) | set(per_gw_counters):
            gateways.setdefault(gw, {"epochs": {}, "open_gaps": 0, "missing": 0})
        for gw, entry in gateways.items():
            b, n = per_gw_depth.get(gw, (0, 0))
            entry["relay_spool"] = {"batches": b, "readings": n or 0}
            for name in PER_GATEWAY_COUNTERS:
                entry[name] = per_gw_counters.get(gw, {}).get(name, 0)
            entry["gateway_spool"] = entry.pop("gateway_spool", None)
        for gw, hb in heartbeat_facts(spool).items():
            if gw in gateways:
                gateways[gw]["gateway_spool"] = hb
        totals = counters
        out.update(
            result=bool(out.get("elasticsearch", {}).get("reachable", True)),
            # the relay engine's own spool and counters
            relay={
                "spool_batches": depth,
                "spool_oldest_age_s": round((now_ms() - oldest) / 1000, 1) if oldest else 0,
                "counters": counters,
            },
            gateways=gateways,
            fleet={
                "gateways": len(gateways),
                "open_gaps": sum(g.get("open_gaps", 0) for g in gateways.values()),
                "missing_readings": sum(g.get("missing", 0) for g in gateways.values()),
                "given_up_gaps": sum(g.get("given_up_gaps", 0) for g in gateways.values()),
                "relay_spool_batches": depth,
                "relay_spool_bytes": spool.used_bytes(),
                "relay_spool_oldest_age_s": round((now_ms() - oldest) / 1000, 1) if oldest else 0,
                "key_sources": spool.keyring.sources(int(rcfg.keyset_ttl_s * 1000)),
                "key_conflicts": spool.keyring.conflicts(),
                "counters": totals,
            },
        )
    finally:
        spool.close()
    return out


def heartbeat_facts(spool: RelaySpool) -> dict[str, Any]:
    """Gateway spool facts from the last heartbeat each gateway sent (kept as a counter row)."""
    out: dict[str, Any] = {}
    for name, body in (
        spool.db.execute("SELECT name, body FROM heartbeat_facts").fetchall()
        if _has_table(spool.db, "heartbeat_facts")
        else []
    ):
        try:
            out[name] = json.loads(body)
        except ValueError:
            continue
    return out


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        is not None
    )


def retire_syndic(opts: Mapping[str, Any], syndic_id: str, undo: bool = False) -> dict[str, Any]:
    """Retire a syndic as a key source (its keys stop verifying at once, its key sets are
    refused) or, with ``undo``, accept its key sets again."""
    if not engine_config(opts):
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    rcfg = resolved_config(opts)
    spool = RelaySpool(rcfg.spool_path or "")
    try:
        with spool.transaction():
            n = spool.keyring.retire(syndic_id, undo=undo)
        return {
            "result": True,
            "syndic": syndic_id,
            "state": "trusted again" if undo else "retired",
            "gateway_keys": n,
            "trusted_in_config": syndic_id in (rcfg.trusted_syndics or ()),
        }
    finally:
        spool.close()
