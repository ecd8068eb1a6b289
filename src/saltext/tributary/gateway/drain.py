"""Sending a backlog past the beacon's ceiling (README, "Architecture": backlog drain).

Salt runs a beacon once a second and fires its output from the minion's event loop as one
message on the minion's own event socket; a run larger than that socket's send buffer stops
the minion (BENCHMARKS.md, "The beacon's ceiling"), so one run carries at most 96-128 KiB:
12-14k readings/s at 7-8 bytes per reading. A gateway whose spool holds more than the next run
carries (a burst, or readings that piled up while the uplink was slow) would take that long to
catch up.

When a beacon run leaves more unsent readings behind than it emitted, the beacon starts a
:class:`Drain`: a thread of the minion process that takes the next runs' worth of batches from
the spool and sends each run to the master in a request of its own that the master answers
(Salt's request channel with the minion's own key, the way ``event.fire_master`` sends with a
preload). The master fires the batches on its bus exactly as it fires a beacon run's events,
with the same tags, so nothing above the gateway changes. The thread waits for each answer
before it takes the next run (the master's pace is the drain's pace). Once less than a beacon
run's worth waits it sends what is left in one last request and stops, so the tail of a burst
leaves at once instead of waiting up to a second for the next beacon run; readings arriving
after that go with the beacon runs again. Beacon runs emit nothing while a drain runs (the
spool emits in order, from one place at a time).

A request that fails (the master is away, or did not answer within ``SEND_TIMEOUT_S``) ends
the drain. Its batches were already counted as emitted, like a beacon run fired while the
master is unreachable: the top master's ledger finds them as a gap and asks this gateway to
replay them. A new drain is not started for ``RETRY_S`` after a failure; beacon runs carry the
readings meanwhile.

The request channel outlives a drain: the next drain to the same master sends on it. Opening
one loads the minion's private key (Salt's request channel signs a token with it: 28 ms of CPU
for a 2,048-bit key on these cores, 200 ms for 4,096 bits, several times that on a gateway
board) and builds Salt's key cache, for every drain when each opened its own. A failed request
closes it (the next drain opens a new one), and so does a drain to another master (failover).

Counted in the spool's counters: ``drains`` (drains that sent something), ``drained``
(readings), ``drain_requests``, ``drain_failures`` and ``drain_channels`` (channels opened).

Not used with a ``bandwidth`` budget (the budget decides what leaves the gateway), nor where
``batch.drain`` is false.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from saltext.tributary.protocol.wire import row_count

log = logging.getLogger(__name__)

#: seconds a drain's request waits for the master's answer
SEND_TIMEOUT_S = 30
#: seconds after a failed drain before another may start
RETRY_S = 30.0

#: one run of events (Salt's beacon event shape: ``{"tag": ..., "data": {...}}``)
Events = list[dict[str, Any]]


def can_drain(opts: Mapping[str, Any]) -> bool:
    """A minion connected to a master: where a drain can send (not ``salt-call --local`` or
    unit tests without a master). With several masters Salt runs the beacons of the first one
    only (``beacons_leader``), whose options these are: the drain sends where its beacon
    runs go."""
    return (
        opts.get("__role") == "minion"
        and bool(opts.get("master_uri"))
        and opts.get("file_client") != "local"
        and opts.get("beacons_leader", True) is not False
    )


class MasterSender:
    """Sends one run's events to the minion's master and waits for its answer."""

    def __init__(self, opts: Mapping[str, Any]) -> None:
        self.opts = opts
        self._channel: Any = None

    def __call__(self, events: Events) -> None:
        if self._channel is None:
            import salt.channel.client

            self._channel = salt.channel.client.ReqChannel.factory(self.opts)
        load = {"id": self.opts["id"], "cmd": "_minion_event", "events": events}
        self._channel.send(load, tries=1, timeout=SEND_TIMEOUT_S)

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception as exc:  # closing must not hide what the drain did
                log.debug("tributary drain: closing the channel: %s", exc)


class Drain:
    """One spool's drain: the lock every emitter of that spool holds while it takes batches,
    and at most one thread sending runs to the master."""

    def __init__(self, spool: Any, retry_s: float = RETRY_S) -> None:
        #: held by whoever takes batches from the spool (a beacon run or the drain thread)
        self.lock = threading.Lock()
        #: the drain's own connection to the spool (the beacon's stays on the minion's loop)
        self.spool = spool
        self.retry_s = retry_s
        self._thread: threading.Thread | None = None
        self._failed_at: float | None = None
        self._stop = threading.Event()
        #: the open sender and the master it sends to (kept from one drain to the next)
        self._sender: Any = None
        self._sender_for: Any = None

    def _count(self, counts: Mapping[str, int]) -> None:
        try:
            self.spool.count(counts)
        except Exception as exc:  # counting must not stop a drain
            log.debug("tributary drain: counting %s: %s", counts, exc)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(
        self, take: Callable[[bool], Events], sender: Callable[[], Any], master: Any = None
    ) -> bool:
        """Start sending what ``take(False)`` answers, run after run, until it answers
        nothing, then what ``take(True)`` answers (the rest, once); False when a drain already
        runs or one failed less than ``retry_s`` ago. It sends with the sender the previous
        drain used when that one sent to the same ``master`` (the master of the run that
        starts this drain) and did not fail, else with a new one from ``sender()``."""
        if self.running() or self._stop.is_set():
            return False
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
            return False
        self._thread = threading.Thread(
            target=self._run, args=(take, sender, master), name="tributary-drain", daemon=True
        )
        self._thread.start()
        return True

    def _open(self, sender: Callable[[], Any], master: Any) -> Any:
        if self._sender is not None and self._sender_for != master:
            self._close_sender()
        if self._sender is None:
            self._sender, self._sender_for = sender(), master
            self._count({"drain_channels": 1})
        return self._sender

    def _close_sender(self) -> None:
        send, self._sender = self._sender, None
        close = getattr(send, "close", None)
        if callable(close):
            close()

    def _run(self, take: Callable[[bool], Events], sender: Callable[[], Any], master: Any) -> None:
        send = self._open(sender, master)
        sent = requests = 0
        final = False
        try:
            while not self._stop.is_set():
                with self.lock:
                    events = take(final)
                if not events:
                    if final:
                        break
                    final = True  # what is left, once: a burst's tail leaves now
                    continue
                if not requests:
                    self._count({"drains": 1})  # a drain that sends something
                n = sum(row_count(ev["data"]) for ev in events)
                try:
                    send(events)
                except Exception as exc:
                    self._failed_at = time.monotonic()
                    self._close_sender()  # a channel left waiting for an answer
                    self._count({"drain_failures": 1, "drain_requests": 1})
                    log.warning(
                        "tributary: backlog drain stopped after %d readings: sending %d to the"
                        " master failed (%s: %s); the top master repairs that gap, beacon runs"
                        " go on",
                        sent,
                        n,
                        type(exc).__name__,
                        exc,
                    )
                    return
                sent += n
                requests += 1
                self._count({"drained": n, "drain_requests": 1})
                if final:
                    break
        except Exception:  # a spool error: the beacon runs report it on their own
            self._failed_at = time.monotonic()
            log.exception("tributary: backlog drain stopped after %d readings", sent)
        log.info("tributary: backlog drain sent %d readings in %d requests", sent, requests)

    def stop(self, timeout: float = SEND_TIMEOUT_S + 5) -> None:
        """Stop after the request in flight and close the drain's channel and spool connection
        (registry release, tests)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self.lock:
            self._close_sender()
            self.spool.close()
