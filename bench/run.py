"""``make bench``: Tributary's pipeline figures from one run against one Elasticsearch.

Prints one JSON document. Everything runs on this machine with real parts: Elasticsearch (the
test distribution, TLS + basic auth), a real salt-master with the ``tributary_relay`` engine, a
syndic master + salt-syndic below it, one gateway salt-minion with the ``tributary_mqtt`` beacon
and its own Mosquitto broker.

Figures (issue 4 targets in brackets; benchmarks, never test assertions):

* ``raw_bulk``: ``_bulk`` create rate of N pre-built reading documents (readings/s).
* ``relay``: the same N readings arriving as signed batch events on the top master's bus,
  through the relay engine (spool, verify, bulk) into Elasticsearch; ratio to raw [>= 0.9].
* ``naive_relay``: one document per event with one index request each (what Salt's old
  Elasticsearch returner did), on the same bus and cluster.
* ``end_to_end``: readings published to the gateway's broker -> beacon -> syndic master ->
  salt-syndic -> top master -> relay -> Elasticsearch; ratio to raw [>= 0.5].
* ``backlog_drain``: a 100k-reading backlog in the gateway spool drained by the beacon through
  the same path (end to end without the MQTT intake).
* ``replay``: ``salt <gw> tributary.replay`` of a 100k-reading backlog through the syndic, until
  the relay has confirmed all of it [>= 10k readings/s].
* ``latency``: sensor (MQTT publish) to searchable (visible to a search), p50 [<= 1.5 s].
* ``soak``: relay engine RSS over a soak at a steady rate (``TRIBUTARY_BENCH_SOAK_S``, default
  60 s; 600 for the 10-minute check) [flat within 10 %].
* ``signing``: sign (gateway) and verify (relay) cost per batch; ``wire``: bytes per reading.
* ``gateway``: ``bench/gateway.py``'s ``run()`` when present.

Environment: ``TRIBUTARY_BENCH_N`` (default 100000), ``TRIBUTARY_BENCH_E2E_N`` (MQTT readings
for the end-to-end rate, default 20000), ``TRIBUTARY_BENCH_SOAK_S``,
``TRIBUTARY_BENCH_ANOMALIES=0`` turns the detector off, ``TRIBUTARY_BENCH_RULES=100`` adds
that many alert rules, ``TRIBUTARY_BENCH_SKIP_GATEWAY=1`` skips ``bench/gateway.py``,
``TRIBUTARY_BENCH_ROUNDS`` (default 3: raw/relay and raw/end-to-end pairs, medians),
``TRIBUTARY_BENCH_SKIP`` (``es_down,naive_relay``) leaves those sections out,
``TRIBUTARY_RELAY_STAGE_CPU=0`` turns the relay's CPU-per-stage counters off,
``TRIBUTARY_BENCH_STOP_AFTER`` (``relay``, ``end_to_end`` or ``latency``) ends the pipeline
after that section.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

from saltext.tributary.gateway.beacons import finalize_batch  # noqa: E402
from saltext.tributary.protocol import signing  # noqa: E402
from saltext.tributary.protocol.wire import (  # noqa: E402
    SpooledReading,
    bytes_per_reading,
    encode_batch,
    pack_rows,
)
from saltext.tributary.relay.elasticsearch import install_templates, make_client  # noqa: E402
from saltext.tributary.relay.ledger import Ledger  # noqa: E402
from tests.support.topology import NEEDS_UPLINK  # noqa: E402

N = int(os.environ.get("TRIBUTARY_BENCH_N", "100000"))
#: Raw/relay (and raw/end-to-end) pairs measured one after the other in one run.
ROUNDS = int(os.environ.get("TRIBUTARY_BENCH_ROUNDS", "3"))
SOAK_S = float(os.environ.get("TRIBUTARY_BENCH_SOAK_S", "60"))
#: Stop after one section ("relay", "end_to_end", "latency"): quicker runs while tuning.
STOP_AFTER = os.environ.get("TRIBUTARY_BENCH_STOP_AFTER", "")
#: Sections to leave out ("es_down,naive_relay"): quicker relay and end-to-end runs.
SKIP = set(os.environ.get("TRIBUTARY_BENCH_SKIP", "").split(","))
GW = "bench-gw-1"
VENV_BIN = pathlib.Path(sys.executable).parent


def machine() -> dict[str, Any]:
    """What a bench ran on: CPUs, platform, Python and Salt versions."""
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import salt.version

        out["salt"] = salt.version.__version__
    except ImportError:
        pass
    return out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_yaml(path: pathlib.Path, data: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def wait(pred, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise RuntimeError(f"bench: timed out waiting for {what}")


def readings(n: int, first: int = 1, sensors: int = 20) -> list[SpooledReading]:
    t0 = int(time.time() * 1000) - n
    return [
        SpooledReading(
            first + i, f"s{i % sensors}/temperature", "C", t0 + i, round(20 + (i % 997) / 100, 2)
        )
        for i in range(n)
    ]


def bench_rules(n: int) -> list[dict[str, Any]]:
    """``n`` alert rules that all look at the bench's readings (site ``bench``, sensors
    ``s0``..``s19``): thresholds with a hold and a clear, rates and absences, none firing."""
    kinds = [
        {"above": 1e6, "for_s": 60, "clear_below": 1e5},
        {"below": -1e6, "for_s": 60, "clear_above": -1e5},
        {"rate_above": 1e6},
        {"absent_s": 3600},
    ]
    return [
        {
            "name": f"bench-{i}",
            "match": {"site": "bench", "sensor": f"s{i % 20}*", "metric": "temperature"},
            "when": kinds[i % 4],
        }
        for i in range(n)
    ]


def make_key(folder: pathlib.Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "minion.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return str(folder), pub.decode()


def signed(batch: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """A batch as a gateway sends it (``finalize_batch``: rows packed, emit time, signature)."""
    return finalize_batch(batch, opts)


# -- in-process figures ----------------------------------------------------------------------
def signing_cost(pki: str, pub: str) -> dict[str, Any]:
    out: dict[str, Any] = {"key": "RSA 2048 (Salt's default minion key size)"}
    for rows in (500, 4000):
        batch = pack_rows(encode_batch("bench", readings(rows)))  # as a gateway sends it
        reps = 200
        t = time.perf_counter()
        for _ in range(reps):
            signing.sign_batch(batch, {"id": GW, "pki_dir": pki})
        sign_s = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            signing.verify_batch(GW, batch, pub)
        verify_s = (time.perf_counter() - t) / reps
        out[f"batch_{rows}_readings"] = {
            "sign_ms": round(sign_s * 1000, 3),
            "verify_ms": round(verify_s * 1000, 3),
            "sign_us_per_reading": round(sign_s / rows * 1e6, 3),
            "verify_us_per_reading": round(verify_s / rows * 1e6, 3),
        }
    return out


def wire_bytes() -> dict[str, Any]:
    rows = readings(4000)
    plain = [encode_batch("3f9c2a1b7d10", rows[i : i + 500]) for i in range(0, 4000, 500)]
    signed = [dict(b, sig="x" * 344) for b in plain]  # a 2048-bit signature is 344 base64 chars
    return {
        "unsigned_500_row_batches": round(bytes_per_reading(plain), 2),
        "signed_500_row_batches": round(bytes_per_reading(signed), 2),
    }


def raw_bulk(client: Any, n: int, prefix: str = "benchraw") -> dict[str, Any]:
    now = int(time.time() * 1000)
    docs = []
    for r in readings(n):
        did = f"raw:{r.seq}"
        docs.append(f'{{"create":{{"_index":"{prefix}-readings-x","_id":"{did}"}}}}')
        docs.append(
            json.dumps(
                {
                    "@timestamp": r.ts_ms,
                    "gateway": "raw",
                    "site": "bench",
                    "sensor": r.key.split("/")[0],
                    "metric": "temperature",
                    "value": r.value,
                    "unit": "C",
                    "seq": r.seq,
                    "epoch": "raw",
                    # the relay's documents carry their lag per hop (see relay.documents.hops)
                    "hop_ms": {"relay": 20},
                    "relayed_at": now,
                }
            )
        )
    client.indices.create(index=f"{prefix}-readings-x")  # as the relay pre-creates its own
    t = time.perf_counter()
    for i in range(0, len(docs), 10_000):
        resp = client.bulk(operations="\n".join(docs[i : i + 10_000]) + "\n", refresh=False)
        assert not resp["errors"], "raw bulk had errors"
    dt = time.perf_counter() - t
    return {"readings": n, "seconds": round(dt, 2), "readings_per_s": round(n / dt)}


# -- daemons ---------------------------------------------------------------------------------
class Daemons:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        # the relay's CPU per stage (saltext.tributary.relay.stagecpu); =0 turns it off
        self.env.setdefault("TRIBUTARY_RELAY_STAGE_CPU", "1")

    def start(self, prog: str, confdir: pathlib.Path) -> subprocess.Popen:
        p = subprocess.Popen(
            [str(VENV_BIN / prog), "-c", str(confdir)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def start_syndic(
    d: Daemons, synd: pathlib.Path, syndic_id: str, common: dict, top_ret: int
) -> tuple[int, int]:
    """A syndic master (with the key-publishing engine) and its salt-syndic below the top
    master on ``top_ret``, configured under ``synd``; returns the syndic master's (publish,
    ret) ports, which its gateways connect to."""
    syn_pub, syn_ret = free_port(), free_port()
    write_yaml(
        synd / "master",
        {
            **common,
            "id": syndic_id,
            "root_dir": str(synd),
            "interface": "127.0.0.1",
            "publish_port": syn_pub,
            "ret_port": syn_ret,
            "auto_accept": True,
            "syndic_master": "127.0.0.1",
            "syndic_master_port": top_ret,
            "syndic_event_forward_timeout": 0.5,
            "engines_dirs": [str(REPO / "salt/_engines")],
            "engines": [
                {
                    "tributary_keys": {
                        "interval": 5,
                        "syndic_id": syndic_id,
                        "signing_key": str(synd / "etc/salt/pki/minion/minion.pem"),
                    }
                },
                # Salt 3008's salt-syndic forwards no events (README, Versions tested)
                *([{"tributary_uplink": {}}] if NEEDS_UPLINK else []),
            ],
        },
    )
    write_yaml(
        synd / "minion",
        {
            **common,
            "id": syndic_id,
            "root_dir": str(synd),
            "master": "127.0.0.1",
            "master_port": syn_ret,
            "publish_port": 4506,
        },
    )
    d.start("salt-master", synd)
    wait(lambda: (synd / "etc/salt/pki/master/master.pub").exists(), 60, "syndic master keys")
    d.start("salt-syndic", synd)
    return syn_pub, syn_ret


def tree_rss(pid: int) -> int:
    import psutil

    try:
        return sum(p.memory_info().rss for p in [psutil.Process(pid)])
    except psutil.Error:
        return 0


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    except psutil.Error:
        pass
    return total


def settled(pid: int, window_s: float = 1.0, max_cpu_s: float = 0.1) -> bool:
    """The process tree used less than ``max_cpu_s`` of CPU over ``window_s`` (started up)."""
    before = tree_cpu_s(pid)
    time.sleep(window_s)
    return tree_cpu_s(pid) - before < max_cpu_s


def engine_pid(master_pid: int) -> int | None:
    import psutil

    for child in psutil.Process(master_pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "Engine(" in cmd and "tributary_relay" in cmd:
            return int(child.pid)
    for child in psutil.Process(master_pid).children(recursive=True):
        try:
            if "Engine(salt.loaded.ext.engine" in " ".join(child.cmdline()):
                return int(child.pid)
        except psutil.Error:
            continue
    return None


class Counters:
    def __init__(self, path: str) -> None:
        self.path = path

    def get(self) -> dict[str, int]:
        if not os.path.exists(self.path):
            return {}
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            out = dict(db.execute("SELECT name, n FROM counters").fetchall())
            for gw, name, n in db.execute("SELECT gateway, name, n FROM gateway_counters"):
                out[f"{name}@{gw}"] = n
            return out
        except sqlite3.Error:
            return {}
        finally:
            db.close()

    def depth(self) -> int:
        """Batches in the relay spool (received, not yet confirmed by Elasticsearch)."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        except sqlite3.Error:
            return -1
        finally:
            db.close()

    def open_gaps(self) -> list[list[Any]]:
        """Holes in the relay ledger's accounted-for ranges: readings lost in transit."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("SELECT gateway, epoch FROM ledger_heads").fetchall()
            rows += db.execute("SELECT DISTINCT gateway, epoch FROM ledger_ranges").fetchall()
            ledger = Ledger.__new__(Ledger)
            ledger.db = db
            return [
                [gw, ep, lo, hi] for gw, ep in sorted(set(rows)) for lo, hi in ledger.holes(gw, ep)
            ]
        except sqlite3.Error as exc:
            return [["error", str(exc)]]
        finally:
            db.close()


def cpu_counters(counters: Counters) -> dict[str, int]:
    """The relay's ``cpu_ns:<stage>`` and ``gc_*`` counters (``TRIBUTARY_RELAY_STAGE_CPU``)."""
    return {k: v for k, v in counters.get().items() if k.startswith(("cpu_ns:", "gc_"))}


def gc_passes(diff: dict[str, int]) -> dict[str, Any]:
    """The garbage collector's passes in the relay engine: runs and milliseconds by generation."""
    return {
        f"gen{g}": {
            "runs": diff.get(f"gc_runs:{g}", 0),
            "ms": round(diff.get(f"gc_ns:{g}", 0) / 1e6, 1),
        }
        for g in range(3)
    }


def relay_burst(bus: Any, counters: Counters, eng: int | None, pki: str, epoch: str) -> dict:
    """N readings as 1,000-reading signed batches fired on the top master's bus at once,
    until the relay has indexed all of them; the engine's CPU during the burst, by stage."""
    from saltext.tributary.relay.stagecpu import per_reading

    rows = readings(N)
    batches = [
        signed(encode_batch(epoch, rows[i : i + 1000]), {"id": "bench-pub", "pki_dir": pki})
        for i in range(0, N, 1000)
    ]
    base = counters.get().get("indexed", 0)
    stages0 = cpu_counters(counters)
    cpu0 = tree_cpu_s(eng) if eng is not None else 0.0
    t = time.perf_counter()
    for b in batches:
        bus.fire_event(b, "salt/beacon/bench-pub/tributary_mqtt/batch")
    fired_s = time.perf_counter() - t
    timeline = []

    def indexed_all() -> bool:
        got = counters.get().get("indexed", 0) - base
        timeline.append((round(time.perf_counter() - t, 2), counters.depth(), got))
        return got >= N

    wait(indexed_all, 600, "relay indexed N")
    dt = time.perf_counter() - t
    cpu_s = tree_cpu_s(eng) - cpu0 if eng is not None else 0.0
    # the counters of the last bulk reach the spool with the next one: a 10-reading batch
    flush = signed(
        encode_batch(f"{epoch}-flush", readings(10)), {"id": "bench-pub", "pki_dir": pki}
    )
    bus.fire_event(flush, "salt/beacon/bench-pub/tributary_mqtt/batch")
    wait(lambda: counters.get().get("indexed", 0) - base >= N + 10, 60, "the flush batch")
    stages1 = cpu_counters(counters)
    diff = {k: v - stages0.get(k, 0) for k, v in stages1.items()}
    return {
        "readings": N,
        "seconds": round(dt, 2),
        "readings_per_s": round(N / dt),
        "events_fired_s": round(fired_s, 2),
        # the engine and its subscriber process, during the burst
        "engine_cpu_s": round(cpu_s, 2) if eng is not None else None,
        "engine_cpu_us_per_reading": round(cpu_s / N * 1e6, 2) if eng is not None else None,
        # by stage (thread CPU, TRIBUTARY_RELAY_STAGE_CPU=1), the burst and the flush batch
        "cpu_us_per_reading": per_reading(diff, N),
        "gc": gc_passes(diff),
        "timeline_s_spooled_indexed": timeline[:: max(1, len(timeline) // 12)],
    }


def es_down(node: Any, master_pid: int, bus: Any, counters: Counters, pki: str, spool: str):
    """Relay engine memory while Elasticsearch is down and the backlog grows, then catch-up."""
    n_batches, rows_per = int(os.environ.get("TRIBUTARY_BENCH_DOWN_BATCHES", "300")), 1000
    eng = engine_pid(master_pid)
    if not eng:
        return {"error": "relay engine process not found"}
    mib = 1024 * 1024
    base = counters.get().get("indexed", 0)
    rss_before = tree_rss(eng)
    log(f"es down: stopping Elasticsearch, {n_batches * rows_per} readings on the bus")
    node.stop()
    rows = readings(n_batches * rows_per, first=1)
    samples = []
    t = time.perf_counter()
    for k in range(n_batches):
        b = encode_batch("down-epoch", rows[k * rows_per : (k + 1) * rows_per])
        bus.fire_event(
            signed(b, {"id": "bench-pub", "pki_dir": pki}),
            "salt/beacon/bench-pub/tributary_mqtt/batch",
        )
        if k % 10 == 0:
            samples.append(tree_rss(eng))
    wait(lambda: counters.depth() >= n_batches, 300, "the backlog spooled", 0.2)
    for _ in range(20):  # ten more seconds of the outage with the backlog on disk
        samples.append(tree_rss(eng))
        time.sleep(0.5)
    spooled_s = time.perf_counter() - t
    spool_bytes = sum(os.path.getsize(spool + x) for x in ("", "-wal") if os.path.exists(spool + x))
    log("es down: starting Elasticsearch again")
    t_up = time.perf_counter()
    node.start()
    ready_s = time.perf_counter() - t_up
    wait(lambda: counters.get().get("indexed", 0) - base >= n_batches * rows_per, 900, "catch-up")
    catch_s = time.perf_counter() - t_up
    return {
        "readings_during_outage": n_batches * rows_per,
        "engine_rss_before_mib": round(rss_before / mib, 1),
        "engine_rss_max_during_outage_mib": round(max(samples) / mib, 1),
        "engine_rss_last_during_outage_mib": round(samples[-1] / mib, 1),
        "relay_spool_file_mib": round(spool_bytes / mib, 1),
        "backlog_spooled_s": round(spooled_s, 1),
        "es_restart_s": round(ready_s, 1),
        "caught_up_after_restart_s": round(catch_s, 1),
        "catch_up_readings_per_s_incl_restart": round(n_batches * rows_per / catch_s),
    }


def gateway_spool_state(gwd: pathlib.Path) -> dict[str, Any]:
    """Where the gateway's readings are: spooled (last_seq), emitted (cursor), counters."""
    from saltext.tributary.gateway.spool import GatewaySpool

    sp = GatewaySpool(str(gwd / "var/cache/salt/minion/tributary/spool.db"))
    try:
        st = sp.status()
        return {k: st[k] for k in ("last_seq", "cursor", "unsent", "counters", "state")}
    finally:
        sp.close()


def naive_relay(client: Any, mopts: dict, bus: Any, out: dict[str, Any]) -> None:
    """One event, one document, one index request (Salt's old Elasticsearch returner)."""
    import salt.utils.event

    m = min(N, 5000)
    log(f"naive relay: {m} single-reading events")
    listen = salt.utils.event.get_master_event(mopts, mopts["sock_dir"], listen=True)
    done = threading.Event()
    got = [0]

    def naive() -> None:
        while got[0] < m:
            ev = listen.get_event(wait=5, tag="bench/naive", full=True)
            if ev is None:
                continue
            r = ev["data"]
            client.index(
                index="benchnaive-readings-x",
                id=f"naive:{r['seq']}",
                document=r,
                op_type="create",
            )
            got[0] += 1
        done.set()

    th = threading.Thread(target=naive, daemon=True)
    th.start()
    time.sleep(0.5)
    t = time.perf_counter()
    for r in readings(m):
        bus.fire_event(
            {"gateway": "naive", "seq": r.seq, "@timestamp": r.ts_ms, "value": r.value},
            "bench/naive",
        )
    done.wait(600)
    dt = time.perf_counter() - t
    out["naive_relay"] = {
        "readings": got[0],
        "seconds": round(dt, 2),
        "readings_per_s": round(got[0] / dt),
        "relay_speedup": round(out["relay"]["readings_per_s"] / max(1, got[0] / dt), 1),
    }


def run_pipeline(node: Any, client: Any, root: pathlib.Path, out: dict[str, Any]) -> None:
    import paho.mqtt.client as mqtt
    import salt.config
    import salt.utils.event

    from tests.support.mosquitto import start_broker

    d = Daemons()
    broker = start_broker()
    try:
        common = {"log_level": "warning", "log_level_logfile": "warning", "user": "root"}
        top_pub, top_ret = free_port(), free_port()
        spool = str(root / "top/relay.db")
        relay_cfg = {
            "elasticsearch": {**node.client_config, "replicas": 0},
            "index_prefix": "bench",
            "bulk": {"max_docs": 5000, "max_wait_s": 0.05},
            "spool_path": spool,
            "trusted_syndics": ["bench-syndic"],
            # TRIBUTARY_BENCH_ANOMALIES=0 measures the relay with the detector off
            "anomalies": {"enabled": os.environ.get("TRIBUTARY_BENCH_ANOMALIES", "1") != "0"},
            "metrics_interval_s": 30,
            "gaps": {"enabled": False},
        }
        # TRIBUTARY_BENCH_RULES=100 measures it with that many alert rules on the readings
        if int(os.environ.get("TRIBUTARY_BENCH_RULES", "0")):
            relay_cfg["rules"] = bench_rules(int(os.environ["TRIBUTARY_BENCH_RULES"]))
        write_yaml(
            root / "top/master",
            {
                **common,
                "id": "bench-top",
                "root_dir": str(root / "top"),
                "interface": "127.0.0.1",
                "publish_port": top_pub,
                "ret_port": top_ret,
                "auto_accept": True,
                "order_masters": True,
                "engines_dirs": [str(REPO / "salt/_engines")],
                "engines": [{"tributary_relay": relay_cfg}],
            },
        )
        # the directly attached bench publisher's key, accepted by the top master
        pki, pub = make_key(root / "benchkey")
        (root / "top/etc/salt/pki/master/minions").mkdir(parents=True, exist_ok=True)
        top = d.start("salt-master", root / "top")
        counters = Counters(spool)
        try:
            wait(lambda: os.path.exists(spool), 120, "the relay engine's spool", 0.5)
        except RuntimeError:
            master_log = root / "top/var/log/salt/master"
            if master_log.exists():
                log("top master log:\n" + "\n".join(master_log.read_text().splitlines()[-40:]))
            raise
        mopts = salt.config.master_config(str(root / "top/master"))
        (pathlib.Path(mopts["pki_dir"]) / "minions").mkdir(parents=True, exist_ok=True)
        (pathlib.Path(mopts["pki_dir"]) / "minions" / "bench-pub").write_text(pub)
        wait(lambda: client.indices.exists_index_template(name="bench-readings"), 60, "templates")
        out["signing"] = signing_cost(pki, pub)

        # relay: N readings as signed batches of 1000 on the top master's bus, alternating with
        # raw _bulk of the same N readings ROUNDS times (the raw figure itself drifts with
        # Elasticsearch from run to run and within one: each relay burst has its own raw)
        bus = salt.utils.event.get_master_event(mopts, mopts["sock_dir"], listen=False)
        # The engine subscribes to the bus a moment after its spool and templates exist, and
        # the bus does not keep events for late subscribers: a small warm-up batch, fired
        # until it is indexed, says the relay is listening before the measured burst.
        warm_batch = signed(
            encode_batch("warm-epoch", readings(10)), {"id": "bench-pub", "pki_dir": pki}
        )

        def warmed() -> bool:
            bus.fire_event(warm_batch, "salt/beacon/bench-pub/tributary_mqtt/batch")
            return counters.get().get("indexed", 0) >= 10

        wait(warmed, 120, "the relay to index a warm-up batch", 1.0)
        # ... and its subscriber process (detector, rules) has started and restored its state
        eng = engine_pid(top.pid)
        if eng is not None:
            wait(lambda: settled(eng), 60, "the relay engine to settle")
        pairs = []
        for k in range(ROUNDS):
            install_templates(client, f"benchraw{k}", replicas=0)
            log(f"round {k + 1}/{ROUNDS}: raw _bulk, then relay: {N} readings each")
            raw = raw_bulk(client, N, prefix=f"benchraw{k}")
            rel = relay_burst(bus, counters, eng, pki, f"relay-{k}")
            pairs.append(
                {
                    "raw_per_s": raw["readings_per_s"],
                    "relay_per_s": rel["readings_per_s"],
                    "ratio": round(rel["readings_per_s"] / raw["readings_per_s"], 3),
                    "relay": rel,
                }
            )
        ratios = [p["ratio"] for p in pairs]
        out["relay"] = {
            "readings": N,
            "rounds": ROUNDS,
            "pairs": pairs,
            "readings_per_s": round(statistics.median(p["relay_per_s"] for p in pairs)),
            "raw_readings_per_s": round(statistics.median(p["raw_per_s"] for p in pairs)),
            "ratio_to_raw": statistics.median(ratios),
            "cpu_us_per_reading": {
                k: statistics.median(p["relay"]["cpu_us_per_reading"][k] for p in pairs)
                for k in pairs[0]["relay"]["cpu_us_per_reading"]
            },
        }
        if STOP_AFTER == "relay":
            return

        if "es_down" not in SKIP:
            out["es_down"] = es_down(node, top.pid, bus, counters, pki, spool)
        if STOP_AFTER == "es_down":
            return

        # naive relay: one event, one document, one request
        if "naive_relay" not in SKIP:
            naive_relay(client, mopts, bus, out)

        # syndic master + salt-syndic + one gateway below the top master
        syn_pub, syn_ret = start_syndic(d, root / "syndic", "bench-syndic", common, top_ret)
        gwd = root / GW
        write_yaml(
            gwd / "minion",
            {
                **common,
                "id": GW,
                "root_dir": str(gwd),
                "master": "127.0.0.1",
                "master_port": syn_ret,
                "publish_port": syn_pub,
                "module_dirs": [str(REPO / "salt")],
                "grains": {"site": "bench"},
                "beacons": {
                    "tributary_mqtt": [
                        {"broker": {"host": "127.0.0.1", "port": broker.port}},
                        {
                            "topics": [
                                {
                                    "topic": "sensors/{sensor}/{metric}",
                                    "format": "number",
                                    "unit": "C",
                                },
                                {
                                    "topic": "json/{sensor}",
                                    "format": "json",
                                    "fields": {"temp": {"metric": "temperature", "unit": "C"}},
                                    "timestamp": {"field": "ts", "format": "ms"},
                                },
                            ]
                        },
                        {"interval": 1},
                    ]
                },
            },
        )
        # a 100k-reading backlog in the gateway's spool (as after a long uplink outage): the
        # beacon drains it at start (end to end from the spool), and it is the replay range later
        from saltext.tributary.gateway.spool import GatewaySpool
        from saltext.tributary.protocol.reading import Reading

        backlog = 100_000
        gsp = GatewaySpool(str(gwd / "var/cache/salt/minion/tributary/spool.db"))
        t_ms = int(time.time() * 1000) - backlog
        for lo in range(0, backlog, 10_000):
            gsp.append(
                [
                    Reading(f"b{i % 20}", "temperature", 20 + (i % 997) / 100, t_ms + i, "C")
                    for i in range(lo, lo + 10_000)
                ]
            )
        gsp.close()
        d.start("salt-minion", gwd)
        pubc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
        pubc.max_inflight_messages_set(1000)
        pubc.max_queued_messages_set(0)
        pubc.connect("127.0.0.1", broker.port)
        pubc.loop_start()

        def indexed_gw() -> int:
            return counters.get().get(f"indexed@{GW}", 0)

        def warm() -> bool:
            pubc.publish("sensors/warm/temperature", b"1", qos=1)
            return indexed_gw() > 0

        log("backlog: waiting for the gateway's first reading through the syndic")
        wait(lambda: indexed_gw() > 0, 300, "a first reading through the syndic", 0.1)
        t = time.perf_counter()
        first_n = indexed_gw()
        wait(lambda: indexed_gw() >= backlog, 1200, "the backlog drained", 0.2)
        dt = time.perf_counter() - t
        out["backlog_drain"] = {
            "readings": backlog - first_n,
            "seconds": round(dt, 2),
            "readings_per_s": round((backlog - first_n) / dt),
            "path": "gateway spool -> beacon -> syndic master -> salt-syndic -> top -> relay -> ES",
        }
        wait(warm, 300, "a first MQTT reading through the syndic", 1)

        # end to end: N readings into the broker as fast as the broker takes them (QoS 1), by
        # the real mosquitto_pub client (C, one message per stdin line, 1000 in flight),
        # alternating with raw _bulk ROUNDS times
        n_e2e = int(os.environ.get("TRIBUTARY_BENCH_E2E_N", "100000"))

        def e2e_once(k: int) -> dict[str, Any]:
            log(f"end to end {k + 1}/{ROUNDS}: {n_e2e} readings into the gateway's broker")
            base = indexed_gw()
            stages0 = cpu_counters(counters)
            eng = engine_pid(top.pid)
            cpu0 = tree_cpu_s(eng) if eng is not None else 0.0
            t = time.perf_counter()
            # (tests.support.mosquitto.Broker.publish runs mosquitto_pub in chunks: one run
            # given 100k lines sends only about a third of them)
            broker.publish(
                f"sensors/e2e{k}/temperature",
                [f"{20 + (i % 997) / 100:.2f}" for i in range(n_e2e)],
            )
            pub_s = time.perf_counter() - t
            # until everything is indexed, or nothing more arrives for 20 s (loss is reported)
            last, last_t = indexed_gw(), time.perf_counter()
            while last - base < n_e2e and time.perf_counter() - last_t < 20:
                time.sleep(0.2)
                now_n = indexed_gw()
                if now_n != last:
                    last, last_t = now_n, time.perf_counter()
            got = last - base
            dt = last_t - t
            cpu_s = tree_cpu_s(eng) - cpu0 if eng is not None else 0.0
            # the relay's counters of the last bulk reach the spool with the next: one more
            n0 = indexed_gw()
            pubc.publish("sensors/warm/temperature", b"1", qos=1)
            wait(lambda: indexed_gw() > n0, 60, "a flush reading through the syndic", 0.2)
            stages = {k: v - stages0.get(k, 0) for k, v in cpu_counters(counters).items()}
            from saltext.tributary.relay.stagecpu import per_reading

            return {
                "readings_published": n_e2e,
                "readings_indexed": got,
                "publish_seconds": round(pub_s, 2),
                "seconds": round(dt, 2),
                "readings_per_s": round(got / dt),
                "relay_engine_cpu_us_per_reading": round(cpu_s / max(1, got) * 1e6, 2),
                "relay_cpu_us_per_reading": per_reading(stages, got),
                "relay_gc": gc_passes(stages),
            }

        e2e_pairs = []
        for k in range(ROUNDS):
            install_templates(client, f"benchrawe{k}", replicas=0)
            log(f"end to end round {k + 1}/{ROUNDS}: raw _bulk {N}")
            raw = raw_bulk(client, N, prefix=f"benchrawe{k}")
            e2e = e2e_once(k)
            e2e_pairs.append(
                {
                    "raw_per_s": raw["readings_per_s"],
                    "end_to_end_per_s": e2e["readings_per_s"],
                    "ratio": round(e2e["readings_per_s"] / raw["readings_per_s"], 3),
                    "end_to_end": e2e,
                }
            )
        out["end_to_end"] = {
            "rounds": ROUNDS,
            "pairs": e2e_pairs,
            "readings_published": n_e2e * ROUNDS,
            "readings_indexed": sum(p["end_to_end"]["readings_indexed"] for p in e2e_pairs),
            "readings_per_s": round(statistics.median(p["end_to_end_per_s"] for p in e2e_pairs)),
            "raw_readings_per_s": round(statistics.median(p["raw_per_s"] for p in e2e_pairs)),
            "ratio_to_raw": statistics.median(p["ratio"] for p in e2e_pairs),
            "relay_open_gaps": counters.open_gaps(),
            "gateway_spool": gateway_spool_state(gwd),
        }
        if STOP_AFTER == "end_to_end":
            return

        # latency: MQTT publish -> visible to a search
        log("latency: 30 single readings, publish -> searchable")
        lat = []
        rnd = random.Random(42)
        to_relay: list[float] = []
        for i in range(30):
            # sensors publish at arbitrary moments: sample every phase of the 1 s beacon timer,
            # the syndic's forward timer and the index refresh instead of locking onto one
            time.sleep(rnd.uniform(0, 1.0))
            ts = int(time.time() * 1000)
            t = time.perf_counter()
            pubc.publish("json/lat", json.dumps({"ts": ts, "temp": i}).encode(), qos=1)

            def seen(ts: int = ts) -> bool:
                r = client.search(
                    index="bench-readings-*",
                    query={
                        "bool": {
                            "must": [{"term": {"sensor": "lat"}}, {"term": {"@timestamp": ts}}]
                        }
                    },
                    size=1,
                )
                hits = r["hits"]["hits"]
                if hits:
                    # the relay stamps relayed_at when it builds the document
                    to_relay.append((hits[0]["_source"]["relayed_at"] - ts) / 1000)
                return bool(hits)

            wait(seen, 60, "latency reading", 0.02)
            lat.append(time.perf_counter() - t)
            time.sleep(0.3)
        out["latency"] = {
            "samples": len(lat),
            "p50_s": round(statistics.median(lat), 3),
            "p90_s": round(sorted(lat)[int(len(lat) * 0.9) - 1], 3),
            "max_s": round(max(lat), 3),
            # split: publish -> the relay building the document (MQTT, beacon timer, syndic),
            # then bulk + index refresh until a search sees it
            "p50_publish_to_relay_s": round(statistics.median(to_relay), 3),
            "p50_relay_to_searchable_s": round(
                statistics.median(a - b for a, b in zip(lat, to_relay, strict=True)), 3
            ),
        }
        if STOP_AFTER == "latency":
            return

        # replay: 100k backlog through the syndic (already indexed -> 409 already present)
        n_rep = 100_000
        log(f"replay: {n_rep} readings through the syndic")
        import salt.client

        lc = salt.client.LocalClient(mopts=mopts)
        st = lc.cmd(GW, "tributary.status", timeout=60).get(GW) or {}
        epoch = st.get("epoch")
        first = 1
        base_present = counters.get().get("already_present", 0)
        t = time.perf_counter()
        ret = lc.cmd(GW, "tributary.replay", [epoch, first, first + n_rep - 1, 0], timeout=600).get(
            GW
        )
        wait(
            lambda: counters.get().get("already_present", 0) - base_present >= n_rep,
            600,
            "replayed readings confirmed",
            0.2,
        )
        dt = time.perf_counter() - t
        out["replay"] = {
            "readings": n_rep,
            "seconds": round(dt, 2),
            "readings_per_s": round(n_rep / dt),
            "gateway_answer": {k: v for k, v in (ret or {}).items() if k != "error"}
            if isinstance(ret, dict)
            else ret,
        }

        # soak: relay engine RSS at a steady rate
        eng = engine_pid(top.pid)
        rate = 2000
        log(f"soak: {SOAK_S:.0f} s at {rate} readings/s, relay engine pid {eng}")
        stop = threading.Event()

        def steady() -> None:
            tick = time.monotonic()
            i = 0
            while not stop.is_set():
                for _ in range(rate // 10):
                    pubc.publish("sensors/soak/temperature", f"{i % 1000}".encode(), qos=1)
                    i += 1
                tick += 0.1
                stop.wait(max(0, tick - time.monotonic()))

        th = threading.Thread(target=steady, daemon=True)
        base = indexed_gw()
        th.start()
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < SOAK_S:
            samples.append(tree_rss(eng) if eng else 0)
            time.sleep(max(1.0, SOAK_S / 60))
        stop.set()
        th.join(10)
        mib = 1024 * 1024
        half = max(1, len(samples) // 2)
        first_half = sum(samples[:half]) / half
        second_half = sum(samples[half:]) / max(1, len(samples) - half)
        out["soak"] = {
            "seconds": round(time.monotonic() - t0),
            "target_rate": rate,
            "indexed_per_s": round((indexed_gw() - base) / (time.monotonic() - t0)),
            "engine_rss_first_mib": round(samples[0] / mib, 1),
            "engine_rss_last_mib": round(samples[-1] / mib, 1),
            "engine_rss_max_mib": round(max(samples) / mib, 1),
            "second_half_over_first_half": round(second_half / first_half, 3)
            if first_half
            else None,
        }
        pubc.loop_stop()
        out["relay_counters"] = {k: v for k, v in counters.get().items() if "@" not in k}
    finally:
        d.stop_all()
        broker.cleanup()


def main() -> None:
    from tests.support.es import start_elasticsearch

    out: dict[str, Any] = {"machine": machine(), "n": N}
    out["wire_bytes_per_reading"] = wire_bytes()
    root = pathlib.Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    log("starting Elasticsearch")
    node = start_elasticsearch(tls=True)
    try:
        out["machine"]["elasticsearch"] = node.version
        client = make_client({**node.client_config, "request_timeout": 120})
        install_templates(client, "benchraw", replicas=0)
        install_templates(client, "benchnaive", replicas=0)
        # warm the JVM first, so that neither raw nor relay is measured on a cold cluster
        install_templates(client, "benchwarm", replicas=0)
        raw_bulk(client, min(N, 50_000), prefix="benchwarm")
        log(f"raw _bulk: {N} documents")
        out["raw_bulk"] = raw_bulk(client, N)
        try:
            run_pipeline(node, client, root, out)
        except Exception as exc:  # report what was measured so far
            out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    if (
        os.environ.get("TRIBUTARY_BENCH_SKIP_GATEWAY") != "1"
        and (REPO / "bench/gateway.py").exists()
    ):
        log("bench/gateway.py")
        try:
            sys.path.insert(0, str(REPO / "bench"))
            import gateway as gateway_bench  # type: ignore[import-not-found]

            out["gateway"] = gateway_bench.run()
        except Exception as exc:
            out["gateway"] = {"error": f"{type(exc).__name__}: {exc}"}
    targets = {}
    if "relay" in out:
        targets["relay_ge_0.9_raw"] = out["relay"]["ratio_to_raw"] >= 0.9
    if "end_to_end" in out:
        targets["end_to_end_ge_0.5_raw"] = out["end_to_end"]["ratio_to_raw"] >= 0.5
    if "replay" in out:
        targets["replay_ge_10k_per_s"] = out["replay"]["readings_per_s"] >= 10_000
    if "latency" in out:
        targets["latency_p50_le_1.5s"] = out["latency"]["p50_s"] <= 1.5
    if "soak" in out and out["soak"]["second_half_over_first_half"]:
        targets[f"relay_rss_flat_within_10pct_over_{out['soak']['seconds']}s"] = (
            abs(out["soak"]["second_half_over_first_half"] - 1) <= 0.1
        )
    out["targets_met"] = targets
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
