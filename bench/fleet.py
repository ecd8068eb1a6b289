"""A simulated fleet through real daemons: 2,000 gateways x 10 sensors behind 4 syndics.

    .venv/bin/python bench/fleet.py                         # the defaults below
    .venv/bin/python bench/fleet.py --gateways 400 --syndics 2 --rates 10,5

Real parts: Elasticsearch (the test distribution, TLS), a top master with the
``tributary_relay`` engine, ``--syndics`` syndic masters each with a salt-syndic below the top
master (and on Salt 3008 the ``tributary_uplink`` engine, which carries the events salt-syndic
there does not), started as the session topology starts them (``tests/support/topology.py``).
Simulated (``tests/support/fleetsim.py``): the gateways. Each has a key pair of its own,
accepted on its syndic master (``pki_dir/minions``), so the syndic's ``tributary_keys``
engine vouches for it and the relay verifies every batch and heartbeat against it; its
batches (``--sensors`` readings each, one every ``batch_every_s``) and 30 s heartbeats are
built and signed by the product's code and fired on its syndic master's event bus, where a
minion's beacon events land. No salt-minion processes.

Phases, each printed in one JSON document:

* ``ramp``: for each ``--rates`` value (seconds between one gateway's batches), ``--step-s``
  seconds of steady firing: readings/s fired and indexed (the relay's ``indexed`` counter),
  relay spool depth, the generator's lag behind its schedule, and the CPU share of every
  daemon over the step (psutil, process trees): the top master (without the relay engine),
  the relay engine (with its process-tap child), each syndic master, each salt-syndic,
  Elasticsearch and the generator itself, plus the machine's total. A step is sustained when
  the relay keeps up (indexed >= 97 % of fired and its spool does not grow). The ramp stops
  after the first step that is not;
* ``exactly_once``: after draining, readings in Elasticsearch per gateway against what the
  generator fired (terms aggregation over every gateway);
* ``relay``: the relay engine's CPU per reading at each step and its RSS with the fleet;
* ``runners``: ``salt-run tributary.status|gaps|health`` (summary and per-gateway detail)
  through the top master's own ``salt-run``: wall time and JSON bytes;
* ``gap_repair``: ``--gap-gateways`` gateways each lose one batch at once while the fleet
  keeps firing at the lowest rate; the relay's ledger opens the gaps, its gap repairer sends
  ``tributary.replay`` jobs through salt-syndic, the simulated gateways' responder on each
  syndic master answers them from the generator's retained rows; measured: time until every
  gap is closed and the withheld readings are indexed, and the other gateways' indexing rate
  meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]

import psutil  # noqa: E402

from saltext.tributary.relay.stagecpu import per_reading  # noqa: E402
from tests.support.fleetsim import SimFleet, gateway_ids  # noqa: E402
from tests.support.topology import (  # noqa: E402
    NEEDS_UPLINK,
    factories_manager,
    running_syndic,
    running_top_master,
    wait_for,
)


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gateways", type=int, default=2000)
    p.add_argument("--syndics", type=int, default=4)
    p.add_argument("--sensors", type=int, default=10)
    p.add_argument(
        "--rates",
        default="10,5,2.5,1.25",
        help="seconds between one gateway's batches, one ramp step each",
    )
    p.add_argument("--step-s", type=float, default=30.0, help="measured seconds per step")
    p.add_argument("--heartbeat-s", type=float, default=30.0)
    p.add_argument("--gap-gateways", type=int, default=200)
    p.add_argument("--gap-timeout-s", type=float, default=300.0)
    return p.parse_args(argv)


# -- process CPU -------------------------------------------------------------------------------
def tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def relay_engine(master_pid: int, spool: str) -> tuple[int | None, dict[str, Any]]:
    """The relay engine's process and how it was found. Salt titles engine processes
    ``Engine(salt.loaded.ext.engines.<module>...`` (cut short where the title space ends), and
    salt-factories adds its own ``pytest`` engine to every master, so a title prefix alone
    can name the wrong one: the relay is the engine whose title names it or, when the title
    is cut before the module, the engine process holding the relay spool open."""
    engines: dict[int, str] = {}
    for p in tree(master_pid)[1:]:
        with contextlib.suppress(psutil.Error):
            title = " ".join(p.cmdline())
            if "Engine(" in title:
                engines[p.pid] = title[title.index("Engine(") :][:80]
    named = [pid for pid, t in engines.items() if "tributary_relay" in t]
    if len(named) == 1:
        return named[0], {"found_by": "title", "engines": engines}
    holding = []
    for pid in engines:
        with contextlib.suppress(psutil.Error):
            if any(f.path == spool for f in psutil.Process(pid).open_files()):
                holding.append(pid)
    # the relay's own children (the process tap) may hold it too: the outermost one
    outer = [pid for pid in holding if psutil.Process(pid).ppid() not in holding]
    if len(outer) == 1:
        return outer[0], {"found_by": "spool open", "engines": engines}
    return None, {"found_by": None, "engines": engines, "holding_spool": holding}


class CpuGroups:
    """CPU seconds of named process groups, sampled at the start and end of a step."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning a process list

    def sample(self) -> tuple[float, dict[str, float], float]:
        busy = psutil.cpu_times()
        return (
            time.monotonic(),
            {name: cpu_s(fn()) for name, fn in self.groups.items()},
            busy.user
            + busy.system
            + getattr(busy, "nice", 0.0)
            + getattr(busy, "irq", 0.0)
            + getattr(busy, "softirq", 0.0),
        )

    @staticmethod
    def percent(a: tuple, b: tuple) -> dict[str, float]:
        dt = b[0] - a[0]
        out = {name: round(100 * (b[1][name] - a[1][name]) / dt, 1) for name in a[1]}
        out["machine_total_of_200"] = round(100 * (b[2] - a[2]) / dt, 1)
        return out


class Discards(logging.Handler):
    """Counts Salt's "Publisher discarding slow subscriber" warnings the daemons forward to
    this process (salt-factories' log server): Salt 3008's event publisher drops a subscriber
    whose pending writes pass ``pub_server_write_queue_size`` (10,000), and the events queued
    for it with it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            msg = record.getMessage()
            if "discarding slow subscriber" in msg:
                reason = next(
                    (r for r in ("drain queue full", "stream closed", "drain timeout") if r in msg),
                    "other",
                )
                self.counts[reason] = self.counts.get(reason, 0) + 1


DISCARDS = Discards()


# -- the relay's own state ---------------------------------------------------------------------
class Relay:
    def __init__(self, spool: str) -> None:
        self.spool = spool

    def _q(self, sql: str, *args: Any) -> list[tuple]:
        if not os.path.exists(self.spool):
            return []
        db = sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.Error:
            return []
        finally:
            db.close()

    def counters(self) -> dict[str, int]:
        return dict(self._q("SELECT name, n FROM counters"))

    def indexed(self) -> int:
        return int(self.counters().get("indexed", 0))

    def depth(self) -> int:
        rows = self._q("SELECT COUNT(*) FROM batches")
        return int(rows[0][0]) if rows else -1

    def gap_states(self, gateways: set[str]) -> dict[str, int]:
        """Ledger gap rows of ``gateways`` by state (open, given up ...)."""
        out: dict[str, int] = {}
        for gw, state in self._q("SELECT gateway, state FROM ledger_gaps"):
            if gw in gateways:
                out[state] = out.get(state, 0) + 1
        return out

    def gap_rows(self, gateways: set[str]) -> list[tuple[str, str]]:
        """(gateway, state) of every ledger gap of ``gateways``."""
        return [
            (gw, st)
            for gw, st in self._q("SELECT gateway, state FROM ledger_gaps")
            if gw in gateways
        ]

    def keyed_gateways(self) -> int:
        rows = self._q("SELECT COUNT(DISTINCT gateway) FROM gateway_keys")
        return int(rows[0][0]) if rows else 0

    def open_gaps(self, gateways: set[str] | None = None) -> int:
        """Open gaps in the ledger (of ``gateways`` only, when given)."""
        rows = self._q("SELECT gateway FROM ledger_gaps WHERE state = 'open'")
        return sum(1 for (gw,) in rows if gateways is None or gw in gateways)


def es_per_gateway(es: Any, index: str) -> dict[str, int]:
    es.refresh(index)
    res = es.search(
        index,
        {"size": 0, "aggs": {"gw": {"terms": {"field": "gateway", "size": 100_000}}}},
    )
    return {b["key"]: b["doc_count"] for b in res["aggregations"]["gw"]["buckets"]}


def salt_run(top: Any, args: list[str]) -> dict[str, Any]:
    """Wall time and JSON bytes of ``salt-run <args> --out json`` against the top master."""
    cli = [
        str(Path(sys.executable).parent / "salt-run"),
        "-c",
        str(Path(top.config["conf_file"]).parent),
        *args,
        "--out",
        "json",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, timeout=300, check=False)
    dt = time.perf_counter() - t
    return {
        "call": "salt-run " + " ".join(args),
        "seconds": round(dt, 2),
        "json_bytes": len(proc.stdout),
        "returncode": proc.returncode,
        **({"stderr": proc.stderr.decode()[-500:]} if proc.returncode else {}),
    }


# -- the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    import salt.version

    from tests.support.es import running_elasticsearch

    syndic_ids = [f"fleet-syndic-{i + 1}" for i in range(args.syndics)]
    per = args.gateways // args.syndics
    rates = [float(r) for r in args.rates.split(",")]
    out |= {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "salt": salt.version.__version__,
            "uplink_engine": NEEDS_UPLINK,
        },
        "fleet": {
            "gateways": per * args.syndics,
            "syndics": args.syndics,
            "sensors_per_gateway": args.sensors,
            "heartbeat_s": args.heartbeat_s,
        },
    }
    root = tempfile.mkdtemp(prefix="tributary-fleet-")
    spool = os.path.join(root, "relay.db")
    relay_cfg_extra = {
        "index_prefix": "fleet",
        "spool_path": spool,
        "trusted_syndics": syndic_ids,
        "health": {"heartbeat_s": args.heartbeat_s},
        "anomalies": {},  # the detector on, with its defaults (the test topology saves often)
        # gap repair sized for 200 gateways at once (defaults: 6 requests a minute, 8 in
        # flight, 60 s grace: 200 gaps would take over 33 minutes by the rate limit alone)
        "gaps": {
            "grace_s": 10,
            "check_s": 1,
            "per_minute": 1000,
            "concurrency": 64,
            "backoff_s": 20,
            "timeout_s": 90,
        },
    }
    out["relay_config"] = relay_cfg_extra
    # the relay's CPU per stage (saltext.tributary.relay.stagecpu): the daemons inherit this
    # process's environment; =0 turns it off
    os.environ.setdefault("TRIBUTARY_RELAY_STAGE_CPU", "1")
    out["relay_stage_cpu"] = os.environ["TRIBUTARY_RELAY_STAGE_CPU"]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)  # last out: the daemons' files
        log("starting Elasticsearch")
        es = stack.enter_context(running_elasticsearch(tls=True))
        out["machine"]["elasticsearch"] = es.version
        # salt-factories' pytest engine forwards every bus event to this process; the
        # benches' copy forwards only the start events it needs (bench/factories_engines)
        from saltfactories.manager import FactoriesManager

        FactoriesManager.get_salt_engines_path = staticmethod(  # type: ignore[method-assign]
            lambda: REPO / "bench" / "factories_engines"
        )
        factories = stack.enter_context(factories_manager(os.path.join(root, "salt")))
        from tests.support.topology import relay_engine_config

        relay_cfg = relay_engine_config(es, **relay_cfg_extra)
        relay_cfg.pop("rules")  # the test topology's rules watch test sensors only
        log("starting the top master")
        top = stack.enter_context(
            running_top_master(factories, es, engines=[{"tributary_relay": relay_cfg}])
        )
        syndics = {}
        for sid in syndic_ids:
            log(f"starting {sid}")
            syndics[sid] = stack.enter_context(running_syndic(top, sid))
        relay = Relay(spool)
        fleet = SimFleet(
            {sid: s.master.config for sid, s in syndics.items()},
            gateway_ids(syndic_ids, per),
            sensors=args.sensors,
            batch_every_s=rates[0],
            heartbeat_every_s=args.heartbeat_s,
        )
        fleet.accept_all()
        stack.callback(fleet.revoke_all)
        log("waiting for the syndics' key sets to vouch for every gateway")
        t = time.monotonic()
        wait_for(
            lambda: relay.keyed_gateways() >= len(fleet.gateways),
            timeout=180,
            what="every gateway's key in the relay's keyring",
            interval=1,
        )
        out["fleet"]["keys_known_after_s"] = round(time.monotonic() - t, 1)
        eng, how = relay_engine(top.pid, spool)
        out["relay_engine_process"] = {"pid": eng, **how}
        if eng is None:
            raise RuntimeError(f"the relay engine's process not found: {how}")
        groups = {
            "relay_engine": lambda: tree(eng),  # with its process tap (detector, rules)
            "relay_engine_own": lambda: tree(eng)[:1],  # the relay process alone
            "top_master_other": lambda: [
                p for p in tree(top.pid) if p.pid not in {q.pid for q in tree(eng)}
            ],
            "elasticsearch": lambda: tree(es.proc.pid if es.proc else None),
            "generator": lambda: [psutil.Process()],
        }
        for sid, s in syndics.items():
            groups[f"{sid}_master"] = lambda s=s: tree(s.master.pid)
            groups[f"{sid}_salt_syndic"] = lambda s=s: tree(s.pid)
        cpu = CpuGroups(groups)
        fleet.start()
        stack.callback(fleet.stop)
        wait_for(
            lambda: len(es_per_gateway(es, "fleet-readings-*")) >= len(fleet.gateways),
            timeout=300,
            what="every gateway indexed",
            interval=2,
        )
        out["ramp"] = ramp(args, fleet, relay, cpu, rates)
        # back to the first rate; what the last step left in the spool drains
        fleet.set_rate(rates[0])
        t = time.monotonic()
        wait_for(lambda: relay.depth() < 500, timeout=900, what="backlog drained", interval=1)
        out["backlog_drained_after_s"] = round(time.monotonic() - t, 1)
        # -- runners at fleet size, while it flows
        log("runners")
        out["runners"] = [
            salt_run(top, a)
            for a in (
                ["test.arg"],
                ["tributary.status", "check_es=False"],
                ["tributary.gaps"],
                ["tributary.health", "check_es=False"],
                ["tributary.status", "check_es=False", "detail=True"],
                ["tributary.gaps", "detail=True"],
                ["tributary.health", "check_es=False", "detail=True"],
            )
        ]
        try:
            out["gap_repair"] = gap_repair(args, fleet, relay, es)
        except Exception as exc:  # report it with what else was measured
            out["gap_repair"] = {"error": f"{type(exc).__name__}: {exc}", **relay.counters()}
        out["rss_mib"] = {
            "relay_engine": rss_mib(tree(eng)),
            "relay_engine_without_children": rss_mib(tree(eng)[:1]),
            "top_master_other": rss_mib(groups["top_master_other"]()),
            "elasticsearch": rss_mib(groups["elasticsearch"]()),
            **{f"{sid}_master": rss_mib(tree(s.master.pid)) for sid, s in syndics.items()},
        }
        # no new batches; one last heartbeat each (a lost tail shows), replays answered
        fleet.quiet()
        log("draining")
        counts = fleet.counts()
        expected = counts.pop("expected")
        t = time.monotonic()
        with contextlib.suppress(AssertionError):  # what arrived is reported either way
            wait_for(
                lambda: all(
                    have.get(gw, 0) >= n
                    for have in [es_per_gateway(es, "fleet-readings-*")]
                    for gw, n in expected.items()
                ),
                timeout=300,
                what="every numbered reading in Elasticsearch",
                interval=5,
            )
        out["final_drain_s"] = round(time.monotonic() - t, 1)
        fleet.stop()
        counts = fleet.counts()
        counts.pop("expected")
        got = es_per_gateway(es, "fleet-readings-*")
        wrong = {gw: (got.get(gw, 0), n) for gw, n in expected.items() if got.get(gw, 0) != n}
        out["exactly_once"] = {
            **{k: v for k, v in counts.items() if k != "errors"},
            "readings_in_es": sum(got.values()),
            "readings_expected": sum(expected.values()),
            "gateways_wrong": len(wrong),
            "gateways_short": sum(1 for g, n in wrong.values() if g < n),
            "readings_short": sum(n - g for g, n in wrong.values() if g < n),
            "gateways_over": sum(1 for g, n in wrong.values() if g > n),
            "readings_over": sum(g - n for g, n in wrong.values() if g > n),
            "gateways_in_es": len(got),
            "wrong_sample": dict(list(wrong.items())[:5]),
            "generator_errors": counts["errors"],
            "relay_counters": relay.counters(),
            "bus_subscribers_discarded_whole_run": dict(DISCARDS.counts),
        }
        out["relay_spool_bytes"] = os.path.getsize(spool)
    return out


def caught_up(fleet: SimFleet, timeout: float) -> float | None:
    """Seconds until the generator fires on schedule again (None: not within ``timeout``)."""
    t = time.monotonic()
    try:
        wait_for(
            lambda: fleet.lag_s() < 1.0, timeout=timeout, what="generator on time", interval=0.5
        )
    except AssertionError:
        return None
    return round(time.monotonic() - t, 1)


def ramp(args, fleet: SimFleet, relay: Relay, cpu: CpuGroups, rates: list[float]) -> list[dict]:
    steps = []
    for rate in rates:
        old = fleet.batch_every_s
        fleet.set_rate(rate)
        log(f"step: one batch per gateway every {rate} s")
        # settle: each gateway's batch already due under the old rate goes out first, so the
        # fleet fires at the new rate only one old interval after the switch
        time.sleep(10.0 if old == rate else max(10.0, old))
        # a start or a step before may have left the generator behind: the step measures a
        # generator on time (not one catching up), or records that it did not get there
        behind_s = caught_up(fleet, timeout=120)
        lag0 = fleet.lag_max_s = 0.0
        k0, x0 = relay.counters(), dict(DISCARDS.counts)
        c0, i0, d0, s0 = fleet.counts(), relay.indexed(), relay.depth(), cpu.sample()
        time.sleep(args.step_s)
        c1, i1, d1, s1 = fleet.counts(), relay.indexed(), relay.depth(), cpu.sample()
        k1 = relay.counters()
        dt = s1[0] - s0[0]
        fired = c1["readings_fired"] - c0["readings_fired"]
        indexed = i1 - i0
        pct = CpuGroups.percent(s0, s1)
        eng_cpu = pct["relay_engine"] / 100 * dt
        own_cpu = pct["relay_engine_own"] / 100 * dt
        target = len(fleet.gateways) * args.sensors / rate
        stages = {k: k1.get(k, 0) - k0.get(k, 0) for k in k1 if k.startswith("cpu_ns:")}
        step = {
            "batch_every_s": rate,
            "target_readings_per_s": round(target),
            "fired_readings_per_s": round(fired / dt),
            "indexed_readings_per_s": round(indexed / dt),
            "events_per_s": round((c1["batches"] - c0["batches"]) / dt),
            "spool_depth_start_end": [d0, d1],
            "generator_caught_up_after_s": behind_s,
            "generator_lag_max_s": round(fleet.lag_max_s - lag0, 2),
            "generator_lag_end_s": round(fleet.lag_s(), 2),
            "heartbeats_per_s": round((c1["heartbeats"] - c0["heartbeats"]) / dt),
            # gaps the ledger saw open meanwhile (none lost: readings still in transit when
            # their gateway's heartbeat arrived) and replays it asked for
            "gaps_opened": k1.get("gaps_opened", 0) - k0.get("gaps_opened", 0),
            # events (batches and heartbeats) fired on the syndic masters and taken in by the
            # relay, and the top master's bus dropping slow subscribers meanwhile
            "events_fired": (c1["batches"] - c0["batches"]) + (c1["heartbeats"] - c0["heartbeats"]),
            "events_in_relay": k1.get("events_in", 0) - k0.get("events_in", 0),
            "bus_subscribers_discarded": {
                k: n - x0.get(k, 0) for k, n in DISCARDS.counts.items() if n > x0.get(k, 0)
            },
            "replays_requested": k1.get("replays_requested", 0) - k0.get("replays_requested", 0),
            "relay_engine_cpu_us_per_reading": round(eng_cpu / indexed * 1e6, 1)
            if indexed
            else None,
            # the relay's own stage timers (thread CPU; the rest of the engine's CPU is Salt
            # reading and unpacking the bus, the counters, the process tap)
            "relay_engine_own_cpu_us_per_reading": round(own_cpu / indexed * 1e6, 1)
            if indexed
            else None,
            "relay_stage_cpu_us_per_reading": per_reading(stages, indexed) if stages else None,
            "relay_engine_rss_mib": rss_mib(cpu.groups["relay_engine"]()),
            "top_master_other_rss_mib": rss_mib(cpu.groups["top_master_other"]()),
            "cpu_percent": pct,
        }
        # sustained: the relay keeps up with what was fired and the generator with its schedule
        step["relay_kept_up"] = bool(indexed >= 0.97 * fired and d1 - d0 < max(50, fired / 100))
        step["generator_on_schedule"] = bool(
            behind_s is not None and fired >= 0.95 * target and step["generator_lag_end_s"] <= 3
        )
        step["sustained"] = step["relay_kept_up"] and step["generator_on_schedule"]
        log(json.dumps(step))
        steps.append(step)
        if not step["sustained"]:
            break
    return steps


def gap_repair(args, fleet: SimFleet, relay: Relay, es: Any) -> dict[str, Any]:
    rate = max(float(r) for r in args.rates.split(","))
    fleet.set_rate(rate)
    victims = list(fleet.gateways)[:: max(1, len(fleet.gateways) // args.gap_gateways)]
    victims = victims[: args.gap_gateways]
    log(f"gap repair: {len(victims)} gateways lose a batch")
    time.sleep(rate * 2)
    wait_for(lambda: relay.depth() < 500, timeout=300, what="spool settled", interval=1)
    behind_s = caught_up(fleet, timeout=120)
    mine = set(victims)
    gaps_before = relay.open_gaps()
    opened0 = relay.counters().get("gaps_opened", 0)
    answered0 = len(fleet.replays)
    withheld0 = {gw: fleet.gateways[gw].withheld for gw in victims}
    others = [gw for gw in fleet.gateways if gw not in mine]
    es0 = es_per_gateway(es, "fleet-readings-*")
    fired0 = fleet.counts()["expected"]
    i0 = relay.indexed()
    t0 = time.monotonic()
    fleet.withhold(victims)
    # the gaps open when each victim's next batch or heartbeat arrives (one interval later);
    # a victim counts once the ledger has shown a gap of it (other gateways' gaps, a tail
    # still in transit when its heartbeat came, do not count)
    seen: set[str] = set()

    def all_seen() -> bool:
        seen.update(gw for gw, _ in relay.gap_rows(mine))
        return len(seen) >= len(victims)

    with contextlib.suppress(AssertionError):
        wait_for(all_seen, timeout=rate * 3 + 60, what="the ledger to open the gaps", interval=0.5)
    opened_s = time.monotonic() - t0
    wait_for(
        lambda: relay.open_gaps(mine) == 0,
        timeout=args.gap_timeout_s,
        what="every gap closed",
        interval=1,
    )
    closed_s = time.monotonic() - t0
    i1 = relay.indexed()
    fired1 = fleet.counts()["expected"]
    es1 = es_per_gateway(es, "fleet-readings-*")
    # the unaffected gateways meanwhile: readings they fired and readings of theirs indexed
    # over the same window (Elasticsearch per gateway, refreshed), and how many had new ones
    o_fired = sum(fired1[gw] - fired0[gw] for gw in others)
    o_indexed = sum(es1.get(gw, 0) - es0.get(gw, 0) for gw in others)
    o_fired_any = sum(1 for gw in others if fired1[gw] > fired0[gw])
    o_indexed_any = sum(1 for gw in others if es1.get(gw, 0) > es0.get(gw, 0))
    lost = sum(fleet.gateways[gw].withheld - withheld0[gw] for gw in victims)
    answers = fleet.replays[answered0:]
    return {
        "gateways_with_gaps": len(victims),
        "victims_seen_with_a_gap": len(seen),
        "gaps_opened_counter": relay.counters().get("gaps_opened", 0) - opened0,
        "generator_caught_up_before_s": behind_s,
        "other_open_gaps_before": gaps_before,
        "readings_withheld": lost,
        "gaps_opened_after_s": round(opened_s, 1),
        "all_closed_after_s": round(closed_s, 1),
        "closed_after_last_opened_s": round(closed_s - opened_s, 1),
        "unaffected": {
            "gateways": len(others),
            "window_s": round(closed_s, 1),
            "readings_fired": o_fired,
            "readings_indexed": o_indexed,
            "indexed_per_s": round(o_indexed / closed_s),
            "gateways_that_fired": o_fired_any,
            "gateways_with_new_readings_indexed": o_indexed_any,
        },
        "victims_gap_rows_by_state_after": relay.gap_states(mine),
        "replay_jobs_answered": len(answers),
        "replay_jobs_answered_ok": sum(1 for a in answers if a.get("result")),
        "fleet_indexed_per_s_meanwhile": round((i1 - i0) / closed_s),
        "fleet_fired_per_s_target": round(len(fleet.gateways) * args.sensors / rate),
        "relay_counters": {
            k: v
            for k, v in relay.counters().items()
            if k.startswith("replays") or k.startswith("gaps")
        },
    }


def main() -> None:
    args = parse_args()
    logging.getLogger().addHandler(DISCARDS)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # `timeout` sends SIGTERM: stop the daemons and print what was measured until then
    signal.signal(signal.SIGTERM, interrupted)
    out: dict[str, Any] = {}
    try:
        run(args, out)
    except (Exception, KeyboardInterrupt) as exc:  # print what was measured before it
        out["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
