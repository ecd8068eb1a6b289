"""The gateway's MQTT connection: the codec, and against a real Mosquitto (TLS, a password
file, batched acknowledgements, keepalive, a broker restart, a refused login)."""

from __future__ import annotations

import logging
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from saltext.tributary.gateway.sources.mqttwire import (
    Message,
    MqttConnection,
    ProtocolError,
    connect_packet,
    decode_publish,
    parse_packets,
    pubacks,
    subscribe_packet,
)
from tests.support.es import free_port
from tests.support.mosquitto import start_broker
from tests.support.tlspki import make_pki


def _publish_packet(topic: bytes, payload: bytes, qos: int = 1, mid: int = 7, dup=False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    body += payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0)
    length = bytearray()
    n = len(body)
    while True:
        n, byte = divmod(n, 128)
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([first]) + bytes(length) + body


# -- codec ---------------------------------------------------------------------------------------
def test_whole_packets_are_parsed_and_a_partial_one_is_left_for_the_next_read():
    a = _publish_packet(b"s/t1/temperature", b"21.5", mid=1)
    b = _publish_packet(b"s/t2/temperature", b"x" * 300, mid=2)  # two-byte remaining length
    c = _publish_packet(b"s/t3/temperature", b"y" * 20000, mid=3)  # three-byte length
    stream = a + b + c + b"\xd0\x00"  # ... and a PINGRESP
    for cut in (0, 1, len(a) - 1, len(a), len(a) + 2, len(a + b) + 3, len(stream) - 1):
        buf = bytearray(stream[:cut])
        first, used = parse_packets(buf)
        del buf[:used]
        buf += stream[cut:]
        rest, used2 = parse_packets(buf)
        assert used2 == len(buf)
        got = first + rest
        assert [f >> 4 for f, _ in got] == [3, 3, 3, 13]
        assert [decode_publish(f, body).mid for f, body in got[:3]] == [1, 2, 3]
        assert decode_publish(*got[2]).payload == b"y" * 20000


def test_a_remaining_length_over_four_bytes_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="4 bytes"):
        parse_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))


def test_publish_fields():
    f, body = parse_packets(bytearray(_publish_packet(b"a/b", b"1", qos=1, mid=513, dup=True)))[0][
        0
    ]
    assert decode_publish(f, body) == Message("a/b", b"1", 1, True, 513, False)
    f, body = parse_packets(bytearray(_publish_packet(b"a/b", b"2", qos=0)))[0][0]
    assert decode_publish(f, body) == Message("a/b", b"2", 0, False, 0, False)
    # a topic that is not UTF-8 reaches the mapper (which rejects and counts it)
    f, body = parse_packets(bytearray(_publish_packet(b"a/\xff", b"3")))[0][0]
    assert decode_publish(f, body).topic == "a/\ufffd"
    with pytest.raises(ProtocolError, match="QoS 2"):
        decode_publish(0x34, body)
    with pytest.raises(ProtocolError, match="shorter"):
        decode_publish(0x32, b"\x00\x09ab")


def test_outgoing_packets():
    assert pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"
    assert connect_packet("gw", 30) == b"\x10\x0e\x00\x04MQTT\x04\x00\x00\x1e\x00\x02gw"
    pkt = connect_packet("gw", 30, username="u", password="p")
    assert pkt[9] == 0xC0 and pkt.endswith(b"\x00\x01u\x00\x01p")
    assert subscribe_packet(1, [("a/#", 1)]) == b"\x82\x08\x00\x01\x00\x03a/#\x01"


def test_stopping_a_connection_that_never_started_is_quiet():
    conn = MqttConnection("127.0.0.1", 1, "gw-never", [], on_message=lambda m: None)
    conn.stop()  # joins no thread, closes its wake-up sockets
    assert conn._wake_r.fileno() == -1


# -- a real broker -------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.messages: list[Message] = []
        self.connects = 0
        self.subscribed = 0
        self.disconnects: list[str] = []
        self.lock = threading.Lock()

    def kwargs(self) -> dict:
        return {
            "on_message": self.on_message,
            "on_connect": self.on_connect,
            "on_subscribe": lambda granted: self._bump("subscribed"),
            "on_disconnect": self.disconnects.append,
        }

    def on_message(self, msg: Message) -> None:
        with self.lock:
            self.messages.append(msg)

    def on_connect(self, session_present: bool) -> None:
        self._bump("connects")

    def _bump(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def tls_broker():
    d = pathlib.Path(tempfile.mkdtemp(prefix="trib-wire-pki-"))
    d.chmod(0o755)
    pki = make_pki(d)
    passwd = d / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "gw", "s3cret"], check=True)
    passwd.chmod(0o644)
    tls_port = free_port()
    broker = start_broker(
        f"password_file {passwd}\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki['ca']}\ncertfile {pki['cert']}\nkeyfile {pki['key']}\n"
    )
    broker.tls_port = tls_port  # type: ignore[attr-defined]
    broker.ca = pki["ca"]  # type: ignore[attr-defined]
    yield broker
    broker.cleanup()
    shutil.rmtree(d, ignore_errors=True)


def test_tls_login_batched_acks_and_a_resumed_session(tls_broker):
    rec = Recorder()
    kw = {
        "keepalive": 30,
        "username": "gw",
        "password": "s3cret",
        "tls_ca": tls_broker.ca,
    }
    conn = MqttConnection(
        "localhost", tls_broker.tls_port, "gw-wire-tls", [("w/#", 1)], **kw, **rec.kwargs()
    )
    conn.start()
    wait_for(lambda: rec.subscribed == 1)
    tls_broker.publish("w/t1", [str(i) for i in range(3000)])
    # The broker holds back what is past its in-flight window (1,000) until acknowledged, so
    # all 3,000 arrive only if the batched acknowledgements reach it.
    acked = 0

    def ack_what_came() -> bool:
        nonlocal acked
        with rec.lock:
            mids = [m.mid for m in rec.messages[acked:]]
        acked += len(mids)
        conn.ack_many(mids)  # as the source's flusher does: one write per flush
        return acked == 3000

    wait_for(ack_what_came)
    assert [m.payload for m in rec.messages] == [str(i).encode() for i in range(3000)]
    assert all(m.qos == 1 and not m.dup for m in rec.messages)
    conn.stop()
    assert rec.disconnects == ["disconnected by the client"]

    # Same client id, persistent session: every message was acknowledged, so nothing comes
    # back; one published while it was away is delivered.
    tls_broker.publish("w/t1", ["after"])
    again = Recorder()
    conn = MqttConnection(
        "localhost", tls_broker.tls_port, "gw-wire-tls", [("w/#", 1)], **kw, **again.kwargs()
    )
    conn.start()
    try:
        wait_for(lambda: again.messages)
        conn.ack_many([again.messages[0].mid])
        tls_broker.publish("w/t1", ["marker"])
        wait_for(lambda: len(again.messages) == 2)
        assert [m.payload for m in again.messages] == [b"after", b"marker"]
    finally:
        conn.stop()


def test_unacknowledged_messages_come_back_flagged_dup(tls_broker):
    rec = Recorder()
    conn = MqttConnection("127.0.0.1", tls_broker.port, "gw-wire-dup", [("d/#", 1)], **rec.kwargs())
    conn.start()
    wait_for(lambda: rec.subscribed == 1)
    tls_broker.publish("d/t1", [str(i) for i in range(50)])
    wait_for(lambda: len(rec.messages) == 50)
    conn.ack_many([m.mid for m in rec.messages[:20]])
    conn.kill()  # no DISCONNECT, as a crash: the broker keeps the other 30 in flight
    again = Recorder()
    conn = MqttConnection(
        "127.0.0.1", tls_broker.port, "gw-wire-dup", [("d/#", 1)], **again.kwargs()
    )
    conn.start()
    try:
        wait_for(lambda: len(again.messages) >= 30)
        redelivered = [m for m in again.messages if m.dup]
        assert {m.payload for m in redelivered} >= {str(i).encode() for i in range(20, 50)}
    finally:
        conn.stop()


def test_keepalive_pings_hold_an_idle_connection(tls_broker):
    rec = Recorder()
    conn = MqttConnection(
        "127.0.0.1", tls_broker.port, "gw-wire-ping", [("p/#", 1)], keepalive=1, **rec.kwargs()
    )
    pings = []
    handle = conn._handle

    def counting(first, body):
        if first >> 4 == 13:
            pings.append(time.monotonic())
        return handle(first, body)

    conn._handle = counting  # type: ignore[method-assign]
    conn.start()
    try:
        # The broker drops a client silent for 1.5 x keepalive; three answered pings later the
        # first connection is still the only one.
        wait_for(lambda: len(pings) >= 3, timeout=20)
        assert rec.connects == 1 and not rec.disconnects
    finally:
        conn.stop()


def test_a_broker_restart_reconnects_and_delivery_goes_on():
    broker = start_broker()
    rec = Recorder()
    conn = MqttConnection(
        "127.0.0.1",
        broker.port,
        "gw-wire-restart",
        [("r/#", 1)],
        reconnect_min=0.2,
        reconnect_max=1,
        **rec.kwargs(),
    )
    conn.start()
    try:
        wait_for(lambda: rec.subscribed == 1)
        broker.restart()
        wait_for(lambda: rec.subscribed == 2)
        assert rec.connects == 2 and len(rec.disconnects) == 1
        broker.publish("r/t1", ["1", "2"])
        wait_for(lambda: len(rec.messages) == 2)
    finally:
        conn.stop()
        broker.cleanup()


def test_a_refused_login_is_logged_and_retried(tls_broker):
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("saltext.tributary.gateway.sources.mqttwire")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    rec = Recorder()
    conn = MqttConnection(
        "127.0.0.1",
        tls_broker.port,
        "gw-wire-badpw",
        [("x/#", 1)],
        username="gw",
        password="wrong",
        reconnect_min=0.1,
        reconnect_max=0.2,
        **rec.kwargs(),
    )
    conn.start()
    try:
        wait_for(lambda: sum("connection refused" in m for m in seen) >= 2)
    finally:
        conn.stop()
        logger.removeHandler(handler)
    assert rec.connects == 0
    assert "not authorized" in seen[0] or "bad user name or password" in seen[0]
