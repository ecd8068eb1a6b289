"""Scale-out mode: the config's cross-checks, syndic relays' receipts (built, signed, verified,
applied to the top's ledger), ownership with takeover, and the top relay's intake skipping
owned gateways (real RSA keys, relay spools in SQLite, no daemons)."""

from __future__ import annotations

import os

from saltext.tributary.relay import scaleout
from saltext.tributary.relay.config import ScaleoutConfig, parse_relay, validate_relay
from saltext.tributary.relay.scaleout import (
    ENTRIES_PER_RECEIPT,
    Ownership,
    ReceiptSender,
    attach_top,
    sign_receipt,
)
from saltext.tributary.relay.spool import RelaySpool
from tests.unit.relay.test_relay import TAG, batch, make_relay, publish_keys

ES = {"hosts": ["http://127.0.0.1:9200"]}


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def errors(cfg: dict) -> list[str]:
    return parse_relay({"elasticsearch": ES, **cfg})[1]


# -- configuration ----------------------------------------------------------------------------


def test_top_role_needs_syndic_relays_that_are_trusted():
    assert errors({"scaleout": {"role": "top"}}) == [
        "scaleout.syndic_relays: required when scaleout.role is top"
    ]
    errs = errors(
        {"trusted_syndics": ["s1"], "scaleout": {"role": "top", "syndic_relays": ["s1", "s9"]}}
    )
    assert errs == [
        "scaleout.syndic_relays[1]: 's9' is not in trusted_syndics (a syndic relay owns the"
        " gateways its key sets vouch for)"
    ]
    assert (
        errors({"trusted_syndics": ["s1"], "scaleout": {"role": "top", "syndic_relays": ["s1"]}})
        == []
    )


def test_syndic_role_needs_its_id_and_options_belong_to_their_role():
    assert errors({"scaleout": {"role": "syndic"}}) == [
        "scaleout.syndic_id: required when scaleout.role is syndic"
    ]
    assert errors({"scaleout": {"role": "syndic", "syndic_id": "s1"}}) == []
    assert errors({"scaleout": {"syndic_id": "s1"}}) == [
        "scaleout.syndic_id: only for scaleout.role syndic, not single"
    ]
    assert errors({"trusted_syndics": ["s1"], "scaleout": {"syndic_relays": ["s1"]}}) == [
        "scaleout.syndic_relays: only for scaleout.role top, not single"
    ]
    ok, msg = validate_relay({"elasticsearch": ES, "scaleout": {"role": "relay", "takeover_s": 0}})
    assert not ok
    assert "scaleout.role: must be one of 'single', 'top', 'syndic'" in msg
    assert "scaleout.takeover_s: must be a number in 1..86400, got 0" in msg
    assert validate_relay({"elasticsearch": ES, "scaleout": {"nope": 1}}) == (
        False,
        "tributary_relay: scaleout.nope: unknown option",
    )


# -- receipts ---------------------------------------------------------------------------------


def syndic_ledger(tmp_path, name="syndic.db"):
    spool = RelaySpool(str(tmp_path / name))
    return spool, spool.ledger


def test_sender_sends_what_moved_and_everything_again_periodically(tmp_path):
    _, ledger = syndic_ledger(tmp_path)
    clock = Clock()
    cfg = ScaleoutConfig(role="syndic", syndic_id="syndic-1", full_receipt_s=300)
    sender = ReceiptSender("syndic-1", cfg, clock=clock)
    ledger.add_range("gw-a", "ep1", 1, 10, now=clock.t - 10)
    ledger.add_range("gw-a", "ep1", 21, 30, now=clock.t - 10)
    ledger.heartbeat("gw-a", "ep1", 35, now=clock.t - 10)
    first = sender.next_receipts(ledger, (3, 1.5))
    assert len(first) == 1
    assert first[0]["ranges"] == [["gw-a", "ep1", [[1, 10], [21, 30]], 35]]
    assert first[0]["spool"] == [3, 1.5] and first[0]["syndic"] == "syndic-1"
    clock.t += 5
    ledger.add_range("gw-b", "ep2", 1, 5, now=clock.t - 3)
    second = sender.next_receipts(ledger)
    assert [e[0] for e in second[0]["ranges"]] == ["gw-b"]  # only what moved
    assert second[0]["ts_ms"] > first[0]["ts_ms"]
    clock.t += 5
    (empty,) = sender.next_receipts(ledger)  # nothing moved: still one (the liveness)
    assert empty["ranges"] == [] and empty["full"] is False
    clock.t += 300
    (full,) = sender.next_receipts(ledger)
    assert full["full"] is True and {e[0] for e in full["ranges"]} == {"gw-a", "gw-b"}


def test_receipts_are_chunked_and_strictly_ordered(tmp_path):
    _, ledger = syndic_ledger(tmp_path)
    for n in range(ENTRIES_PER_RECEIPT + 5):
        ledger.add_range(f"gw-{n:04d}", "ep1", 1, 3)
    sender = ReceiptSender("syndic-1", ScaleoutConfig(role="syndic", syndic_id="syndic-1"))
    receipts = sender.next_receipts(ledger)
    assert [len(r["ranges"]) for r in receipts] == [ENTRIES_PER_RECEIPT, 5]
    assert receipts[1]["ts_ms"] > receipts[0]["ts_ms"]


def test_receipt_time_stays_ahead_of_the_last_one_over_a_restart_with_the_clock_back(
    tmp_path, monkeypatch
):
    """The top refuses a receipt not newer than the last it took. A syndic relay restarted
    after its clock stepped back an hour carries its last receipt time over (kept in its
    ledger) instead of stamping older ones, which the top would refuse as stale."""
    spool, ledger = syndic_ledger(tmp_path)
    cfg = ScaleoutConfig(role="syndic", syndic_id="syndic-1")
    (before,) = ReceiptSender("syndic-1", cfg).next_receipts(ledger)
    spool.close()
    stepped_back = before["ts_ms"] - 3_600_000
    monkeypatch.setattr(scaleout, "now_ms", lambda: stepped_back)
    spool, ledger = syndic_ledger(tmp_path)  # the restarted relay
    sender = ReceiptSender("syndic-1", cfg)
    (after,) = sender.next_receipts(ledger)
    (later,) = sender.next_receipts(ledger)
    assert before["ts_ms"] < after["ts_ms"] < later["ts_ms"]
    spool.close()


def top_relay(tmp_path, master_pki, keys, clock=None, **so):
    relay = make_relay(
        tmp_path,
        master_pki,
        trusted_syndics=["syndic-1", "syndic-2"],
        scaleout=ScaleoutConfig(role="top", syndic_relays=["syndic-1"], **so),
    )
    receipts = attach_top(relay)
    if clock is not None:
        receipts.ownership.clock = clock
    assert publish_keys(relay, keys)  # syndic-1 vouches for gw-a and gw-b
    receipts.ownership.load(relay.spool.db)
    return relay, receipts


def receipt(keys, syndic: str, ranges: list, ts_ms: int | None = None, **extra) -> dict:
    data = {
        "v": 1,
        "syndic": syndic,
        "ts_ms": ts_ms if ts_ms is not None else scaleout.now_ms(),
        "full": False,
        "spool": [0, None],
        "ranges": ranges,
        **extra,
    }
    return sign_receipt(syndic, data, os.path.join(keys[syndic][0], "minion.pem"))


RTAG = "syndic/{0}/tributary/receipt/{0}"


def test_a_receipt_fills_the_top_ledger_and_reveals_gaps(tmp_path, master_pki, keys):
    relay, _ = top_relay(tmp_path, master_pki, keys)
    data = receipt(keys, "syndic-1", [["gw-a", "ep1", [[1, 10], [21, 30]], 40]])
    assert relay.accept(RTAG.format("syndic-1"), data)
    ledger = relay.spool.ledger
    assert ledger.ranges("gw-a", "ep1") == [(1, 10), (21, 30)]
    assert ledger.holes("gw-a", "ep1") == [(11, 20), (31, 40)]  # gap repair asks for these
    # the copy salt-syndic forwards a second time is ignored; a replayed older one too
    assert not relay.accept("tributary/receipt/syndic-1", data)
    old = receipt(keys, "syndic-1", [["gw-a", "ep1", [[11, 20]], 0]], ts_ms=data["ts_ms"] - 1)
    assert not relay.accept(RTAG.format("syndic-1"), old)
    assert relay.counters["receipts_stale"] == 1
    assert ledger.ranges("gw-a", "ep1") == [(1, 10), (21, 30)]
    assert relay.counters["receipts_in"] == 1
    (view,) = scaleout.relays_view(relay.spool.db, relay.config.scaleout).values()
    assert view["state"] == "live" and view["gateways"] == 2 and view["receipts"] == 1


def test_receipts_are_refused_unless_signed_by_a_syndic_relay(tmp_path, master_pki, keys):
    relay, _ = top_relay(tmp_path, master_pki, keys)
    ranges = [["gw-a", "ep1", [[1, 10]], 0]]
    # syndic-2 is trusted (key sets) but runs no relay: its receipts are refused
    assert not relay.accept(RTAG.format("syndic-2"), receipt(keys, "syndic-2", ranges))
    assert relay.counters["receipt_rejected:not_a_syndic_relay"] == 1
    # a receipt under syndic-1's name signed by gw-a's key
    forged = receipt(keys, "syndic-1", ranges)
    forged = sign_receipt(
        "syndic-1",
        {k: v for k, v in forged.items() if k != "sig"},
        os.path.join(keys["gw-a"][0], "minion.pem"),
    )
    assert not relay.accept(RTAG.format("syndic-1"), forged)
    assert relay.counters["receipt_rejected:bad_signature"] == 1
    tampered = receipt(keys, "syndic-1", ranges)
    tampered["ranges"] = [["gw-a", "ep1", [[1, 99]], 0]]
    assert not relay.accept(RTAG.format("syndic-1"), tampered)
    assert relay.counters["receipt_rejected:bad_signature"] == 2
    bad = receipt(keys, "syndic-1", [["gw-a", "ep:1", [[1, 10]], 0]])
    assert not relay.accept(RTAG.format("syndic-1"), bad)
    assert relay.counters["receipt_rejected:bad_receipt"] == 1
    reversed_range = receipt(keys, "syndic-1", [["gw-a", "ep1", [[10, 1]], 0]])
    assert not relay.accept(RTAG.format("syndic-1"), reversed_range)
    assert relay.spool.ledger.ranges("gw-a", "ep1") == []


def test_a_receipt_speaks_only_for_gateways_bound_to_its_syndic(tmp_path, master_pki, keys):
    relay, _ = top_relay(tmp_path, master_pki, keys)
    data = receipt(
        keys,
        "syndic-1",
        [["gw-a", "ep1", [[1, 5]], 0], ["gw-elsewhere", "ep1", [[1, 5]], 9]],
    )
    assert relay.accept(RTAG.format("syndic-1"), data)
    assert relay.spool.ledger.ranges("gw-a", "ep1") == [(1, 5)]
    assert relay.spool.ledger.ranges("gw-elsewhere", "ep1") == []
    assert relay.counters["receipt_entries_not_owned"] == 1


def test_top_skips_owned_gateways_while_their_relay_lives_and_takes_over_after(
    tmp_path, master_pki, keys
):
    clock = Clock(scaleout.now_ms() / 1000)
    relay, receipts = top_relay(tmp_path, master_pki, keys, clock=clock, takeover_s=30)
    # before any receipt, syndic-1's relay is not known to live: the top indexes
    assert relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=1))
    assert relay.counters["taken_over"] == 1
    assert relay.accept(RTAG.format("syndic-1"), receipt(keys, "syndic-1", []))
    assert not relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=4))
    assert not relay.accept("salt/beacon/gw-b/tributary_health/health", {"epoch": "ep1"})
    assert relay.counters["owned_skipped"] == 2
    assert relay.spool.depth()[0] == 1
    clock.t += 31  # no receipt for takeover_s: the top indexes syndic-1's gateways again
    assert relay.accept(TAG.format("gw-a"), batch("gw-a", keys, first=7))
    assert relay.counters["taken_over"] == 2
    assert relay.spool.depth()[0] == 2
    # a top relay restarted reads the relays' last receipts from its spool
    again = Ownership(relay.config.scaleout, clock=Clock(clock.t - 31))
    again.load(relay.spool.db)
    assert again.state("gw-a") == "live"
    assert again.state("gw-unbound") is None
    assert receipts.ownership.state("gw-a") == "down"


def test_a_syndic_relay_takes_no_key_sets(tmp_path, master_pki, keys):
    relay = make_relay(
        tmp_path, master_pki, scaleout=ScaleoutConfig(role="syndic", syndic_id="syndic-1")
    )
    assert not publish_keys(relay, keys)  # its own key set on its own bus: not an error
    assert relay.counters["keyset_rejected:untrusted_syndic"] == 0


def test_receipt_loop_signs_what_the_top_accepts(tmp_path, master_pki, keys):
    """Syndic side to top side: the loop's receipts verify and fill the top's ledger."""
    spool, ledger = syndic_ledger(tmp_path, "syn.db")
    ledger.add_range("gw-b", "ep7", 1, 100)
    ledger.heartbeat("gw-b", "ep7", 120)
    cfg = ScaleoutConfig(role="syndic", syndic_id="syndic-1")
    fired = []
    loop = scaleout.ReceiptLoop(
        str(tmp_path / "syn.db"),
        cfg,
        scaleout.default_signing_key(keys["syndic-1"][0]),
        lambda data, tag: fired.append((tag, data)),
    )
    assert loop.once(spool) == 1
    ((tag, data),) = fired
    assert tag == "tributary/receipt/syndic-1"
    top, _ = top_relay(tmp_path / "top", master_pki, keys)
    assert top.accept(tag, data)
    assert top.spool.ledger.ranges("gw-b", "ep7") == [(1, 100)]
    assert top.spool.ledger.holes("gw-b", "ep7") == [(101, 120)]
