"""Relay intake, origin checks, disk budget and config validation (SQLite spool, no daemons).

Shipping to Elasticsearch is covered by the integration and fault tests against a real cluster;
these tests stop at the bulk body the relay would send.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, decode_batch, encode_batch
from saltext.tributary.relay.config import RelayConfig, relay_config, validate_relay
from saltext.tributary.relay.pipeline import Relay
from saltext.tributary.relay.spool import RelaySpool

TAG = "salt/beacon/{}/tributary_mqtt/batch"


def make_relay(tmp_path, master_pki, **kw) -> Relay:
    """A relay whose time window takes the fixed 2023 timestamps of these tests."""
    kw.setdefault("max_age_s", 86_400.0 * 3650)
    kw.setdefault("trusted_syndics", ["syndic-1"])
    cfg = RelayConfig(spool_path=str(tmp_path / "relay.db"), pki_dir=master_pki, **kw)
    return Relay(None, cfg)


def batch(gw: str, keys, first: int = 1, n: int = 3, sign: bool = True, **extra) -> dict:
    rows = [
        SpooledReading(first + i, "t1/temperature", "C", 1_700_000_000_000 + i, 20.0 + i)
        for i in range(n)
    ]
    b = encode_batch("ep1", rows, site="x") | extra
    if sign:
        signing.sign_batch(b, {"id": gw, "pki_dir": keys[gw][0]})
    return b


def publish_keys(relay: Relay, keys, which=("gw-a", "gw-b")) -> bool:
    data = signing.sign_keyset(
        "syndic-1",
        {gw: keys[gw][1] for gw in which},
        os.path.join(keys["syndic-1"][0], "minion.pem"),
    )
    return relay.accept("syndic/syndic-1/tributary/keys/syndic-1", data)


def bulk_ops(relay: Relay):
    docs = relay.build_docs(relay.spool.take(100))
    ops = [json.loads(line) for line in docs.lines[0::2]]
    bodies = [json.loads(line) for line in docs.lines[1::2]]
    return docs, ops, bodies


def test_syndic_copy_is_taken_once(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    b = batch("gw-a", keys)
    assert relay.accept(TAG.format("gw-a"), b)
    assert not relay.accept("syndic/syndic-1/" + TAG.format("gw-a"), dict(b))
    assert relay.spool.depth()[0] == 1
    # a replay is a new emission
    assert relay.accept(TAG.format("gw-a"), batch("gw-a", keys, replay="r1"))
    assert relay.spool.depth()[0] == 2


def test_fire_master_load_is_unwrapped(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    b = batch("gw-a", keys)
    assert relay.accept(
        TAG.format("gw-a"), {"id": "gw-a", "tag": "x", "data": b, "cmd": "_minion_event"}
    )
    publish_keys(relay, keys)
    docs, ops, _ = bulk_ops(relay)
    assert [o["create"]["_id"] for o in ops] == [f"gw-a:ep1:{i}" for i in (1, 2, 3)]
    assert next(iter(docs.rows.values())).range == ("gw-a", "ep1", 1, 3)


def test_signed_batches_from_published_keys(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    assert publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), batch("gw-a", keys))
    relay.accept(TAG.format("gw-b"), batch("gw-b", keys))
    docs, ops, bodies = bulk_ops(relay)
    assert all("create" in o for o in ops)
    assert {b["gateway"] for b in bodies} == {"gw-a", "gw-b"}
    assert not docs.held


def test_forged_unsigned_and_unknown_are_dead_lettered(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, key_wait_s=0)
    publish_keys(relay, keys, which=("gw-a",))
    forged = batch("gw-a", keys, first=10)  # gw-a's key, published under gw-b's... name:
    relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=20, sign=False))
    relay.accept(TAG.format("gw-b"), forged)  # gw-b's key is not known at all
    publish_keys(relay, keys)  # now it is: the forged batch is mis-signed
    relay.accept(TAG.format("gw-b"), batch("gw-a", keys, first=30))
    relay.accept(TAG.format("gw-c"), batch("gw-a", keys, first=40))  # nobody accepted gw-c
    docs, ops, bodies = bulk_ops(relay)
    reasons = sorted(b["reason"] for b in bodies)
    assert reasons == ["bad_signature", "bad_signature", "unknown_key", "unsigned"]
    assert all(
        b["stage"] == "origin" and "deadletter" in o["create"]["_index"]
        for o, b in zip(ops, bodies, strict=True)
    )
    assert not any(rp.range for rp in docs.rows.values())  # the ledger does not move
    assert relay.counters["rejected:bad_signature"] == 2
    assert relay.counters[("rejected", "gw-b")] == 2


def test_unknown_key_waits_for_the_key_set(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, key_wait_s=60)
    relay.accept(TAG.format("gw-a"), batch("gw-a", keys))
    docs = relay.build_docs(relay.spool.take(10))
    assert docs.held and not docs.lines
    relay.spool.hold(docs.held, 2**62)
    assert relay.spool.take(10) == []
    publish_keys(relay, keys)  # releases the hold
    docs, ops, _ = bulk_ops(relay)
    assert len(ops) == 3 and not docs.held


def test_allow_unsigned_is_off_by_default(tmp_path, master_pki, keys):
    assert RelayConfig().allow_unsigned is False
    relay = make_relay(tmp_path, master_pki, allow_unsigned=True)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), batch("gw-a", keys, sign=False))
    relay.accept(TAG.format("gw-b"), batch("gw-a", keys, first=5))  # mis-signed: still refused
    _, ops, bodies = bulk_ops(relay)
    assert sum("_id" in o["create"] and "readings" in o["create"]["_index"] for o in ops) == 3
    assert [b["reason"] for b in bodies if "reason" in b] == ["bad_signature"]


def test_forged_key_set_is_refused(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    data = signing.sign_keyset(
        "syndic-1", {"gw-b": keys["gw-a"][1]}, os.path.join(keys["gw-a"][0], "minion.pem")
    )
    assert not relay.accept("tributary/keys/syndic-1", data)
    assert relay.counters["keyset_rejected:bad_signature"] == 1
    # an unknown syndic cannot publish either
    assert not relay.accept("tributary/keys/syndic-9", data)
    assert relay.spool.keyring.keys_for("gw-b", 0, 10**15) == []


def test_malformed_batches_are_dead_lettered_with_reasons(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, allow_unsigned=True)
    good = batch("gw-a", keys, first=1, sign=False)
    bad_version = dict(good, v=99, first=100, last=102)
    bad_types = dict(good, first="x", last=200)
    oversized = dict(good, first=300, last=300 + 60_000 - 1, r=[[0, 0, 1]] * 60_000)
    bad_row = dict(good, first=400, last=402, r=[[0, 0, 1], [0, 0, "hot"], [0, 0, 2]])
    for b in (bad_version, bad_types, oversized, bad_row, good):
        relay.accept(TAG.format("gw-a"), b)
    _, _, bodies = bulk_ops(relay)
    reasons = sorted(b["reason"] for b in bodies if "reason" in b)
    assert reasons == ["bad_field", "bad_version", "not_numeric", "oversized"]
    over = next(b for b in bodies if b.get("reason") == "oversized")
    assert over["original"]["r_total"] == 60_000 and len(over["original"]["r"]) == 20
    readings = [b for b in bodies if "seq" in b and "reason" not in b]
    assert sorted(r["seq"] for r in readings) == [1, 2, 3, 400, 402]


def test_disk_budget_drops_oldest_and_counts(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, spool_max_bytes=1024 * 1024, allow_unsigned=True)
    big = [
        SpooledReading(i + 1, f"s{i % 50}/m", "C", 1_700_000_000_000 + i, i * 1.37)
        for i in range(2000)
    ]
    first_ids = None
    for k in range(40):
        b = encode_batch(f"e{k}", big)
        relay.accept(TAG.format("gw-a"), b)
        if first_ids is None:
            first_ids = relay.spool.take(1)[0][0]
    relay.check_budget()
    assert relay.spool.used_bytes() <= 1024 * 1024
    assert relay.counters["spool_dropped_batches"] > 0
    assert (
        relay.counters["spool_dropped_readings"] == 2000 * relay.counters["spool_dropped_batches"]
    )
    remaining = [r[4]["epoch"] for r in relay.spool.take(100)]
    assert "e0" not in remaining and "e39" in remaining  # oldest first


def test_a_flood_evicts_its_own_batches_not_anothers(tmp_path, master_pki, keys):
    """Past the budget, unverifiable claims go first, then the biggest verified sender's."""
    relay = make_relay(tmp_path, master_pki, spool_max_bytes=1024 * 1024)
    publish_keys(relay, keys)
    for n in range(5):  # gw-b: a little, first (the oldest rows)
        relay.accept(TAG.format("gw-b"), batch("gw-b", keys, first=1 + 100 * n, n=100))
    for n in range(20):  # claims under ids nobody vouched for
        relay.accept(TAG.format(f"ghost-{n}"), batch("gw-a", keys, first=1, n=1000))
    for n in range(200):  # gw-a floods with genuine, signed batches
        relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=1 + 1000 * n, n=1000))
    relay.check_budget()
    assert relay.spool.used_bytes() <= 1024 * 1024
    left = relay.spool.depth_by_gateway()
    assert left["gw-b"] == (5, 500)  # untouched
    assert not any(gw.startswith("ghost") for gw in left), left  # dropped first
    assert 0 < left["gw-a"][0] < 200  # the flood paid for itself
    assert relay.counters["spool_dropped_batches"] == 20 + 200 - left["gw-a"][0]


def test_spool_survives_reopen(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    relay.accept(TAG.format("gw-a"), batch("gw-a", keys))
    relay.spool.close()
    again = RelaySpool(str(tmp_path / "relay.db"))
    assert again.depth()[0] == 1


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({}, "elasticsearch"),
        (
            {"elasticsearch": {"hosts": ["https://x:9200"]}, "allow_unsigned": "yes"},
            "allow_unsigned",
        ),
        ({"elasticsearch": {"hosts": ["https://x:9200"]}, "gaps": {"grace_s": -1}}, "gaps.grace_s"),
        ({"elasticsearch": {"hosts": ["https://x:9200"]}, "gaps": {"nope": 1}}, "gaps"),
        ({"elasticsearch": {"hosts": ["https://x:9200"]}, "indices": "weekly"}, "indices"),
        ({"elasticsearch": {"hosts": ["https://x:9200"]}, "spool_max_bytes": 5}, "spool_max_bytes"),
        (
            {"elasticsearch": {"hosts": ["https://x:9200"]}, "backoff": {"max_s": 0}},
            "backoff.max_s",
        ),
        (
            {"elasticsearch": {"hosts": ["https://x:9200"], "api_key": "k", "username": "u"}},
            "api_key",
        ),
    ],
)
def test_validate_names_the_key(cfg, key):
    ok, msg = validate_relay(cfg)
    assert ok is False and key in msg


def test_validate_never_raises_and_config_maps():
    assert validate_relay(None)[0] is False
    assert validate_relay({"elasticsearch": {"hosts": ["https://x:9200"]}}) == (True, "valid")
    rc = relay_config(
        {"gaps": {"grace_s": 5, "per_minute": 2}, "indices": "data_stream", "allow_unsigned": True},
        "/c",
        "/pki",
    )
    assert (rc.gaps.grace_s, rc.gaps.per_minute, rc.daily, rc.allow_unsigned) == (
        5,
        2,
        False,
        True,
    )
    assert rc.pki_dir == "/pki" and rc.spool_path == "/c/tributary/relay.db"


def test_reading_lines_are_the_documents(tmp_path, master_pki, keys):
    """The hot loop's hand-built JSON equals the document the dead-letter path materialises."""
    from saltext.tributary.relay.documents import reading_doc

    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    rows = [
        SpooledReading(1, 't"1/temp\\x', "°C", 1_700_000_000_000, 20.25),
        SpooledReading(2, "t2/humidity", None, 1_700_086_400_000, 55),
    ]
    b = encode_batch("ep1", rows, site=None)
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    relay.accept(TAG.format("gw-a"), b)
    docs, ops, bodies = bulk_ops(relay)
    assert [o["create"]["_id"] for o in ops] == ["gw-a:ep1:1", "gw-a:ep1:2"]
    # one daily index per UTC day of the reading's timestamp
    assert ops[0]["create"]["_index"].endswith("2023.11.14")
    assert ops[1]["create"]["_index"].endswith("2023.11.15")
    for body, (row, orig) in zip(bodies, docs.ops, strict=True):
        assert body == reading_doc(orig, docs.rows[row].hops)
    # no emit time in this batch: of the hops only the relay's own is known
    assert set(bodies[0]["hop_ms"]) == {"relay"} and bodies[0]["hop_ms"]["relay"] >= 0
    assert bodies[0]["sensor"] == 't"1' and bodies[0]["metric"] == "temp\\x"
    assert bodies[0]["unit"] == "°C" and bodies[0]["value"] == 20.25
    assert bodies[1]["unit"] is None and bodies[1]["site"] is None


def test_aggregated_readings_keep_their_statistics(tmp_path, master_pki, keys):
    from saltext.tributary.protocol.wire import encode_agg_batch

    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    rows = [
        SpooledReading(i + 1, "t1/temperature", "C", 1_700_000_000_000 + i * 1000, 20.0 + i)
        for i in range(10)
    ]
    b = encode_agg_batch("ep1", rows, 10.0, site="x")
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    relay.accept(TAG.format("gw-a"), b)
    docs, _ops, bodies = bulk_ops(relay)
    assert len(bodies) == 1
    agg = bodies[0]["agg"]
    assert agg["count"] == 10 and agg["min"] == 20.0 and agg["max"] == 29.0
    assert bodies[0]["value"] == pytest.approx(24.5)
    # recorded in the ledger as covered by an aggregate (add_range(..., now=None, agg=True))
    assert next(iter(docs.rows.values())).range == ("gw-a", "ep1", 1, 10, None, True)


def test_readings_carry_their_lag_per_hop(tmp_path, master_pki, keys):
    """The gateway stamps its emit time (signed); the relay adds when it took the batch in and
    when it sent the bulk: each reading's ``hop_ms`` adds up to relayed_at - @timestamp."""
    from saltext.tributary.gateway.beacons import finalize_batch
    from saltext.tributary.relay.documents import reading_doc

    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    now = int(time.time() * 1000)
    rows = [
        SpooledReading(i + 1, "t1/temperature", "C", now - 5000 + i * 1000, 20.0) for i in (0, 1)
    ]
    b = finalize_batch(encode_batch("ep1", rows), {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    assert now <= b["emit_ms"] <= int(time.time() * 1000)
    relay.accept(TAG.format("gw-a"), b)
    docs, _ops, bodies = bulk_ops(relay)
    ((row, plan),) = docs.rows.items()
    received = plan.hops[1]
    assert plan.hops[0] == b["emit_ms"] and b["emit_ms"] <= received <= bodies[0]["relayed_at"]
    for body, (_, orig) in zip(bodies, docs.ops, strict=True):
        hop = body["hop_ms"]
        assert hop == {
            "gateway": b["emit_ms"] - body["@timestamp"],
            "uplink": received - b["emit_ms"],
            "relay": body["relayed_at"] - received,
        }
        assert sum(hop.values()) == body["relayed_at"] - body["@timestamp"]
        assert body == reading_doc(orig, docs.rows[row].hops)
    assert [body["hop_ms"]["gateway"] for body in bodies] == [b["emit_ms"] - r.ts_ms for r in rows]
    # an implausible emit time is ignored, never a reason to refuse the batch
    bad = encode_batch("ep2", rows)
    bad["emit_ms"] = "soon"
    assert decode_batch(bad).emit_ms is None and len(decode_batch(bad).readings) == 2


def test_take_bounds_documents_and_skips_rows_in_flight(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    for k in range(5):
        relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=1 + 3 * k))
    ids = [r[0] for r in relay.spool.take(100)]
    assert len(ids) == 5
    assert [r[0] for r in relay.spool.take(100, max_docs=7)] == ids[:2]  # 3 + 3, never split
    assert [r[0] for r in relay.spool.take(100, max_docs=2)] == ids[:1]  # one batch at least
    assert [r[0] for r in relay.spool.take(100, skip=set(ids[:2]))] == ids[2:]
    assert [r[0] for r in relay.spool.take(2, skip={ids[0]})] == ids[1:3]


def test_forged_copy_of_a_range_does_not_shadow_the_genuine_batch(tmp_path, master_pki, keys):
    """Intake dedupes before the signature check: a forgery arriving first with the genuine
    batch's (epoch, first, last) must not make the genuine batch look like a duplicate."""
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    genuine = batch("gw-a", keys)
    forged = batch("gw-b", keys)  # same range, signed by gw-b, sent under gw-a's name
    assert relay.accept(TAG.format("gw-a"), forged)
    assert relay.accept(TAG.format("gw-a"), genuine)
    assert not relay.accept("syndic/syndic-1/" + TAG.format("gw-a"), dict(genuine))
    _, ops, bodies = bulk_ops(relay)
    assert [b["reason"] for b in bodies if "reason" in b] == ["bad_signature"]
    assert [o["create"]["_id"] for o in ops if "_id" in o["create"]] == [
        f"gw-a:ep1:{i}" for i in (1, 2, 3)
    ]


def test_bulk_concurrency_is_validated():
    base = {"elasticsearch": {"hosts": ["https://es:9200"]}}
    assert validate_relay({**base, "bulk": {"concurrency": 2}})[0]
    ok, msg = validate_relay({**base, "bulk": {"concurrency": 0}})
    assert not ok and "bulk.concurrency" in msg
    assert relay_config({"bulk": {"concurrency": 3}}, "/tmp").bulk.concurrency == 3


def test_per_gateway_counters_are_structured_and_old_spools_migrate(tmp_path):
    spool = RelaySpool(str(tmp_path / "r.db"))
    spool.bump({"indexed": 3, ("indexed", "gw-a"): 2, ("indexed", "gw-b"): 1})
    spool.bump({("indexed", "gw-a"): 1})
    assert spool.counters() == {"indexed": 3}
    assert spool.gateway_counters() == {"gw-a": {"indexed": 3}, "gw-b": {"indexed": 1}}
    # a spool written before the table existed kept them as "<name>@<gateway>" counters
    spool.db.execute("INSERT INTO counters VALUES ('rejected@gw-c', 4)")
    spool.close()
    spool = RelaySpool(str(tmp_path / "r.db"))
    assert spool.counters() == {"indexed": 3}
    assert spool.gateway_counters()["gw-c"] == {"rejected": 4}
    spool.close()
