"""Who may vouch for which gateway: trusted syndics only, one source per gateway, no replayed
old key sets, expiry and retirement (real RSA keys, relay spool in SQLite, no daemons)."""

from __future__ import annotations

import os
import time

from saltext.tributary.protocol import signing
from saltext.tributary.relay.status import retire_syndic
from saltext.tributary.syndic.keys import KeyPublisher
from tests.unit.relay.test_planner import signed
from tests.unit.relay.test_relay import TAG, make_relay


def keyset(keys, syndic: str, vouch: dict[str, str], ts_ms: int | None = None) -> dict:
    """A key set signed by ``syndic`` vouching ``{gateway: key owner}``."""
    data = {
        "v": 1,
        "syndic": syndic,
        "ts": 0,
        "ts_ms": ts_ms if ts_ms is not None else time.time_ns() // 10**6,
        "keys": {gw: keys[owner][1] for gw, owner in vouch.items()},
    }
    key = signing.load_private_key(os.path.join(keys[syndic][0], "minion.pem"))
    data["sig"] = signing.sign_bytes(key, signing.canonical(syndic, data))
    return data


def send(relay, syndic: str, data) -> bool:
    return relay.accept(f"syndic/{syndic}/tributary/keys/{syndic}", data)


SEQ = iter(range(1000, 10**9, 10))


def verdicts(relay, *gateways: str) -> dict[str, str]:
    """Ship a new batch from each gateway (signed by its own key): what became of it."""
    for gw in gateways:
        relay.accept(TAG.format(gw), signed(gw, keys_of(relay), first=next(SEQ)))
    plan = relay.build_docs(relay.spool.take(100))
    out = {}
    for _row, original in plan.ops:
        gw = original[0] if isinstance(original, tuple) else original.get("gateway")
        out.setdefault(gw, "indexed" if isinstance(original, tuple) else original["reason"])
    relay.spool.done(list(plan.rows))
    return out


def keys_of(relay):
    return relay._test_keys


def make(tmp_path, master_pki, keys, **kw):
    relay = make_relay(tmp_path, master_pki, key_wait_s=0, **kw)
    relay._test_keys = keys
    return relay


def test_only_trusted_syndics_vouch(tmp_path, master_pki, keys):
    relay = make(tmp_path, master_pki, keys)
    # syndic-2 is an accepted minion of the top master (a syndic host's own minion, say)
    assert not send(relay, "syndic-2", keyset(keys, "syndic-2", {"gw-b": "gw-b"}))
    assert relay.counters["keyset_rejected:untrusted_syndic"] == 1
    assert verdicts(relay, "gw-b") == {"gw-b": "unknown_key"}
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-b": "gw-b"}))
    assert verdicts(relay, "gw-b") == {"gw-b": "indexed"}


def test_a_gateway_is_bound_to_one_source(tmp_path, master_pki, keys):
    relay = make(tmp_path, master_pki, keys, trusted_syndics=["syndic-1", "syndic-2"])
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-b": "gw-b"}))
    # syndic-2 vouches gw-a's key under gw-b's name: refused for gw-b, counted, shown
    assert send(relay, "syndic-2", keyset(keys, "syndic-2", {"gw-b": "gw-a", "gw-a": "gw-a"}))
    assert relay.counters["keyset_conflicts"] == 1
    (conflict,) = relay.spool.keyring.conflicts()
    assert conflict["gateway"] == "gw-b" and conflict["claimed_by"] == "syndic-2"
    assert conflict["bound_to"] == "syndic-1"
    # gw-a signing as gw-b is still refused; both genuine gateways verify
    relay.accept(TAG.format("gw-b"), signed("gw-a", keys, first=100))
    plan = relay.build_docs(relay.spool.take(100))
    assert [o.get("reason") for _, o in plan.ops] == ["bad_signature"]
    relay.spool.done(list(plan.rows))
    assert verdicts(relay, "gw-a", "gw-b") == {"gw-a": "indexed", "gw-b": "indexed"}


def test_a_gateway_attached_to_the_top_master_is_bound_to_it(tmp_path, master_pki, keys):
    with open(os.path.join(master_pki, "minions", "gw-a"), "w") as fh:
        fh.write(keys["gw-a"][1])
    relay = make(tmp_path, master_pki, keys)
    # a trusted syndic cannot take over a directly attached gateway's name
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-b", "gw-b": "gw-b"}))
    assert relay.counters["keyset_conflicts"] == 1
    relay.accept(TAG.format("gw-a"), signed("gw-b", keys, first=50))  # gw-b's key, gw-a's name
    plan = relay.build_docs(relay.spool.take(100))
    assert [o.get("reason") for _, o in plan.ops] == ["bad_signature"]
    relay.spool.done(list(plan.rows))
    assert verdicts(relay, "gw-a", "gw-b") == {"gw-a": "indexed", "gw-b": "indexed"}


def test_a_syndic_listing_its_own_id_is_not_a_conflict(tmp_path, master_pki, keys):
    """The syndic host's minion shares the syndic's id, which the top master accepted."""
    with open(os.path.join(master_pki, "minions", "syndic-1"), "w") as fh:
        fh.write(keys["syndic-1"][1])
    relay = make(tmp_path, master_pki, keys)
    vouch = {"syndic-1": "syndic-1", "gw-b": "gw-b"}
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", vouch))
    assert relay.counters["keyset_conflicts"] == 0
    assert relay.spool.keyring.conflicts() == []
    assert verdicts(relay, "gw-b") == {"gw-b": "indexed"}


def test_an_older_key_set_never_replaces_a_newer_one(tmp_path, master_pki, keys):
    relay = make(tmp_path, master_pki, keys)
    old = keyset(keys, "syndic-1", {"gw-a": "gw-a", "gw-b": "gw-b"}, ts_ms=1_000)
    assert send(relay, "syndic-1", old)
    # gw-b's key deleted on the syndic: the next set leaves it out
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-a"}, ts_ms=2_000))
    assert verdicts(relay, "gw-b") == {"gw-b": "unknown_key"}
    # the old set, replayed (re-signed data is not needed: it is the genuine old set)
    relay.intake._recent.clear()  # past the de-duplication window
    assert not send(relay, "syndic-1", old)
    assert relay.counters["keyset_rejected:stale"] == 1
    assert verdicts(relay, "gw-b") == {"gw-b": "unknown_key"}


def test_keys_expire_for_rows_arriving_after_the_source_went_quiet(tmp_path, master_pki, keys):
    relay = make(tmp_path, master_pki, keys, keyset_ttl_s=10)
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-a"}))
    ring = relay.spool.keyring
    now = time.time_ns() // 10**6
    assert ring.keys_for("gw-a", now, 10_000)  # arrived while live
    assert ring.keys_for("gw-a", now + 9_000, 10_000)
    assert not ring.keys_for("gw-a", now + 11_000, 10_000)  # after the syndic went quiet
    assert ring.sources(10_000)["syndic-1"]["state"] == "live"


def test_an_operator_retires_a_syndic(tmp_path, master_pki, keys):
    relay = make(tmp_path, master_pki, keys)
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-a"}))
    opts = {
        "cachedir": str(tmp_path),
        "pki_dir": master_pki,
        "engines": [
            {
                "tributary_relay": {
                    "elasticsearch": {"hosts": "http://127.0.0.1:9"},
                    "spool_path": relay.config.spool_path,
                    "trusted_syndics": ["syndic-1"],
                }
            }
        ],
    }
    out = retire_syndic(opts, "syndic-1")
    assert out["result"] and out["gateway_keys"] == 1 and out["state"] == "retired"
    assert verdicts(relay, "gw-a") == {"gw-a": "unknown_key"}
    assert not send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-a"}))
    assert relay.counters["keyset_rejected:retired"] == 1
    assert retire_syndic(opts, "syndic-1", undo=True)["state"] == "trusted again"
    assert send(relay, "syndic-1", keyset(keys, "syndic-1", {"gw-a": "gw-a"}))
    assert verdicts(relay, "gw-a") == {"gw-a": "indexed"}


def test_look_alike_key_events_do_not_make_the_syndic_sign(tmp_path, keys):
    pki = tmp_path / "syndic-pki"
    (pki / "minions").mkdir(parents=True)
    (pki / "minions" / "gw-a").write_text(keys["gw-a"][1])
    now = [1000.0]
    pub = KeyPublisher(
        str(pki),
        "syndic-1",
        os.path.join(keys["syndic-1"][0], "minion.pem"),
        interval=60,
        min_gap_s=2,
        clock=lambda: now[0],
    )
    assert pub.next_set() is not None  # at start
    signed_sets = 0
    for _ in range(1000):  # a gateway fires salt/key as fast as it can, for 10 s
        now[0] += 0.01
        pub.note("salt/key")
        signed_sets += pub.next_set() is not None
    assert signed_sets == 0  # the keys did not change
    (pki / "minions" / "gw-b").write_text(keys["gw-b"][1])  # a real accept
    pub.note("salt/key")
    now[0] += 2
    data = pub.next_set()
    assert data is not None and set(data["keys"]) == {"gw-a", "gw-b"}
    pub.note("salt/key")
    (pki / "minions" / "gw-b").unlink()
    now[0] += 1
    assert pub.next_set() is None  # within min_gap_s
    now[0] += 1
    assert set(pub.next_set()["keys"]) == {"gw-a"}
    now[0] += 60
    assert pub.next_set() is not None  # the periodic full set


def test_the_top_masters_own_keys_are_read_once_until_they_change(
    tmp_path, master_pki, keys, monkeypatch
):
    """A directly attached gateway's key is read from ``pki_dir/minions`` once; the file is
    read again only after it changed, and a deleted key stops verifying at once."""
    from saltext.tributary.relay import origin as origin_mod

    path = os.path.join(master_pki, "minions", "gw-a")
    with open(path, "w", encoding="ascii") as fh:
        fh.write(keys["gw-a"][1])
    reads: list[str] = []

    def counting_open(file, *args, **kwargs):
        reads.append(os.path.basename(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(origin_mod, "open", counting_open, raising=False)
    relay = make(tmp_path, master_pki, keys)
    for _ in range(50):
        assert verdicts(relay, "gw-a") == {"gw-a": "indexed"}
        assert relay.origin.local_key("gw-b") is None  # not attached here: never opened
    assert reads.count("gw-a") == 1 and "gw-b" not in reads
    # the key replaced (re-accepted with another key): read again, the old one stops
    with open(path, "w", encoding="ascii") as fh:
        fh.write(keys["gw-b"][1] + "\n")  # another size, another mtime
    assert verdicts(relay, "gw-a") == {"gw-a": "bad_signature"}
    assert reads.count("gw-a") == 2
    # deleted: no key, and a key accepted later is found without waiting
    os.unlink(path)
    assert relay.origin.local_key("gw-a") is None
    with open(os.path.join(master_pki, "minions", "gw-b"), "w", encoding="ascii") as fh:
        fh.write(keys["gw-b"][1])
    assert relay.origin.local_key("gw-b") == keys["gw-b"][1]
