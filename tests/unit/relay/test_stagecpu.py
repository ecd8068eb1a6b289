"""CPU per relay stage (the bench's ``TRIBUTARY_RELAY_STAGE_CPU``)."""

from __future__ import annotations

import time

from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.stagecpu import StageCPU, per_reading


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_nested_stage_is_counted_once_under_its_own_name():
    counters = Counters()
    stages = StageCPU(counters)
    inner = stages.wrap("origin", _burn)
    with stages.stage("intake"):
        _burn(0.02)
        inner(0.03)
    intake, origin = counters["cpu_ns:intake"], counters["cpu_ns:origin"]
    assert 0.03e9 <= origin < 0.05e9
    assert 0.02e9 <= intake < 0.03e9  # the origin check inside it is not counted twice


def test_per_reading_is_microseconds_by_stage_and_their_total():
    out = per_reading({"cpu_ns:intake": 2_000_000, "cpu_ns:ship": 1_000_000}, 1000)
    assert out == {"intake": 2.0, "origin": 0.0, "build": 0.0, "ship": 1.0, "total": 3.0}


def test_collector_passes_are_counted_at_the_end_of_a_stage():
    import gc

    counters = Counters()
    stages = StageCPU(counters)
    try:
        with stages.stage("build"):
            gc.collect()
        assert counters["gc_runs:2"] >= 1 and counters["gc_ns:2"] > 0
    finally:
        stages.close()
    assert stages._on_gc not in gc.callbacks


def test_a_relay_with_stage_timing_counts_intake_origin_and_build(tmp_path, master_pki, keys):
    from saltext.tributary.relay.pipeline import take_event
    from tests.unit.relay.test_relay import TAG, batch, make_relay, publish_keys

    relay = make_relay(tmp_path, master_pki)
    stages = relay.time_stages()
    try:
        publish_keys(relay, keys)
        take_event(relay, TAG.format("gw-a"), batch("gw-a", keys, n=50))
        plan = relay.prepare(relay.spool)
        assert plan is not None and len(plan.ops) == 50
        counts = relay.counters.drain()
        assert counts["cpu_ns:intake"] > 0 and counts["cpu_ns:origin"] > 0
        assert counts["cpu_ns:build"] > 0 and "cpu_ns:ship" not in counts
    finally:
        stages.close()
