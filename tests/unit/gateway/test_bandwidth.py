"""Bandwidth budget: aggregated batches on the wire, decode compatibility, bytes per reading."""

from __future__ import annotations

import random

import pytest

from saltext.tributary.gateway.bandwidth import Budget
from saltext.tributary.gateway.spool import GatewaySpool
from saltext.tributary.protocol.reading import make_reading
from saltext.tributary.protocol.wire import (
    SpooledReading,
    WireError,
    bytes_per_reading,
    decode_batch,
    encode_agg_batch,
    encode_batch,
    packed_size,
)

T0 = 1_700_000_000_000


def rows(n, sensors=4, step_ms=1000):
    rnd = random.Random(1)
    return [
        SpooledReading(
            1 + i,
            f"s{i % sensors}/temperature",
            "C",
            T0 + i * step_ms,
            round(20 + rnd.random() * 5, 1),
        )
        for i in range(n)
    ]


def test_agg_round_trip_counts_and_stats():
    rs = rows(240, sensors=4, step_ms=250)  # 60 s of data, 4 sensors
    batch = encode_agg_batch("ep1", rs, 30)
    assert batch["agg"] == 30 and (batch["first"], batch["last"]) == (1, 240)
    dec = decode_batch(batch)
    assert dec.rejected == [] and dec.agg == 30
    assert sum(r["agg"]["count"] for r in dec.readings) == 240
    groups = {(x.key, x.ts_ms // 30_000) for x in rs}
    assert len(dec.readings) == len(groups)  # one aggregate per sensor and 30 s window
    seqs = [r["seq"] for r in dec.readings]
    assert len(set(seqs)) == len(seqs) and all(1 <= s <= 240 for s in seqs)
    for r in dec.readings:
        group = [
            x
            for x in rs
            if x.key == f"{r['sensor']}/{r['metric']}" and x.ts_ms // 30_000 == r["ts_ms"] // 30_000
        ]
        vals = [x.value for x in group]
        assert r["agg"]["count"] == len(group)
        assert r["agg"]["min"] == min(vals) and r["agg"]["max"] == max(vals)
        assert r["value"] == pytest.approx(sum(vals) / len(vals), abs=0.05)  # mean at d=1
        assert r["agg"]["first"] == min(x.ts_ms for x in group) == r["ts_ms"]
        assert r["agg"]["last"] == max(x.ts_ms for x in group)
        assert r["seq"] == max(x.seq for x in group)
        assert r["unit"] == "C" and r["agg"]["window_s"] == 30


def test_raw_batches_decode_unchanged():
    rs = rows(50)
    dec = decode_batch(encode_batch("ep1", rs))
    assert [r["seq"] for r in dec.readings] == list(range(1, 51))
    assert all("agg" not in r for r in dec.readings)


def test_bad_agg_batches():
    batch = encode_agg_batch("ep1", rows(40), 10)
    bad = dict(batch, last=batch["last"] + 1)
    with pytest.raises(WireError, match="bad_range"):
        decode_batch(bad)
    bad = dict(batch, r=[[*batch["r"][0][:7], 999], *batch["r"][1:]])
    assert [x["reason"] for x in decode_batch(bad).rejected] == ["bad_row"]
    bad = dict(batch, r=[[99, *batch["r"][0][1:]], *batch["r"][1:]])
    assert [x["reason"] for x in decode_batch(bad).rejected] == ["bad_row"]


def test_bytes_per_reading_raw_and_aggregated():
    """Measured, not timed: the figures go to the report and the bench."""
    raw = [
        encode_batch("3f9c2a1b7d10", rows(2000, sensors=8)[i : i + 500])
        for i in range(0, 2000, 500)
    ]
    raw_bpr = bytes_per_reading(raw)
    # 8 sensors at 1 Hz each for 250 s, 60 s windows
    agg = encode_agg_batch("3f9c2a1b7d10", rows(2000, sensors=8, step_ms=125), 60)
    agg_bpr = packed_size(agg) / 2000
    print(f"bytes/reading raw={raw_bpr:.2f} aggregated(60 s, 8 sensors, 1 Hz)={agg_bpr:.3f}")
    assert raw_bpr <= 12
    assert agg_bpr < raw_bpr / 5


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def spool_with(tmp_path, n, sensors=4, step_ms=1000):
    s = GatewaySpool(str(tmp_path / "bw.db"))
    s.append(
        [
            make_reading(f"s{i % sensors}", "t", 20 + (i % 7) / 10, T0 + i * step_ms, "C")
            for i in range(n)
        ]
    )
    return s


def test_budget_raw_when_affordable_aggregates_when_not(tmp_path):
    s = spool_with(tmp_path, 20)
    clock = FakeClock()
    b = Budget(bytes_per_s=50, window_s=60, burst_s=60, clock=clock)
    b.tokens = 3000
    (batch,) = b.emit(s)
    assert batch["agg"] is None and len(batch["r"]) == 20  # affordable: raw
    s.append(
        [make_reading(f"s{i % 4}", "t", 21.0, T0 + 100_000 + i * 100, "C") for i in range(3000)]
    )
    (agg,) = b.emit(s)
    assert agg["agg"] == 60 and (agg["first"], agg["last"]) == (21, 3020)
    assert packed_size(agg) < 1000 and b.tokens < 3000
    assert sum(r["agg"]["count"] for r in decode_batch(agg).readings) == 3000
    # bucket borrowed/empty: nothing until it refills, and nothing is lost meanwhile
    s.append([make_reading("s0", "t", 1.0, T0 + 500_000 + i, "C") for i in range(10)])
    if b.tokens <= 0:
        assert b.emit(s) == []
        clock.t += 600
    (nxt,) = b.emit(s)
    assert nxt["first"] == 3021 and nxt["last"] == 3030
    st = s.status()
    assert (
        st["unsent"] == 0
        and st["counters"]["aggregated"] == 3000
        and st["counters"]["emitted"] == 3030
    )
    s.close()


def test_budget_widens_window_to_fit_batch_cap(tmp_path):
    s = spool_with(tmp_path, 6000, sensors=50, step_ms=100)
    b = Budget(bytes_per_s=1, window_s=1, max_window_s=3600)
    b.tokens = 1
    (agg,) = b.emit(s, max_batch_bytes=2048)
    assert packed_size(agg) <= 2048 and agg["agg"] > 1
    assert (
        sum(r["agg"]["count"] for r in decode_batch(agg).readings) == agg["last"] - agg["first"] + 1
    )
    s.close()
