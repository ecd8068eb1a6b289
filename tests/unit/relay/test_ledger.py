"""Ledger: merged ranges, holes, heartbeat tails, gap repair state (SQLite, no daemons)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from saltext.tributary.relay.ledger import Ledger
from saltext.tributary.relay.repair import GapRepairer, RateLimiter, classify


@pytest.fixture
def ledger(tmp_path):
    db = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    return Ledger(db)


def test_ranges_merge_adjacent_and_overlapping(ledger):
    for lo, hi in [(1, 10), (21, 30), (11, 15), (14, 20), (40, 40)]:
        ledger.add_range("gw", "e", lo, hi)
    assert ledger.ranges("gw", "e") == [(1, 30), (40, 40)]
    assert ledger.holes("gw", "e") == [(31, 39)]
    ledger.add_range("gw", "e", 31, 39)
    assert ledger.ranges("gw", "e") == [(1, 40)]
    assert ledger.holes("gw", "e") == []


def test_leading_hole_and_heartbeat_tail(ledger):
    ledger.add_range("gw", "e", 5, 10)
    assert ledger.holes("gw", "e") == [(1, 4)]
    ledger.heartbeat("gw", "e", 15)
    assert ledger.holes("gw", "e") == [(1, 4), (11, 15)]
    ledger.heartbeat("gw", "e", 12)  # an older heartbeat never lowers the head
    assert ledger.holes("gw", "e") == [(1, 4), (11, 15)]
    ledger.heartbeat("gw", "other", 3)  # heartbeat alone: everything missing
    assert ledger.holes("gw", "other") == [(1, 3)]


def test_durable_across_connections(tmp_path):
    path = tmp_path / "l.db"
    Ledger(sqlite3.connect(path, isolation_level=None)).add_range("gw", "e", 1, 5)
    again = Ledger(sqlite3.connect(path, isolation_level=None))
    assert again.ranges("gw", "e") == [(1, 5)]


def test_gap_keeps_its_age_while_partly_filled(ledger):
    ledger.add_range("gw", "e", 1, 10)
    ledger.add_range("gw", "e", 31, 40)
    (gap,) = ledger.refresh(now=100)
    assert (gap.lo, gap.hi, gap.opened) == (11, 30, 100)
    ledger.requested(gap, backoff_s=10, backoff_max_s=100, now=160)
    ledger.add_range("gw", "e", 11, 20)
    (gap,) = ledger.refresh(now=170)
    assert (gap.lo, gap.hi, gap.opened, gap.attempts) == (21, 30, 100, 1)
    ledger.add_range("gw", "e", 21, 30)
    assert ledger.refresh(now=180) == []


def test_due_respects_grace_and_backoff(ledger):
    ledger.add_range("gw", "e", 1, 1)
    ledger.add_range("gw", "e", 3, 3)
    ledger.refresh(now=0)
    assert ledger.due(grace_s=60, now=30) == []
    (gap,) = ledger.due(grace_s=60, now=61)
    ledger.requested(gap, backoff_s=10, backoff_max_s=15, now=61)
    assert ledger.due(grace_s=60, now=70) == []
    assert len(ledger.due(grace_s=60, now=72)) == 1
    ledger.requested(gap, backoff_s=10, backoff_max_s=15, now=72)
    assert gap.next_try == 72 + 15  # capped
    ledger.give_up(gap, "gone")
    ledger.refresh(now=200)
    assert ledger.due(grace_s=60, now=1000) == []
    assert [g.state for g in ledger.gaps()] == ["given_up"]
    assert ledger.gaps(include_given_up=False) == []


def test_summary(ledger):
    ledger.add_range("gw", "e", 1, 10, now=50)
    ledger.add_range("gw", "e", 15, 20, now=60)
    ledger.heartbeat("gw", "e", 25, now=65)
    ledger.refresh(now=70)
    s = ledger.summary(now=70)["gw"]
    assert s["last_seq"] == 20 and s["epoch"] == "e"
    assert s["open_gaps"] == 2 and s["missing"] == 4 + 5
    assert s["behind"] == 5 and s["lag_s"] == 10


def test_rate_limiter():
    t = [0.0]
    rl = RateLimiter(2, clock=lambda: t[0])
    assert rl.allow() and rl.allow() and not rl.allow()
    t[0] = 60.1
    assert rl.allow()


def test_classify():
    assert classify(None)[0] == "retry"
    assert classify({"result": True, "readings": 5})[0] == "ok"
    gone = {"result": False, "error": "range 1..5 of epoch e is not held: this spool holds ..."}
    assert classify(gone)[0] == "gone"
    assert classify({"result": False, "error": "unknown epoch 'x': ..."})[0] == "gone"
    assert classify({"result": False, "error": "event.fire_master failed"})[0] == "retry"
    assert classify("'tributary.replay' is not available.")[0] == "retry"


def test_repairer_requests_retries_and_gives_up(ledger):
    calls = []
    answers = {
        "gw-ok": {"result": True, "readings": 3},
        "gw-gone": {"result": False, "error": "range is not held"},
        "gw-off": None,
    }

    def replay(gw, epoch, lo, hi):
        calls.append((gw, epoch, lo, hi))
        return answers[gw]

    counts: dict = {}
    for gw in answers:
        ledger.add_range(gw, "e", 1, 1)
        ledger.add_range(gw, "e", 5, 5)
    rep = GapRepairer(
        lambda: ledger,
        replay,
        grace_s=10,
        backoff_s=5,
        backoff_max_s=5,
        per_minute=100,
        max_attempts=2,
        max_readings=2,
        give_up_after_s=40,
        count=lambda n, k, gateway=None: counts.__setitem__(
            (n, gateway) if gateway else n, counts.get((n, gateway) if gateway else n, 0) + k
        ),
    )
    assert rep.run_once(ledger, now=0) == []  # within grace
    done = {d["gateway"]: d for d in rep.run_once(ledger, now=11)}
    assert done["gw-ok"]["outcome"] == "ok" and done["gw-ok"]["requested_to"] == 3  # chunked
    assert done["gw-gone"]["outcome"] == "gone"
    assert done["gw-off"]["outcome"] == "retry"
    assert sorted(calls) == [("gw-gone", "e", 2, 3), ("gw-off", "e", 2, 3), ("gw-ok", "e", 2, 3)]
    assert rep.run_once(ledger, now=12) == []  # backoff
    rep.run_once(ledger, now=17)
    done = {d["gateway"]: d for d in rep.run_once(ledger, now=23)}
    # answered twice, but the replayed readings never closed the gap: given up, with the reason
    assert done["gw-ok"]["outcome"] == "given_up"
    # unanswered: retried, not given up, while the gateway may still hold the range
    assert done["gw-off"]["outcome"] == "retry"
    states = {g.gateway: (g.state, g.reason) for g in ledger.gaps()}
    assert states["gw-gone"][0] == "given_up" and "not held" in states["gw-gone"][1]
    assert states["gw-ok"][0] == "given_up" and "2 replays" in states["gw-ok"][1]
    assert states["gw-off"][0] == "open"
    # the gateway is heard from again: its unanswered gap is asked for at once (no backoff)
    ledger.heartbeat("gw-off", "e", 5)
    assert [d["gateway"] for d in rep.run_once(ledger, now=24)] == ["gw-off"]
    # past give_up_after_s without an answer: given up
    done = {d["gateway"]: d for d in rep.run_once(ledger, now=45)}
    assert done["gw-off"]["outcome"] == "given_up" and "give_up_after_s" in done["gw-off"]["detail"]
    assert counts["gaps_given_up"] == 3 and counts["replays_requested", "gw-ok"] >= 2
    # the operator asks again: given-up gaps reopen with a fresh count
    assert ledger.reopen("gw-gone") == 1
    assert {g.gateway: g.state for g in ledger.gaps()}["gw-gone"] == "open"


def test_repair_of_one_silent_gateway_does_not_stall_the_others(ledger):
    """Requests to different gateways run concurrently: a gateway whose request hangs for its
    whole timeout holds one of the ``concurrency`` slots, and the others' repair goes on
    through the rest; never more than ``concurrency`` requests are in flight."""
    import threading

    release = threading.Event()
    calls = []

    def replay(gw, epoch, lo, hi):
        calls.append(gw)
        if gw == "gw-silent":
            release.wait(30)
            return None
        return {"result": True}

    ledger.add_range("gw-silent", "e", 2, 2)
    for n in range(5):
        ledger.add_range(f"gw-{n}", "e", 2, 2)
    rep = GapRepairer(lambda: ledger, replay, grace_s=0, per_minute=100, concurrency=2)
    try:
        done: set = set()
        deadline = time.monotonic() + 10
        now = 1
        while len(done) < 5 and time.monotonic() < deadline:
            assert len(rep._inflight) <= 2
            done |= {d["gateway"] for d in rep.run_once(ledger, now=now, wait=False)}
            now += 1
            time.sleep(0.01)  # polling the pool's progress (no fixed wait)
        assert done == {f"gw-{n}" for n in range(5)}
        assert "gw-silent" in rep._inflight and calls.count("gw-silent") == 1
    finally:
        release.set()
        rep.stop()


def test_refresh_stays_linear_with_thousands_of_gaps(ledger):
    for n in range(2000):
        ledger.add_range(f"gw-{n}", "e", 1, 1)
        ledger.add_range(f"gw-{n}", "e", 3, 3)
        ledger.add_range(f"gw-{n}", "e", 5, 5)
    gaps = ledger.refresh(now=0)
    assert len(gaps) == 4000
    assert {(g.lo, g.hi) for g in gaps} == {(2, 2), (4, 4)}


def test_prune_forgets_settled_old_epochs(ledger):
    ledger.add_range("gw-a", "old", 1, 10, now=0)
    ledger.add_range("gw-a", "new", 1, 10, now=100 * 86400)
    ledger.add_range("gw-b", "only", 1, 10, now=0)  # its latest epoch: kept
    ledger.add_range("gw-c", "holey", 1, 1, now=0)
    ledger.add_range("gw-c", "holey", 3, 3, now=0)
    ledger.add_range("gw-c", "newer", 1, 1, now=100 * 86400)
    ledger.refresh(now=100 * 86400)
    assert ledger.prune(30 * 86400, now=100 * 86400) == 1
    assert not ledger.ranges("gw-a", "old") and ledger.ranges("gw-a", "new")
    assert ledger.ranges("gw-b", "only")
    assert ledger.ranges("gw-c", "holey")  # an open gap keeps its epoch


def test_repairer_rate_limit(ledger):
    calls = []
    for n in range(5):
        ledger.add_range(f"gw{n}", "e", 2, 2)
    rep = GapRepairer(
        lambda: ledger, lambda *a: calls.append(a) or {"result": True}, grace_s=0, per_minute=3
    )
    rep.run_once(ledger, now=100)
    assert len(calls) == 3


def test_refresh_counts_gaps_opened_repaired_and_filled_once(tmp_path):
    path = tmp_path / "l.db"
    ledger = Ledger(sqlite3.connect(path, isolation_level=None))
    ledger.add_range("gw", "e", 1, 10)
    ledger.add_range("gw", "e", 21, 30)
    ledger.add_range("gw", "e", 41, 50)
    assert len(ledger.refresh(now=100)) == 2  # 11..20 and 31..40
    assert ledger.counts() == {"gaps_opened": 2}
    assert len(ledger.refresh(now=101)) == 2  # the same gaps: not opened again
    ledger.requested(ledger.gaps()[0], backoff_s=10, backoff_max_s=100, now=102)
    ledger.add_range("gw", "e", 11, 15)  # partly filled: still the same gap
    ledger.refresh(now=103)
    assert ledger.counts() == {"gaps_opened": 2}
    ledger.add_range("gw", "e", 16, 20)  # after a replay request: repaired
    ledger.add_range("gw", "e", 31, 40)  # never requested: filled late
    ledger.heartbeat("gw", "e", 55)  # a lost tail opens a gap
    # another connection (salt-run tributary.status refreshes too) counts in the same file
    other = Ledger(sqlite3.connect(path, isolation_level=None))
    assert [(g.lo, g.hi) for g in other.refresh(now=104)] == [(51, 55)]
    assert ledger.refresh(now=105) != []
    assert ledger.counts() == {"gaps_opened": 3, "gaps_repaired": 1, "gaps_filled": 1}
    ledger.give_up(ledger.gaps()[0], "gone")
    ledger.add_range("gw", "e", 51, 55)  # a given-up gap whose readings came after all
    assert ledger.refresh(now=106) == []
    assert ledger.counts() == {"gaps_opened": 3, "gaps_repaired": 2, "gaps_filled": 1}
    # a request on its way: through a syndic its readings are indexed before the answer is back
    ledger.heartbeat("gw", "e", 60)
    (gap,) = ledger.refresh(now=107)
    ledger.asking(gap)
    ledger.add_range("gw", "e", 56, 60)
    assert ledger.refresh(now=108) == []
    assert ledger.counts() == {"gaps_opened": 4, "gaps_repaired": 3, "gaps_filled": 1}
