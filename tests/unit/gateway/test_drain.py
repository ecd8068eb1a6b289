"""The backlog drain's logic (``gateway/drain.py``) and its wiring in the beacon's emit.

The transport here is a recorder standing in for Salt's request channel; the real channel to a
real syndic master, and the readings indexed exactly once, are tested in
``tests/integration/test_end_to_end.py::test_a_backlog_past_the_beacons_ceiling_drains``.
"""

from __future__ import annotations

import threading
import time

import pytest

from saltext.tributary.gateway import beacons as gw_beacons
from saltext.tributary.gateway import drain as gw_drain
from saltext.tributary.protocol.reading import make_reading
from saltext.tributary.protocol.wire import decode_batch, packed_size
from tests.support.keys import write_keypair

T0 = 1_700_000_000_000
N = 40_000


class Recorder:
    """Records each request's events; ``gate`` (when set) holds each send until released,
    ``fail_after`` makes the request after that many fail. ``opened`` and ``closed`` list the
    senders made and closed (the channels a drain opens)."""

    sent: list[list[dict]] = []
    gate: threading.Event | None = None
    fail_after: int | None = None
    opened: list[Recorder] = []
    closed: list[Recorder] = []

    def __init__(self, opts):
        self.opts = opts
        Recorder.opened.append(self)

    def close(self):
        Recorder.closed.append(self)

    def __call__(self, events):
        if Recorder.gate is not None:
            assert Recorder.gate.wait(10)
        if Recorder.fail_after is not None and len(Recorder.sent) >= Recorder.fail_after:
            raise TimeoutError("no answer")
        Recorder.sent.append(events)


@pytest.fixture(autouse=True)
def recorder(monkeypatch):
    Recorder.sent, Recorder.gate, Recorder.fail_after = [], None, None
    Recorder.opened, Recorder.closed = [], []
    monkeypatch.setattr(gw_beacons, "MasterSender", Recorder)
    yield Recorder
    if Recorder.gate is not None:
        Recorder.gate.set()
    gw_beacons.stop_sources()


@pytest.fixture(scope="module")
def opts(tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    write_keypair(pki)
    return {"id": "gw", "pki_dir": str(pki), "__role": "minion", "master_uri": "tcp://x:4506"}


@pytest.fixture
def cfg(tmp_path):
    return {
        "_beacon_name": "tributary_mqtt",
        "spool": {"path": str(tmp_path / "s.db")},
        "batch": {"max_bytes": 8192, "max_run_bytes": 32_768, "drain_run_bytes": 65_536},
    }


def backlog(cfg, opts, n=N):
    rs = [make_reading(f"s{i % 50}", "t", i * 1.25, T0 + i, "C") for i in range(n)]
    gw_beacons.spool_readings(cfg, opts, rs, [])


def the_drain(cfg, opts):
    return gw_beacons.REGISTRY.get("drain", cfg["spool"]["path"])


def wait_idle(drain, timeout=20.0):
    deadline = time.monotonic() + timeout
    while drain.running():
        assert time.monotonic() < deadline, "the drain did not finish"
        time.sleep(0.01)


def seqs(batches):
    out = []
    for b in batches:
        assert len(decode_batch(b).readings) == b["last"] - b["first"] + 1
        out.extend(range(b["first"], b["last"] + 1))
    return out


def test_a_backlog_leaves_in_one_run_then_drain_requests_each_reading_once(cfg, opts):
    backlog(cfg, opts)
    first = gw_beacons.emit(cfg, opts, {})
    assert first
    drain = the_drain(cfg, opts)
    wait_idle(drain)
    drained = [ev for req in Recorder.sent for ev in req]
    assert {ev["tag"] for ev in drained} == {"salt/beacon/gw/tributary_mqtt/batch"}
    assert {ev["data"]["id"] for ev in drained} == {"gw"}
    # once less than one beacon run (32 KiB here) waits, the drain's last request takes the
    # rest: nothing is left for the beacon runs (test_a_drain_leaves_less_than_a_run_to_the_
    # beacon shows take() leaving it; this is the final take)
    assert drain.spool.unsent() == 0
    rest: list[dict] = []
    for _ in range(3):
        rest += gw_beacons.emit(cfg, opts, {})
    assert rest == [] and not drain.running() and len(Recorder.sent) > 1  # no new drain
    # every reading exactly once, in order: the beacon run, then the drain
    drained_seqs = seqs([ev["data"] for ev in drained])
    assert seqs(first) + drained_seqs == list(range(1, N + 1))
    counters = drain.spool.counters()
    assert counters["drained"] == len(drained_seqs)
    assert counters["drains"] == 1 and counters["drain_requests"] == len(Recorder.sent)
    assert drain.spool.unsent() == 0
    # full batches: each request's batches but its last hold about max_bytes (8 KiB here)
    assert all(packed_size(e["data"]) > 0.9 * 8192 for r in Recorder.sent for e in r[:-1])


def test_a_drain_leaves_less_than_a_run_to_the_beacon(cfg, opts):
    """A drain sends full batches while a beacon run's worth or more waits; its last request
    takes what is left."""
    backlog(cfg, opts, 8_000)  # about 75 KB on the wire
    drain = gw_beacons._drain_for(cfg, opts)
    take = gw_beacons._drain_take(drain, cfg, opts, 8192, 16_384, 32_768, None)
    requests = []
    while events := take():
        requests.append(events)
    per = drain.spool.bytes_per_reading
    assert len(requests) >= 2 and per > 0
    left = drain.spool.unsent()
    assert left > 0 and left * per < 32_768  # less than a run
    # full batches (a request's last one takes what is left of its bytes)
    assert all(packed_size(ev["data"]) > 0.9 * 8192 for req in requests for ev in req[:-1])
    # the drain's last request takes what is left, up to a request's bytes (16 KiB here)
    tail = take(True)
    took = sum(b["last"] - b["first"] + 1 for b in (ev["data"] for ev in tail))
    assert 0 < took <= left and drain.spool.unsent() == left - took
    while take(True):
        pass
    assert drain.spool.unsent() == 0


def test_beacon_runs_emit_nothing_while_a_drain_sends(cfg, opts, recorder):
    recorder.gate = threading.Event()
    backlog(cfg, opts)
    first = gw_beacons.emit(cfg, opts, {})
    drain = the_drain(cfg, opts)
    assert first and drain.running()
    assert gw_beacons.emit(cfg, opts, {}) == []
    recorder.gate.set()
    wait_idle(drain)
    assert seqs(first) + seqs([ev["data"] for r in recorder.sent for ev in r]) == list(
        range(1, N + 1)
    )


def test_a_failed_request_ends_the_drain_and_beacon_runs_carry_on(cfg, opts, recorder):
    recorder.fail_after = 1
    backlog(cfg, opts)
    first = gw_beacons.emit(cfg, opts, {})
    drain = the_drain(cfg, opts)
    wait_idle(drain)
    counters = drain.spool.counters()
    assert counters["drain_failures"] == 1 and counters["drain_requests"] == 2
    assert counters["drained"] == len(seqs([ev["data"] for ev in recorder.sent[0]]))
    # no new drain within RETRY_S: the beacon run emits the next readings itself
    nxt = gw_beacons.emit(cfg, opts, {})
    assert nxt and not drain.running() and len(recorder.sent) == 1
    # the failed request's readings count as emitted: a gap the top master repairs
    lost_from = seqs(first)[-1] + len(seqs([ev["data"] for ev in recorder.sent[0]])) + 1
    assert seqs(nxt)[0] > lost_from


def test_drains_to_one_master_share_a_channel_until_a_request_fails(cfg, opts, recorder):
    """Opening Salt's request channel loads the minion's key (drain.py): the next drain to the
    same master sends on the channel the last one opened; a failure or another master closes
    it and the next drain opens its own."""

    def drain_once(o, n=20_000):
        backlog(cfg, o, n)
        assert gw_beacons.emit(cfg, o, {})
        drain = the_drain(cfg, o)
        assert drain.running() or recorder.sent, "no drain started"
        wait_idle(drain)
        return drain

    drain = drain_once(opts)
    drain_once(opts)
    assert drain.spool.counters()["drains"] == 2
    assert len(recorder.opened) == 1 and recorder.closed == []
    assert {id(s.opts) for s in recorder.opened} == {id(opts)}
    # failover to another master: a channel of its own, the old one closed
    other = {**opts, "master_uri": "tcp://y:4506"}
    drain_once(other)
    assert len(recorder.opened) == 2 and recorder.closed == recorder.opened[:1]
    # a failed request closes its channel; the drain after it opens a new one
    recorder.fail_after = len(recorder.sent)
    drain_once(other)
    assert recorder.closed == recorder.opened[:2]
    drain.retry_s = 0
    recorder.fail_after = None
    drain_once(other)
    assert len(recorder.opened) == 3 and recorder.closed == recorder.opened[:2]
    counters = drain.spool.counters()
    assert counters["drain_channels"] == 3 and counters["drain_failures"] == 1
    # stopping the drain (registry release) closes the open channel
    drain.stop()
    assert recorder.closed == recorder.opened


def test_no_drain_without_a_master_with_a_budget_or_when_switched_off(cfg, opts):
    backlog(cfg, opts, 20_000)
    for o, c in (
        ({"id": "gw", "pki_dir": opts["pki_dir"]}, cfg),  # salt-call --local, unit tests
        ({**opts, "beacons_leader": False}, cfg),
        (opts, {**cfg, "batch": {**cfg["batch"], "drain": False}}),
        (opts, {**cfg, "bandwidth": {"bytes_per_s": 50_000}}),
    ):
        assert gw_beacons.emit(c, o, {})
        assert the_drain(c, o) is None or not the_drain(c, o).running()
    assert Recorder.sent == []


def test_drain_config_is_validated():
    from saltext.tributary.gateway import config as gw_config

    ok, msg = gw_config.validate_mqtt([{"broker": {"host": "h"}, "batch": {"drain": "yes"}}])
    assert not ok and "batch.drain" in msg
    ok, msg = gw_config.validate_mqtt([{"broker": {"host": "h"}, "batch": {"drain_run_bytes": 1}}])
    assert not ok and "batch.drain_run_bytes" in msg


def test_can_drain():
    assert gw_drain.can_drain({"__role": "minion", "master_uri": "tcp://m:4506"})
    assert gw_drain.can_drain(
        {"__role": "minion", "master_uri": "tcp://m:4506", "multimaster": True}
    )
    assert not gw_drain.can_drain(
        {"__role": "minion", "master_uri": "tcp://m:4506", "beacons_leader": False}
    )
    assert not gw_drain.can_drain({"__role": "minion"})
    assert not gw_drain.can_drain({"__role": "master", "master_uri": "tcp://m:4506"})
