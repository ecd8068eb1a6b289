"""The top master's relay state and runners at fleet size, without thousands of processes.

    .venv/bin/python bench/fleet_state.py                 # 2,000 gateways, a week, 600 s steps
    .venv/bin/python bench/fleet_state.py --interval 30   # the beacon's own 30 s (slow)

Builds, in a scratch directory, the state the relay engine keeps for ``--gateways`` gateways
(``--sensors`` sensors each, ``--sites`` sites) behind ``--syndics`` syndic masters after a
simulated week, through the library functions the engine calls when things arrive:

* every step (``--interval`` simulated seconds) each gateway's batch and signed heartbeat are
  spooled (``RelaySpool.put``, as intake does) and then confirmed as the shipper's ``finish``
  does, one write transaction per bulk: ``Ledger.add_range`` for the batch's sequence range,
  ``Ledger.heartbeat`` for the heartbeat's ``epoch``/``last_seq``, the heartbeat's facts row,
  the rows leave the spool (``RelaySpool.done``) and the fleet and per-gateway counters are
  bumped (``RelaySpool.bump``). The heartbeat is built with the gateway's own
  ``health.event``; each batch carries ``--sensors`` readings per 30 s of simulated time;
* gateways restart now and then with a new epoch (``--epochs-per-week`` on average);
* a batch is lost now and then (``--loss``) and replayed an hour later (its range is added
  then), as gap repair does; a few gaps are given up (``Ledger.give_up``);
* every simulated hour, as the gap repairer and the syndics' ``tributary_keys`` engines do:
  ``Ledger.refresh``, ``Ledger.prune(keep_s)``, and one key set per syndic (``--per-syndic``
  gateways each, a few claimed by a second syndic: conflicts) through ``Keyring.take`` in a
  spool transaction, as intake takes them;
* at the end of the week: ``--open-gaps`` gateways have open gaps (a batch of the last few
  minutes lost, and for one in ten the tail after it: heartbeat ahead of the ledger), one site
  and some scattered gateways fell silent 2 hours ago, and the health layers are evaluated
  once (``HealthMonitor.check`` with the relay's heartbeat facts, into the real
  ``FindingBook``; no detector models, so no sensor findings).

Timestamps are simulated (the week ends now); everything else is real: SQLite files on disk,
the ledger's and keyring's own SQL. The runners are then loaded through ``salt.loader.runner``
with a master config whose ``tributary_relay`` engine points at that spool, as
``salt-run`` would, and ``tributary.status``, ``tributary.gaps`` and ``tributary.health`` are
timed (``check_es=False``: no Elasticsearch here) in their default (fleet summary) form and
with per-gateway detail. Output size is the bytes of the JSON of what the runner returns.
The default calls are also timed through the ``salt-run`` command line itself (a fresh
process per call, as an operator runs it: Salt's start-up, the loader importing the runner
module, the call and the JSON outputter), beside ``salt-run test.arg`` for Salt's own cost.

Prints one JSON document. ``--profile NAME`` prints a cProfile of runner NAME instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import salt.config  # noqa: E402
import salt.loader  # noqa: E402

from saltext.tributary.analysis import health as analysis_health  # noqa: E402
from saltext.tributary.gateway.sources import health as gw_health  # noqa: E402
from saltext.tributary.relay import status as relay_status  # noqa: E402
from saltext.tributary.relay.spool import RelaySpool  # noqa: E402

WEEK_S = 7 * 86400
HOUR_S = 3600
READING_EVERY_S = 30  # each sensor's reading interval (simulated)
#: per transaction, as one confirmed bulk: bulk.max_docs (5,000) readings of 10-reading batches
ROWS_PER_BULK = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gateways", type=int, default=2000)
    p.add_argument("--sensors", type=int, default=10)
    p.add_argument("--syndics", type=int, default=4)
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument(
        "--interval", type=float, default=600.0, help="simulated seconds between heartbeats"
    )
    p.add_argument("--epochs-per-week", type=float, default=2.0)
    p.add_argument("--loss", type=float, default=0.0005, help="share of batches lost")
    p.add_argument("--open-gaps", type=int, default=200)
    p.add_argument("--silent", type=int, default=20, help="scattered silent gateways")
    p.add_argument("--conflicts", type=int, default=5)
    p.add_argument("--keep-s", type=float, default=30 * 86400.0, help="gaps.keep_s")
    p.add_argument("--repeat", type=int, default=3, help="runs of each runner call")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--profile", default=None, help="cProfile this runner call, e.g. status")
    p.add_argument("--calls", default=None, help="only these runner calls (comma-separated)")
    p.add_argument(
        "--no-salt-run",
        dest="salt_run",
        action="store_false",
        help="skip timing the salt-run command line (a fresh process per call)",
    )
    return p.parse_args(argv)


def pubkeys(n: int) -> list[str]:
    """``n`` real RSA public keys (PEM), shared round-robin by the simulated gateways (the
    keyring stores the PEM text; generating 2,000 RSA keys would take minutes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    out = []
    for _ in range(n):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        out.append(
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
    return out


class Gateway:
    __slots__ = ("epoch", "n_epochs", "name", "pending", "seq", "site", "syndic")

    def __init__(self, name: str, site: str, syndic: str) -> None:
        self.name, self.site, self.syndic = name, site, syndic
        self.epoch = ""
        self.seq = 0
        self.n_epochs = 0
        #: lost ranges to replay: (due_at, epoch, lo, hi)
        self.pending: list[tuple[float, str, int, int]] = []


def new_epoch(gw: Gateway, rnd: random.Random) -> None:
    gw.n_epochs += 1
    gw.epoch = f"{rnd.getrandbits(48):012x}"
    gw.seq = 0


def heartbeat(gw: Gateway, t_ms: int, rnd: random.Random) -> dict[str, Any]:
    """A heartbeat as the gateway's ``tributary_health`` beacon builds it (without ``sig``,
    which the planner strips before keeping the facts; ``_stamp`` is dropped at intake)."""
    metrics = {
        "cpu_temp_c": round(45 + rnd.random() * 10, 3),
        "load1": round(rnd.random(), 3),
        "load5": 0.4,
        "load15": 0.3,
        "mem_total_bytes": 1_024_000_000,
        "mem_available_bytes": 600_000_000,
        "mem_used_pct": 41.41,
        "disk_total_bytes": 31_000_000_000,
        "disk_free_bytes": 20_000_000_000,
        "disk_used_pct": 35.48,
        "uptime_s": 86_400.0,
        "spool_unsent": 0,
        "spool_held": 0,
        "dropped": 0,
        "counters": {"received": gw.seq, "spooled": gw.seq, "emitted": gw.seq, "filtered": 0},
        "numbered_seq": gw.seq,
        "broker": "connected",
    }
    hb = gw_health.event(gw.epoch, gw.seq, metrics, t_ms)
    hb["site"] = gw.site
    hb["grains"] = {"role": "gateway"}
    hb.pop("_stamp", None)
    return hb


def simulate(args: argparse.Namespace, spool_path: str, state_path: str) -> dict[str, Any]:
    rnd = random.Random(args.seed)
    end = time.time()
    start = end - args.days * 86400
    step = float(args.interval)
    per_batch = max(1, round(args.sensors * step / READING_EVERY_S))
    syndics = [f"syndic-{i + 1}" for i in range(args.syndics)]
    per_syndic = -(-args.gateways // args.syndics)
    gws = [
        Gateway(
            f"gw-{i:05d}",
            f"site-{i % args.sites:03d}",
            syndics[min(i // per_syndic, len(syndics) - 1)],
        )
        for i in range(args.gateways)
    ]
    by_name = {g.name: g for g in gws}
    for gw in gws:
        new_epoch(gw, rnd)
    keys = pubkeys(8)
    p_restart = args.epochs_per_week * step / WEEK_S
    last_steps = 3  # the final steps, where the end-of-week gaps are made
    steps = int((end - start) // step)
    open_gap_gws = set(rnd.sample(range(args.gateways), min(args.open_gaps, args.gateways)))
    silent_site = "site-007"
    silent = {i for i, g in enumerate(gws) if g.site == silent_site} | set(
        rnd.sample(range(args.gateways), min(args.silent, args.gateways))
    )
    silent_from = end - 2 * HOUR_S
    spool = RelaySpool(spool_path)
    stats = {"steps": steps, "batches": 0, "heartbeats": 0, "readings": 0, "lost_batches": 0}
    stats.update(replayed_batches=0, given_up=0, keysets=0, refresh_s=[], prune_s=[], epochs=0)
    next_hour = start
    ukey = 0
    sim_started = time.perf_counter()
    for k in range(steps):
        t = start + (k + 1) * step
        t_ms = int(t * 1000)
        rows: list[tuple[Gateway, str, Any]] = []
        for i, gw in enumerate(gws):
            if i in silent and t > silent_from:
                continue
            if rnd.random() < p_restart:
                new_epoch(gw, rnd)
                stats["epochs"] += 1
            lo, hi = gw.seq + 1, gw.seq + per_batch
            gw.seq = hi
            lost = rnd.random() < args.loss
            if i in open_gap_gws and k == steps - last_steps:
                lost = True  # open now: lost a few minutes before the end
            tail = i in open_gap_gws and i % 10 == 0 and k >= steps - 1
            if lost:
                stats["lost_batches"] += 1
                if k < steps - last_steps:
                    gw.pending.append((t + HOUR_S, gw.epoch, lo, hi))
            elif not tail:
                rows.append((gw, "batch", (gw.epoch, lo, hi)))
            rows.append((gw, "health", heartbeat(gw, t_ms, rnd)))
            for due in [p for p in gw.pending if p[0] <= t]:
                gw.pending.remove(due)
                rows.append((gw, "batch", due[1:]))
                stats["replayed_batches"] += 1
        for n in range(0, len(rows), ROWS_PER_BULK):
            bulk = rows[n : n + ROWS_PER_BULK]
            ids = []
            for gw, kind, data in bulk:  # intake: spooled as they come off the bus
                ukey += 1
                body = (
                    data
                    if kind == "health"
                    else {"v": 1, "epoch": data[0], "first": data[1], "last": data[2]}
                )
                spool.put(gw.name, kind, f"{kind}:{ukey}", body, verified=1)
                ids.append(spool.db.execute("SELECT last_insert_rowid()").fetchone()[0])
            counts: dict[Any, int] = {}
            with spool.transaction():  # shipper.finish: ledger, facts, rows leave, counters
                for gw, kind, data in bulk:
                    if kind == "batch":
                        ep, lo, hi = data
                        spool.ledger.add_range(gw.name, ep, lo, hi, now=t)
                        counts[("indexed", gw.name)] = counts.get(("indexed", gw.name), 0) + (
                            hi - lo + 1
                        )
                        counts["indexed"] = counts.get("indexed", 0) + hi - lo + 1
                        stats["batches"] += 1
                        stats["readings"] += hi - lo + 1
                    else:
                        spool.ledger.heartbeat(gw.name, data["epoch"], data["last_seq"], now=t)
                        body = json.dumps({"received_ms": t_ms, **data}, default=str)
                        spool.db.execute(
                            "INSERT OR REPLACE INTO heartbeat_facts VALUES (?,?)",
                            (gw.name, body[:8192]),
                        )
                        stats["heartbeats"] += 1
                spool.done(ids)
                counts["batches_in"] = len(bulk)
                spool.bump(counts)
        if k and k % max(1, int(86400 // step)) == 0:
            print(
                f"simulated day {k * step / 86400:.0f}: {time.perf_counter() - sim_started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        if t >= next_hour:  # the gap repairer's pass and the syndics' key sets
            next_hour = t + HOUR_S
            t0 = time.perf_counter()
            with spool.transaction():
                spool.ledger.refresh(t)
            stats["refresh_s"].append(time.perf_counter() - t0)
            if rnd.random() < 0.3:  # now and then a gap is given up (the gateway lost it)
                gaps = spool.ledger.gaps(include_given_up=False)
                if gaps:
                    gap = rnd.choice(gaps)
                    with spool.transaction():
                        spool.ledger.give_up(gap, "gateway no longer holds range")
                    stats["given_up"] += 1
                    owner = by_name[gap.gateway]  # ... so it never replays it
                    owner.pending = [
                        p
                        for p in owner.pending
                        if not (p[1] == gap.epoch and p[2] <= gap.hi and p[3] >= gap.lo)
                    ]
            t0 = time.perf_counter()
            spool.ledger.prune(args.keep_s, t)
            stats["prune_s"].append(time.perf_counter() - t0)
            for s_i, syndic in enumerate(syndics):
                mine = {
                    g.name: keys[j % len(keys)] for j, g in enumerate(gws) if g.syndic == syndic
                }
                if s_i == 1:  # a few gateways of syndic-1 also claimed by syndic-2: conflicts
                    for g in gws[: args.conflicts]:
                        mine[g.name] = keys[0]
                with spool.transaction():
                    spool.keyring.take(syndic, t_ms, mine, 600_000)
                stats["keysets"] += 1
    with spool.transaction():
        spool.ledger.refresh(end)
    stats["simulate_s"] = round(time.perf_counter() - sim_started, 1)
    # the health layers once, from the relay's heartbeat facts, into the real finding book
    book = analysis_health.FindingBook(state_path)
    try:
        monitor = analysis_health.HealthMonitor(
            analysis_health.HealthConfig(heartbeat_s=step),
            lambda: relay_status.heartbeat_facts(spool),
            book,
        )
        monitor.check([], {}, int(end * 1000))
        stats["open_findings"] = len(book.open())
    finally:
        book.close()
    refresh, prune = stats.pop("refresh_s"), stats.pop("prune_s")
    stats["ledger_refresh_ms"] = {
        "median": round(statistics.median(refresh) * 1000, 1),
        "max": round(max(refresh) * 1000, 1),
    }
    stats["ledger_prune_ms"] = {
        "median": round(statistics.median(prune) * 1000, 1),
        "max": round(max(prune) * 1000, 1),
    }
    stats["epochs_started"] = sum(g.n_epochs for g in gws)
    spool.close()
    return stats


def table_sizes(path: str) -> dict[str, Any]:
    """Rows and bytes (pages of the table and its indexes, ``dbstat``) per table."""
    out: dict[str, Any] = {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        try:
            pages = dict(
                db.execute(
                    "SELECT m.tbl_name, SUM(s.pgsize) FROM dbstat s"
                    " JOIN sqlite_master m ON m.name = s.name GROUP BY m.tbl_name"
                )
            )
        except sqlite3.OperationalError:  # SQLite built without dbstat
            pages = {}
        for name in names:
            (rows,) = db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
            out[name] = {"rows": rows, "bytes": pages.get(name)}
    return out


def master_opts(root: str, spool_path: str, state_path: str, interval: float) -> dict[str, Any]:
    opts = salt.config.master_config(None)
    opts.update(
        cachedir=os.path.join(root, "cache"),
        pki_dir=os.path.join(root, "pki"),
        runner_dirs=[str(REPO / "salt" / "_runners")],
        engines=[
            {
                "tributary_relay": {
                    "elasticsearch": {"hosts": ["https://127.0.0.1:1"]},
                    "spool_path": spool_path,
                    "trusted_syndics": ["syndic-1", "syndic-2", "syndic-3", "syndic-4"],
                    "anomalies": {"state_path": state_path},
                    # the gateways' heartbeat interval (here the simulated one)
                    "health": {"heartbeat_s": interval},
                }
            }
        ],
    )
    return opts


#: (label, runner, kwargs): the default (fleet summary) answers, then per-gateway detail
CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("status", "tributary.status", {"check_es": False}),
    ("gaps", "tributary.gaps", {}),
    ("health", "tributary.health", {"check_es": False}),
    ("status_one_gateway", "tributary.status", {"check_es": False, "gateway": "gw-00042"}),
    ("status_one_site", "tributary.status", {"check_es": False, "site": "site-003"}),
    ("gaps_detail", "tributary.gaps", {"detail": True}),
    ("health_one_site", "tributary.health", {"check_es": False, "site": "site-007"}),
    ("status_detail", "tributary.status", {"check_es": False, "detail": True}),
    ("health_detail", "tributary.health", {"check_es": False, "detail": True}),
]


def measure(runners: Any, repeat: int, only: set[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    _ = runners["tributary.status"]  # the lazy loader imports the runner module here
    out: dict[str, Any] = {"module_load_s": round(time.perf_counter() - t0, 3)}
    for label, name, kwargs in CALLS:
        if only and label not in only:
            continue
        times, size = [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            ret = runners[name](**kwargs)
            times.append(time.perf_counter() - t0)
            size = len(json.dumps(ret, default=str).encode())
        out[label] = {
            "call": " ".join([name, *(f"{k}={v}" for k, v in kwargs.items())]),
            "seconds_median": round(statistics.median(times), 3),
            "seconds_max": round(max(times), 3),
            "json_bytes": size,
        }
    return out


#: ``salt-run`` calls timed as an operator runs them (a fresh process each: Salt's start-up,
#: the loader importing the runner module, the call, the JSON outputter); ``test.arg`` is
#: Salt's own cost of a trivial runner, for comparison.
SALT_RUN_CALLS: list[tuple[str, list[str]]] = [
    ("test.arg", ["test.arg"]),
    ("status", ["tributary.status", "check_es=False"]),
    ("gaps", ["tributary.gaps"]),
    ("health", ["tributary.health", "check_es=False"]),
]


def measure_salt_run(opts: dict[str, Any], root: str, repeat: int) -> dict[str, Any]:
    """Wall time and stdout bytes of ``salt-run -c <conf> <call> --out json``."""
    import subprocess

    import yaml

    conf = os.path.join(root, "conf")
    os.makedirs(conf, exist_ok=True)
    os.makedirs(os.path.join(opts["cachedir"], "proc"), exist_ok=True)
    master = {
        "root_dir": "/",
        "cachedir": opts["cachedir"],
        "pki_dir": opts["pki_dir"],
        "sock_dir": os.path.join(root, "sock"),
        "log_file": os.path.join(root, "master.log"),
        "runner_dirs": opts["runner_dirs"],
        "engines": opts["engines"],
    }
    with open(os.path.join(conf, "master"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(master, fh)
    salt_run = os.path.join(os.path.dirname(sys.executable), "salt-run")
    out: dict[str, Any] = {}
    for label, call in SALT_RUN_CALLS:
        times, size = [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [salt_run, "-c", conf, *call, "--out", "json"],
                capture_output=True,
                check=False,
                timeout=300,
            )
            times.append(time.perf_counter() - t0)
            size = len(proc.stdout)
            if proc.returncode != 0:
                raise RuntimeError(f"salt-run {' '.join(call)}: {proc.stderr.decode()[-2000:]}")
        out[label] = {
            "call": "salt-run " + " ".join(call),
            "seconds_median": round(statistics.median(times), 3),
            "seconds_max": round(max(times), 3),
            "stdout_bytes": size,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        root = args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-"))
        os.makedirs(root, exist_ok=True)
        spool_path = os.path.join(root, "relay.db")
        state_path = os.path.join(root, "analysis.db")
        for p in (spool_path, state_path):
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p + suffix)
        sim = simulate(args, spool_path, state_path)
        opts = master_opts(root, spool_path, state_path, args.interval)
        runners = salt.loader.runner(opts)
        if args.profile:
            label = {c[0]: c for c in CALLS}[args.profile]
            runners[label[1]](**label[2])  # the module is loaded (imported) by the first call
            prof = cProfile.Profile()
            prof.enable()
            runners[label[1]](**label[2])
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
            print(buf.getvalue())
            return 0
        timings = measure(runners, args.repeat, set(args.calls.split(",")) if args.calls else None)
        salt_run = measure_salt_run(opts, root, args.repeat) if args.salt_run else None
        tables = table_sizes(spool_path)
        pick = {
            "ledger": ("ledger_ranges", "ledger_heads", "ledger_gaps"),
            "keys": ("gateway_keys", "key_sources", "key_conflicts"),
            "spool": ("batches", "heartbeat_facts", "counters", "gateway_counters"),
        }
        report = {
            "fleet": {
                "gateways": args.gateways,
                "sensors_per_gateway": args.sensors,
                "syndics": args.syndics,
                "sites": args.sites,
                "days": args.days,
                "heartbeat_interval_s": args.interval,
                "readings_per_batch": max(1, round(args.sensors * args.interval / 30)),
                "keep_s": args.keep_s,
            },
            "simulation": sim,
            "runners": timings,
            "salt_run": salt_run,
            "sizes": {
                group: {name: tables.get(name) for name in names} for group, names in pick.items()
            },
            "files": {
                "relay_db_bytes": os.path.getsize(spool_path),
                "analysis_db_bytes": os.path.getsize(state_path),
            },
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
