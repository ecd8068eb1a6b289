"""``make bench BENCH=scaleout``: one relay for the fleet versus one relay per syndic master.

Prints one JSON document. Real parts on this machine: Elasticsearch (the test distribution, TLS
+ basic auth) and real salt-masters running the ``tributary_relay`` engine, each reading its own
event bus. Gateways' batches are signed with real RSA keys (1,000 readings each) and fired on a
master's bus as salt-syndic or a gateway would put them there.

Layouts, measured one after the other against the same Elasticsearch, alternated ``ROUNDS``
times (the figures drift with Elasticsearch from run to run):

* ``single``: one master, relay ``role: single``, all N readings of the ``SYNDICS x GATEWAYS``
  gateways on its bus (what the top master does today);
* ``per_syndic``: ``SYNDICS`` masters, each relay ``role: syndic``, each with N / SYNDICS
  readings of its own gateways fired on its own bus at the same time (what the syndic masters
  do in scale-out mode); readings/s is N over the time until both have indexed their share;
* ``top_skip``: the top master's relay in ``role: top``, its syndic relays live (their key sets
  and a receipt a second fired on its bus, signed with the syndics' keys), receiving the same N
  readings (salt-syndic still forwards every batch up): what the top's relay costs per reading
  when it skips them.

Figures per layout: readings/s, the relay engines' CPU (process and children) per reading, and
the whole salt-master process tree's CPU per reading (the bus, workers and engines). Per-core
estimate: readings/s one core carries = 1e6 / (CPU µs per reading), as gateways of ``10``
sensors reporting every ``10`` s (1 reading/s per gateway), not counting Elasticsearch.

Environment: ``TRIBUTARY_BENCH_N`` (default 100000), ``TRIBUTARY_BENCH_ROUNDS`` (default 3),
``TRIBUTARY_BENCH_SYNDICS`` (default 2), ``TRIBUTARY_BENCH_BATCH`` (readings per batch event,
default 1000; a fleet of small gateways sends a few dozen per beacon run).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src"), str(REPO / "bench")]

import run as B  # noqa: E402  (bench/run.py: daemons, keys, readings, counters)

from saltext.tributary.protocol import signing  # noqa: E402
from saltext.tributary.protocol.wire import encode_batch, row_count  # noqa: E402
from saltext.tributary.relay.elasticsearch import make_client  # noqa: E402
from saltext.tributary.relay.scaleout import RECEIPT_TAG, sign_receipt  # noqa: E402

N = int(os.environ.get("TRIBUTARY_BENCH_N", "100000"))
ROUNDS = int(os.environ.get("TRIBUTARY_BENCH_ROUNDS", "3"))
SYNDICS = int(os.environ.get("TRIBUTARY_BENCH_SYNDICS", "2"))
GATEWAYS = 2  # per syndic
#: readings per batch event (a gateway beacon run sends 1 to a few thousand)
BATCH = int(os.environ.get("TRIBUTARY_BENCH_BATCH", "1000"))
#: the sizing unit: a gateway of 10 sensors reporting every 10 s
GATEWAY_READINGS_PER_S = 1.0
log = B.log


class Master:
    """One salt-master with the relay engine, its bus and its spool."""

    def __init__(self, d: B.Daemons, root: pathlib.Path, name: str, relay: dict[str, Any]):
        import salt.config

        self.name = name
        self.spool = str(root / name / "relay.db")
        B.write_yaml(
            root / name / "master",
            {
                "log_level": "warning",
                "log_level_logfile": "warning",
                "user": "root",
                "id": name,
                "root_dir": str(root / name),
                "interface": "127.0.0.1",
                "publish_port": B.free_port(),
                "ret_port": B.free_port(),
                "worker_threads": 2,
                "engines_dirs": [str(REPO / "salt/_engines")],
                "engines": [{"tributary_relay": {**relay, "spool_path": self.spool}}],
            },
        )
        self.opts = salt.config.master_config(str(root / name / "master"))
        self.minions = pathlib.Path(self.opts["pki_dir"]) / "minions"
        self.minions.mkdir(parents=True, exist_ok=True)
        self.proc = d.start("salt-master", root / name)
        self.counters = B.Counters(self.spool)
        self._bus: Any = None
        self.engine: int | None = None
        #: Salt 3008's MasterEvent runs an IOLoop of its own: one thread fires at a time (the
        #: flusher and the receipts thread fire beside the burst; unlocked it raised "This
        #: event loop is already running" with 20-reading batches)
        self.lock = threading.Lock()

    def fire(self, data: dict[str, Any], tag: str) -> None:
        with self.lock:
            self.bus.fire_event(data, tag)

    @property
    def bus(self) -> Any:
        import salt.utils.event

        if self._bus is None:
            self._bus = salt.utils.event.get_master_event(
                self.opts, self.opts["sock_dir"], listen=False
            )
        return self._bus

    def accept(self, minion: str, pub: str) -> None:
        (self.minions / minion).write_text(pub)

    def fire_until_indexed(self, gateway: str, pki: str, prefix: str) -> None:
        """Fire a 10-reading batch until the relay indexed it (it listens; counters flow)."""
        batch = B.signed(
            encode_batch(f"{prefix}-warm", B.readings(10)), {"id": gateway, "pki_dir": pki}
        )
        base = self.counters.get().get(f"indexed@{gateway}", 0)

        def done() -> bool:
            self.fire(batch, f"salt/beacon/{gateway}/tributary_mqtt/batch")
            return self.counters.get().get(f"indexed@{gateway}", 0) >= base + 10

        B.wait(done, 180, f"{self.name} indexing a warm-up batch of {gateway}", 1.0)

    def settle(self) -> None:
        B.wait(lambda: os.path.exists(self.spool), 120, f"{self.name}'s spool", 0.5)
        self.engine = B.engine_pid(self.proc.pid)

    def cpu(self) -> tuple[float, float]:
        """(relay engine CPU s, whole master tree CPU s)."""
        eng = B.tree_cpu_s(self.engine) if self.engine else 0.0
        return eng, B.tree_cpu_s(self.proc.pid)


def batches_for(gateways: dict[str, str], epoch: str, n: int) -> list[tuple[str, dict]]:
    """``n`` readings as signed ``BATCH``-reading batches, round-robin over ``gateways``
    (id -> pki dir), each gateway's sequences consecutive in ``epoch``."""
    names = list(gateways)
    seqs = dict.fromkeys(names, 1)
    out = []
    for k in range(0, n, BATCH):
        gw = names[(k // BATCH) % len(names)]
        chunk = B.readings(min(BATCH, n - k), first=seqs[gw])
        seqs[gw] += len(chunk)
        batch = B.signed(encode_batch(epoch, chunk), {"id": gw, "pki_dir": gateways[gw]})
        out.append((gw, batch))
    return out


class Flusher:
    """A relay's counters reach its spool with a confirmed bulk: while a burst is awaited,
    a 10-reading batch of a gateway ``bench-flush`` (not part of the load) every 0.2 s."""

    def __init__(self, masters: list[Master], pki: str) -> None:
        self.masters, self.pki = masters, pki
        self.stop = threading.Event()
        self.n = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            self.n += 1
            b = B.signed(
                encode_batch(f"flush{time.time_ns()}", B.readings(10)),
                {"id": "bench-flush", "pki_dir": self.pki},
            )
            for m in self.masters:
                m.fire(b, "salt/beacon/bench-flush/tributary_mqtt/batch")

    def __enter__(self) -> Flusher:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def burst(
    masters: list[Master], loads: list[list[tuple[str, dict]]], goal: str, flush_pki: str
) -> dict:
    """Fire each master's load on its bus at once (a thread each) until each relay counted
    ``goal`` for every reading of its load; wall time and CPU."""
    want = []
    for m, load in zip(masters, loads, strict=True):
        c = m.counters.get()
        n = sum(row_count(b) for _, b in load)
        if goal == "indexed":
            want.append((m, {gw: c.get(f"indexed@{gw}", 0) for gw, _ in load}, n))
        else:
            want.append((m, {"owned_skipped": c.get("owned_skipped", 0)}, len(load)))
    cpu0 = [m.cpu() for m in masters]
    t = time.perf_counter()
    threads = [
        threading.Thread(
            target=lambda m=m, load=load: [
                m.fire(b, f"salt/beacon/{gw}/tributary_mqtt/batch") for gw, b in load
            ]
        )
        for m, load in zip(masters, loads, strict=True)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    def done() -> bool:
        for m, base, n in want:
            c = m.counters.get()
            got = sum(
                c.get(f"{goal}@{gw}" if goal == "indexed" else goal, 0) - v
                for gw, v in base.items()
            )
            if got < n:
                return False
        return True

    with Flusher(masters, flush_pki):
        B.wait(done, 600, f"{goal} of the burst", 0.05)
    dt = time.perf_counter() - t
    cpu1 = [m.cpu() for m in masters]
    readings = sum(sum(row_count(b) for _, b in load) for load in loads)
    eng = sum(c1[0] - c0[0] for c0, c1 in zip(cpu0, cpu1, strict=True))
    tree = sum(c1[1] - c0[1] for c0, c1 in zip(cpu0, cpu1, strict=True))
    return {
        "readings": readings,
        "seconds": round(dt, 2),
        "readings_per_s": round(readings / dt),
        "engine_cpu_us_per_reading": round(eng / readings * 1e6, 2),
        "master_tree_cpu_us_per_reading": round(tree / readings * 1e6, 2),
    }


def live_on_top(spool: str, syndics: list[str], gateways: dict[str, Any]) -> bool:
    """The top relay took every syndic's receipt and key set (it skips their gateways)."""
    import sqlite3

    if not os.path.exists(spool):
        return False
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=10)
    try:
        relays = {r[0] for r in db.execute("SELECT syndic FROM scaleout_relays")}
        bound = {r[0] for r in db.execute("SELECT gateway FROM gateway_keys")}
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return relays >= set(syndics) and bound >= set(gateways)


def main() -> None:
    from tests.support.es import start_elasticsearch

    out: dict[str, Any] = {
        "machine": B.machine(),
        "n": N,
        "rounds": ROUNDS,
        "syndics": SYNDICS,
        "gateways_per_syndic": GATEWAYS,
        "readings_per_batch": BATCH,
    }
    root = pathlib.Path(tempfile.mkdtemp(prefix="tributary-bench-scaleout-"))
    log("starting Elasticsearch")
    node = start_elasticsearch(tls=True)
    d = B.Daemons()
    stop = threading.Event()
    try:
        out["machine"]["elasticsearch"] = node.version
        client = make_client({**node.client_config, "request_timeout": 120})
        base = {
            "elasticsearch": {**node.client_config, "replicas": 0},
            "bulk": {"max_docs": 5000, "max_wait_s": 0.05},
            "anomalies": {"enabled": False},
            "health": {"enabled": False},
            "metrics_interval_s": 0,
            "gaps": {"enabled": False},
        }
        syndic_ids = [f"bench-syn-{i + 1}" for i in range(SYNDICS)]
        keys = {s: B.make_key(root / "keys" / s) for s in syndic_ids}
        gws = {
            s: {
                f"{s}-gw-{j + 1}": B.make_key(root / "keys" / f"{s}-gw-{j + 1}")
                for j in range(GATEWAYS)
            }
            for s in syndic_ids
        }
        flush_key = B.make_key(root / "keys" / "bench-flush")
        all_gws = {gw: k for s in syndic_ids for gw, k in gws[s].items()}

        log("starting the masters")
        single = Master(d, root, "bench-single", {**base, "index_prefix": "bso-single"})
        single.accept("bench-flush", flush_key[1])
        per = [
            Master(
                d,
                root,
                s,
                {
                    **base,
                    "index_prefix": "bso-syndic",
                    "scaleout": {"role": "syndic", "syndic_id": s},
                },
            )
            for s in syndic_ids
        ]
        top = Master(
            d,
            root,
            "bench-top",
            {
                **base,
                "index_prefix": "bso-top",
                "trusted_syndics": syndic_ids,
                "scaleout": {"role": "top", "syndic_relays": syndic_ids, "takeover_s": 30},
            },
        )
        for gw, (_pki, pub) in all_gws.items():
            single.accept(gw, pub)
        for m, s in zip(per, syndic_ids, strict=True):
            for gw, (_pki, pub) in gws[s].items():
                m.accept(gw, pub)
            m.accept("bench-flush", flush_key[1])
        for s in syndic_ids:
            top.accept(s, keys[s][1])
        top.accept("bench-flush", flush_key[1])
        for m in (single, *per, top):
            m.settle()
        for prefix in ("bso-single", "bso-syndic", "bso-top"):
            B.wait(
                lambda p=prefix: client.indices.exists_index_template(name=f"{p}-readings"),
                120,
                f"{prefix} templates",
                0.5,
            )
        # warm each relay (it listens, the JVM is warm) with one gateway of its own
        first = next(iter(all_gws))
        single.fire_until_indexed(first, all_gws[first][0], "single")
        for m, s in zip(per, syndic_ids, strict=True):
            gw = next(iter(gws[s]))
            m.fire_until_indexed(gw, gws[s][gw][0], s)
        top.fire_until_indexed("bench-flush", flush_key[0], "top")

        # the top's syndic relays are live: their key sets (every 5 s) and a receipt a second
        def receipts() -> None:
            ts = int(time.time() * 1000)
            n = 0
            while not stop.is_set():
                if n % 5 == 0:
                    for s in syndic_ids:
                        ks = signing.sign_keyset(
                            s,
                            {gw: k[1] for gw, k in gws[s].items()},
                            os.path.join(keys[s][0], "minion.pem"),
                        )
                        top.fire(ks, f"tributary/keys/{s}")
                n += 1
                ts = max(ts + 1, int(time.time() * 1000))
                for s in syndic_ids:
                    data = {
                        "v": 1,
                        "syndic": s,
                        "ts_ms": ts,
                        "full": False,
                        "spool": [0, None],
                        "ranges": [],
                    }
                    top.fire(
                        sign_receipt(s, data, os.path.join(keys[s][0], "minion.pem")),
                        RECEIPT_TAG.format(syndic=s),
                    )
                stop.wait(1.0)

        threading.Thread(target=receipts, daemon=True).start()
        B.wait(
            lambda: live_on_top(top.spool, syndic_ids, all_gws),
            60,
            "the syndic relays live on the top",
            0.5,
        )
        for m in (single, *per, top):
            if m.engine:
                B.wait(lambda m=m: B.settled(m.engine), 60, f"{m.name} engine to settle")

        rounds = []
        for k in range(ROUNDS):
            log(f"round {k + 1}/{ROUNDS}: single relay, then one per syndic, then the top skipping")
            r: dict[str, Any] = {}
            r["single"] = burst(
                [single],
                [batches_for({g: v[0] for g, v in all_gws.items()}, f"s{k}", N)],
                "indexed",
                flush_key[0],
            )
            loads = [
                batches_for({g: v[0] for g, v in gws[s].items()}, f"p{k}", N // SYNDICS)
                for s in syndic_ids
            ]
            r["per_syndic"] = burst(per, loads, "indexed", flush_key[0])
            top_load = batches_for({g: v[0] for g, v in all_gws.items()}, f"t{k}", N)
            r["top_skip"] = burst([top], [top_load], "owned_skipped", flush_key[0])
            c = top.counters.get()
            r["top_skip"]["indexed_by_top_total"] = sum(c.get(f"indexed@{g}", 0) for g in all_gws)
            log(json.dumps(r))
            rounds.append(r)
        out["rounds"] = rounds
        med = {
            lay: {
                key: statistics.median(r[lay][key] for r in rounds)
                for key in (
                    "readings_per_s",
                    "engine_cpu_us_per_reading",
                    "master_tree_cpu_us_per_reading",
                )
            }
            for lay in ("single", "per_syndic", "top_skip")
        }
        out["median"] = med
        out["per_syndic_over_single"] = round(
            med["per_syndic"]["readings_per_s"] / med["single"]["readings_per_s"], 3
        )
        # gateways (1 reading/s each) one core carries, from the master trees' CPU per reading
        out["gateways_per_core"] = {
            "single_top_master": round(
                1e6 / med["single"]["master_tree_cpu_us_per_reading"] / GATEWAY_READINGS_PER_S
            ),
            "scaleout_top_master": round(
                1e6 / med["top_skip"]["master_tree_cpu_us_per_reading"] / GATEWAY_READINGS_PER_S
            ),
            "scaleout_syndic_master": round(
                1e6 / med["per_syndic"]["master_tree_cpu_us_per_reading"] / GATEWAY_READINGS_PER_S
            ),
        }
    except Exception as exc:  # report what was measured so far
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        d.stop_all()
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
