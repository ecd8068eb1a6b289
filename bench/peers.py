"""``make bench BENCH=peers``: Tributary beside Telegraf, in one run, against one Elasticsearch.

The job Tributary does at the top (MQTT readings into Elasticsearch) is what Telegraf's
``mqtt_consumer`` input with its ``elasticsearch`` output does for many IoT users. This section
starts one Elasticsearch, one Mosquitto broker (the tests' configuration: persistence on,
``max_queued_messages 200000``), Tributary's real path (gateway salt-minion with the
``tributary_mqtt`` beacon -> syndic master -> salt-syndic -> top master -> ``tributary_relay``)
and a Telegraf built from the Go module proxy with only the plugins it needs, subscribed to
the same broker, and measures:

* ``throughput``: the same N readings (``TRIBUTARY_PEERS_N``, default 100,000) published by
  ``mosquitto_pub`` at QoS 1, once to Telegraf's topic and once to the gateway's, until all are
  searchable (both counted the same way: ``_count`` after ``_refresh`` every 0.25 s), with a
  raw ``_bulk`` of N pre-built documents in each round; ``TRIBUTARY_PEERS_ROUNDS`` rounds
  (default 3, the order of the two peers alternating), medians and ratios to that round's raw;
  CPU seconds of each side's processes during its phase.
  ``TRIBUTARY_PEERS_GATEWAYS`` (default 1) gateways behind the syndic, each its own
  salt-minion and beacon on the same broker, share Tributary's N readings evenly.
  ``TRIBUTARY_PEERS_ANOMALIES=0`` turns the relay's detector off (Telegraf has none);
  ``TRIBUTARY_PEERS_RUN_BYTES`` sets the beacon's ``batch.max_run_bytes`` (at most the
  beacon's hard cap, 128 KiB; above it the beacon's ``validate()`` refuses the config);
  ``TRIBUTARY_PEERS_DRAIN=0`` turns the gateways' backlog drain off (beacon runs only). Each
  round's Tributary entry has the gateways' counters: readings emitted, and how many of them
  a drain sent.
* ``backlog``: a gateway catching up (the first gateway; Tributary only, Telegraf keeps no
  backlog of its own): ``TRIBUTARY_PEERS_BACKLOG_N`` readings (default 200,000) published
  while its beacon runs are paused (``salt-call beacons.disable``; the subscriber keeps
  spooling), then the runs resumed: readings/s from resuming until the last is indexed, and
  how many a backlog drain sent (``TRIBUTARY_PEERS_DRAIN=0`` for beacon runs alone).
* ``es_outage``: readings at a steady rate (``TRIBUTARY_PEERS_RATE``, default 500/s) on a topic
  both subscribe to, Elasticsearch stopped for ``TRIBUTARY_PEERS_OUTAGE_S`` (default 120 s) and
  started again; then readings lost (acknowledged by the broker, never indexed) and duplicated
  (indexed more than once) for each peer, counted value by value (each payload is unique).
* ``broker_restart``: the same, across a restart of the broker (SIGTERM, which persists its
  queues, then a start on the same port and files).

Telegraf's configuration is the one its documentation gives for not losing MQTT messages
(``qos = 1``, ``persistent_session = true``, a ``client_id``), batches of 5,000 like the relay's,
a buffer of 100,000, flush every second; everything else is the plugin defaults (automatic
document ids, ``timeout = "5s"``, health check every 10 s). Its Elasticsearch output reads the
server version from ``GET /``, which the integ-test distribution answers with 405, so Telegraf
talks to the node through ``bench/es_passthrough.py`` (bench only; it answers ``GET /`` and
forwards the rest; its CPU is counted with Telegraf's).

The Telegraf binary is built once with ``go install`` (module proxy; Go 1.26 at
``/usr/local/go/bin/go`` or on PATH) into the download cache beside the Elasticsearch zip
(``/var/cache/tributary/telegraf/<version>/`` as root, else ``~/.cache/tributary/...``), never
into the repository. ``TRIBUTARY_TELEGRAF`` points at an existing binary instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as rb  # noqa: E402  (bench/run.py: its helpers, and REPO/src on sys.path)

from saltext.tributary.relay.elasticsearch import install_templates, make_client  # noqa: E402
from tests.support.es import cache_dir  # noqa: E402

REPO = rb.REPO
N = int(os.environ.get("TRIBUTARY_PEERS_N", "100000"))
ROUNDS = int(os.environ.get("TRIBUTARY_PEERS_ROUNDS", "3"))
RATE = int(os.environ.get("TRIBUTARY_PEERS_RATE", "500"))
OUTAGE_S = float(os.environ.get("TRIBUTARY_PEERS_OUTAGE_S", "120"))
#: "throughput", "backlog", "es_outage" or "broker_restart" (comma-separated): only those parts
PARTS = os.environ.get(
    "TRIBUTARY_PEERS_PARTS", "throughput,backlog,es_outage,broker_restart"
).split(",")
TELEGRAF_VERSION = os.environ.get("TRIBUTARY_TELEGRAF_VERSION", "v1.37.2")
TELEGRAF_TAGS = "custom,inputs.mqtt_consumer,outputs.elasticsearch,parsers.value"
#: gateways behind the syndic (each its own salt-minion and beacon on the same broker); the
#: throughput phase splits Tributary's N readings evenly across them
GATEWAYS = int(os.environ.get("TRIBUTARY_PEERS_GATEWAYS", "1"))
#: the gateway beacon's ``batch.max_run_bytes`` (unset: the beacon's default)
RUN_BYTES = int(os.environ.get("TRIBUTARY_PEERS_RUN_BYTES", "0"))
DRAIN = os.environ.get("TRIBUTARY_PEERS_DRAIN", "1") != "0"
BACKLOG_N = int(os.environ.get("TRIBUTARY_PEERS_BACKLOG_N", "200000"))
#: ``TRIBUTARY_PEERS_ANOMALIES=0``: the relay with its detector off
ANOMALIES = os.environ.get("TRIBUTARY_PEERS_ANOMALIES", "1") != "0"
GWS = [f"peers-gw-{k}" for k in range(1, GATEWAYS + 1)]
TG_INDEX = "peers-telegraf"
TR_INDEX = "peers-readings-*"
log = rb.log


# -- Telegraf ------------------------------------------------------------------------------
def telegraf_binary() -> pathlib.Path:
    """The cached Telegraf build, built with ``go install`` when missing."""
    if os.environ.get("TRIBUTARY_TELEGRAF"):
        return pathlib.Path(os.environ["TRIBUTARY_TELEGRAF"])
    folder = cache_dir() / "telegraf" / TELEGRAF_VERSION
    exe = folder / "telegraf"
    if exe.exists():
        return exe
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise RuntimeError("building Telegraf needs Go (go on PATH or /usr/local/go/bin/go)")
    folder.mkdir(parents=True, exist_ok=True)
    log(f"building Telegraf {TELEGRAF_VERSION} ({TELEGRAF_TAGS}) into {folder}")
    subprocess.run(
        [
            go,
            "install",
            "-tags",
            TELEGRAF_TAGS,
            f"github.com/influxdata/telegraf/cmd/telegraf@{TELEGRAF_VERSION}",
        ],
        env=dict(os.environ, GOBIN=str(folder)),
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return exe


def telegraf_conf(path: pathlib.Path, broker_port: int, es_port: int, node: Any) -> None:
    path.write_text(
        f"""
[agent]
  interval = "1s"
  flush_interval = "1s"
  flush_jitter = "0s"
  metric_batch_size = 5000
  metric_buffer_limit = 100000
  omit_hostname = true
  logfile = "{path.parent}/telegraf.log"

[[inputs.mqtt_consumer]]
  servers = ["tcp://127.0.0.1:{broker_port}"]
  topics = ["tg/#", "both/#"]
  qos = 1
  persistent_session = true
  client_id = "peers-telegraf"
  max_undelivered_messages = 10000
  data_format = "value"
  data_type = "float"

[[outputs.elasticsearch]]
  urls = ["http://127.0.0.1:{es_port}"]
  username = "{node.username}"
  password = "{node.password}"
  index_name = "{TG_INDEX}"
  manage_template = true
  template_name = "{TG_INDEX}"
"""
    )


# -- Tributary's path (as bench/run.py builds it) ----------------------------------------------
def start_tributary(
    d: rb.Daemons, node: Any, root: pathlib.Path, broker_port: int
) -> tuple[rb.Counters, Any]:
    common = {"log_level": "warning", "log_level_logfile": "warning", "user": "root"}
    top_pub, top_ret = rb.free_port(), rb.free_port()
    spool = str(root / "top/relay.db")
    relay_cfg = {
        "elasticsearch": {**node.client_config, "replicas": 0},
        "index_prefix": "peers",
        "bulk": {"max_docs": 5000, "max_wait_s": 0.05},
        "spool_path": spool,
        "trusted_syndics": ["peers-syndic"],
        "anomalies": {"enabled": ANOMALIES},
    }
    rb.write_yaml(
        root / "top/master",
        {
            **common,
            "id": "peers-top",
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
    top = d.start("salt-master", root / "top")
    rb.wait(lambda: os.path.exists(spool), 120, "the relay engine's spool", 0.5)
    syn_pub, syn_ret = rb.start_syndic(d, root / "syndic", "peers-syndic", common, top_ret)
    number = {"format": "number", "unit": "C"}
    for k, gw in enumerate(GWS):
        start_gateway(d, root / gw, gw, k, common, syn_ret, syn_pub, broker_port, number)
    return rb.Counters(spool), top


def gw_prefix(k: int) -> str:
    """The topic prefix of gateway ``k`` (0-based): ``gw``, ``gw2``, ``gw3``..."""
    return "gw" if k == 0 else f"gw{k + 1}"


def start_gateway(
    d: rb.Daemons,
    gwd: pathlib.Path,
    gw: str,
    k: int,
    common: dict,
    syn_ret: int,
    syn_pub: int,
    broker_port: int,
    number: dict,
) -> None:
    topics = [{"topic": gw_prefix(k) + "/{sensor}/{metric}", **number}]
    if k == 0:  # the fault scenarios' shared topic: the first gateway only
        topics.append({"topic": "both/{sensor}/{metric}", **number})
    rb.write_yaml(
        gwd / "minion",
        {
            **common,
            "id": gw,
            "root_dir": str(gwd),
            "master": "127.0.0.1",
            "master_port": syn_ret,
            "publish_port": syn_pub,
            "module_dirs": [str(REPO / "salt")],
            "grains": {"site": "peers"},
            "beacons": {
                "tributary_mqtt": [
                    {"broker": {"host": "127.0.0.1", "port": broker_port}},
                    {"topics": topics},
                    {
                        "batch": {
                            **({"max_run_bytes": RUN_BYTES} if RUN_BYTES else {}),
                            "drain": DRAIN,
                        }
                    },
                    {"interval": 1},
                ]
            },
        },
    )
    d.start("salt-minion", gwd)


# -- measuring -------------------------------------------------------------------------------
def gateway_counters(root: pathlib.Path) -> dict[str, int]:
    """The gateways' spool counters added up (read-only: emitted, batches, drained...)."""
    out: dict[str, int] = {}
    for path in (p for gw in GWS for p in (root / gw).glob("**/tributary/spool.db")):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            for name, n in db.execute("SELECT name, n FROM counters"):
                out[name] = out.get(name, 0) + n
        finally:
            db.close()
    return out


def gateway_unsent(root: pathlib.Path) -> int:
    """Readings the first gateway has numbered and not yet emitted (read-only)."""
    path = next((root / GWS[0]).glob("**/tributary/spool.db"))
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        meta = dict(db.execute("SELECT k, v FROM meta WHERE k IN ('last_seq', 'cursor')"))
    finally:
        db.close()
    return int(meta["last_seq"]) - int(meta["cursor"])


def backlog(
    d: Any, node: Any, broker: Any, root: pathlib.Path, pids: dict[str, int], es_pid: int
) -> dict[str, Any]:
    """A gateway catching up: ``BACKLOG_N`` readings spooled while its beacon runs are paused
    (``beacons.disable``; the MQTT subscriber keeps spooling), then the runs resumed; the
    catch-up rate is BACKLOG_N over the time from resuming to the last one indexed."""
    gwd = root / GWS[0]

    def salt_call(fun: str) -> None:
        subprocess.run(
            [str(rb.VENV_BIN / "salt-call"), "-c", str(gwd), "--out", "json", fun],
            env=d.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    sensor = "backlog"
    payloads = [f"{20 + (i % 997) / 100:.2f}" for i in range(BACKLOG_N)]
    g0 = gateway_counters(root)
    salt_call("beacons.disable")
    try:
        unsent = gateway_unsent(root)
        log(f"backlog: {BACKLOG_N} readings published with beacon runs paused")
        broker.publish(f"{gw_prefix(0)}/{sensor}/temperature", payloads)
        rb.wait(lambda: gateway_unsent(root) >= unsent + BACKLOG_N, 300, "the backlog spooled", 0.5)
    finally:
        c0, es0 = cpu(pids), rb.tree_cpu_s(es_pid)
        t = time.perf_counter()
        salt_call("beacons.enable")
    # when the gateway had emitted it all (its part done), polled beside the index count
    sent_at: list[float] = []

    def watch() -> None:
        while not sent_at and time.perf_counter() - t < 600:
            if gateway_unsent(root) == 0:
                sent_at.append(time.perf_counter() - t)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    got, dt = until_indexed(node, TR_INDEX, tr_query(sensor), BACKLOG_N, t)
    c1, es1 = cpu(pids), rb.tree_cpu_s(es_pid)
    watcher.join(5)
    g1 = gateway_counters(root)
    return {
        "readings": BACKLOG_N,
        "drain": DRAIN,
        "readings_indexed": got,
        "seconds_from_resume": round(dt, 2),
        "readings_per_s": round(got / dt),
        "gateway_emitted_all_after_s": round(sent_at[0], 2) if sent_at else None,
        "cpu_share_of_a_core_by_process": {k: round((c1[k] - c0[k]) / dt, 2) for k in c1}
        | {"elasticsearch": round((es1 - es0) / dt, 2)},
        "gateway_counters": {
            k: g1.get(k, 0) - g0.get(k, 0)
            for k in ("emitted", "batches", "drains", "drained", "drain_requests")
        },
    }


def tg_query(topic: str) -> dict:
    return {"term": {"tag.topic": topic}}


def tr_query(sensor: str) -> dict:
    return {"bool": {"filter": [{"terms": {"gateway": GWS}}, {"term": {"sensor": sensor}}]}}


def until_indexed(
    node: Any, index: str, query: dict, target: int, t0: float, stall_s: float = 20
) -> tuple[int, float]:
    """Poll the count (after a refresh) every 0.25 s until ``target`` or no progress for
    ``stall_s``; returns the count and the seconds from ``t0`` to its last change."""
    n, dt, _ = indexing_timeline(node, index, query, target, t0, stall_s)
    return n, dt


def indexing_timeline(
    node: Any, index: str, query: dict, target: int, t0: float, stall_s: float = 20
) -> tuple[int, float, dict[str, float]]:
    """:func:`until_indexed`, and the seconds from ``t0`` until the count first reached 1 %,
    50 % and 90 % of ``target`` (where the time went: a late start or a slow finish)."""
    last, last_t = -1, time.perf_counter()
    marks: dict[str, float] = {}
    while True:
        n = node.count(index, query)
        now = time.perf_counter()
        if n != last:
            last, last_t = n, now
            for name, share in (("p1", 0.01), ("p50", 0.5), ("p90", 0.9)):
                if name not in marks and n >= share * target:
                    marks[name] = round(now - t0, 2)
        if n >= target or now - last_t > stall_s:
            return n, last_t - t0, marks
        time.sleep(0.25)


def hop_percentiles(node: Any, query: dict) -> dict[str, dict[str, float]]:
    """Percentiles (50, 95, 99) of the indexed readings' ``hop_ms`` per hop: the time each
    reading waited on its gateway, on the way up, and in the relay."""
    aggs = {
        hop: {"percentiles": {"field": f"hop_ms.{hop}", "percents": [50, 95, 99]}}
        for hop in ("gateway", "uplink", "relay")
    }
    resp = node.search(TR_INDEX, {"size": 0, "query": query, "aggs": aggs})
    return {
        hop: {k: round(v, 1) for k, v in (resp["aggregations"][hop]["values"] or {}).items()}
        for hop in aggs
    }


def until_all(
    node: Any, what: list[tuple[str, dict]], target: int, t0: float, stall_s: float
) -> list[float]:
    """:func:`until_indexed` for several counts at once (polled together, so that each one's
    time of last change is seen as it happens); returns the seconds for each."""
    last = [-1] * len(what)
    last_t = [time.perf_counter()] * len(what)
    while True:
        now = time.perf_counter()
        for i, (index, query) in enumerate(what):
            n = node.count(index, query)
            if n != last[i]:
                last[i], last_t[i] = n, now
        if all(x >= target for x in last) or all(now - t > stall_s for t in last_t):
            return [t - t0 for t in last_t]
        time.sleep(0.25)


def index_stats(node: Any) -> dict[str, dict[str, Any]]:
    """Where Elasticsearch spent its time on each peer's index over all rounds (both indexed
    the same readings): milliseconds indexing, refreshing, merging and flushing, and the
    segments and requests it took."""
    out: dict[str, dict[str, Any]] = {}
    for peer, index in (("telegraf", TG_INDEX), ("tributary", TR_INDEX)):
        code, body = node.request("GET", f"/{index}/_stats/indexing,refresh,merge,flush,segments")
        if code != 200:
            out[peer] = {"error": f"{code} {body[:200]!r}"}
            continue
        t = json.loads(body)["_all"]["total"]
        out[peer] = {
            "docs_indexed": t["indexing"]["index_total"],
            "index_ms": t["indexing"]["index_time_in_millis"],
            "refreshes": t["refresh"]["total"],
            "refresh_ms": t["refresh"]["total_time_in_millis"],
            "merges": t["merges"]["total"],
            "merge_ms": t["merges"]["total_time_in_millis"],
            "merged_docs": t["merges"]["total_docs"],
            "flush_ms": t["flush"]["total_time_in_millis"],
            "segments": t["segments"]["count"],
        }
    return out


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: rb.tree_cpu_s(p) for name, p in pids.items()}


def tally(node: Any, index: str, query: dict, field: str) -> dict[float, int]:
    """Every value indexed for the query, with how many documents carry it (composite agg)."""
    out: dict[float, int] = {}
    after = None
    while True:
        comp: dict[str, Any] = {"size": 10000, "sources": [{"v": {"terms": {"field": field}}}]}
        if after:
            comp["after"] = after
        r = node.search(index, {"size": 0, "query": query, "aggs": {"v": {"composite": comp}}})
        agg = r["aggregations"]["v"]
        for b in agg["buckets"]:
            out[float(b["key"]["v"])] = b["doc_count"]
        after = agg.get("after_key")
        if not agg["buckets"] or not after:
            return out


def accounting(published: set[float], got: dict[float, int]) -> dict[str, int]:
    return {
        "acknowledged_by_broker": len(published),
        "indexed_documents": sum(got.values()),
        "distinct_indexed": len(got),
        "lost": len(published - set(got)),
        "duplicated_documents": sum(c - 1 for c in got.values() if c > 1),
        "readings_indexed_twice_or_more": sum(1 for c in got.values() if c > 1),
        "unexpected": len(set(got) - published),
    }


class SteadyPublisher(threading.Thread):
    """A paho client (QoS 1, persistent session, reconnecting) publishing unique values at a
    steady rate; ``published()`` is the set the broker acknowledged (PUBACK)."""

    def __init__(self, port: int, topic: str, base: int, rate: int) -> None:
        super().__init__(daemon=True)
        import paho.mqtt.client as mqtt

        self.topic, self.base, self.rate = topic, base, rate
        self.stop_ev = threading.Event()
        self.infos: list[tuple[int, Any]] = []
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"peers-pub-{base}", clean_session=False
        )
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(0.2, 2)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def run(self) -> None:
        tick, i = time.monotonic(), 0
        while not self.stop_ev.is_set():
            for _ in range(self.rate // 10):
                v = self.base + i
                self.infos.append((v, self.c.publish(self.topic, str(v).encode(), qos=1)))
                i += 1
            tick += 0.1
            self.stop_ev.wait(max(0.0, tick - time.monotonic()))

    @staticmethod
    def acked(info: Any) -> bool:
        # paho 2.2: is_published() raises for a message handed over while the client was
        # disconnected (rc "not connected"), although paho keeps it and sends it after the
        # reconnect; the PUBACK still marks the same info object as published
        with info._condition:
            return bool(info._published)

    def finish(self, timeout: float = 120) -> set[float]:
        self.stop_ev.set()
        self.join(10)
        try:
            rb.wait(lambda: all(self.acked(i) for _, i in self.infos), timeout, "PUBACKs", 0.2)
        except RuntimeError:
            pass  # the unacknowledged ones are not counted as published
        self.c.loop_stop()
        self.c.disconnect()
        return {float(v) for v, info in self.infos if self.acked(info)}


def fault(
    node: Any, broker: Any, name: str, base: int, action, settle_s: float = 60
) -> dict[str, Any]:
    """Steady readings on ``both/<name>/temperature`` through ``action()``; then what each
    peer lost and duplicated."""
    topic = f"both/{name}/temperature"
    pub = SteadyPublisher(broker.port, topic, base, RATE)
    pub.start()
    rb.wait(
        lambda: (
            node.count(TG_INDEX, tg_query(topic)) > 0 and node.count(TR_INDEX, tr_query(name)) > 0
        ),
        120,
        f"{name}: both peers indexing",
        0.5,
    )
    info = action()
    t_back = time.perf_counter()
    # ten more seconds of readings after the fault, then stop and wait for both to settle
    rb.wait(lambda: time.perf_counter() - t_back > 10, 20, "readings after the fault", 0.5)
    published = pub.finish()
    n = len(published)
    tg_s, tr_s = until_all(
        node, [(TG_INDEX, tg_query(topic)), (TR_INDEX, tr_query(name))], n, t_back, settle_s
    )
    return {
        **info,
        "rate_per_s": RATE,
        "telegraf": {
            **accounting(published, tally(node, TG_INDEX, tg_query(topic), "mqtt_consumer.value")),
            "last_indexed_s_after_fault": round(tg_s, 1),
        },
        "tributary": {
            **accounting(published, tally(node, TR_INDEX, tr_query(name), "value")),
            "last_indexed_s_after_fault": round(tr_s, 1),
        },
    }


def main() -> None:
    from tests.support.es import start_elasticsearch
    from tests.support.mosquitto import start_broker

    out: dict[str, Any] = {
        "machine": rb.machine(),
        "n": N,
        "gateways": GATEWAYS,
    }
    exe = telegraf_binary()
    out["telegraf"] = {
        "binary": str(exe),
        "module": f"github.com/influxdata/telegraf@{TELEGRAF_VERSION}",
    }
    out["telegraf"]["tags"] = TELEGRAF_TAGS
    root = pathlib.Path(tempfile.mkdtemp(prefix="tributary-peers-"))
    d = rb.Daemons()
    extra: list[subprocess.Popen] = []
    log("starting Elasticsearch")
    # plain HTTP (security on, basic auth): Telegraf's pass-through and the relay both talk
    # to the node without TLS, so neither side pays for it
    node = start_elasticsearch(tls=False)
    broker = None
    try:
        out["machine"]["elasticsearch"] = node.version
        client = make_client({**node.client_config, "request_timeout": 120})
        install_templates(client, "peerswarm", replicas=0)
        rb.raw_bulk(client, min(N, 50_000), prefix="peerswarm")
        broker = start_broker()
        proxy_port = rb.free_port()
        proxy = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "es_passthrough.py"),
                "--port",
                str(proxy_port),
                "--upstream",
                f"127.0.0.1:{node.port}",
                "--version",
                node.version,
            ],
            start_new_session=True,
        )
        extra.append(proxy)
        tgdir = root / "telegraf"
        tgdir.mkdir()
        telegraf_conf(tgdir / "telegraf.conf", broker.port, proxy_port, node)
        log("starting Tributary's path (top master + relay, syndic, gateway)")
        counters, top = start_tributary(d, node, root, broker.port)
        log("starting Telegraf")
        tg = subprocess.Popen(
            [str(exe), "--config", str(tgdir / "telegraf.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        extra.append(tg)

        # both ready: one reading each through
        def warm(topic: str, index: str, query: dict) -> bool:
            broker.publish(topic, "1")
            return node.count(index, query) > 0

        rb.wait(
            lambda: warm("tg/warm/temperature", TG_INDEX, tg_query("tg/warm/temperature")),
            120,
            "Telegraf indexing",
            2,
        )
        for k, gw in enumerate(GWS):
            q = {"bool": {"filter": [{"term": {"gateway": gw}}, {"term": {"sensor": "warm"}}]}}
            rb.wait(
                lambda k=k, q=q: warm(f"{gw_prefix(k)}/warm/temperature", TR_INDEX, q),
                300,
                f"Tributary indexing through the syndic ({gw})",
                2,
            )
        # each side's processes (daemon trees), for CPU seconds per phase
        tg_pids = {"telegraf": tg.pid, "es_passthrough": proxy.pid}
        tr_pids = dict(
            zip(
                [
                    "top_master_relay",
                    "syndic_master",
                    "salt_syndic",
                    *(f"gateway_minion{'' if k == 0 else f'_{k + 1}'}" for k in range(GATEWAYS)),
                ],
                [p.pid for p in d.procs],
                strict=True,
            )
        )
        assert node.proc is not None
        es_pid = node.proc.pid
        for p in [*tg_pids.values(), *tr_pids.values()]:
            rb.wait(lambda p=p: rb.settled(p, 1.0, 0.3), 120, "daemons to settle")

        if "throughput" in PARTS:
            payloads = [f"{20 + (i % 997) / 100:.2f}" for i in range(N)]
            rounds = []
            for r in range(ROUNDS):
                prefix = f"peersraw{r}"
                install_templates(client, prefix, replicas=0)
                log(f"round {r + 1}: raw _bulk {N}")
                row: dict[str, Any] = {"raw_bulk": rb.raw_bulk(client, N, prefix=prefix)}
                order = ["telegraf", "tributary"] if r % 2 == 0 else ["tributary", "telegraf"]
                for peer in order:
                    log(f"round {r + 1}: {peer}, {N} readings published")
                    if peer == "telegraf":
                        topic, index = f"tg/tput{r}/temperature", TG_INDEX
                        query, pids = tg_query(topic), tg_pids
                    else:
                        topic, index = "", TR_INDEX
                        query, pids = tr_query(f"tput{r}"), tr_pids
                    # each phase starts with Elasticsearch idle: merges and refreshes left by
                    # the phase before are not charged to this one
                    settle = time.perf_counter()
                    rb.wait(lambda: rb.settled(es_pid, 1.0, 0.1), 120, "Elasticsearch to settle")
                    settle_s = time.perf_counter() - settle
                    c0, es0 = cpu(pids), rb.tree_cpu_s(es_pid)
                    g0 = gateway_counters(root) if peer == "tributary" else {}
                    t = time.perf_counter()
                    if topic:
                        broker.publish(topic, payloads)
                    else:  # N readings split evenly across the gateways, published at once
                        share = -(-N // GATEWAYS)
                        threads = [
                            threading.Thread(
                                target=broker.publish,
                                args=(
                                    f"{gw_prefix(k)}/tput{r}/temperature",
                                    payloads[k * share : (k + 1) * share],
                                ),
                            )
                            for k in range(GATEWAYS)
                        ]
                        for th in threads:
                            th.start()
                        for th in threads:
                            th.join()
                    pub_s = time.perf_counter() - t
                    got, dt, marks = indexing_timeline(node, index, query, N, t)
                    c1, es1 = cpu(pids), rb.tree_cpu_s(es_pid)
                    used = {k: c1[k] - c0[k] for k in c1}
                    row[peer] = {
                        "readings_indexed": got,
                        "publish_seconds": round(pub_s, 2),
                        "seconds": round(dt, 2),
                        "readings_per_s": round(got / dt),
                        "ratio_to_raw": round(got / dt / row["raw_bulk"]["readings_per_s"], 3),
                        "cpu_s": round(sum(used.values()), 1),
                        "cpu_us_per_reading": round(sum(used.values()) / max(1, got) * 1e6, 1),
                        "cpu_us_per_reading_by_process": {
                            k: round(v / max(1, got) * 1e6, 1) for k, v in used.items()
                        },
                        "elasticsearch_cpu_us_per_reading": round(
                            (es1 - es0) / max(1, got) * 1e6, 1
                        ),
                        # seconds from the first publish until 1 %, 50 %, 90 % were searchable
                        "indexed_by_s": marks,
                        "waited_for_elasticsearch_to_settle_s": round(settle_s, 1),
                    }
                    if peer == "tributary":  # how the gateways sent them: runs or drains
                        g1 = gateway_counters(root)
                        row[peer]["gateway_counters"] = {
                            k: g1.get(k, 0) - g0.get(k, 0)
                            for k in ("emitted", "batches", "drains", "drained", "drain_requests")
                        } | {"drain_failures": g1.get("drain_failures", 0)}
                        row[peer]["hop_ms"] = hop_percentiles(node, query)
                rounds.append(row)
                log(
                    f"round {r + 1}: "
                    + json.dumps({k: v["readings_per_s"] for k, v in row.items()})
                )
            out["throughput"] = {
                "rounds": rounds,
                "median_readings_per_s": {
                    k: statistics.median(r[k]["readings_per_s"] for r in rounds)
                    for k in ("raw_bulk", "telegraf", "tributary")
                },
                "median_ratio_to_raw": {
                    k: statistics.median(r[k]["ratio_to_raw"] for r in rounds)
                    for k in ("telegraf", "tributary")
                },
                "tributary_over_telegraf_median": statistics.median(
                    r["tributary"]["readings_per_s"] / r["telegraf"]["readings_per_s"]
                    for r in rounds
                ),
                "elasticsearch_index_stats": index_stats(node),
            }

        if "backlog" in PARTS:
            out["backlog"] = backlog(d, node, broker, root, tr_pids, node.proc.pid)
            log("backlog: " + json.dumps(out["backlog"]))

        if "es_outage" in PARTS:

            def outage() -> dict[str, Any]:
                log(f"es_outage: Elasticsearch stopped for {OUTAGE_S:.0f} s")
                t = time.perf_counter()
                node.stop()
                rb.wait(lambda: time.perf_counter() - t >= OUTAGE_S, OUTAGE_S + 5, "outage", 0.5)
                t_start = time.perf_counter()
                node.start()  # returns when the node answers again
                log("es_outage: Elasticsearch back")
                return {
                    "es_stopped_s": round(t_start - t, 1),
                    "es_start_until_ready_s": round(time.perf_counter() - t_start, 1),
                    "outage_s": round(time.perf_counter() - t, 1),
                }

            out["es_outage"] = fault(node, broker, "outage", 1_000_000, outage, settle_s=90)
            log("es_outage: " + json.dumps(out["es_outage"]))

        if "broker_restart" in PARTS:

            def restart() -> dict[str, Any]:
                log("broker_restart: restarting Mosquitto")
                t = time.perf_counter()
                broker.restart()
                return {"broker_restart_s": round(time.perf_counter() - t, 2)}

            out["broker_restart"] = fault(node, broker, "restart", 2_000_000, restart)
            log("broker_restart: " + json.dumps(out["broker_restart"]))
        out["relay_counters"] = {k: v for k, v in counters.get().items() if "@" not in k}
        del top
    except Exception as exc:  # report what was measured so far
        out["error"] = f"{type(exc).__name__}: {exc}"
        tglog = root / "telegraf" / "telegraf.log"
        if tglog.exists():
            out["telegraf_log_tail"] = tglog.read_text().splitlines()[-15:]
    finally:
        for p in extra:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        d.stop_all()
        if broker is not None:
            broker.cleanup()
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
