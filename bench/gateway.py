"""Gateway benchmark: CPU per reading, spool rates, wire bytes, and real-minion memory.

``run() -> dict`` (imported by ``bench/run.py``) or standalone::

    .venv/bin/python bench/gateway.py            # prints JSON

Parts:

1. In-process (no daemons): CPU time (``time.process_time``) per reading through the gateway
   path the beacon uses: MQTT payload parse (number and JSON formats) -> filters -> spool
   append (500-reading commits, as the MQTT flusher does) -> batch encode + cursor move
   (``next_batches``), and separately the per-batch signing cost amortised per reading.
   The real MQTT source in process through a real broker: as fast as mosquitto_pub sends
   (``mqtt_source``, and with Mosquitto's default window of 20), and paced by a publisher
   process (``mqtt_source_paced_*``: 100 messages/s one by one, 1,000/s in bursts of 100).
2. Spool append and read rates (readings/s) for the same sizes.
3. Wire bytes per reading: raw batches and aggregated batches (bandwidth budget).
4. Memory: a real ``salt-minion`` (against a real ``salt-master`` and Mosquitto) running all
   three Tributary beacons while a publisher sends ~1,000 readings/s, against a stock minion
   of the same master with no beacons; RSS (sum over the minion's process tree) sampled every
   5 s. Duration ``TRIBUTARY_BENCH_GATEWAY_S`` (default 60; 600 for the 10-minute check).
   The minion's own CPU per delivered reading is reported from the same run.
   ``TRIBUTARY_BENCH_GATEWAY_SKIP_MINION=1`` skips this part.

Targets (issue 3; benchmarks, not tests): <= 20 us CPU/reading through beacon + spool,
<= 25 MiB RSS over a stock minion and flat over 10 minutes, <= 12 B/reading raw on the wire.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from saltext.tributary.gateway.filters import Filters, compile_filters  # noqa: E402
from saltext.tributary.gateway.sources.payload import Mapper, compile_rules  # noqa: E402
from saltext.tributary.gateway.spool import GatewaySpool  # noqa: E402
from saltext.tributary.protocol.wire import (  # noqa: E402
    SpooledReading,
    bytes_per_reading,
    encode_agg_batch,
    encode_batch,
    packed_size,
)

N = int(os.environ.get("TRIBUTARY_BENCH_GATEWAY_N", "100000"))
T0 = 1_700_000_000_000


def _messages(n: int) -> list[tuple[str, bytes]]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        if i % 2:
            out.append((f"sensors/s{i % 16}/temperature", f"{20 + rnd.random() * 5:.2f}".encode()))
        else:
            out.append(
                (
                    f"json/j{i % 16}",
                    json.dumps({"ts": T0 + i, "temp": round(rnd.random() * 30, 1)}).encode(),
                )
            )
    return out


RULES = [
    {"topic": "sensors/{sensor}/{metric}", "format": "number", "unit": "C"},
    {
        "topic": "json/{sensor}",
        "format": "json",
        "fields": {"temp": {"metric": "temperature", "unit": "C"}},
        "timestamp": {"field": "ts", "format": "ms"},
    },
]


def cpu_path(n: int = N) -> dict[str, Any]:
    """CPU per reading: parse + filter + spool append (500/commit) + encode/emit."""
    tmp = tempfile.mkdtemp(prefix="tributary-bench-")
    try:
        mapper = Mapper(compile_rules(RULES))
        filters = Filters(compile_filters([{"match": "*", "min": -40, "max": 125}]))
        spool = GatewaySpool(os.path.join(tmp, "spool.db"))
        msgs = _messages(n)
        t_parse = t_append = t_emit = 0.0
        emitted = 0
        batches: list[dict] = []
        for lo in range(0, n, 500):
            c0 = time.process_time()
            readings = []
            for topic, payload in msgs[lo : lo + 500]:
                readings.extend(mapper.parse(topic, payload, T0 + lo))
            kept, counts, aside = filters.apply(readings)
            c1 = time.process_time()
            spool.append(kept, {"received": len(readings), **counts}, aside)
            c2 = time.process_time()
            if lo % 1000 == 500:  # a beacon run every ~1000 readings (1 s at 1,000/s)
                out = spool.next_batches()
                emitted += sum(len(b["r"]) for b in out)
                batches.extend(out)
            c3 = time.process_time()
            t_parse += c1 - c0
            t_append += c2 - c1
            t_emit += c3 - c2
        c0 = time.process_time()
        out = spool.next_batches()
        emitted += sum(len(b["r"]) for b in out)
        batches.extend(out)
        t_emit += time.process_time() - c0
        assert emitted == n, (emitted, n)
        sign_us = None
        try:
            sign_us = _signing_cost(batches[:20])
        except Exception as exc:  # signing module/cryptography absent: report why
            sign_us = f"not measured: {exc}"
        total = t_parse + t_append + t_emit
        res = {
            "readings": n,
            "cpu_us_per_reading": round(total / n * 1e6, 2),
            "parse_filter_us": round(t_parse / n * 1e6, 2),
            "spool_append_us": round(t_append / n * 1e6, 2),
            "encode_emit_us": round(t_emit / n * 1e6, 2),
            "signing_us_per_reading": sign_us,
            "bytes_per_reading_raw_emitted": round(bytes_per_reading(batches), 2),
        }
        spool.close()
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _signing_cost(batches: list[dict]) -> float:
    """CPU per reading of finalising batches as the beacon does: rows packed, stamped, signed."""
    from saltext.tributary.gateway.beacons import finalize_batch
    from tests.support.keys import write_keypair

    pki = tempfile.mkdtemp(prefix="tributary-bench-pki-")
    try:
        write_keypair(pki)
        opts = {"pki_dir": pki, "id": "bench-gw"}
        finalize_batch(dict(batches[0]), opts)  # load/cache the key
        c0 = time.process_time()
        rows = 0
        for b in batches:
            finalize_batch(dict(b), opts)
            rows += len(b["r"])
        return round((time.process_time() - c0) / rows * 1e6, 2)
    finally:
        shutil.rmtree(pki, ignore_errors=True)


@contextlib.contextmanager
def _mqtt_source(broker_extra: str = "") -> Iterator[tuple[Any, str]]:
    """The real MQTT source (its own QoS 1 connection, acknowledgements after the spool commit,
    parse, spool) running in this process, subscribed to a real Mosquitto broker (the tests'
    configuration plus ``broker_extra``); yields the broker and the spool path."""
    from saltext.tributary.gateway.sources.mqtt import BrokerConfig, MqttSource
    from tests.support.mosquitto import start_broker

    tmp = tempfile.mkdtemp(prefix="tributary-bench-")
    broker = start_broker(extra=broker_extra)
    src = None
    try:
        path = os.path.join(tmp, "spool.db")
        src = MqttSource(
            BrokerConfig(port=broker.port, client_id="bench-src"),
            Mapper(compile_rules(RULES)),
            path,
        )
        src.start()
        deadline = time.monotonic() + 30
        while not src.subscribed and time.monotonic() < deadline:
            time.sleep(0.05)
        yield broker, path
    finally:
        if src is not None:
            src.stop()
        broker.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _spooled(path: str) -> int:
    spool = GatewaySpool(path)
    try:
        return int(spool.counters().get("spooled", 0))
    finally:
        spool.close()


def mqtt_source_cpu(n: int = 20_000, broker_extra: str = "") -> dict[str, Any]:
    """CPU of the MQTT source in this process for ``n`` readings as fast as they come, fed by
    mosquitto_pub in another process."""
    with _mqtt_source(broker_extra) as (broker, path):
        c0, w0 = time.process_time(), time.perf_counter()
        broker.publish("sensors/b1/temperature", [f"{20 + i % 100 / 10:.1f}" for i in range(n)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _spooled(path) < n:
            time.sleep(0.01)
        c1, w1 = time.process_time(), time.perf_counter()
        got = _spooled(path)
        return {
            "readings": got,
            "cpu_us_per_reading": round((c1 - c0) / max(1, got) * 1e6, 2),
            "readings_per_s": round(got / (w1 - w0)),
        }


#: A paced publisher (another process): ``rate`` of the bench's messages a second at QoS 1, in
#: bursts of ``burst``, for ``seconds``.
_PACED = """
import sys, time
sys.path[:0] = {paths!r}
import paho.mqtt.client as mqtt
import gateway
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paced")
c.max_inflight_messages_set(1000)
c.connect("127.0.0.1", {port})
c.loop_start()
msgs = gateway._messages({rate})
tick = time.monotonic()
end = tick + {seconds}
while time.monotonic() < end:
    for i in range(0, {rate}, {burst}):
        for topic, payload in msgs[i : i + {burst}]:
            c.publish(topic, payload, qos=1)
        tick += {burst} / {rate}
        time.sleep(max(0.0, tick - time.monotonic()))
c.loop_stop()
"""


def mqtt_source_paced(rate: int, burst: int, seconds: float = 15.0) -> dict[str, Any]:
    """CPU of the MQTT source in this process per message at a steady ``rate`` in bursts of
    ``burst`` (1: one by one), measured over ``seconds`` after 2 s of warm-up: what commits
    and wake-ups cost when messages do not come all at once."""
    with _mqtt_source() as (broker, path):
        code = _PACED.format(
            paths=[str(REPO / "bench"), str(REPO), str(REPO / "src")],
            port=broker.port,
            rate=rate,
            burst=burst,
            seconds=seconds + 4,
        )
        pub = subprocess.Popen([sys.executable, "-c", code])
        try:
            time.sleep(2)  # warm-up, not a wait for a condition: the pace is the workload
            n0, c0, w0 = _spooled(path), time.process_time(), time.perf_counter()
            time.sleep(seconds)
            n1, c1, w1 = _spooled(path), time.process_time(), time.perf_counter()
        finally:
            pub.wait(timeout=seconds + 30)
        got = n1 - n0
        return {
            "rate": rate,
            "burst": burst,
            "readings": got,
            "cpu_us_per_reading": round((c1 - c0) / max(1, got) * 1e6, 2),
            "readings_per_s": round(got / (w1 - w0)),
        }


def spool_rates(n: int = N) -> dict[str, Any]:
    from saltext.tributary.protocol.reading import make_reading

    tmp = tempfile.mkdtemp(prefix="tributary-bench-")
    try:
        spool = GatewaySpool(os.path.join(tmp, "spool.db"))
        rs = [
            make_reading(f"s{i % 16}", "temperature", 20 + (i % 100) / 10, T0 + i, "C")
            for i in range(n)
        ]
        t0 = time.perf_counter()
        for lo in range(0, n, 500):
            spool.append(rs[lo : lo + 500])
        t1 = time.perf_counter()
        got = 0
        while True:
            out = spool.next_batches()
            if not out:
                break
            got += sum(len(b["r"]) for b in out)
        t2 = time.perf_counter()
        rep = spool.replay(spool.epoch, 1, n)
        t3 = time.perf_counter()
        assert got == n and sum(len(b["r"]) for b in rep) == n
        size = spool.status()["bytes"]
        spool.close()
        return {
            "append_readings_per_s": round(n / (t1 - t0)),
            "emit_read_readings_per_s": round(n / (t2 - t1)),
            "replay_read_readings_per_s": round(n / (t3 - t2)),
            "disk_bytes_per_reading": round(size / n, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wire_sizes() -> dict[str, Any]:
    rnd = random.Random(3)

    def rows(n: int, sensors: int, step_ms: int) -> list[SpooledReading]:
        return [
            SpooledReading(
                1 + i,
                f"s{i % sensors}/temperature",
                "C",
                T0 + i * step_ms,
                round(20 + rnd.random() * 5, 1),
            )
            for i in range(n)
        ]

    raw = [
        encode_batch("3f9c2a1b7d10", rows(4000, 16, 1)[i : i + 1000]) for i in range(0, 4000, 1000)
    ]
    out: dict[str, Any] = {"raw_1000_rows_16_sensors_1_decimal": round(bytes_per_reading(raw), 2)}
    small = [encode_batch("3f9c2a1b7d10", rows(50, 4, 1000))]
    out["raw_50_rows_4_sensors"] = round(bytes_per_reading(small), 2)
    for win in (10, 60):
        rs = rows(3600, 8, 125)  # 8 sensors at 1 Hz for 7.5 minutes
        agg = encode_agg_batch("3f9c2a1b7d10", rs, win)
        out[f"aggregated_{win}s_8_sensors_1Hz"] = round(packed_size(agg) / len(rs), 3)
    return out


# -- real minion memory ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss_cpu(pid: int) -> tuple[int, float]:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0.0
    rss = 0
    cpu = 0.0
    for q in procs:
        try:
            rss += q.memory_info().rss
            t = q.cpu_times()
            cpu += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return rss, cpu


def _write(path: pathlib.Path, data: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def minion_memory(duration_s: float, rate: int = 1000) -> dict[str, Any]:
    """RSS of a salt-minion running all three beacons at ~rate readings/s vs a stock one."""
    import paho.mqtt.client as mqtt
    import salt.version

    from tests.support.mosquitto import start_broker

    venv_bin = pathlib.Path(sys.executable).parent
    root = pathlib.Path(tempfile.mkdtemp(prefix="tributary-bench-minion-"))
    procs: list[subprocess.Popen] = []
    broker = start_broker()
    try:
        pub_port, ret_port = _free_port(), _free_port()
        common = {"log_level": "warning", "log_level_logfile": "warning", "user": "root"}
        _write(
            root / "master/master",
            {
                **common,
                "root_dir": str(root / "master"),
                "interface": "127.0.0.1",
                "publish_port": pub_port,
                "ret_port": ret_port,
                "auto_accept": True,
                "open_mode": True,
            },
        )
        spool = str(root / "tributary-minion/spool.db")
        beacons = {
            "tributary_mqtt": [
                {"broker": {"host": "127.0.0.1", "port": broker.port}},
                {"topics": RULES},
                {"spool": {"path": spool}},
                {"interval": 1},
            ],
            "tributary_sysfs": [
                {"root": "/"},
                {
                    "sources": [
                        {"kind": k, "interval_s": 5} for k in ("hwmon", "thermal", "iio", "w1")
                    ]
                },
                {"spool": {"path": spool}},
                {"interval": 1},
            ],
            "tributary_health": [{"spool": {"path": spool}}, {"interval": 10}],
        }
        for mid, bcn in (("stock-minion", {}), ("tributary-minion", beacons)):
            _write(
                root / f"{mid}/minion",
                {
                    **common,
                    "id": mid,
                    "root_dir": str(root / mid),
                    "master": "127.0.0.1",
                    "master_port": ret_port,
                    "publish_port": pub_port,
                    "module_dirs": [str(REPO / "salt")],
                    "beacons": bcn,
                },
            )
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        procs.append(
            subprocess.Popen(
                [str(venv_bin / "salt-master"), "-c", str(root / "master")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        time.sleep(5)  # let the master bind before the minions try to authenticate
        minions = {}
        for mid in ("stock-minion", "tributary-minion"):
            p = subprocess.Popen(
                [str(venv_bin / "salt-minion"), "-c", str(root / mid)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(p)
            minions[mid] = p
        # wait for the tributary minion's beacon to spool (it is subscribed and running)
        deadline = time.monotonic() + 120
        pubc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
        pubc.connect("127.0.0.1", broker.port)
        pubc.loop_start()
        while time.monotonic() < deadline and not os.path.exists(spool):
            pubc.publish("sensors/warm/temperature", b"1", qos=1)
            time.sleep(1)
        if not os.path.exists(spool):
            return {"error": "the tributary minion never spooled a reading (beacons not running)"}
        stop = threading.Event()
        sent = [0]

        def publish() -> None:
            if rate <= 0:  # idle run: the beacons' fixed cost
                stop.wait()
                return
            msgs = _messages(rate)
            tick = time.monotonic()
            while not stop.is_set():
                for i in range(0, rate, rate // 10):
                    for topic, payload in msgs[i : i + rate // 10]:
                        pubc.publish(topic, payload, qos=1)
                        sent[0] += 1
                    tick += 0.1
                    delay = tick - time.monotonic()
                    if delay > 0:
                        stop.wait(delay)
                    if stop.is_set():
                        break

        def spooled() -> int:
            s = GatewaySpool(spool)
            try:
                return int(s.status()["counters"].get("spooled", 0))
            finally:
                s.close()

        t_pub = threading.Thread(target=publish, daemon=True)
        t_pub.start()
        time.sleep(10)  # warm-up (caches, first batches) before the measured window
        samples: list[dict[str, Any]] = []
        n0 = spooled()
        _, cpu0 = _tree_rss_cpu(minions["tributary-minion"].pid)
        _, stock_cpu0 = _tree_rss_cpu(minions["stock-minion"].pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration_s:
            rss_t, _ = _tree_rss_cpu(minions["tributary-minion"].pid)
            rss_s, _ = _tree_rss_cpu(minions["stock-minion"].pid)
            samples.append({"t": round(time.monotonic() - t0), "tributary": rss_t, "stock": rss_s})
            time.sleep(5)
        n1 = spooled()
        _, cpu1 = _tree_rss_cpu(minions["tributary-minion"].pid)
        _, stock_cpu1 = _tree_rss_cpu(minions["stock-minion"].pid)
        elapsed = time.monotonic() - t0
        stop.set()
        t_pub.join(timeout=10)
        pubc.loop_stop()
        mib = 1024 * 1024
        diffs = [(s["tributary"] - s["stock"]) / mib for s in samples]
        half = max(1, len(samples) // 2)
        return {
            "salt_version": salt.version.__version__,
            "duration_s": round(elapsed),
            "readings_spooled_per_s": round((n1 - n0) / elapsed),
            "rate_target_per_s": rate,
            "minion_cpu_us_per_reading": round((cpu1 - cpu0) / max(1, n1 - n0) * 1e6, 2),
            "minion_cpu_us_per_reading_over_stock": round(
                ((cpu1 - cpu0) - (stock_cpu1 - stock_cpu0)) / max(1, n1 - n0) * 1e6, 2
            ),
            "minion_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1),
            "stock_minion_cpu_pct": round((stock_cpu1 - stock_cpu0) / elapsed * 100, 1),
            "rss_stock_mib": round(samples[-1]["stock"] / mib, 1),
            "rss_tributary_mib": round(samples[-1]["tributary"] / mib, 1),
            "rss_over_stock_mib_last": round(diffs[-1], 1),
            "rss_over_stock_mib_max": round(max(diffs), 1),
            "rss_tributary_first_half_mean_mib": round(
                sum(s["tributary"] for s in samples[:half]) / half / mib, 1
            ),
            "rss_tributary_second_half_mean_mib": round(
                sum(s["tributary"] for s in samples[half:]) / max(1, len(samples) - half) / mib, 1
            ),
            "samples": len(samples),
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        broker.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpu": cpu_path(),
        "mqtt_source": mqtt_source_cpu(),
        # Mosquitto's default window: 20 unacknowledged messages in flight to the subscriber
        "mqtt_source_broker_window_20": mqtt_source_cpu(5_000, "max_inflight_messages 20\n"),
        # paced: what a commit and its wake-ups cost per message when messages trickle in
        "mqtt_source_paced_100_per_s_one_by_one": mqtt_source_paced(100, 1),
        "mqtt_source_paced_1000_per_s_bursts_of_100": mqtt_source_paced(1000, 100),
        "spool": spool_rates(),
        "wire_bytes_per_reading": wire_sizes(),
        "targets": {
            "cpu_us_per_reading": 20,
            "rss_over_stock_mib": 25,
            "raw_bytes_per_reading": 12,
        },
    }
    if os.environ.get("TRIBUTARY_BENCH_GATEWAY_SKIP_MINION") != "1":
        duration = float(os.environ.get("TRIBUTARY_BENCH_GATEWAY_S", "60"))
        try:
            out["minion_memory"] = minion_memory(duration)
            if os.environ.get("TRIBUTARY_BENCH_GATEWAY_IDLE") == "1":
                out["minion_idle"] = minion_memory(min(duration, 60), rate=0)
        except Exception as exc:  # report, don't fake
            out["minion_memory"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
