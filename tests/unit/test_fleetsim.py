"""The simulated fleet's batches are the product's: signed with each gateway's own key,
decoded by the relay's wire code, replayed as a gateway replays (tests/support/fleetsim.py)."""

from __future__ import annotations

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import decode_batch
from tests.support.fleetsim import SimFleet, gateway_ids


def _fleet(tmp_path):
    masters = {s: {"pki_dir": str(tmp_path / s), "sock_dir": str(tmp_path)} for s in ("a", "b")}
    return SimFleet(
        masters, gateway_ids(masters, 2), sensors=3, key_dir=tmp_path / "keys", respond=False
    )


def test_batches_verify_against_the_accepted_key_only(tmp_path):
    fleet = _fleet(tmp_path)
    fleet.accept_all()
    assert sorted(p.name for p in (tmp_path / "a" / "minions").iterdir()) == [
        "sim-0-0000",
        "sim-0-0001",
    ]
    g = fleet.gateways["sim-0-0000"]
    batch = fleet.next_batch(g, 1_800_000_000_000)
    accepted = (tmp_path / "a" / "minions" / "sim-0-0000").read_text()
    signing.verify_batch("sim-0-0000", batch, accepted)
    other = fleet.pubkey("sim-1-0000")
    try:
        signing.verify_batch("sim-0-0000", batch, other)
    except signing.SignatureError as exc:
        assert exc.reason == "bad_signature"
    else:
        raise AssertionError("a batch verified against another gateway's key")
    decoded = decode_batch(batch)
    assert (decoded.first, decoded.last, decoded.site) == (1, 3, g.site)
    assert [r["sensor"] for r in decoded.readings] == ["s0", "s1", "s2"]
    fleet.revoke_all()
    assert not list((tmp_path / "a" / "minions").iterdir())


def test_replay_re_encodes_the_held_range_or_says_what_is_held(tmp_path):
    fleet = _fleet(tmp_path)
    g = fleet.gateways["sim-1-0001"]
    for n in range(4):
        fleet.next_batch(g, 1_800_000_000_000 + n * 1000)
    batches = fleet.replay_batches(g, g.epoch, 4, 9)
    assert isinstance(batches, list) and len(batches) == 1
    b = batches[0]
    assert (b["first"], b["last"], len(b["replay"])) == (4, 9, 8)
    signing.verify_batch(g.id, b, fleet.pubkey(g.id))
    assert "not held" in str(fleet.replay_batches(g, g.epoch, 10, 20))
    assert "unknown epoch" in str(fleet.replay_batches(g, "other", 1, 2))
    assert fleet.counts()["readings_numbered"] == 12
