"""What ``salt-run tributary.status`` reports: the runner's read model of the relay spool."""

from __future__ import annotations

import fnmatch
import heapq
import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from saltext.tributary.relay.config import RelayConfig, engine_config, relay_config
from saltext.tributary.relay.spool import PER_GATEWAY_COUNTERS, RelaySpool
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

#: How many gateways the fleet summary lists under ``worst`` by default.
WORST_N = 10
#: Gateway states, worst first.
STATES = ("silent", "gaps", "ok")


def check_elasticsearch(es_cfg: Any) -> dict[str, Any]:
    """Can the relay reach and authenticate to Elasticsearch with this config? Never raises."""
    from saltext.tributary.relay.config import parse_elasticsearch
    from saltext.tributary.relay.elasticsearch import make_client

    es, errors = parse_elasticsearch(es_cfg)
    if es is None:
        return {"reachable": False, "error": "; ".join(errors)}
    if "request_timeout" not in es_cfg:  # a probe answers sooner than the relay's requests
        es = replace(es, request_timeout=es.probe_timeout)
    try:
        client = make_client(es)
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


def status_from_opts(
    opts: Mapping[str, Any],
    check_es: bool = True,
    detail: bool = True,
    gateway: str | None = None,
    site: str | None = None,
    worst: int = WORST_N,
) -> dict[str, Any]:
    """What ``salt-run tributary.status`` reports: fleet totals, gateways per state and per
    site, the ``worst`` gateways, the relay spool, Elasticsearch and, with ``detail`` (or for
    the gateways matching the ``gateway`` / ``site`` globs), every gateway's entry."""
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
        facts = heartbeat_facts(spool)
        silent_after_s = rcfg.health.overdue_factor * rcfg.health.heartbeat_s
        for gw, entry in gateways.items():
            b, n = per_gw_depth.get(gw, (0, 0))
            entry["relay_spool"] = {"batches": b, "readings": n or 0}
            for name in PER_GATEWAY_COUNTERS:
                entry[name] = per_gw_counters.get(gw, {}).get(name, 0)
            hb = facts.get(gw)
            entry["gateway_spool"] = hb
            entry["site"] = str(hb.get("site")) if isinstance(hb, Mapping) else "None"
            entry["state"] = gateway_state(entry, silent_after_s)
        totals = counters
        out.update(
            result=bool(out.get("elasticsearch", {}).get("reachable", True)),
            # the relay engine's own spool and counters
            relay={
                "spool_batches": depth,
                "spool_oldest_age_s": round((now_ms() - oldest) / 1000, 1) if oldest else 0,
                "counters": counters,
            },
            fleet={
                "gateways": len(gateways),
                "states": _count(e["state"] for e in gateways.values()),
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
            sites=site_summary(gateways),
            worst=worst_gateways(gateways, worst),
        )
        if rcfg.scaleout.role == "top":  # scale-out: the syndic relays, their receipts
            from saltext.tributary.relay.scaleout import relays_view

            out["fleet"]["syndic_relays"] = relays_view(spool.db, rcfg.scaleout)
        if detail or gateway or site:
            out["gateways"] = {
                gw: entry
                for gw, entry in sorted(gateways.items())
                if (not gateway or fnmatch.fnmatchcase(gw, str(gateway)))
                and (not site or fnmatch.fnmatchcase(entry["site"], str(site)))
            }
    finally:
        spool.close()
    return out


def gateway_state(entry: Mapping[str, Any], silent_after_s: float) -> str:
    """``silent``: nothing heard (heartbeat or indexed batch) for ``silent_after_s``;
    ``gaps``: open gaps; ``ok`` otherwise."""
    ages = [
        a
        for ep in (entry.get("epochs") or {}).values()
        for a in (ep.get("heartbeat_age_s"), ep.get("last_indexed_age_s"))
        if a is not None
    ]
    if not ages or min(ages) > silent_after_s:
        return "silent"
    if entry.get("open_gaps"):
        return "gaps"
    return "ok"


def _count(values: Any) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def site_summary(gateways: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site: gateways per state, open gaps, readings missing."""
    sites: dict[str, dict[str, Any]] = {}
    for entry in gateways.values():
        e = sites.setdefault(
            str(entry.get("site")),
            {"gateways": 0, **dict.fromkeys(STATES, 0), "open_gaps": 0, "missing": 0},
        )
        e["gateways"] += 1
        e[entry["state"]] = e.get(entry["state"], 0) + 1
        e["open_gaps"] += entry.get("open_gaps", 0)
        e["missing"] += entry.get("missing", 0)
    return dict(sorted(sites.items()))


def worst_gateways(gateways: Mapping[str, Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` gateways in the worst state (silent, then gaps), most readings missing and
    longest lag first; gateways in state ``ok`` are never listed."""
    rank = {s: i for i, s in enumerate(STATES)}

    def key(item: tuple[str, Mapping[str, Any]]) -> tuple[Any, ...]:
        gw, e = item
        return (rank.get(e["state"], 0), -e.get("missing", 0), -(e.get("lag_s") or 0), gw)

    bad = [(gw, e) for gw, e in gateways.items() if e["state"] != "ok"]
    return [
        {
            "gateway": gw,
            "site": e.get("site"),
            "state": e["state"],
            "open_gaps": e.get("open_gaps", 0),
            "missing": e.get("missing", 0),
            "lag_s": e.get("lag_s"),
            "behind": e.get("behind", 0),
        }
        for gw, e in heapq.nsmallest(max(0, int(n)), bad, key=key)
    ]


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


def gaps_from_opts(
    opts: Mapping[str, Any],
    gateway: str | None = None,
    given_up: bool = True,
    site: str | None = None,
    detail: bool = False,
    oldest: int = WORST_N,
) -> Any:
    """What ``salt-run tributary.gaps`` reports: by default a fleet summary (open and given-up
    gaps, readings missing, per site, the ``oldest`` open gaps); with ``detail``, or for the
    gateways matching the ``gateway`` / ``site`` globs, the list of the gaps themselves."""
    _, spool = open_status_spool(opts)
    if spool is None:
        return [] if detail or gateway or site else gaps_summary([], {}, time.time(), oldest)
    try:
        now = time.time()
        spool.ledger.refresh(now)
        exact = gateway if gateway and not any(c in str(gateway) for c in "*?[") else None
        found = spool.ledger.gaps(exact, include_given_up=bool(given_up))
        sites = {gw: str(hb.get("site")) for gw, hb in heartbeat_facts(spool).items()}
    finally:
        spool.close()
    if not (detail or gateway or site):
        return gaps_summary(found, sites, now, oldest)
    return [
        g.as_dict(now) | {"site": sites.get(g.gateway, "None")}
        for g in found
        if (not gateway or fnmatch.fnmatchcase(g.gateway, str(gateway)))
        and (not site or fnmatch.fnmatchcase(sites.get(g.gateway, "None"), str(site)))
    ]


def gaps_summary(
    gaps: list[Any], sites: Mapping[str, str], now: float, oldest: int = WORST_N
) -> dict[str, Any]:
    """Gaps counted for the fleet and per site, and the ``oldest`` open ones."""
    per_site: dict[str, dict[str, Any]] = {}
    gws: dict[str, set[str]] = {}
    open_gaps = [g for g in gaps if g.state == "open"]
    for g in gaps:
        name = sites.get(g.gateway, "None")
        e = per_site.setdefault(name, {"open": 0, "given_up": 0, "missing": 0, "gateways": 0})
        if g.state == "open":
            e["open"] += 1
            e["missing"] += g.size
            gws.setdefault(name, set()).add(g.gateway)
        else:
            e["given_up"] += 1
    for name, members in gws.items():
        per_site[name]["gateways"] = len(members)
    return {
        "result": True,
        "open": len(open_gaps),
        "given_up": len(gaps) - len(open_gaps),
        "missing_readings": sum(g.size for g in open_gaps),
        "gateways_with_open_gaps": len({g.gateway for g in open_gaps}),
        "sites": dict(sorted(per_site.items())),
        "oldest": [
            g.as_dict(now) | {"site": sites.get(g.gateway, "None")}
            for g in heapq.nsmallest(
                max(0, int(oldest)), open_gaps, key=lambda g: (g.opened, g.gateway, g.lo)
            )
        ],
    }
