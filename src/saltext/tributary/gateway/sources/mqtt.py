"""The MQTT source: a subscriber thread that spools readings durably.

It runs off the minion's loop (the connection's network thread plus one flusher thread), so a
beacon run never waits on the broker. Messages are taken with QoS 1 on a persistent session
(``clean_session=False`` and a fixed client id): the broker keeps queueing while the minion is
down. Acknowledgements are manual and sent only after the readings are committed to the spool,
so a crash between receipt and commit makes the broker redeliver instead of losing data.
Reconnects use capped exponential backoff; a broker restart or a network loss does not leave
the subscriber dead. The connection itself is :mod:`.mqttwire` (why not paho's loop: its
module docstring and BENCHMARKS.md, gateway efficiency).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from saltext.tributary.gateway.filters import Filters
from saltext.tributary.gateway.sources.mqttwire import Message, MqttConnection
from saltext.tributary.gateway.sources.payload import Mapper
from saltext.tributary.gateway.spool import GatewaySpool, SpoolFull
from saltext.tributary.protocol.reading import TS_MAX_MS, TS_MIN_MS, Reading, RejectedReading
from saltext.tributary.util import clock, schema
from saltext.tributary.util.schema import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerConfig:
    """The ``broker`` block of a ``tributary_mqtt`` beacon (its YAML names)."""

    host: str = option("127.0.0.1", doc="the site broker")
    port: int = option(1883, range=(1, 65535))
    client_id: str = option("", doc="default: tributary-<minion id>-<beacon name>")
    username: str | None = option(None)
    password: str | None = option(None)
    password_file: str | None = option(None, doc="a file holding the password (mode 0600)")
    keepalive: int = option(30, range=(5, 3600))
    tls_ca: str | None = option(None, doc="CA file: connect with TLS")
    qos: int = option(1, choices=(0, 1))
    reconnect_min: float = option(0.5, range=(0.1, 3600))
    reconnect_max: float = option(30.0, range=(0.1, 86400))
    inflight_window: int = option(
        20,
        range=(1, 65535),
        doc="the broker's max_inflight_messages (Mosquitto's default 20): when half of it"
        " waits for acknowledgement and the broker goes quiet, commit and acknowledge at once",
    )

    def problems(self, path: str) -> list[str]:
        """What the credentials say about each other, by key path."""
        if self.password is not None and self.password_file is not None:
            return [f"{path}.password_file: use either password or password_file"]
        if (self.password or self.password_file) and not self.username:
            return [f"{path}.username: required when {path}.password is set"]
        return []


def parse_broker(data: Any) -> tuple[BrokerConfig | None, list[str]]:
    """The broker block, or every problem with its key path (``broker.port: ...``)."""
    return schema.parse(BrokerConfig, data, "broker")


def broker_password(broker: BrokerConfig) -> str | None:
    """The broker password: ``password``, or the first line of ``password_file``."""
    if broker.password_file:
        with open(broker.password_file, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")
    return broker.password


class MqttSource:
    """Subscribe, parse, spool, then acknowledge."""

    #: A reading waits at most this long for its commit and its message for its
    #: acknowledgement (the broker's in-flight window, ``max_inflight_messages``, must hold
    #: what arrives meanwhile): the network thread commits when a message comes this long
    #: after the first uncommitted one, when that time comes in a quiet spell, after
    #: FLUSH_ROWS readings, and when the broker goes quiet with half its window unacknowledged.
    FLUSH_EVERY_S = 0.1
    FLUSH_ROWS = 500
    #: The flusher thread's period: it commits what the network thread has not (readings held
    #: while the connection is down, a commit that failed) and records the connection state.
    #: (It was the only timer once, at FLUSH_EVERY_S: a wake-up of its own and one of the
    #: network thread to write the acknowledgements, ten times a second.)
    BACKSTOP_S = 1.0
    #: After a failed commit (a full disk), the network thread tries again this much later.
    RETRY_S = 1.0
    #: An acknowledgement handed to the connection is recorded as sent only after this long on
    #: a connection that stayed up: one queued just before the connection died may never have
    #: reached the broker, which then redelivers (DUP) a message the record must still match.
    ACK_SETTLE_S = 10.0

    def __init__(
        self,
        broker: BrokerConfig,
        mapper: Mapper,
        spool_path: str,
        filters: Filters | None = None,
        **spool_kw: Any,
    ):
        self.broker = broker
        self.mapper = mapper
        self.filters = filters or Filters([])
        self._pending_aside: list[tuple[Reading, str]] = []
        self.spool_path = spool_path
        self.spool_kw = spool_kw
        self._pending: list[Reading] = []
        self._pending_acks: list[tuple[int, bytes]] = []
        #: in-flight record ids (spool) whose acknowledgements have settled
        self._acked: list[int] = []
        #: (monotonic time sent, connection generation, in-flight record id) of committed
        #: messages whose acknowledgements were handed over
        self._ack_sent: list[tuple[float, int, int]] = []
        self._generation = 0
        #: monotonic time of the first message not yet committed (None: nothing waits)
        self._first_pending: float | None = None
        self._retry_at = 0.0
        #: a quiet broker with this many messages unacknowledged is probably waiting for them
        #: (its window is full): commit now rather than at the next FLUSH_EVERY_S
        self._idle_min = max(1, broker.inflight_window // 2)
        self._pending_counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = False
        self.subscribed = False
        self.client = MqttConnection(
            broker.host,
            broker.port,
            broker.client_id,
            [(sub, broker.qos) for sub in mapper.subscriptions],
            keepalive=broker.keepalive,
            username=broker.username or None,
            password=broker_password(broker) if broker.username else None,
            tls_ca=broker.tls_ca,
            reconnect_min=broker.reconnect_min,
            reconnect_max=broker.reconnect_max,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_subscribe=self._on_subscribe,
            on_disconnect=self._on_disconnect,
            on_idle=self._on_idle,
            name=f"tributary-mqtt-{broker.client_id}"[:60],
        )
        self._flusher = threading.Thread(target=self._flush_loop, name="tributary-mqtt-flush")
        self._flusher.daemon = True
        self._spool: GatewaySpool | None = None
        self._reported_state = ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.client.start()
        self._flusher.start()
        # A minion stopping normally (SIGTERM -> exit) commits and acknowledges what it holds,
        # so the broker does not redeliver readings that are already spooled.
        atexit.register(self.stop)

    def stop(self) -> None:
        """Commit pending readings, acknowledge them, then disconnect (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._flusher.join(timeout=5)
        try:
            self._flush()  # commit, then queue the PUBACKs ...
        except Exception as exc:  # not committed -> not acknowledged -> redelivered later
            log.warning("tributary mqtt: final spool flush failed: %s", exc)
        self.client.stop()  # ... which the connection writes before its DISCONNECT
        if self._spool is not None:
            try:
                self._spool.set_state("broker", "stopped")
            except Exception:
                pass
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    # -- connection callbacks (network thread) ----------------------------------------------
    def _on_connect(self, session_present: bool) -> None:
        self.connected = True
        log.info(
            "tributary mqtt: connected to %s:%s (session %s)",
            self.broker.host,
            self.broker.port,
            "resumed" if session_present else "new",
        )
        with self._lock:
            self._pending_counts["connects"] += 1

    def _on_subscribe(self, granted: list[int]) -> None:
        with self._lock:
            self._pending_counts["subscribed"] += 1
            self.subscribed = True

    def _on_disconnect(self, reason: str) -> None:
        self.connected = False
        self._generation += 1  # acknowledgements still settling may not have left
        self.subscribed = False
        if not self._stop.is_set():
            log.warning("tributary mqtt: disconnected (%s); reconnecting with backoff", reason)

    def _on_message(self, msg: Message) -> None:
        # Hot path (one call per MQTT message): plain dict counting, one lock round.
        now_ms = clock.now_ms()
        digest = b""
        if msg.qos > 0:
            digest = hashlib.blake2b(
                msg.topic.encode() + b"\0" + msg.payload, digest_size=8
            ).digest()
            if msg.dup and self._redelivered(msg.mid, digest):
                return
        readings: list[Reading] = []
        rejects: list[RejectedReading] = []
        failed: str | None = None
        try:
            readings = self.mapper.parse(msg.topic, msg.payload, now_ms, rejects)
        except RejectedReading as exc:
            failed = f"rejected:{exc.reason}"
            log.info("tributary mqtt: rejected message on %s: %s", msg.topic, exc)
        except Exception as exc:  # never let a parser bug kill the subscriber
            failed = "rejected:parser_error"
            log.exception("tributary mqtt: parser error on %s: %s", msg.topic, exc)
        aside: list[tuple[Reading, str]] = []
        fcounts: dict[str, int] = {}
        if readings and self.filters.rules:
            readings, fcounts, aside = self.filters.apply(readings)
        with self._lock:
            pc = self._pending_counts
            pc["received"] += 1
            if readings:
                pc["readings"] += len(readings)
                self._pending.extend(readings)
            if failed:
                pc[failed] += 1
            for rej in rejects:
                pc[f"rejected:{rej.reason}"] += 1
            if fcounts:
                pc.update(fcounts)
            if aside:
                self._pending_aside.extend(aside)
            if msg.qos > 0:
                self._pending_acks.append((msg.mid, digest))
            now = time.monotonic()
            if self._first_pending is None:
                self._first_pending = now
                self.client.wake_at = now + self.FLUSH_EVERY_S  # commit by then, come what may
            self.client.quiet_wanted = len(self._pending_acks) >= self._idle_min
            due = (
                len(self._pending) >= self.FLUSH_ROWS
                or now - self._first_pending >= self.FLUSH_EVERY_S
            ) and now >= self._retry_at
        if due:
            try:
                self._flush()
            except Exception as exc:  # the flusher retries; never raise into the network thread
                log.warning("tributary mqtt: spool append failed (%s); will retry", exc)

    # -- spooling (network thread, flusher thread) ------------------------------------------
    def _on_idle(self) -> float | None:
        """On the network thread: the broker went quiet with at least half its window
        (``broker.inflight_window``) unacknowledged, or the first uncommitted message has
        waited FLUSH_EVERY_S. Commit and acknowledge now; returns when to be called again.

        Mosquitto sends a subscriber at most ``max_inflight_messages`` unacknowledged QoS 1
        messages (20 by default) and then waits for acknowledgements. Fewer than half of that
        wait for their time instead: a commit per message of a sensor publishing now and then
        costs a transaction and wake-ups for each (bench/gateway.py, paced source)."""
        with self._lock:
            first, unacked = self._first_pending, len(self._pending_acks)
        if first is None:
            return None
        now = time.monotonic()
        if now < self._retry_at:
            return self._retry_at - now
        if unacked < self._idle_min and now - first < self.FLUSH_EVERY_S:
            return first + self.FLUSH_EVERY_S - now  # not yet: called again then
        try:
            self._flush()
        except Exception as exc:  # retried; never raise into the network thread
            log.warning("tributary mqtt: spool append failed (%s); will retry", exc)
            return self.RETRY_S
        return None

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.BACKSTOP_S):
            try:
                self._flush()
            except SpoolFull as exc:
                # Nothing acknowledged: the broker keeps the messages until there is room.
                log.error("tributary mqtt: %s; holding acknowledgements, retrying", exc)
                time.sleep(1)
            except Exception:  # keep flushing: a transient sqlite error must not end the thread
                log.exception("tributary mqtt: spool flush failed; will retry")
                time.sleep(1)

    def _flush(self) -> None:
        with self._lock:
            if not self._pending and not self._pending_acks and not self._pending_counts:
                if self._spool is not None and self._reported_state != self.state:
                    self._spool.set_state("broker", self.state)
                    self._reported_state = self.state
                return
            readings, self._pending = self._pending, []
            aside, self._pending_aside = self._pending_aside, []
            acks, self._pending_acks = self._pending_acks, []
            acked, self._acked = self._acked, []
            counts, self._pending_counts = self._pending_counts, Counter()
            first, self._first_pending = self._first_pending, None
            self.client.quiet_wanted = False
            if self._spool is None:
                self._spool = GatewaySpool(self.spool_path, **self.spool_kw)
            spool = self._spool
            try:
                ids = self._append(spool, readings, counts, aside, acks, acked)
                if self._reported_state != self.state:
                    spool.set_state("broker", self.state)
                    self._reported_state = self.state
            except BaseException:
                # Put them back: nothing is acknowledged that is not committed.
                self._pending[:0] = readings
                self._pending_aside[:0] = aside
                self._pending_acks[:0] = acks
                self._acked[:0] = acked
                self._pending_counts.update(counts)
                self._first_pending = first if first is not None else time.monotonic()
                self._retry_at = time.monotonic() + self.RETRY_S
                self.client.wake_at = self._retry_at
                raise
            # Settled (the in-flight record dropped) in a later commit, once the
            # acknowledgements have been out for ACK_SETTLE_S on a live connection (a record
            # left is harmless: the broker does not redeliver what it saw acknowledged, and a
            # newer commit with the same packet id decides for it).
            now, gen = time.monotonic(), self._generation
            self._ack_sent.extend((now, gen, rid) for rid in ids)
            settled = 0
            for t, g, rid in self._ack_sent:
                if now - t < self.ACK_SETTLE_S:
                    break
                settled += 1
                if g == gen:
                    self._acked.append(rid)
            del self._ack_sent[:settled]
        self.client.ack_many([mid for mid, _ in acks])

    def _append(
        self,
        spool: GatewaySpool,
        readings: list[Reading],
        counts: Counter[str],
        aside: list[tuple[Reading, str]],
        acks: list[tuple[int, bytes]],
        acked: list[int],
    ) -> tuple[int, ...]:
        """Commit readings with the messages they came from; returns the in-flight record ids.
        A failure that is not the disk's or SQLite's (a value the spool cannot store) never
        blocks the messages behind it: readings that are not storable are rejected and
        counted, and if the rest still fails the whole flush is rejected and counted, and its
        messages are acknowledged."""
        inflight = [(self.broker.client_id, mid, dg) for mid, dg in acks]
        try:
            done = spool.append_messages(readings, counts, aside, inflight, acked)
            return done.inflight_ids
        except (SpoolFull, sqlite3.OperationalError):
            raise  # transient or the disk's: nothing acknowledged, retried
        except Exception as exc:
            log.error("tributary mqtt: could not store %d readings: %s", len(readings), exc)
        good = [r for r in readings if storable(r)]
        good_aside = [(r, why) for r, why in aside if storable(r)]
        rejected = Counter({"rejected:store_error": len(readings) - len(good)})
        try:
            done = spool.append_messages(good, counts + rejected, good_aside, inflight, acked)
            return done.inflight_ids
        except (SpoolFull, sqlite3.OperationalError):
            raise
        except Exception:
            log.exception("tributary mqtt: rejecting %d readings that cannot be stored", len(good))
        rejected = Counter({"rejected:store_error": len(readings)})
        return spool.append_messages([], counts + rejected, [], inflight, acked).inflight_ids

    def _redelivered(self, mid: int, digest: bytes) -> bool:
        """A DUP message we committed before a crash, whose acknowledgement never left."""
        spool = self._spool
        if spool is None:
            spool = self._spool = GatewaySpool(self.spool_path, **self.spool_kw)
        try:
            seen = spool.committed_unacked(self.broker.client_id, mid, digest)
        except Exception as exc:  # on doubt, take it: a duplicate beats a loss
            log.warning("tributary mqtt: redelivery check failed (%s); accepting the message", exc)
            return False
        if seen:
            # acknowledged now; its commit's in-flight record stays (if this acknowledgement is
            # lost too, the next redelivery is recognised again) until newer ones replace it
            with self._lock:
                self._pending_counts["redelivered_duplicates"] += 1
            self.client.ack_many([mid])
        return seen

    @property
    def state(self) -> str:
        if self.subscribed and self.connected:
            return "subscribed"
        return "connected" if self.connected else "disconnected"

    def status(self) -> dict[str, Any]:
        return {
            "broker": f"{self.broker.host}:{self.broker.port}",
            "connected": self.connected,
            "subscriptions": self.mapper.subscriptions,
        }


def storable(r: Reading) -> bool:
    """Can the spool store ``r`` (exact types and sizes, as make_reading checks them)?"""
    return (
        type(r.sensor) is str
        and type(r.metric) is str
        and len(r.sensor) <= 128
        and len(r.metric) <= 128
        and (r.unit is None or (type(r.unit) is str and len(r.unit) <= 32))
        and type(r.value) is float
        and math.isfinite(r.value)
        and type(r.ts_ms) is int
        and TS_MIN_MS <= r.ts_ms < TS_MAX_MS
    )
