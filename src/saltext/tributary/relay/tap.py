"""Confirmed readings, offered to whoever subscribes, off the shipping path.

The shipper hands each confirmed bulk's readings to :meth:`Tap.offer`, which never blocks: a
bounded queue feeds the subscriber on a thread of its own, and when the subscriber falls
behind, what does not fit is shed and counted (``tap_shed``), so analysis can never slow
ingest. The relay does not know what subscribes (the engine wires the detector to it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from saltext.tributary.relay.counters import Counters

log = logging.getLogger(__name__)

#: A confirmed reading as the relay holds it: (gateway, site, epoch, relayed_at, reading dict
#: with seq, sensor, metric, unit, ts_ms, value and, for aggregates, agg).
Confirmed = tuple[str, Any, str, int, dict[str, Any]]


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
        if not readings:
            return True
        try:
            self._q.put_nowait(readings)
            return True
        except queue.Full:
            self.counters.inc("tap_shed", len(readings))
            return False

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
            self._q.put(((), done), timeout=timeout)  # type: ignore[arg-type]
        except queue.Full:
            return False
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self.idle_s)
            except queue.Empty:
                if self.idle is not None:
                    try:
                        self.idle()
                    except Exception:  # same rule as the handler
                        log.exception("tributary relay: subscriber's idle call failed")
                continue
            if item is None:
                return
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], threading.Event):
                item[1].set()
                continue
            try:
                self.handler(item)
            except Exception:  # a subscriber's bug never stops the tap (or the relay)
                log.exception("tributary relay: subscriber failed on %d readings", len(item))
                self.counters.inc("tap_failed", len(item))
