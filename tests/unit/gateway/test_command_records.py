"""The command audit on the gateway: records numbered in the reading sequence of the spool,
emitted in (raw and aggregated) batches, replayed like readings; the per-device rate limit
shared through the spool file; and what a relay, old or new, makes of a record."""

from __future__ import annotations

import time

from saltext.tributary.gateway.bandwidth import Budget
from saltext.tributary.gateway.spool import GatewaySpool
from saltext.tributary.protocol.reading import make_reading
from saltext.tributary.protocol.wire import decode_batch

NOW = int(time.time() * 1000)
RECORD = {"device": "boiler-1", "command": "setpoint", "payload": 70, "outcome": "acked"}


def spool_with_record(tmp_path) -> GatewaySpool:
    spool = GatewaySpool(str(tmp_path / "spool.db"))
    spool.append([make_reading("t1", "temperature", 20.5, NOW, "C")])
    assert spool.append_record("command", NOW + 1, RECORD) == 2
    spool.append([make_reading("t1", "temperature", 20.7, NOW + 2, "C")])
    return spool


def test_a_record_takes_the_next_sequence_number_and_travels_in_the_batch(tmp_path):
    spool = spool_with_record(tmp_path)
    (batch,) = spool.next_batches()
    assert (batch["first"], batch["last"]) == (1, 3) and "@command" in batch["sensors"]
    dec = decode_batch(batch)
    assert [r["seq"] for r in dec.readings] == [1, 3] and not dec.rejected
    assert dec.records == [{"seq": 2, "kind": "command", "ts_ms": NOW + 1, "body": RECORD}]
    # not a sensor: neither the grain's sensor keys nor "latest" show it
    assert spool.sensor_keys() == ["t1/temperature"] and "@command" not in spool.latest()
    assert spool.records("command")[-1] == {"seq": 2, "kind": "command", **RECORD}


def test_a_replay_carries_the_record_again(tmp_path):
    spool = spool_with_record(tmp_path)
    spool.next_batches()
    (again,) = spool.replay(spool.epoch, 2, 2)
    assert decode_batch(again).records[0]["body"] == RECORD


def test_an_aggregated_batch_never_summarises_a_record(tmp_path):
    spool = GatewaySpool(str(tmp_path / "spool.db"))
    spool.append([make_reading("t1", "temperature", 20 + i, NOW + i, "C") for i in range(5)])
    spool.append_record("command", NOW + 5, RECORD)
    spool.append([make_reading("t1", "temperature", 30 + i, NOW + 6 + i, "C") for i in range(5)])
    budget = Budget(bytes_per_s=1, window_s=60)
    budget.tokens = 1  # any credit: too little for the raw batch, so it aggregates
    (agg,) = budget.emit(spool)
    dec = decode_batch(agg)
    assert agg["agg"] == 60 and not dec.rejected
    assert dec.records == [{"seq": 6, "kind": "command", "ts_ms": NOW + 5, "body": RECORD}]
    assert sum(r["agg"]["count"] for r in dec.readings) == 10


def test_unknown_record_kinds_and_bad_records_are_set_aside_with_their_reason(tmp_path):
    spool = GatewaySpool(str(tmp_path / "spool.db"))
    spool.append_record("firmware", NOW, {"image": "x"})
    spool.append_record("command", NOW, RECORD)
    (batch,) = spool.next_batches()
    batch["r"].append([batch["sensors"].index("@command"), 0, [1, 2]])
    batch["last"] += 1
    dec = decode_batch(batch)
    assert [(r["seq"], r["reason"]) for r in dec.rejected] == [
        (1, "unknown_kind"),
        (3, "bad_record"),
    ]
    assert [r["seq"] for r in dec.records] == [2]


def test_an_old_relay_sets_a_record_aside_without_breaking(tmp_path):
    """A relay that predates records reads "@command" as a sensor entry that is not
    sensor/metric: the row is rejected as bad_sensor (dead-lettered with the row, which holds
    the record), the readings around it decode as before."""
    spool = spool_with_record(tmp_path)
    (batch,) = spool.next_batches()
    old = dict(batch)
    # what an old decoder sees: the same batch, without knowing the "@" entries
    from saltext.tributary.protocol import wire

    saved = wire.is_record_key
    wire.is_record_key = lambda key: False  # type: ignore[assignment]
    try:
        dec = wire.decode_batch(old)
    finally:
        wire.is_record_key = saved
    assert [r["seq"] for r in dec.readings] == [1, 3]
    assert [(r["seq"], r["reason"]) for r in dec.rejected] == [(2, "bad_sensor")]
    assert dec.rejected[0]["row"][2] == RECORD


def test_the_rate_limit_is_per_device_and_shared_by_every_spool_connection(tmp_path):
    a = GatewaySpool(str(tmp_path / "spool.db"))
    b = GatewaySpool(str(tmp_path / "spool.db"))  # another job process on the same gateway
    assert a.reserve_command("boiler-1", 2, 10, now_ms=NOW) is None
    assert b.reserve_command("boiler-1", 2, 10, now_ms=NOW + 1) is None
    assert a.reserve_command("boiler-1", 2, 10, now_ms=NOW + 2) == 2
    assert b.reserve_command("boiler-2", 2, 10, now_ms=NOW + 2) is None
    assert a.reserve_command("boiler-1", 2, 10, now_ms=NOW + 5, dry=True) == 2
    # the window slides: the first two fall out after 10 s
    assert b.reserve_command("boiler-1", 2, 10, now_ms=NOW + 10_002, dry=True) is None
    assert b.reserve_command("boiler-1", 2, 10, now_ms=NOW + 10_002) is None
    assert a.reserve_command("boiler-1", 2, 10, now_ms=NOW + 10_003) is None
    assert a.reserve_command("boiler-1", 2, 10, now_ms=NOW + 10_004) == 2


def test_retention_trims_records_with_their_rows(tmp_path):
    spool = spool_with_record(tmp_path)
    spool.next_batches()
    spool.max_age_s = 0
    spool.trim(now_ms=NOW + 10**9)
    assert spool.records() == []
