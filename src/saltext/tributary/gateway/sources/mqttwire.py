"""A small MQTT 3.1.1 subscriber connection: what the gateway's MQTT source needs, and no more.

Why not paho's client loop: measured at 1,000 messages/s on these machines, paho's threaded
loop costs about 34 µs of CPU per QoS 1 message before any reading is parsed (one ``select``
and three ``recv`` calls per packet, one wake-up and one ``send`` per acknowledgement), against
about 8 µs for reading the socket in 64 KiB chunks, parsing every whole packet in the buffer and
sending each flush's acknowledgements in one write (``BENCHMARKS.md``, gateway efficiency).
On a Raspberry-class gateway that difference is most of the minion's CPU.

What it does: one network thread per connection; ``CONNECT`` with a persistent session
(``clean_session`` false, fixed client id), optional username/password and TLS (a CA file,
hostname checked), ``SUBSCRIBE`` on every (re)connect, incoming ``PUBLISH`` at QoS 0 and 1
handed to ``on_message`` in arrival order, acknowledgements queued by any thread with
:meth:`MqttConnection.ack_many` and written by the network thread in one ``send``, ``PINGREQ``
when nothing was sent for ``keepalive`` seconds, and a reconnect with capped exponential
backoff when the broker goes away, refuses, or stops answering pings. A protocol error from the
broker drops the connection and reconnects; nothing a message carries (topic, payload) can
stop the thread: a topic that is not UTF-8 is handed on with replacement characters, for the
mapper to reject and count. Acknowledgements queued for a connection that died are dropped,
as paho does: the broker redelivers those messages (flagged ``dup``) on the persistent session.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_H = struct.Struct("!H")
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
READ_CHUNK = 65536
#: MQTT's own ceiling for a packet's remaining length (268,435,455 bytes).
MAX_REMAINING = 268_435_455


class ProtocolError(Exception):
    """The broker sent something MQTT 3.1.1 does not allow here."""


class Refused(Exception):
    """The broker answered CONNECT with a non-zero return code."""

    REASONS = {
        1: "unacceptable protocol version",
        2: "identifier rejected",
        3: "server unavailable",
        4: "bad user name or password",
        5: "not authorized",
    }

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"connection refused: {self.REASONS.get(code, f'code {code}')}")


@dataclass(slots=True)
class Message:
    """One incoming PUBLISH (the attributes paho's ``MQTTMessage`` has)."""

    topic: str
    payload: bytes
    qos: int
    dup: bool
    mid: int
    retain: bool = False


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return _H.pack(len(raw)) + raw


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    keepalive: int,
    clean_session: bool = False,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean_session else 0) | (0x80 if username else 0)
    flags |= 0x40 if (username and password is not None) else 0
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + _H.pack(keepalive) + _string(client_id)
    if username:
        body += _string(username)
        if password is not None:
            body += _string(password)
    return b"\x10" + _remaining(len(body)) + body


def subscribe_packet(mid: int, topics: Sequence[tuple[str, int]]) -> bytes:
    body = _H.pack(mid) + b"".join(_string(t) + bytes([q]) for t, q in topics)
    return b"\x82" + _remaining(len(body)) + body


def pubacks(mids: Sequence[int]) -> bytes:
    """One buffer holding a PUBACK for each packet id, in order."""
    return b"".join([b"\x40\x02" + _H.pack(m) for m in mids])


def parse_packets(buf: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The whole packets at the start of ``buf`` as ``(first byte, body)``, and how many bytes
    they took; a partial packet at the end is left for the next read."""
    out: list[tuple[int, bytes]] = []
    i, n = 0, len(buf)
    while n - i >= 2:
        first = buf[i]
        length, mult, k = 0, 1, i + 1
        while True:
            if k >= n:
                return out, i
            byte = buf[k]
            k += 1
            length += (byte & 0x7F) * mult
            if not byte & 0x80:
                break
            mult *= 128
            if k - i > 4:
                raise ProtocolError("remaining length longer than 4 bytes")
        if n - k < length:
            return out, i
        out.append((first, bytes(buf[k : k + length])))
        i = k + length
    return out, i


def decode_publish(first: int, body: bytes) -> Message:
    qos = (first >> 1) & 3
    if qos > 1:
        raise ProtocolError(f"PUBLISH at QoS {qos} on a QoS <= 1 subscription")
    if len(body) < 2:
        raise ProtocolError("PUBLISH shorter than its topic length")
    (tlen,) = _H.unpack_from(body)
    pos = 2 + tlen
    if len(body) < pos + (2 if qos else 0):
        raise ProtocolError("PUBLISH shorter than its topic and packet id")
    topic = body[2:pos].decode("utf-8", "replace")
    mid = 0
    if qos:
        (mid,) = _H.unpack_from(body, pos)
        pos += 2
    return Message(topic, body[pos:], qos, bool(first & 0x08), mid, bool(first & 0x01))


class MqttConnection:
    """A persistent-session subscriber connection run by its own thread (see module doc).

    Callbacks run on the network thread: ``on_connect(session_present)``,
    ``on_subscribe(granted_qos_list)``, ``on_message(Message)``, ``on_disconnect(reason)``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        *,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        on_message: Callable[[Message], None],
        on_connect: Callable[[bool], None] | None = None,
        on_subscribe: Callable[[list[int]], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_idle: Callable[[], float | None] | None = None,
        idle_s: float = 0.005,
        name: str = "tributary-mqtt",
    ):
        self.host, self.port, self.client_id = host, port, client_id
        self.subscriptions = list(subscriptions)
        self.keepalive = keepalive
        self.username, self.password, self.tls_ca = username, password, tls_ca
        self.reconnect_min, self.reconnect_max = reconnect_min, max(reconnect_min, reconnect_max)
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_subscribe = on_subscribe
        self.on_disconnect = on_disconnect
        #: called on the network thread when nothing has come from the broker for ``idle_s``
        #: after messages, if ``quiet_wanted`` (a broker that sends at most
        #: ``max_inflight_messages`` unacknowledged messages waits for acknowledgements, so
        #: that is the moment to give them), and when ``wake_at`` (monotonic) passes. Both are
        #: set by the callbacks; it returns None, or in how many seconds to call it again.
        self.on_idle = on_idle
        self.idle_s = idle_s
        self.quiet_wanted = True
        self.wake_at: float | None = None
        self._delivered = False
        self._out_lock = threading.Lock()
        self._queued: list[bytes] = []
        self._closing = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- other threads ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def ack_many(self, mids: Sequence[int]) -> None:
        """Queue a PUBACK for each packet id; the network thread writes them in one send."""
        if mids:
            self._queue(pubacks(mids))

    def disconnect(self) -> None:
        """Write what is queued (acknowledgements first), then DISCONNECT and close."""
        with self._out_lock:
            self._closing = True
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and wait for the network thread to end."""
        self.disconnect()
        if self._sock is None:  # not connected (backing off): nothing to say goodbye on
            self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
            self._stop.set()
            self._wake()
            self._thread.join(timeout)
        self._stop.set()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT or pending writes (as a crash would)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake()
        self._thread.join(5)

    def _queue(self, data: bytes) -> None:
        with self._out_lock:
            self._queued.append(data)
            # Queued from a callback on the network thread itself (the commit when the broker
            # goes quiet): its loop takes the queue before it waits again, so no wake-up write
            # (a socketpair send and an extra select return cost more than the PUBACKs).
            if self._woken or threading.get_ident() == self._thread.ident:
                return
            self._woken = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (already woken) or closed
            pass

    # -- the network thread -----------------------------------------------------------------
    def _run(self) -> None:
        delay = self.reconnect_min
        while not self._stop.is_set():
            reason = "closed"
            served = False
            try:
                self._open()
                served = True
                delay = self.reconnect_min
                reason = self._serve()
            except Refused as exc:
                reason = str(exc)
                log.warning("tributary mqtt: broker %s:%s: %s", self.host, self.port, exc)
            except (OSError, ProtocolError, ValueError, struct.error) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._close_socket()
            if served and self.on_disconnect is not None:
                self._callback(self.on_disconnect, reason)
            if self._closing or self._stop.is_set():
                break
            if not served:
                log.debug("tributary mqtt: connect to %s:%s: %s", self.host, self.port, reason)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.reconnect_max)

    def _open(self) -> None:
        timeout = float(min(10, max(2, self.keepalive)))
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_ca:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
                sock = ctx.wrap_socket(sock, server_hostname=self.host)
            self._sock = sock
            sock.sendall(
                connect_packet(self.client_id, self.keepalive, False, self.username, self.password)
            )
            head = self._recv_exact(sock, 4)
            if head[0] != 0x20 or head[1] != 2:
                raise ProtocolError(f"expected CONNACK, got {head[:2].hex()}")
            if head[3] != 0:
                raise Refused(head[3])
            session_present = bool(head[2] & 1)
        except BaseException:
            self._close_socket(sock)
            raise
        with self._out_lock:  # acknowledgements queued for an earlier connection are void
            self._queued.clear()
        if self.on_connect is not None:
            self._callback(self.on_connect, session_present)
        if self.subscriptions:
            sock.sendall(subscribe_packet(1, self.subscriptions))
        sock.setblocking(False)

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker during CONNECT")
            data += chunk
        return data

    def _serve(self) -> str:
        sock = self._sock
        assert sock is not None
        buf = bytearray()
        out = b""
        last_out = last_in = time.monotonic()
        ping_sent: float | None = None
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        writing = False
        try:
            while not self._stop.is_set():
                with self._out_lock:
                    if self._queued:
                        out += b"".join(self._queued)
                        self._queued.clear()
                    self._woken = False
                    closing = self._closing
                if closing:
                    sock.setblocking(True)
                    sock.settimeout(5)
                    sock.sendall(out + DISCONNECT)
                    return "disconnected by the client"
                if out:
                    out = self._send(sock, out)
                    last_out = time.monotonic()
                if bool(out) != writing:
                    writing = bool(out)
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
                    sel.modify(sock, events)
                now = time.monotonic()
                if ping_sent is not None and now - ping_sent > self.keepalive:
                    raise TimeoutError(f"no PINGRESP within {self.keepalive} s")
                if ping_sent is None and now - last_out >= self.keepalive:
                    out += PINGREQ
                    ping_sent = now
                    continue
                if now - last_in > 2 * self.keepalive:
                    raise TimeoutError(f"nothing from the broker for {2 * self.keepalive} s")
                wait = self.keepalive - (now - last_out)
                if ping_sent is not None:
                    wait = min(wait, self.keepalive - (now - ping_sent))
                timeout = max(0.05, wait)
                quiet = self._delivered and self.quiet_wanted and self.on_idle is not None
                if quiet:
                    timeout = min(timeout, self.idle_s)
                wake_at = self.wake_at
                if wake_at is not None:
                    timeout = min(timeout, max(0.0, wake_at - now))
                ready = sel.select(timeout)
                if not ready and (quiet or (wake_at is not None and time.monotonic() >= wake_at)):
                    self._delivered = False
                    self.wake_at = None
                    again = self._idle()
                    if again is not None:
                        self.wake_at = time.monotonic() + again
                    continue
                for key, _ in ready:
                    if key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    if not self._read(sock, buf):
                        continue
                    last_in = time.monotonic()
                    packets, used = parse_packets(buf)
                    del buf[:used]
                    for first, body in packets:
                        if self._handle(first, body):
                            ping_sent = None
            return "stopped"
        finally:
            sel.close()

    @staticmethod
    def _read(sock: socket.socket, buf: bytearray) -> bool:
        """Append what the socket has to ``buf``; False if nothing was there yet (TLS)."""
        try:
            data = sock.recv(READ_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        if not data:
            raise ConnectionError("closed by the broker")
        buf += data
        pending = getattr(sock, "pending", None)
        while pending is not None and pending():
            buf += sock.recv(READ_CHUNK)
        return True

    @staticmethod
    def _send(sock: socket.socket, out: bytes) -> bytes:
        try:
            sent = sock.send(out)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return out
        return out[sent:]

    def _handle(self, first: int, body: bytes) -> bool:
        """Dispatch one packet; True if it was a PINGRESP."""
        kind = first >> 4
        if kind == 3:
            self._delivered = True
            self._callback(self.on_message, decode_publish(first, body))
        elif kind == 13:
            return True
        elif kind == 9:
            if len(body) < 3:
                raise ProtocolError("SUBACK without return codes")
            granted = list(body[2:])
            pairs = zip(self.subscriptions, granted, strict=False)
            if any(code == 0x80 for code in granted):
                log.error(
                    "tributary mqtt: broker %s:%s refused a subscription (%s): check its ACL",
                    self.host,
                    self.port,
                    [t for (t, _), code in pairs if code == 0x80],
                )
            if self.on_subscribe is not None:
                self._callback(self.on_subscribe, granted)
        elif kind in (4, 5, 6, 7, 11):  # acknowledgements of things this client never sends
            log.debug("tributary mqtt: ignored packet type %d", kind)
        else:
            raise ProtocolError(f"unexpected packet type {kind}")
        return False

    def _idle(self) -> float | None:
        if self.on_idle is None:
            return None
        try:
            return self.on_idle()
        except Exception:  # a callback bug must not end the connection thread
            log.exception("tributary mqtt: idle callback failed")
            return None

    def _callback(self, fn: Callable, arg: object) -> None:
        try:
            fn(arg)
        except Exception:  # a callback bug must not end the connection thread
            log.exception("tributary mqtt: callback %s failed", getattr(fn, "__name__", fn))

    def _close_socket(self, sock: socket.socket | None = None) -> None:
        sock = sock or self._sock
        if sock is self._sock:
            self._sock = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
