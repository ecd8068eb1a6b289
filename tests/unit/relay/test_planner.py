"""One spool row never stops the others: poisoned rows are set aside with their reason while the
good rows around them become documents; bulks are bounded in bytes (no Elasticsearch here)."""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch, pack_rows
from saltext.tributary.relay.config import BulkConfig
from saltext.tributary.relay.documents import ORIGINAL_MAX_BYTES, bounded
from tests.unit.relay.test_relay import TAG, make_relay, publish_keys

NOW = int(time.time() * 1000)


def signed(gw: str, keys, first: int = 1, n: int = 3, ts: int = NOW, **patch) -> dict:
    rows = [SpooledReading(first + i, "t1/temperature", "C", ts + i, 20.5 + i) for i in range(n)]
    b = encode_batch("ep1", rows, site="x") | patch
    signing.sign_batch(b, {"id": gw, "pki_dir": keys[gw][0]})
    return b


def planned(relay):
    plan = relay.build_docs(relay.spool.take(1000))
    return (
        plan,
        [json.loads(x) for x in plan.lines[0::2]],
        [json.loads(x) for x in plan.lines[1::2]],
    )


def test_each_poisoned_row_is_set_aside_with_its_reason(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, max_age_s=86_400.0)
    publish_keys(relay, keys)
    poison = {
        # the gateway's own key signs them: only their content is wrong
        "decimals_overflow": signed("gw-a", keys, first=100, d=[400]),
        "seq_past_2_53": signed("gw-a", keys, first=2**62, n=1),
        "epoch_with_colon": signed("gw-a", keys, epoch="gw2:ab12"),
        "broken_clock": signed("gw-a", keys, first=200, ts=NOW - 400 * 86_400_000),
        "huge_junk": {"v": 1, "junk": "x" * 1_000_000, "sig": "AAAA"},
        "mixed_keys": {1: "a", "b": 2, "v": 1, "sig": "AAAA"},
    }
    good = [signed("gw-b", keys, first=1 + 3 * i) for i in range(len(poison) + 1)]
    relay.accept(TAG.format("gw-b"), good[0])
    for i, (name, data) in enumerate(poison.items()):
        relay.accept(TAG.format("gw-a") if name != "mixed_keys" else TAG.format("gw-b"), data)
        relay.accept(TAG.format("gw-b"), good[i + 1])
    plan, ops, bodies = planned(relay)
    readings = [
        b for o, b in zip(ops, bodies, strict=True) if "-readings-" in o["create"]["_index"]
    ]
    assert sorted(b["seq"] for b in readings if b["gateway"] == "gw-b") == list(range(1, 22))
    letters = {
        b["reason"]
        for o, b in zip(ops, bodies, strict=True)
        if "-deadletter-" in o["create"]["_index"]
    }
    assert letters == {
        "bad_range",
        "bad_field",
        "out_of_window",
        "bad_signature",
        "bad_payload",
    }
    # every row is done once its documents are confirmed: nothing is retried forever
    assert len(plan.rows) == len(poison) + len(good) and not plan.held
    assert all(len(line) < 64 * 1024 for line in plan.lines)  # the junk is trimmed
    assert relay.counters["rejected:out_of_window"] == 3


def test_an_unreadable_spool_body_is_set_aside(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys))
    relay.spool.db.execute(
        "INSERT INTO batches (gateway, kind, ukey, received, body) VALUES ('gw-a','batch','k',?,?)",
        (NOW, b"\xc1\xc1 not msgpack"),
    )
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=4))
    plan, _, bodies = planned(relay)
    assert [b.get("reason") for b in bodies].count("undecodable") == 1
    assert sorted(b["seq"] for b in bodies if "seq" in b) == list(range(1, 7))
    assert len(plan.rows) == 3


def test_bulks_are_bounded_in_bytes_and_never_split_a_row(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, bulk=BulkConfig(max_bytes=64 * 1024))
    publish_keys(relay, keys)
    for i in range(10):
        relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=1 + 100 * i, n=100))
    seen = []
    while rows := relay.spool.take(256, skip=set(seen)):
        plan = relay.build_docs(rows)
        assert plan.size() <= 64 * 1024 or len(plan.rows) == 1
        assert plan.rows and len(plan.ops) % 100 == 0  # whole rows only
        seen += plan.rows
    assert len(seen) == 10


def test_a_document_larger_than_a_bulk_is_dead_lettered(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, bulk=BulkConfig(max_bytes=64 * 1024))
    publish_keys(relay, keys)
    rows = [SpooledReading(1, "t1/temperature", "C", NOW, 1.0)]
    rows.append(SpooledReading(2, "s" * 200 + "/m", "C", NOW, 2.0))
    b = encode_batch("ep1", rows, site="y" * 70_000)  # every document carries the site
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    relay.accept(TAG.format("gw-a"), b)
    plan, _ops, bodies = planned(relay)
    assert [b["reason"] for b in bodies] == ["oversized_document"] * 2
    assert len(plan.rows) == 1


def test_bounded_keeps_small_originals_and_trims_large_ones():
    assert bounded({"a": 1}) == {"a": 1}
    assert bounded(7) == {"value": "7"}
    big = bounded({"r": [[0, i, i] for i in range(10_000)], "v": 1})
    assert big["r_total"] == 10_000 and len(big["r"]) == 20
    huge = bounded({"junk": "x" * 1_000_000})
    assert huge["bytes"] > 1_000_000 and len(huge["truncated"]) == ORIGINAL_MAX_BYTES
    # packed rows are kept as rows, readable in the dead letter; junk ones as their repr
    packed = bounded(pack_rows({"r": [[0, i, i] for i in range(10_000)], "v": 1}))
    assert packed["r_total"] == 10_000 and packed["r"][:2] == [[0, 0, 0], [0, 1, 1]]
    assert "rb" not in packed
    junk = bounded({"rb": b"\xff\x01\xc1", "v": 1})
    assert junk["rb"] == repr(b"\xff\x01\xc1") and "r" not in junk


@pytest.mark.parametrize("d", [16, -1, True, "2"])
def test_decimals_are_range_checked(tmp_path, master_pki, keys, d):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, d=[d]))
    _, _, bodies = planned(relay)
    assert [b["reason"] for b in bodies] == ["bad_field"]


def test_spool_rows_count_their_attempts(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys))
    (row,) = relay.spool.take(10)
    relay.spool.attempted([row.id])
    relay.spool.attempted([row.id])
    assert relay.spool.take(10)[0].attempts == 2
    assert msgpack.packb(row.data)  # still what was spooled


def _agg_batch(keys, first: int, n: int) -> dict:
    from saltext.tributary.protocol.wire import encode_agg_batch

    t0 = NOW - NOW % 60_000 - 60_000  # all in one 60 s window: one group per sensor
    rows = [
        SpooledReading(first + i, f"t{i % 2}/temperature", "C", t0 + i * 100, 20.0 + i % 5)
        for i in range(n)
    ]
    b = encode_agg_batch("ep1", rows, 60.0, site="x")
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    return b


def _confirm(relay) -> list[dict]:
    """Plan what is spooled and account for it as Elasticsearch-confirmed: the readings."""
    plan, ops, docs = planned(relay)
    relay.finish(relay.spool, plan, set())
    return [d for o, d in zip(ops, docs, strict=True) if "_id" in o["create"]]


@pytest.mark.parametrize("agg_first", [True, False])
def test_aggregates_and_raw_readings_never_count_a_sequence_twice(
    tmp_path, master_pki, keys, agg_first
):
    """A replay (raw) and a late batch (aggregated) of the same range, in either order: only
    the first to arrive is indexed, the other counts as already present (no id collision)."""
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    agg, raw = _agg_batch(keys, 1, 100), signed("gw-a", keys, first=1, n=100)
    first, second = (agg, raw) if agg_first else (raw, agg)
    relay.accept(TAG.format("gw-a"), first)
    indexed = _confirm(relay)
    assert len(indexed) == (2 if agg_first else 100)  # two sensors' groups, or 100 readings
    relay.accept(TAG.format("gw-a"), second)
    assert _confirm(relay) == []
    expected = 100 if agg_first else 2
    counted = relay.counters["already_present"] + relay.spool.counters().get("already_present", 0)
    assert counted == expected
    assert relay.spool.ledger.holes("gw-a", "ep1") == []


def test_a_raw_replay_over_raw_readings_is_left_to_the_ids(tmp_path, master_pki, keys):
    """Re-sending raw readings already indexed recreates what Elasticsearch lost (a restored
    index): the ledger does not filter it; the ids answer 409 for what is still there."""
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=1, n=10))
    assert len(_confirm(relay)) == 10
    relay.intake._recent.clear()
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=1, n=10, ts=NOW + 5))
    assert len(_confirm(relay)) == 10


@pytest.mark.parametrize("emit", [None, NOW + 50])
def test_each_reading_line_is_its_document_as_json(tmp_path, master_pki, keys, emit):
    """The hot loop writes each document as text from cached fragments: it must say exactly
    what :func:`reading_doc` says of the same reading (with and without the gateway's emit
    time, integer and float values, several sensors and days; aggregates:
    test_relay.test_aggregated_readings_keep_their_statistics)."""
    from saltext.tributary.relay.documents import reading_doc

    relay = make_relay(tmp_path, master_pki, max_age_s=86_400.0 * 30)
    publish_keys(relay, keys)
    day = 86_400_000
    values: list[float] = [20.5, 3, -7, 1e-7, 123456789012, 0.1 + 0.2]
    rows = [
        SpooledReading(1 + i, f"s{i % 3}/m{i % 2}", "C" if i % 2 else "", NOW - (i % 3) * day, v)
        for i, v in enumerate(values)
    ]
    b = encode_batch("ep1", rows, site="x")
    if emit is not None:
        b["emit_ms"] = emit
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    relay.accept(TAG.format("gw-a"), b)
    plan, ops, bodies = planned(relay)
    (rp,) = plan.rows.values()
    assert len(bodies) == len(values)
    for (_row, original), op, body in zip(plan.ops, ops, bodies, strict=True):
        assert body == reading_doc(original, rp.hops)
        assert op["create"]["_id"] == f"gw-a:ep1:{body['seq']}"
        assert op["create"]["_index"].startswith("tributary-readings-")
