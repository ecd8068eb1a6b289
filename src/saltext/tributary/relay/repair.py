"""Gap repair: ask gateways to replay what the ledger shows missing.

Where it runs, and why: inside the ``tributary_relay`` engine, as a thread of its own beside the
shipper. It reads the same ledger the shipper writes (the relay spool's SQLite file), so the
two never disagree about what is missing; it lives and dies with the relay (a top master
without the relay has no ledger to repair); and a separate engine would need its own process,
its own copy of the configuration and a second writer on the ledger for nothing. It never
touches the event-bus thread: a replay request through a syndic takes seconds (``syndic_wait``)
and must not delay draining the bus.

A replay request is a Salt job ``tributary.replay [epoch, lo, hi]`` sent to the gateway (it
works through the syndic). In the engine, :class:`JobReplayer` publishes it without waiting
(``LocalClient.run_job``, a job id chosen first) and takes the gateway's answer from the
``salt/job/<jid>/ret/<gateway>`` event the relay's own bus subscription already sees; a job
unanswered after ``timeout_s`` counts as no answer. It costs no thread and no bus subscriber
per request: a ``LocalClient.cmd`` per request, the earlier way, unpacked every event on the
master's bus in each waiting thread, and 64 of them starved the relay's intake in the 2,000
gateway bench. :class:`ThreadReplayer` runs a plain blocking function
``replay(gateway, epoch, lo, hi) -> answer`` in a pool instead (the runner, the unit tests).
Requests to different gateways run concurrently (at most ``concurrency`` in flight, one per
gateway), so a silent site does not stall repair for the fleet; the ledger is written only
from the repair thread. An answer decides the gap's fate:

* ``{"result": True, ...}``: the gateway re-emitted the range; the gap closes when the batches
  are indexed. Until then the next request waits ``backoff_s * 2**attempts`` (capped). A gap
  still open after ``max_attempts`` such answers is given up.
* ``{"result": False, "error": "... not held ..."}`` or an unknown epoch: the gateway no longer
  holds the range; the gap is given up with that reason (kept, reported; ``salt-run
  tributary.replay <gateway> retry_given_up=True`` asks again).
* no answer (``None``, gateway offline): retried with backoff for as long as the gateway could
  still hold the range (``give_up_after_s``, the gateways' retention), and at once when the
  gateway is heard from again (a batch or heartbeat arrives), so recovery after an outage
  takes about the grace period plus one request, not several backoff doublings.

Requests are rate-limited fleet-wide (``per_minute``) and sized at most ``max_readings``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, runtime_checkable

from saltext.tributary.relay.ledger import Gap, Ledger

log = logging.getLogger(__name__)

ReplayFn = Callable[[str, str, int, int], Any]

GONE_MARKERS = ("not held", "unknown epoch", "empty range")


@runtime_checkable
class Replayer(Protocol):
    """Sends replay requests; each answer (or None) arrives in the returned future."""

    def submit(self, gateway: str, epoch: str, lo: int, hi: int) -> Future[Any]: ...

    def expire(self) -> None:
        """Settle the requests that ran out of time (answer None)."""

    def close(self) -> None: ...


class ThreadReplayer:
    """A blocking ``replay(gateway, epoch, lo, hi)`` run in a pool of ``concurrency`` threads."""

    def __init__(self, replay: ReplayFn, concurrency: int = 8) -> None:
        self.replay = replay
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, concurrency), thread_name_prefix="tributary-replay"
        )

    def submit(self, gateway: str, epoch: str, lo: int, hi: int) -> Future[Any]:
        return self._pool.submit(self.replay, gateway, epoch, lo, hi)

    def expire(self) -> None:
        """The blocking function keeps its own time."""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


JOB_RET_PREFIX = "salt/job/"


class JobReplayer:
    """Replay requests as Salt jobs published without waiting; answers taken from the bus.

    ``publish(jid, gateway, args)`` sends the job ``tributary.replay`` with that job id (see
    :func:`salt_job_replayer`), ``new_jid()`` makes one. The relay's bus handler hands every
    event to :meth:`take`; the ``salt/job/<jid>/ret/<gateway>`` of a pending request settles
    it with the gateway's answer (a return claiming another minion id, or a job that is not
    ours, is ignored). :meth:`expire` settles what is still unanswered after ``timeout`` with
    None (the gateway did not answer: retried with backoff)."""

    def __init__(
        self,
        publish: Callable[[str, str, list[Any]], Any],
        new_jid: Callable[[], str],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.publish = publish
        self.new_jid = new_jid
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        #: jid -> (gateway, deadline, future answer)
        self._pending: dict[str, tuple[str, float, Future[Any]]] = {}

    def submit(self, gateway: str, epoch: str, lo: int, hi: int) -> Future[Any]:
        fut: Future[Any] = Future()
        jid = str(self.new_jid())
        # registered before the job is out: a gateway on this master can answer before
        # publish() returns
        with self._lock:
            self._pending[jid] = (gateway, self.clock() + self.timeout, fut)
        try:
            self.publish(jid, gateway, [str(epoch), int(lo), int(hi)])
        except Exception as exc:  # the request failed: retried like no answer
            with self._lock:
                self._pending.pop(jid, None)
            if not fut.done():
                fut.set_exception(exc)
        return fut

    def take(self, tag: str, data: Any) -> bool:
        """Settle a pending request from a bus event; True if the event was its answer. Cheap
        for every other event (one prefix test while nothing is pending)."""
        if not self._pending or not tag.startswith(JOB_RET_PREFIX):
            return False
        parts = tag.split("/")
        # salt/job/<jid>/ret/<minion id>
        if len(parts) != 5 or parts[3] != "ret":
            return False
        with self._lock:
            entry = self._pending.get(parts[2])
            if entry is None or entry[0] != parts[4]:
                return False
            if isinstance(data, Mapping) and data.get("id", parts[4]) != parts[4]:
                return False
            del self._pending[parts[2]]
        answer = data.get("return") if isinstance(data, Mapping) else None
        if not entry[2].done():
            entry[2].set_result(answer)
        return True

    def expire(self) -> None:
        now = self.clock()
        with self._lock:
            late = [jid for jid, (_, deadline, _f) in self._pending.items() if deadline <= now]
            futs = [self._pending.pop(jid)[2] for jid in late]
        for fut in futs:
            if not fut.done():
                fut.set_result(None)

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._lock:
            futs = [f for _, _, f in self._pending.values()]
            self._pending.clear()
        for fut in futs:
            if not fut.done():
                fut.cancel()


def salt_job_replayer(opts: Mapping[str, Any], timeout: float) -> JobReplayer:
    """A :class:`JobReplayer` publishing through this master's LocalClient (one client, used
    only from the repair thread; ``run_job`` without ``listen`` subscribes to nothing)."""
    import salt.client
    import salt.utils.jid

    client = salt.client.get_local_client(mopts=dict(opts))

    def publish(jid: str, gateway: str, args: list[Any]) -> None:
        pub = client.run_job(
            gateway, "tributary.replay", args, timeout=int(timeout), jid=jid, listen=False
        )
        if not pub or "jid" not in pub:
            raise RuntimeError(f"the master did not publish the replay job for {gateway}")

    return JobReplayer(publish, lambda: salt.utils.jid.gen_jid(opts), timeout)


def local_client_replay(opts: Mapping[str, Any], timeout: float) -> ReplayFn:
    """``replay(gateway, epoch, lo, hi)`` through this master's LocalClient (it reaches
    gateways behind syndics): the answer of the gateway's ``tributary.replay``, or None. Each
    thread gets a LocalClient of its own (requests run concurrently)."""
    import salt.client

    local = threading.local()

    def replay(gateway: str, epoch: str, lo: int, hi: int) -> Any:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = salt.client.get_local_client(mopts=dict(opts))
        args = [str(epoch), int(lo), int(hi)]
        ret = client.cmd(gateway, "tributary.replay", args, timeout=int(timeout))
        return (ret or {}).get(gateway)

    return replay


class RateLimiter:
    """At most ``per_minute`` events in any 60 s window."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.times: deque[float] = deque()

    def allow(self) -> bool:
        now = self.clock()
        while self.times and now - self.times[0] >= 60:
            self.times.popleft()
        if len(self.times) >= self.per_minute:
            return False
        self.times.append(now)
        return True


def classify(answer: Any) -> tuple[str, str]:
    """``("ok"|"gone"|"retry", detail)`` for a gateway's answer to a replay request."""
    if answer is None:
        return "retry", "no answer from the gateway"
    if isinstance(answer, Mapping):
        if answer.get("result") is True:
            return "ok", f"{answer.get('readings', '?')} readings re-emitted"
        err = str(answer.get("error") or answer)
        if any(m in err for m in GONE_MARKERS):
            return "gone", err
        return "retry", err
    # a string is Salt's way of reporting an exception or a missing function
    return "retry", str(answer)[:500]


class GapRepairer:
    """One pass (:meth:`run_once`) or a loop (:meth:`start`) over the ledger's due gaps."""

    def __init__(
        self,
        ledger_factory: Callable[[], Ledger],
        replay: ReplayFn | Replayer,
        *,
        grace_s: float = 60.0,
        check_s: float = 5.0,
        backoff_s: float = 30.0,
        backoff_max_s: float = 600.0,
        per_minute: int = 6,
        max_attempts: int = 8,
        max_readings: int = 20_000,
        concurrency: int = 8,
        give_up_after_s: float = 7 * 86400.0,
        keep_s: float = 30 * 86400.0,
        count: Callable[..., None] | None = None,
    ) -> None:
        self.ledger_factory = ledger_factory
        #: sends the requests: a :class:`Replayer`, or a blocking function run in a pool
        self.replayer: Replayer = (
            replay if isinstance(replay, Replayer) else ThreadReplayer(replay, concurrency)
        )
        self.concurrency = max(1, concurrency)
        self.grace_s = grace_s
        self.check_s = check_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.limiter = RateLimiter(per_minute)
        self.max_attempts = max_attempts
        self.max_readings = max_readings
        self.give_up_after_s = give_up_after_s
        self.keep_s = keep_s
        #: ``count(name, n, gateway=None)``: the relay's counters
        self.count = count or (lambda name, n, gateway=None: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: requests in flight: gateway -> (gap, last sequence asked, future answer)
        self._inflight: dict[str, tuple[Gap, int, Future[Any]]] = {}
        self._last_prune = 0.0
        self.last: list[dict[str, Any]] = []

    def run_once(
        self, ledger: Ledger, now: float | None = None, wait: bool = True
    ) -> list[dict[str, Any]]:
        """Refresh the gaps, record the answers that came back and request the due gaps (one
        request per gateway at a time); with ``wait``, wait for this pass's answers."""
        now = time.time() if now is None else now
        ledger.refresh(now)
        done = self._collect(ledger, now)
        for gap in ledger.due(self.grace_s, now):
            if gap.gateway in self._inflight:
                continue
            if gap.answered >= self.max_attempts or now - gap.opened > self.give_up_after_s:
                why = (
                    f"still missing after {gap.answered} replays the gateway answered"
                    if gap.answered >= self.max_attempts
                    else f"unanswered for {now - gap.opened:.0f} s, past give_up_after_s"
                )
                ledger.give_up(gap, why)
                self.count("gaps_given_up", 1)
                done.append({**gap.as_dict(now), "outcome": "given_up", "detail": why})
                continue
            if len(self._inflight) >= self.concurrency or not self.limiter.allow():
                break
            self._submit(gap, ledger)
        if wait:
            for _, _, fut in list(self._inflight.values()):
                self._wait(fut)
            done += self._collect(ledger, now)
        if now - self._last_prune > 3600:
            self._last_prune = now
            ledger.prune(self.keep_s, now)
        self.last = done
        return done

    def _submit(self, gap: Gap, ledger: Ledger) -> None:
        hi = min(gap.hi, gap.lo + self.max_readings - 1)
        ledger.asking(gap)
        # Counted before the request: through a syndic the answer takes syndic_wait (5 s),
        # and the replayed readings can be indexed, and the counters persisted with them,
        # before it is back.
        self.count("replays_requested", 1)
        self.count("replays_requested", 1, gateway=gap.gateway)
        fut = self.replayer.submit(gap.gateway, gap.epoch, gap.lo, hi)
        self._inflight[gap.gateway] = (gap, hi, fut)

    def _wait(self, fut: Future[Any]) -> None:
        while not fut.done():
            self.replayer.expire()
            try:
                fut.exception(timeout=0.5)
            except FutureTimeout:
                continue

    def _collect(self, ledger: Ledger, now: float) -> list[dict[str, Any]]:
        self.replayer.expire()
        out = []
        for gateway, (gap, hi, fut) in list(self._inflight.items()):
            if not fut.done():
                continue
            del self._inflight[gateway]
            try:
                answer = fut.result()
            except Exception as exc:  # a failed request is retried
                answer = f"{type(exc).__name__}: {exc}"
            out.append(self._record(ledger, gap, hi, answer, now))
        return out

    def request(self, ledger: Ledger, gap: Gap, now: float | None = None) -> dict[str, Any]:
        """Ask for (the first ``max_readings`` of) one gap now, wait, record the outcome."""
        now = time.time() if now is None else now
        self._submit(gap, ledger)
        self._wait(self._inflight[gap.gateway][2])
        done = self._collect(ledger, now)
        return done[0] if done else {**gap.as_dict(now), "outcome": "retry"}

    def _record(self, ledger: Ledger, gap: Gap, hi: int, answer: Any, now: float) -> dict[str, Any]:
        outcome, detail = classify(answer)
        if outcome != "retry":
            self.count("replays_answered", 1)
        if outcome == "gone":
            ledger.give_up(gap, f"gateway no longer holds the range: {detail}")
            self.count("gaps_given_up", 1)
            log.error(
                "tributary relay: gap %s %s..%s of %s given up: %s",
                gap.epoch,
                gap.lo,
                gap.hi,
                gap.gateway,
                detail,
            )
        else:
            ledger.requested(gap, self.backoff_s, self.backoff_max_s, now, outcome)
            log.info(
                "tributary relay: replay %s %s..%s from %s (attempt %s): %s, %s",
                gap.epoch,
                gap.lo,
                hi,
                gap.gateway,
                gap.attempts,
                outcome,
                detail,
            )
            if outcome == "retry":
                self.count("replays_failed", 1)
                log.warning(
                    "tributary relay: replay %s %s..%s from %s failed (%s); will retry",
                    gap.epoch,
                    gap.lo,
                    hi,
                    gap.gateway,
                    detail,
                )
        return {**gap.as_dict(now), "requested_to": hi, "outcome": outcome, "detail": detail}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tributary-gaps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self.replayer.close()

    def _loop(self) -> None:
        ledger = self.ledger_factory()
        while not self._stop.wait(self.check_s):
            try:
                self.run_once(ledger, wait=False)
            except Exception:  # keep repairing after a transient fault
                log.exception("tributary relay: gap repair pass failed")
