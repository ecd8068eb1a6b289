"""CPU per relay stage, for the bench and for debugging (off unless asked for).

With ``TRIBUTARY_RELAY_STAGE_CPU=1`` in the master's environment the relay counts the CPU time
of the thread doing each stage (``time.thread_time_ns``) under the fleet counters
``cpu_ns:<stage>``, written to the spool with the other counters (``salt-run
tributary.status`` and the bench read them):

* ``intake``: an event Salt has unpacked off the bus, checked and appended to the spool
  (Salt's own reading and unpacking of the bus message is not in it: it is part of the
  engine's CPU outside the stages);
* ``origin``: signature checks (at intake, or when a row is planned);
* ``build``: taking rows from the spool, decoding them and building the bulk body;
* ``ship``: sending the bulk, reading its answer, and confirming it (ledger, spool rows).

Stages nest: an ``origin`` check inside ``intake`` is counted as ``origin`` only. Off (the
default), nothing is timed and the relay pays one attribute test per event and per bulk.

The garbage collector's passes are counted too (``gc_ns:<generation>``, wall time of each
pass, and ``gc_runs:<generation>``); they happen inside the stages and are part of their CPU.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from saltext.tributary.relay.counters import Counters

ENV = "TRIBUTARY_RELAY_STAGE_CPU"
STAGES = ("intake", "origin", "build", "ship")
F = TypeVar("F", bound=Callable[..., Any])


def wanted() -> bool:
    """Stage timing asked for in the environment."""
    return os.environ.get(ENV, "") not in ("", "0")


class StageCPU:
    """Counts the CPU each stage takes on the thread that runs it (exclusive of nested
    stages) into ``counters`` as ``cpu_ns:<stage>``."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._local = threading.local()
        # collector passes, kept in plain fields by the callback (it may run inside a counter
        # update, whose lock it must not take) and moved to the counters at each stage's end
        self._gc_start = 0
        self._gc: dict[str, int] = {}
        gc.callbacks.append(self._on_gc)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter_ns()
            return
        gen = info.get("generation", 0)
        spent = time.perf_counter_ns() - self._gc_start
        self._gc[f"gc_ns:{gen}"] = self._gc.get(f"gc_ns:{gen}", 0) + spent
        self._gc[f"gc_runs:{gen}"] = self._gc.get(f"gc_runs:{gen}", 0) + 1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        local = self._local
        outer = getattr(local, "inner", 0)
        local.inner = 0
        t0 = time.thread_time_ns()
        try:
            yield
        finally:
            spent = time.thread_time_ns() - t0
            self.counters.inc(f"cpu_ns:{name}", spent - local.inner)
            local.inner = outer + spent
            if self._gc:
                passes, self._gc = self._gc, {}
                self.counters.update(passes)

    def wrap(self, name: str, func: F) -> F:
        """``func`` with its calls counted under ``name``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return func(*args, **kwargs)

        return timed  # type: ignore[return-value]


def per_reading(counts: dict[str, int], readings: int) -> dict[str, float]:
    """Microseconds of CPU per reading by stage, from two ``cpu_ns:*`` counter snapshots'
    difference ``counts`` (``total`` is their sum)."""
    out = {s: round(counts.get(f"cpu_ns:{s}", 0) / 1000 / max(1, readings), 2) for s in STAGES}
    out["total"] = round(sum(out.values()), 2)
    return out
