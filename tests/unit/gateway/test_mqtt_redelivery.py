"""A crash between spool commit and broker acknowledgement numbers nothing twice.

Real Mosquitto broker, the source's own connection: the first subscriber commits every message
to the spool but its acknowledgements never leave (its connection dies first, as under kill -9); the
broker redelivers the unacknowledged QoS 1 messages, flagged DUP, to the next subscriber with
the same persistent session, which recognises them in the spool and only acknowledges them.
"""

from __future__ import annotations

import time

import pytest

from saltext.tributary.gateway.sources.mqtt import BrokerConfig, MqttSource
from saltext.tributary.gateway.sources.payload import Mapper, compile_rules
from saltext.tributary.gateway.spool import GatewaySpool
from tests.support.mosquitto import start_broker

pytest.importorskip("paho.mqtt.client")

RULES = [{"topic": "sensors/{sensor}/{metric}", "format": "number", "unit": "C"}]


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _source(port: int, path: str) -> MqttSource:
    src = MqttSource(
        BrokerConfig(port=port, client_id="gw-redelivery"), Mapper(compile_rules(RULES)), path
    )
    src.start()
    _wait(lambda: src.subscribed)
    return src


def _counters(path: str) -> dict:
    spool = GatewaySpool(path)
    try:
        return {**spool.counters(), "last_seq": spool.status()["last_seq"]}
    finally:
        spool.close()


def test_redelivered_after_commit_is_not_numbered_twice(tmp_path):
    broker = start_broker()
    path = str(tmp_path / "spool.db")
    try:
        first = _source(broker.port, path)
        # The acknowledgements of this subscriber never reach the broker.
        first.client.ack_many = lambda mids: None  # type: ignore[method-assign]
        broker.publish("sensors/t1/temperature", [str(i) for i in range(40)])
        _wait(lambda: _counters(path).get("spooled", 0) == 40)
        # Die without a DISCONNECT and without the stop() flush: like kill -9.
        first._stop.set()
        first.client.kill()

        second = _source(broker.port, path)
        try:
            _wait(lambda: _counters(path).get("redelivered_duplicates", 0) == 40)
            broker.publish("sensors/t1/temperature", ["99"])
            _wait(lambda: _counters(path).get("spooled", 0) == 41)
        finally:
            second.stop()
        counters = _counters(path)
        assert counters["last_seq"] == 41
        assert counters["spooled"] == 41
        assert counters["redelivered_duplicates"] == 40
    finally:
        broker.cleanup()


def test_a_broker_window_of_20_does_not_hold_the_gateway_to_one_window_per_flush(tmp_path):
    """Mosquitto sends a subscriber at most ``max_inflight_messages`` (20 by default)
    unacknowledged QoS 1 messages. The source acknowledges after each spool commit; it commits
    as soon as the broker goes quiet, not only every ``FLUSH_EVERY_S``. With that interval set
    to an hour here, 500 messages arrive only if the quiet-broker commits happen (without
    them: 20, then nothing for an hour)."""
    broker = start_broker(extra="max_inflight_messages 20\n")
    path = str(tmp_path / "spool.db")
    try:
        src = MqttSource(
            BrokerConfig(port=broker.port, client_id="gw-window"),
            Mapper(compile_rules(RULES)),
            path,
        )
        src.FLUSH_EVERY_S = src.BACKSTOP_S = 3600.0  # no timed commit: only the quiet broker
        src.start()
        try:
            _wait(lambda: src.subscribed)
            broker.publish("sensors/t1/temperature", [str(i) for i in range(500)])
            _wait(lambda: _counters(path).get("spooled", 0) == 500, timeout=60)
        finally:
            src.stop()
        assert _counters(path)["last_seq"] == 500
    finally:
        broker.cleanup()


def _commits(path: str) -> int:
    """Spool commits that held acknowledged messages (one in-flight record each; none settles
    within ACK_SETTLE_S, longer than these tests)."""
    spool = GatewaySpool(path)
    try:
        return int(spool.db.execute("SELECT COUNT(*) FROM inflight_flushes").fetchone()[0])
    finally:
        spool.close()


def test_a_trickle_waits_for_its_time_and_half_a_window_commits_at_once(tmp_path):
    """Below half the broker's window (``broker.inflight_window``, 20 here), messages that
    came one by one are not committed one by one when the broker goes quiet: they wait for
    FLUSH_EVERY_S. Half a window unacknowledged and a quiet broker commits them all, in one
    transaction; and when FLUSH_EVERY_S comes in a quiet spell, the network thread commits
    without waiting for another message (the flusher thread is held off here)."""
    broker = start_broker()
    path = str(tmp_path / "spool.db")
    try:
        src = MqttSource(
            BrokerConfig(port=broker.port, client_id="gw-trickle", inflight_window=20),
            Mapper(compile_rules(RULES)),
            path,
        )
        src.FLUSH_EVERY_S = src.BACKSTOP_S = 3600.0
        src.start()
        try:
            _wait(lambda: src.subscribed)
            for i in range(3):  # three publishers: three messages with quiet between them
                broker.publish("sensors/t1/temperature", [str(i)])
            _wait(lambda: len(src._pending_acks) == 3)
            assert _counters(path).get("spooled", 0) == 0  # held: 3 < 10, not yet their time
            broker.publish("sensors/t1/temperature", [str(i) for i in range(3, 10)])
            _wait(lambda: _counters(path).get("spooled", 0) == 10)
            assert _commits(path) == 1
            src.FLUSH_EVERY_S = 0.2
            broker.publish("sensors/t1/temperature", ["10"])
            _wait(lambda: _counters(path).get("spooled", 0) == 11, timeout=10)
            assert _commits(path) == 2
        finally:
            src.stop()
    finally:
        broker.cleanup()
