"""Health metrics and the heartbeat event."""

from __future__ import annotations

import json
import os

import pytest

from saltext.tributary.gateway.sources import health
from saltext.tributary.protocol import signing
from tests.unit.relay.test_relay import TAG, batch, make_relay, publish_keys


def test_collect_from_fake_root_and_spool_status(tmp_path):
    root = tmp_path
    for i, t in enumerate(("41000", "55500")):
        d = root / f"sys/class/thermal/thermal_zone{i}"
        d.mkdir(parents=True)
        (d / "temp").write_text(t + "\n")
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(
        "MemTotal:  1000 kB\nMemFree: 100 kB\nMemAvailable:  250 kB\n"
    )
    (root / "proc/uptime").write_text("12345.67 999.0\n")
    status = {
        "unsent": 7,
        "held": {"count": 100},
        "bytes": 4096,
        "oldest_age_s": 3.5,
        "dropped": 2,
        "counters": {"received": 10},
        "state": {"broker": "subscribed"},
    }
    m = health.collect(status, root=str(root), disk_path=str(tmp_path))
    assert m["cpu_temp_c"] == 55.5
    assert m["mem_total_bytes"] == 1_024_000 and m["mem_used_pct"] == 75.0
    assert m["uptime_s"] == 12345.7
    assert m["broker"] == "subscribed" and m["broker_connected"] is True
    assert (m["spool_unsent"], m["spool_held"], m["spool_bytes"], m["dropped"]) == (7, 100, 4096, 2)
    assert 0 <= m["disk_used_pct"] <= 100 and "load1" in m
    rs = health.readings(m, 1_700_000_000_000)
    by = {r.metric: r for r in rs}
    assert by["broker_connected"].value == 1.0 and by["cpu_temp_c"].unit == "C"
    assert {r.sensor for r in rs} == {"health"}


def test_missing_sources_are_left_out(tmp_path):
    m = health.collect({}, root=str(tmp_path), disk_path=os.devnull + "-missing")
    assert "cpu_temp_c" not in m and "mem_total_bytes" not in m and "uptime_s" not in m
    assert m["broker"] == "unknown" and "broker_connected" not in m


def test_event_shape():
    ev = health.event("ep1", 42, {"load1": 0.5}, 1_700_000_000_000)
    assert ev["tag"] == "health" and ev["v"] == 1 and ev["epoch"] == "ep1" and ev["last_seq"] == 42
    assert ev["load1"] == 0.5 and ev["_stamp"] == 1_700_000_000_000


# -- origin authentication of the heartbeat (real RSA keys, relay without Elasticsearch) ------

HTAG = "salt/beacon/{}/tributary_health/health"


def heartbeat(gw: str, keys, last_seq: int = 9, signer: str | None = None, stamp: int = 0) -> dict:
    """A heartbeat as the health beacon returns it; signed by ``signer`` (None: unsigned)."""
    now = 1_700_000_000_000 + stamp
    hb = health.event("ep1", last_seq, {"load1": 0.5, "counters": {"emitted": last_seq}}, now)
    hb["site"] = "x"
    if signer:
        signing.sign_event(hb, {"id": gw, "pki_dir": keys[signer][0]})
    return hb


def health_ops(relay):
    docs = relay.build_docs(relay.spool.take(100))
    ops = [json.loads(line)["create"] for line in docs.lines[0::2]]
    bodies = [json.loads(line) for line in docs.lines[1::2]]
    return docs, ops, bodies


def test_signed_heartbeat_is_indexed_and_feeds_the_ledger(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    assert publish_keys(relay, keys)
    assert relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=1, n=3))
    # as it arrives on the bus: Salt adds id and _stamp, the tag moved into the event tag
    wire = {**heartbeat("gw-a", keys, signer="gw-a"), "id": "gw-a", "_stamp": "2023-11-14T22"}
    del wire["tag"]
    assert relay.accept(HTAG.format("gw-a"), wire)
    docs, ops, bodies = health_ops(relay)
    heartbeats = {i: rp.heartbeat for i, rp in docs.rows.items() if rp.heartbeat}
    ranges = {i: rp.range for i, rp in docs.rows.items() if rp.range}
    (hb_row,) = heartbeats
    assert heartbeats[hb_row] == ("gw-a", "ep1", 9)
    facts = docs.rows[hb_row].facts
    assert facts[0] == "gw-a" and "sig" not in facts[1]
    assert set(docs.rows) == {hb_row, *ranges} and not docs.held
    (doc,) = [b for o, b in zip(ops, bodies, strict=True) if "-health-" in o["_index"]]
    assert doc["gateway"] == "gw-a" and doc["last_seq"] == 9 and doc["site"] == "x"
    assert "sig" not in doc and "reason" not in doc
    assert not any(k.startswith("rejected") for k in relay.counters)
    # what the shipper does with the rows once they are done: the tail 4..9 is now known
    ledger = relay.spool.ledger
    ledger.add_range(*next(iter(ranges.values())))
    ledger.heartbeat(*heartbeats[hb_row])
    assert ledger.holes("gw-a", "ep1") == [(4, 9)]


def test_unsigned_tampered_and_forged_heartbeats_are_dead_lettered(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, key_wait_s=0)
    publish_keys(relay, keys)
    tampered = heartbeat("gw-a", keys, signer="gw-a", stamp=1)
    tampered["last_seq"] = 10_000  # would make the top master chase a tail that never existed
    relay.accept(HTAG.format("gw-a"), heartbeat("gw-a", keys, stamp=2))  # unsigned
    relay.accept(HTAG.format("gw-a"), tampered)
    # gw-a speaking for gw-b: signed with gw-a's key, under gw-b's name and tag
    relay.accept(HTAG.format("gw-b"), heartbeat("gw-b", keys, signer="gw-a", stamp=3))
    # a gateway nobody accepted (no key will ever come; key_wait_s=0)
    relay.accept(HTAG.format("gw-c"), heartbeat("gw-c", keys, signer="gw-a", stamp=4))
    docs, ops, bodies = health_ops(relay)
    assert sorted(b["reason"] for b in bodies) == [
        "bad_signature",
        "bad_signature",
        "unknown_key",
        "unsigned",
    ]
    assert all("-deadletter-" in o["_index"] for o in ops)
    assert all(b["stage"] == "origin" and b["original"]["epoch"] == "ep1" for b in bodies)
    # neither the ledger nor the facts move
    assert not any(rp.heartbeat or rp.facts for rp in docs.rows.values())
    assert len(docs.rows) == 4 and not docs.held  # done once the dead letters are written
    c = relay.counters
    assert c["rejected:bad_signature"] == 2 and c["rejected:unsigned"] == 1
    assert c["rejected:unknown_key"] == 1 and c["dead_lettered"] == 4
    # per gateway only where the id is proven to have a key (a bad signature); unsigned and
    # unknown-key rows may claim any id, so they are counted together
    assert [c["rejected", gw] for gw in ("gw-a", "gw-b", "gw-c")] == [1, 1, 0]
    assert c["rejected", "(unverified)"] == 2


def test_heartbeat_with_unknown_key_waits_for_the_key_set(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, key_wait_s=60)
    relay.accept(HTAG.format("gw-a"), heartbeat("gw-a", keys, signer="gw-a"))
    docs = relay.build_docs(relay.spool.take(10))
    assert docs.held and not docs.lines and not docs.rows
    relay.spool.hold(docs.held, 2**62)
    assert relay.spool.take(10) == []
    publish_keys(relay, keys)  # releases the hold
    docs, ops, _ = health_ops(relay)
    assert [rp.heartbeat for rp in docs.rows.values()] == [("gw-a", "ep1", 9)]
    assert len(ops) == 1 and "-health-" in ops[0]["_index"]


def test_allow_unsigned_accepts_an_unsigned_heartbeat(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki, allow_unsigned=True)
    publish_keys(relay, keys)
    relay.accept(HTAG.format("gw-a"), heartbeat("gw-a", keys, last_seq=7))
    # mis-signed is still refused during a migration
    relay.accept(HTAG.format("gw-b"), heartbeat("gw-b", keys, signer="gw-a", stamp=1))
    docs, ops, bodies = health_ops(relay)
    assert [rp.heartbeat for rp in docs.rows.values() if rp.heartbeat] == [("gw-a", "ep1", 7)]
    assert sorted(o["_index"].split("-")[1] for o in ops) == ["deadletter", "health"]
    assert [b["reason"] for b in bodies if "reason" in b] == ["bad_signature"]
    assert relay.counters["unsigned_accepted"] == 1


@pytest.mark.parametrize("last_seq", [2**62, -1])
def test_a_heartbeat_out_of_range_never_moves_the_ledger(tmp_path, master_pki, keys, last_seq):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(HTAG.format("gw-a"), heartbeat("gw-a", keys, last_seq=last_seq, signer="gw-a"))
    docs, _ops, bodies = health_ops(relay)
    assert [b["reason"] for b in bodies] == ["bad_heartbeat"]
    assert not any(rp.heartbeat for rp in docs.rows.values())
