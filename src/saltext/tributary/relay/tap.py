"""Confirmed readings, offered to whoever subscribes, off the shipping path.

The shipper hands each confirmed bulk's readings to ``offer``, which never blocks: a bounded
queue feeds the subscriber, and when the subscriber falls behind, what does not fit is shed and
counted (``tap_shed``), so analysis can never slow ingest. The relay does not know what
subscribes (the engine wires the detector, the health layers and the alert rules to it).

:class:`Tap` runs the subscriber on a thread of the relay's process. :class:`ProcessTap` runs it
in a child process of its own, so its CPU does not share the relay's GIL: the relay only pickles
each batch onto a bounded ``multiprocessing`` queue. The child builds its subscriber from a
module-level factory, sends its counts and log records back, exits when its parent is gone, and
is started again (counted as ``tap_restarts``) if it dies.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from saltext.tributary.relay.counters import Counters

log = logging.getLogger(__name__)

#: A confirmed reading as the relay holds it: (gateway, site, epoch, relayed_at, reading dict
#: with seq, sensor, metric, unit, ts_ms, value and, for aggregates, agg).
Confirmed = tuple[str, Any, str, int, dict[str, Any]]


@dataclass(frozen=True)
class Drain:
    """Queued after what was offered; answered when the subscriber reaches it."""

    token: Any


class Tap:
    """One subscriber, a bounded queue of confirmed batches of readings, one thread."""

    def __init__(
        self,
        handler: Callable[[Sequence[Confirmed]], None],
        counters: Counters,
        max_batches: int = 256,
        name: str = "tributary-tap",
        idle: Callable[[], None] | None = None,
        idle_s: float = 1.0,
    ) -> None:
        self.handler = handler
        self.counters = counters
        #: called on the subscriber's thread when nothing arrived for ``idle_s`` (its timers)
        self.idle = idle
        self.idle_s = idle_s
        self._q: queue.Queue[Sequence[Confirmed] | None] = queue.Queue(max_batches)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, readings: Sequence[Confirmed]) -> bool:
        """Queue readings for the subscriber; False (and counted) when the queue is full."""
        return not readings or shed_when_full(self._q, readings, self.counters)

    def close(self, timeout: float = 10.0) -> None:
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything offered so far has been handled (tests, shutdown)."""
        done = threading.Event()
        try:
            self._q.put(Drain(done), timeout=timeout)  # type: ignore[arg-type]
        except queue.Full:
            return False
        return done.wait(timeout)

    def _run(self) -> None:
        def drained(item: Drain) -> None:
            item.token.set()

        serve(self._q.get, self.handler, self.idle, self.idle_s, self.counters.inc, drained)


def shed_when_full(q: Any, readings: Sequence[Confirmed], counters: Counters) -> bool:
    """Put ``readings`` on ``q`` without waiting; when it is full they are shed and counted."""
    try:
        q.put_nowait(readings)
        return True
    except queue.Full:
        counters.inc("tap_shed", len(readings))
        return False


def serve(
    get: Callable[..., Any],
    handler: Callable[[Sequence[Confirmed]], None],
    idle: Callable[[], None] | None,
    idle_s: float,
    count: Callable[[str, int], None],
    drained: Callable[[Drain], None],
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """The subscriber's loop: batches to ``handler``, ``idle()`` when nothing came for
    ``idle_s``, a :class:`Drain` to ``drained(item)``, ``None`` ends it (and so does ``alive()``
    turning false). A failing call is logged and counted, never fatal."""
    while alive():
        try:
            item = get(timeout=idle_s)
        except queue.Empty:
            if idle is not None:
                try:
                    idle()
                except Exception:  # same rule as the handler
                    log.exception("tributary relay: subscriber's idle call failed")
            continue
        if item is None:
            return
        if isinstance(item, Drain):
            drained(item)
            continue
        try:
            handler(item)
        except Exception:  # a subscriber's bug never stops the tap (or the relay)
            log.exception("tributary relay: subscriber failed on %d readings", len(item))
            count("tap_failed", len(item))


class Subscriber(Protocol):
    """What a :class:`ProcessTap` factory builds in the child."""

    def handle(self, readings: Sequence[Confirmed]) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


#: The child's niceness: when the relay and Elasticsearch need every core, the subscriber
#: gets what is left; its queue absorbs bursts, and what does not fit is shed and counted
#: (BENCHMARKS.md: at 10 the relay lost 14-22 % of its rate on 2 cores, at 19 it did not).
CHILD_NICE = 19

#: ``factory(*args, count=count) -> Subscriber``: module-level, so the child can import it.
Factory = Callable[..., Subscriber]


class ProcessTap:
    """One subscriber in a child process, fed through a bounded queue of confirmed batches."""

    #: a child that died is started again at most this often
    RESTART_S = 10.0

    def __init__(
        self,
        factory: Factory,
        args: tuple[Any, ...],
        counters: Counters,
        max_batches: int = 256,
        name: str = "tributary-tap",
        idle_s: float = 1.0,
    ) -> None:
        self.factory = factory
        self.args = args
        self.counters = counters
        self.max_batches = max_batches
        self.name = name
        self.idle_s = idle_s
        self._ctx = multiprocessing.get_context("spawn")  # never fork the relay's threads
        self._lock = threading.Lock()
        self._closed = False
        self._started = 0.0
        self._tokens = 0
        self._drained: dict[int, threading.Event] = {}
        self._start()

    def _start(self) -> None:
        self._q: Any = self._ctx.Queue(self.max_batches)
        self._back: Any = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_child,
            args=(
                self.factory,
                self.args,
                self._q,
                self._back,
                os.getpid(),
                self.idle_s,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=self.name,
            daemon=True,
        )
        self._proc.start()
        self._started = time.monotonic()
        self._reader = threading.Thread(
            target=self._read_back, args=(self._back,), name=f"{self.name}-back", daemon=True
        )
        self._reader.start()

    def alive(self) -> bool:
        return self._proc.is_alive()

    def offer(self, readings: Sequence[Confirmed]) -> bool:
        """Queue readings for the child; False (and counted) when it is full or down."""
        if not readings:
            return True
        with self._lock:
            if not self._proc.is_alive() and not self._closed:
                if time.monotonic() - self._started < self.RESTART_S:
                    self.counters.inc("tap_shed", len(readings))
                    return False
                log.error(
                    "tributary relay: subscriber process %s ended (exit %s); starting it again",
                    self.name,
                    self._proc.exitcode,
                )
                self.counters.inc("tap_restarts")
                self._start()
            return shed_when_full(self._q, readings, self.counters)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the child has handled everything offered so far (tests, shutdown)."""
        with self._lock:  # offer() never waits behind a drain's full queue
            self._tokens += 1
            token = self._tokens
            done = self._drained[token] = threading.Event()
            q = self._q
        try:
            q.put(Drain(token), timeout=timeout)
        except queue.Full:
            self._drained.pop(token, None)
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child after it has handled its queue (it saves its state at stop)."""
        with self._lock:
            self._closed = True
        try:
            self._q.put(None, timeout=timeout)
        except (queue.Full, OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.error("tributary relay: subscriber process %s did not stop; killed", self.name)
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)

    def _read_back(self, back: Any) -> None:
        """Counts, log records and drain answers from the child, until it ends."""
        while True:
            try:
                kind, value = back.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    return
                continue
            except (EOFError, OSError, ValueError):
                return
            if kind == "counts":
                self.counters.update(value)
            elif kind == "log":
                logging.getLogger(value.name).handle(value)
            elif kind == "drained":
                event = self._drained.pop(value, None)
                if event is not None:
                    event.set()
            elif kind == "end":
                return


class _BackCounts:
    """The child's counts, sent to the parent at most once per ``every_s``."""

    def __init__(self, back: Any, every_s: float = 0.5) -> None:
        self.back = back
        self.every_s = every_s
        self._counts: dict[Any, int] = {}
        self._last = time.monotonic()

    def __call__(self, name: str, n: int = 1, gateway: str | None = None) -> None:
        key = (name, gateway) if gateway else name
        self._counts[key] = self._counts.get(key, 0) + n
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if self._counts:
            counts, self._counts = self._counts, {}
            self.back.put(("counts", counts))


class _BackLog(logging.handlers.QueueHandler):
    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put_nowait(("log", record))


def _child(
    factory: Factory,
    args: tuple[Any, ...],
    q: Any,
    back: Any,
    parent: int,
    idle_s: float,
    level: int,
) -> None:
    """The child process: build the subscriber, serve the queue, save at the end."""
    try:
        os.nice(CHILD_NICE)  # under CPU contention, intake and shipping come first
    except OSError:
        pass
    root = logging.getLogger()
    root.handlers[:] = [_BackLog(back)]
    root.setLevel(level)
    count = _BackCounts(back)
    sub = factory(*args, count=count)

    def tick() -> None:
        sub.tick()
        count.flush()

    def drained(item: Drain) -> None:
        count.flush()
        back.put(("drained", item.token))

    try:
        serve(
            q.get,
            sub.handle,
            tick,
            idle_s,
            count,
            drained,
            alive=lambda: os.getppid() == parent,
        )
    finally:
        try:
            sub.close()
        finally:
            count.flush()
            back.put(("end", None))
