"""Origin authentication: batch signatures and syndic key sets (real RSA keys, no daemons)."""

from __future__ import annotations

import hashlib
import os

import pytest

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from tests.support.keys import write_keypair


def _keypair(folder, name: str) -> tuple[str, str]:
    d = folder / name
    return str(d), write_keypair(d)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return {name: _keypair(base, name) for name in ("gw-a", "gw-b", "syndic-1")}


def _batch(n: int = 5) -> dict:
    rows = [
        SpooledReading(i + 1, "t1/temperature", "C", 1_700_000_000_000 + i, 20.5 + i)
        for i in range(n)
    ]
    return encode_batch("ep1", rows, site="brisbane")


def test_sign_and_verify_round_trip(keys):
    pki, pub = keys["gw-a"]
    batch = signing.sign_batch(_batch(), {"id": "gw-a", "pki_dir": pki})
    assert isinstance(batch["sig"], str)
    # transport fields Salt adds do not matter
    signing.verify_batch("gw-a", {**batch, "id": "gw-a", "tag": "batch", "_stamp": 1}, pub)


def test_survives_msgpack_round_trip(keys):
    import msgpack

    pki, pub = keys["gw-a"]
    batch = signing.sign_batch(_batch(), {"id": "gw-a", "pki_dir": pki})
    wire = msgpack.unpackb(msgpack.packb(batch, use_bin_type=True), raw=False)
    signing.verify_batch("gw-a", wire, pub)


def _packed(n: int = 5) -> dict:
    from saltext.tributary.protocol.wire import pack_rows

    return pack_rows(_batch(n))


@pytest.mark.parametrize(
    ("make", "mutate"),
    [
        (_batch, lambda b: b["r"][0].__setitem__(2, 999)),
        (_batch, lambda b: b.__setitem__("first", b["first"] + 1)),
        (_batch, lambda b: b.__setitem__("epoch", "other")),
        (_batch, lambda b: b.__setitem__("site", "sydney")),
        (_batch, lambda b: b.__setitem__("replay", "abc")),
        # packed rows (rb)
        (_packed, lambda b: b.__setitem__("rb", b["rb"][:-1] + bytes([b["rb"][-1] ^ 1]))),
        (_packed, lambda b: b.__setitem__("rb", b["rb"] + b"\x00")),
        # the rows' hash in place of the rows: never the same signed content
        (_packed, lambda b: b.__setitem__("rb", hashlib.sha256(b["rb"]).hexdigest())),
        (_packed, lambda b: b.__setitem__("r", [[0, 0, 1]]) or b.pop("rb")),
        (_packed, lambda b: b.__setitem__("first", b["first"] + 1)),
    ],
)
def test_tampering_is_detected(keys, make, mutate):
    pki, pub = keys["gw-a"]
    batch = signing.sign_batch(make(), {"id": "gw-a", "pki_dir": pki})
    mutate(batch)
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_batch("gw-a", batch, pub)
    assert exc.value.reason == "bad_signature"


def test_forged_under_another_name(keys):
    pki_a, _ = keys["gw-a"]
    _, pub_b = keys["gw-b"]
    batch = signing.sign_batch(_batch(), {"id": "gw-a", "pki_dir": pki_a})
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_batch("gw-b", batch, pub_b)
    assert exc.value.reason == "bad_signature"
    # even gw-a signing while claiming to be gw-b (its own key, other name) fails
    forged = signing.sign_batch(_batch(), {"id": "gw-b", "pki_dir": pki_a})
    with pytest.raises(signing.SignatureError):
        signing.verify_batch("gw-b", forged, pub_b)


def test_unsigned_and_unknown_key(keys):
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_batch("gw-a", _batch(), keys["gw-a"][1])
    assert exc.value.reason == "unsigned"
    batch = signing.sign_batch(_batch(), {"id": "gw-a", "pki_dir": keys["gw-a"][0]})
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_batch("gw-a", batch, None)
    assert exc.value.reason == "unknown_key"
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_batch("gw-a", batch, "not a pem")
    assert exc.value.reason == "unknown_key"
    for bad in (123, "!!notbase64!!", ""):
        with pytest.raises(signing.SignatureError) as exc:
            signing.verify_batch("gw-a", {**batch, "sig": bad}, keys["gw-a"][1])
        assert exc.value.reason == "bad_signature"


def test_keyset_signed_by_syndic(keys, tmp_path):
    syn_pki, syn_pub = keys["syndic-1"]
    pki = tmp_path / "master"
    (pki / "minions").mkdir(parents=True)
    for gw in ("gw-a", "gw-b"):
        (pki / "minions" / gw).write_text(keys[gw][1])
    (pki / "minions" / ".hidden").write_text("x")
    accepted = signing.read_accepted_keys(str(pki))
    assert set(accepted) == {"gw-a", "gw-b"}
    data = signing.sign_keyset("syndic-1", accepted, os.path.join(syn_pki, "minion.pem"))
    assert signing.verify_keyset("syndic-1", data, syn_pub) == accepted
    # a gateway cannot forge a key set: it does not hold the syndic's key
    forged = signing.sign_keyset(
        "syndic-1", {"gw-b": keys["gw-a"][1]}, os.path.join(keys["gw-a"][0], "minion.pem")
    )
    with pytest.raises(signing.SignatureError):
        signing.verify_keyset("syndic-1", forged, syn_pub)
    # a key set claims exactly one syndic
    with pytest.raises(signing.SignatureError):
        signing.verify_keyset("syndic-2", data, syn_pub)
    with pytest.raises(signing.SignatureError):
        signing.verify_keyset("syndic-1", {**data, "keys": {"gw-a": 1}}, syn_pub)
    assert signing.read_accepted_keys(str(tmp_path / "missing")) == {}


def _heartbeat() -> dict:
    from saltext.tributary.gateway.sources import health

    hb = health.event("ep1", 42, {"load1": 0.5, "broker": "subscribed", "counters": {"n": 1}}, 7)
    hb["site"] = "brisbane"
    return hb


def test_heartbeat_signed_like_a_batch(keys):
    import msgpack

    pki, pub = keys["gw-a"]
    hb = signing.sign_event(_heartbeat(), {"id": "gw-a", "pki_dir": pki})
    assert isinstance(hb["sig"], str) and hb["tag"] == "health"
    # the same scheme: sign_batch and sign_event agree, verify_batch is verify_event
    assert signing.sign_batch(_heartbeat(), {"id": "gw-a", "pki_dir": pki})["sig"] == hb["sig"]
    assert signing.verify_batch is signing.verify_event
    # as the relay sees it: through msgpack, without tag and _stamp, with Salt's id
    wire = msgpack.unpackb(msgpack.packb(hb, use_bin_type=True), raw=False)
    del wire["tag"], wire["_stamp"]
    signing.verify_event("gw-a", {**wire, "id": "gw-a"}, pub)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.__setitem__("last_seq", h["last_seq"] + 1000),
        lambda h: h.__setitem__("epoch", "other"),
        lambda h: h["counters"].__setitem__("n", 2),
        lambda h: h.__setitem__("site", "sydney"),
    ],
)
def test_heartbeat_tampering_is_detected(keys, mutate):
    pki, pub = keys["gw-a"]
    hb = signing.sign_event(_heartbeat(), {"id": "gw-a", "pki_dir": pki})
    mutate(hb)
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_event("gw-a", hb, pub)
    assert exc.value.reason == "bad_signature"


def test_heartbeat_unsigned_or_by_another_gateway(keys):
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_event("gw-a", _heartbeat(), keys["gw-a"][1])
    assert exc.value.reason == "unsigned"
    forged = signing.sign_event(_heartbeat(), {"id": "gw-b", "pki_dir": keys["gw-a"][0]})
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_event("gw-b", forged, keys["gw-b"][1])
    assert exc.value.reason == "bad_signature"


def test_packed_rows_are_signed_through_salts_transport(keys):
    import salt.payload

    pki, pub = keys["gw-a"]
    batch = signing.sign_batch(_packed(), {"id": "gw-a", "pki_dir": pki})
    # what a master's request worker and an event bus subscriber do to event data
    wire = salt.payload.loads(salt.payload.dumps({"data": batch}))["data"]
    assert isinstance(wire["rb"], bytes)
    signing.verify_batch("gw-a", wire, pub)


def test_canonical_form_of_packed_rows_cannot_be_written_as_content():
    """The packed rows' digest follows the JSON on a line of its own: no batch content (a
    string, a field named after it) reads the same as a batch whose rows are packed."""
    packed = _packed()
    digest = hashlib.sha256(packed["rb"]).hexdigest()
    text = signing.canonical("gw-a", packed)
    assert text.endswith(b"\n" + digest.encode()) and text.count(b"\n") == 2
    body = {k: v for k, v in packed.items() if k != "rb"}
    for imitation in (
        {**body, "rb": digest},
        {**body, "rb": {"sha256": digest}},
        {**body, "rb\n": digest},
    ):
        assert signing.canonical("gw-a", imitation) != text
