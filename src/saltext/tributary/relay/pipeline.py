"""The relay: top master event bus -> durable relay spool -> Elasticsearch bulk.

Its parts, each in its own module:

* :mod:`~saltext.tributary.relay.intake` (bus reader thread): takes Tributary batches, heartbeats
  and syndic key sets off the bus and spools them, returning at once;
* :mod:`~saltext.tributary.relay.origin`: is a row really from the gateway it names;
* :mod:`~saltext.tributary.relay.planner`: spooled rows -> a bulk plan, one row at a time;
* :mod:`~saltext.tributary.relay.shipper` (shipper thread): sends plans, reads the answers
  (:mod:`~saltext.tributary.relay.bulk`) and deletes a row once all its documents are confirmed.

The gateway id is the one in the event tag (Salt sets it from the authenticated minion id),
never a value inside the batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.documents import BulkPlan
from saltext.tributary.relay.intake import Intake
from saltext.tributary.relay.origin import OriginVerifier
from saltext.tributary.relay.planner import Planner
from saltext.tributary.relay.shipper import Shipper
from saltext.tributary.relay.spool import RelaySpool, SpoolRow
from saltext.tributary.relay.stagecpu import StageCPU, wanted
from saltext.tributary.relay.tap import Factory, ProcessTap, Tap

log = logging.getLogger(__name__)


class Relay:
    """Intake on the caller's thread, shipping on its own: the engine's one object."""

    def __init__(
        self, client: Any, config: RelayConfig, setup: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.counters = Counters()
        self.spool = RelaySpool(config.spool_path or "")
        wake = threading.Event()
        self.origin = OriginVerifier(config, self.counters)
        self.intake = Intake(config, self.spool, self.counters, self.origin, wake)
        self.planner = Planner(config, self.counters, self.origin)
        self.shipper = Shipper(client, config, self.counters, self.planner, wake, setup)
        #: CPU per stage (``TRIBUTARY_RELAY_STAGE_CPU=1``, see :mod:`~.stagecpu`); None: off
        self.stages: StageCPU | None = None
        if wanted():
            self.time_stages()

    def time_stages(self) -> StageCPU:
        """Count the CPU of each stage from now on (``cpu_ns:<stage>`` counters)."""
        st = self.stages = StageCPU(self.counters)
        self.origin.verify = st.wrap("origin", self.origin.verify)  # type: ignore[method-assign]
        self.shipper.prepare = st.wrap("build", self.shipper.prepare)  # type: ignore[method-assign]
        self.shipper.send = st.wrap("ship", self.shipper.send)  # type: ignore[method-assign]
        self.shipper.finish = st.wrap("ship", self.shipper.finish)  # type: ignore[method-assign]
        return st

    @property
    def name(self) -> str:
        return self.shipper.name

    @name.setter
    def name(self, value: str) -> None:
        self.shipper.name = value

    @property
    def ready(self) -> bool:
        return self.shipper.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.shipper.ready = value

    def accept(self, tag: str, data: Any) -> bool:
        """Spool one bus event if it is Tributary's; True if it was taken."""
        return self.intake.accept(tag, data)

    def count(self, name: str, n: int = 1, gateway: str | None = None) -> None:
        """Count ``n`` under ``name`` (for the fleet, or for ``gateway``)."""
        self.counters.inc(name, n, gateway)

    def check_budget(self) -> None:
        self.intake.check_budget()

    def build_docs(self, rows: list[SpoolRow], spool: RelaySpool | None = None) -> BulkPlan:
        """The bulk plan for some spooled rows."""
        return self.planner.build(rows, spool or self.spool)

    def prepare(self, spool: RelaySpool, skip: Collection[int] = ()) -> BulkPlan | None:
        return self.shipper.prepare(spool, skip)

    def finish(self, spool: RelaySpool, plan: BulkPlan, retry_rows: set[int]) -> int:
        return self.shipper.finish(spool, plan, retry_rows)

    def subscribe(self, handler: Any, max_batches: int = 256, idle: Any = None) -> Tap:
        """Offer the readings of every confirmed bulk to ``handler(readings)``, on a thread
        of its own behind a bounded queue (shed and counted when it falls behind); ``idle()``
        is called on that thread when nothing arrived for a second."""
        self.shipper.tap = Tap(handler, self.counters, max_batches, idle=idle)
        return self.shipper.tap

    def subscribe_process(
        self, factory: Factory, args: tuple[Any, ...], max_batches: int = 256
    ) -> ProcessTap:
        """Like :meth:`subscribe`, with the subscriber built by ``factory(*args, count=...)``
        in a child process of its own (off this process's GIL)."""
        self.shipper.tap = ProcessTap(factory, args, self.counters, max_batches)
        return self.shipper.tap

    def start(self) -> None:
        self.shipper.start()

    def stop(self) -> None:
        self.shipper.stop()
        if self.shipper.tap is not None:
            self.shipper.tap.close()
        if self.stages is not None:
            self.stages.close()


def take_event(relay: Relay, tag: Any, data: Any) -> None:
    """Hand one bus event to the relay; an error is logged and never ends the engine."""
    if relay.stages is not None:
        with relay.stages.stage("intake"):
            _take(relay, tag, data)
    else:
        _take(relay, tag, data)


def _take(relay: Relay, tag: Any, data: Any) -> None:
    try:
        relay.accept(tag if isinstance(tag, str) else "", data)
    except Exception:
        log.exception("tributary relay: could not spool event %s", tag)
