"""Replay requests as Salt jobs published without waiting, answered from the relay's bus (no
daemons: the publisher is a recording function, the bus events are handed in as the engine's
handler does)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from saltext.tributary.relay.ledger import Ledger
from saltext.tributary.relay.repair import GapRepairer, JobReplayer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def jobs():
    sent: list[tuple[str, str, list]] = []
    counter = iter(range(1, 10_000))
    clock = Clock()
    rep = JobReplayer(
        lambda jid, gw, args: sent.append((jid, gw, args)),
        lambda: f"2026113000000000{next(counter):04d}",
        timeout=60,
        clock=clock,
    )
    return rep, sent, clock


def ret(jid: str, minion: str, answer, claimed: str | None = None):
    return f"salt/job/{jid}/ret/{minion}", {
        "id": claimed or minion,
        "jid": jid,
        "fun": "tributary.replay",
        "return": answer,
    }


def test_the_answer_comes_from_the_return_event_of_the_job(jobs):
    rep, sent, _ = jobs
    fut = rep.submit("gw-1", "e1", 5, 9)
    ((jid, gw, args),) = sent
    assert gw == "gw-1" and args == ["e1", 5, 9] and not fut.done()
    assert rep.take("salt/beacon/gw-1/tributary_mqtt/batch", {"x": 1}) is False
    assert rep.take(f"salt/job/{jid}/new", {"minions": ["gw-1"]}) is False
    assert rep.take(*ret(jid, "gw-1", {"result": True, "readings": 5})) is True
    assert fut.result(timeout=0) == {"result": True, "readings": 5}
    assert rep.pending() == 0
    # a second copy of the same return settles nothing
    assert rep.take(*ret(jid, "gw-1", {"result": False})) is False


def test_returns_from_another_minion_or_job_are_ignored(jobs):
    rep, sent, _ = jobs
    fut = rep.submit("gw-1", "e1", 1, 2)
    jid = sent[0][0]
    assert rep.take(*ret(jid, "gw-2", {"result": False, "error": "not held"})) is False
    assert rep.take(*ret(jid, "gw-1", {"result": False}, claimed="gw-2")) is False
    assert rep.take(*ret("20260101000000000000", "gw-1", {"result": False})) is False
    assert rep.take(f"salt/job/{jid}/ret", {"return": 1}) is False
    assert not fut.done() and rep.pending() == 1


def test_an_unanswered_job_settles_as_no_answer_after_the_timeout(jobs):
    rep, _, clock = jobs
    fut = rep.submit("gw-off", "e1", 1, 2)
    clock.t += 59
    rep.expire()
    assert not fut.done()
    clock.t += 1
    rep.expire()
    assert fut.result(timeout=0) is None and rep.pending() == 0


def test_a_failed_publish_fails_the_request_and_keeps_nothing_pending():
    def publish(jid, gw, args):
        raise ConnectionError("master not responding")

    rep = JobReplayer(publish, lambda: "1", timeout=60)
    fut = rep.submit("gw-1", "e", 1, 1)
    assert isinstance(fut.exception(timeout=0), ConnectionError)
    assert rep.pending() == 0


def test_an_answer_that_arrives_before_publish_returns_is_kept():
    """A gateway on the same master can answer before ``publish`` has returned."""
    holder: dict = {}

    def publish(jid, gw, args):
        assert holder["rep"].take(*ret(jid, gw, {"result": True, "readings": 1}))

    rep = holder["rep"] = JobReplayer(publish, lambda: "42", timeout=60)
    assert rep.submit("gw-1", "e", 1, 1).result(timeout=0) == {"result": True, "readings": 1}


def test_the_repairer_drives_jobs_without_a_thread_per_request(tmp_path, jobs):
    """200 gateways with a gap: at most ``concurrency`` jobs out, each settled by its return
    event or its timeout, the ledger written from the repair pass only; no thread is started
    per request."""
    rep, sent, clock = jobs
    ledger = Ledger(sqlite3.connect(tmp_path / "l.db", isolation_level=None))
    for n in range(200):
        ledger.add_range(f"gw-{n:03d}", "e", 1, 1)
        ledger.add_range(f"gw-{n:03d}", "e", 3, 3)
    gaps = GapRepairer(lambda: ledger, rep, grace_s=0, per_minute=10_000, concurrency=64)
    threads = threading.active_count()
    assert gaps.run_once(ledger, now=1, wait=False) == []
    assert len(sent) == 64 and rep.pending() == 64
    assert threading.active_count() == threads
    # every gateway but one answers; that one's job runs out of time
    for jid, gw, _args in sent[1:]:
        rep.take(*ret(jid, gw, {"result": True, "readings": 1}))
    done = gaps.run_once(ledger, now=2, wait=False)
    assert len(done) == 63 and {d["outcome"] for d in done} == {"ok"}
    assert len(sent) == 64 + 63  # the freed slots asked the next gateways
    for jid, gw, _args in sent[64:]:
        rep.take(*ret(jid, gw, {"result": True, "readings": 1}))
    clock.t += 61
    done = gaps.run_once(ledger, now=3, wait=False)
    assert len(done) == 64
    assert [(d["gateway"], d["outcome"]) for d in done if d["outcome"] != "ok"] == [
        (sent[0][1], "retry")
    ]
    gaps.stop()
    assert rep.pending() == 0
