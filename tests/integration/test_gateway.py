"""Gateway faults with real daemons: a minion down for a minute, a broker restart mid-stream.

These tests stop and restart shared session fixtures (a gateway minion, a Mosquitto broker)
and always bring them back to running (try/finally) for the tests that follow.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.support.topology import (
    GATEWAYS,
    es_count,
    es_readings,
    gateway_subscribed,
    wait_for,
)

pytestmark = [pytest.mark.usefixtures("topology"), pytest.mark.fault]

DOWN_S = 60


class Publisher(threading.Thread):
    """Publishes numbered readings (QoS 1, real mosquitto_pub) until stopped."""

    def __init__(self, broker, sensor: str, per_round: int = 20, pace_s: float = 0.5):
        super().__init__(daemon=True)
        self.broker, self.sensor = broker, sensor
        self.per_round, self.pace_s = per_round, pace_s
        self.sent = 0
        self.errors: list[str] = []
        self._stop_evt = threading.Event()
        # held during each publish: a restart never cuts a mosquitto_pub run in half (which
        # would leave it unknown which of its messages the broker took)
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            values = [str(self.sent + i) for i in range(self.per_round)]
            with self.lock:
                try:
                    self.broker.publish(f"sensors/{self.sensor}/temperature", values)
                    self.sent += len(values)
                except Exception as exc:  # broker not accepting: retry the same values
                    self.errors.append(str(exc))
            self._stop_evt.wait(self.pace_s)  # producer pacing, not a wait for a result

    def stop(self) -> int:
        self._stop_evt.set()
        self.join(timeout=130)
        return self.sent


def assert_exactly_once(es, gw: str, sensor: str, n: int) -> None:
    wait_for(lambda: es_count(es, gw, sensor) >= n, timeout=300, what=f"{n} {sensor} docs")
    docs = es_readings(es, gw, sensor, size=n + 100)
    values = sorted(d["value"] for d in docs)
    assert values == [float(i) for i in range(n)], (
        f"{len(docs)} docs; missing {sorted(set(range(n)) - {int(v) for v in values})[:20]}"
    )
    ids = [d["_id"] for d in docs]
    assert len(set(ids)) == len(ids) == n


def test_gateway_down_a_minute_loses_nothing(topology):
    es, brokers, gateways = topology["es"], topology["brokers"], topology["gateways"]
    gw = "gw-brisbane-1"
    factory = gateways[gw]
    pub = Publisher(brokers[gw], "gw-outage")
    pub.start()
    try:
        wait_for(lambda: es_count(es, gw, "gw-outage") > 0, timeout=120, what="stream flowing")
        factory.terminate()
        down_at = time.monotonic()
        # the broker queues for the persistent session while the minion is down
        wait_for(
            lambda: time.monotonic() - down_at >= DOWN_S,
            timeout=DOWN_S + 30,
            what="a minute of outage",
            interval=1,
        )
        published_while_down = pub.sent
    finally:
        if not factory.is_running():
            factory.start()
    try:
        wait_for(lambda: gateway_subscribed(factory), timeout=120, what=f"{gw} resubscribed")
        n = pub.stop()
        assert n > published_while_down > 0
        assert_exactly_once(es, gw, "gw-outage", n)
    finally:
        pub.stop()


def test_broker_restart_mid_stream_reconnects_and_loses_nothing(topology):
    es, brokers, gateways = topology["es"], topology["brokers"], topology["gateways"]
    gw = "gw-sydney-1"
    broker, factory = brokers[gw], gateways[gw]
    pub = Publisher(broker, "gw-broker-restart")
    pub.start()
    try:
        wait_for(
            lambda: es_count(es, gw, "gw-broker-restart") > 0, timeout=120, what="stream flowing"
        )
        with pub.lock:
            before = pub.sent
            broker.restart()  # SIGTERM (queue persisted) and start again on the same port
        wait_for(lambda: pub.sent > before + 100, timeout=120, what="publishing resumed")
        wait_for(lambda: gateway_subscribed(factory), timeout=120, what="beacon reconnected")
        n = pub.stop()
        assert_exactly_once(es, gw, "gw-broker-restart", n)
        st = factory.salt_call_cli(timeout=60).run("tributary.status")
        assert st.data["counters"].get("connects", 0) >= 2  # it did reconnect
    finally:
        pub.stop()
        if broker.proc is None or broker.proc.poll() is not None:
            broker.start()


def test_grain_targets_gateways_with_temperature_sensors(topology):
    top = topology["top"]
    ret = top.salt_cli(timeout=120).run(
        "-G", "tributary.read", "e2e-*", minion_tgt="tributary:sensors:temperature"
    )
    assert ret.returncode == 0, ret
    assert set(ret.data) == {"gw-brisbane-1", "gw-sydney-1"}, ret.data
    for gw, answer in ret.data.items():
        assert isinstance(answer["readings"], dict), (gw, answer)
    # A grain no gateway has reaches nobody. The syndic master finds no minion for it, so the
    # top master never learns whom to wait for and its CLI would wait out its whole timeout.
    # Instead: publish it, then a job both gateways answer; each takes publications in order,
    # so by that answer each has seen (and declined) the first, whose job holds no return.
    ret = top.salt_cli(timeout=60).run(
        "--async", "-G", "test.ping", minion_tgt="tributary:sensors:radiation"
    )
    found = re.search(r"\b\d{20}\b", ret.stdout)
    assert ret.returncode == 0 and found, ret
    ret = top.salt_cli(timeout=120).run("-L", "test.ping", minion_tgt=",".join(GATEWAYS))
    assert ret.returncode == 0 and set(ret.data) == set(GATEWAYS), ret
    ret = top.salt_run_cli(timeout=60).run("jobs.lookup_jid", found.group(0))
    assert ret.returncode == 0 and not ret.data, ret


def test_health_heartbeat_reaches_elasticsearch(topology):
    es, gateways = topology["es"], topology["gateways"]
    gw = "gw-sydney-1"
    cli = gateways[gw].salt_call_cli(timeout=90)
    ret = cli.run("beacons.add", "tributary_health", '[{"interval": 2}]')
    assert ret.returncode == 0 and ret.data["result"], ret
    try:

        def heartbeats():
            try:
                res = es.search(
                    "tributary-health-*",
                    {
                        "size": 5,
                        "query": {"term": {"gateway": gw}},
                        "sort": [{"@timestamp": "desc"}],
                    },
                )
            except Exception:
                return None
            hits = [h["_source"] for h in res["hits"]["hits"]]
            return hits or None

        hits = wait_for(heartbeats, timeout=120, what="a health document for the gateway")
        status = cli.run("tributary.status").data
        doc = hits[0]
        assert doc["v"] == 1 and doc["epoch"] == status["epoch"]
        assert 0 < doc["last_seq"] <= status["last_seq"]
        assert doc["broker"] == "subscribed" and doc["spool_held"] > 0
        # the health metrics are numbered readings too
        wait_for(lambda: es_count(es, gw, "health") > 0, timeout=120, what="health readings")
    finally:
        cli.run("beacons.delete", "tributary_health")
