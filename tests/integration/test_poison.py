"""One poisoned event of each class reaches the real relay engine on the real top master bus
while two gateways stream: their readings are indexed exactly once, each poison is in the
dead-letter index with its reason, and ``salt-run tributary.status`` counts it."""

from __future__ import annotations

import time

import pytest
import salt.utils.event

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from tests.support.topology import GATEWAYS, es_count, wait_for

pytestmark = pytest.mark.usefixtures("topology")

N = 400
SENSOR = "poison-stream"


def gateway_signed(gateways, gw: str, epoch: str, first: int, ts: int, **patch) -> dict:
    """A batch signed with ``gw``'s real minion key (a compromised or buggy gateway's)."""
    rows = [SpooledReading(first + i, "poison/temperature", "C", ts + i, 20.0) for i in range(3)]
    b = encode_batch(epoch, rows, site="x") | patch
    signing.sign_batch(b, {"id": gw, "pki_dir": gateways[gw].config["pki_dir"]})
    return b


def deadletters(es, reason: str) -> list[dict]:
    res = es.search("tributary-deadletter-*", {"size": 100, "query": {"term": {"reason": reason}}})
    return [h["_source"] for h in res["hits"]["hits"]]


def test_poisoned_events_never_stop_the_relay(topology):
    es, top, gateways, brokers = (topology[k] for k in ("es", "top", "gateways", "brokers"))
    gw_a, gw_b = list(GATEWAYS)
    now = int(time.time() * 1000)
    for gw in GATEWAYS:  # the streams the poison must not disturb
        brokers[gw].publish(f"sensors/{SENSOR}/temperature", [f"{i / 10:.1f}" for i in range(N)])
    poison = [
        # decimals that overflow a float (10**400): the batch is refused
        (gw_a, gateway_signed(gateways, gw_a, "pz1", 1, now, d=[400]), "bad_field"),
        # sequence numbers beyond SQLite's integer range
        (gw_a, gateway_signed(gateways, gw_a, "pz2", 2**62, now), "bad_range"),
        # a sensor with a broken clock (2090): no daily index is created for it
        (gw_b, gateway_signed(gateways, gw_b, "pz3", 1, 3_800_000_000_000), "out_of_window"),
        # map keys of mixed types (cannot be canonicalised to check the signature)
        (gw_b, {1: "x", "v": 1, "epoch": "pz4", "sig": "AAAA"}, "bad_payload"),
    ]
    # and 40 junk events of 1 MB each, unsigned, under a real gateway's name
    junk = [{"v": 1, "epoch": f"junk{i}", "junk": "x" * 2**20} for i in range(40)]
    with salt.utils.event.get_master_event(top.config, top.config["sock_dir"], listen=False) as bus:
        for gw, data, _ in poison:
            bus.fire_event(data, f"salt/beacon/{gw}/tributary_mqtt/batch")
        for data in junk:
            bus.fire_event(data, f"salt/beacon/{gw_b}/tributary_mqtt/batch")
    for gw in GATEWAYS:
        wait_for(
            lambda gw=gw: es_count(es, gw, SENSOR) >= N, timeout=120, what=f"{gw} stream indexed"
        )
    for _, _, reason in [*poison, (None, None, "unsigned")]:
        letters = wait_for(
            lambda r=reason: deadletters(es, r), timeout=60, what=f"a {reason} dead letter"
        )
        assert all(len(str(d["original"])) < 40_000 for d in letters)  # trimmed
    wait_for(
        lambda: len(deadletters(es, "unsigned")) >= 40, timeout=60, what="all junk dead-lettered"
    )
    for gw in GATEWAYS:
        assert es_count(es, gw, SENSOR) == N  # exactly once
    code, body = es.request("GET", "/_cat/indices/tributary-readings-2090*?format=json")
    assert code == 200 and body.strip() == b"[]", body
    ret = top.salt_run_cli(timeout=60).run("tributary.status", check_es=False)
    assert ret.returncode == 0, ret
    counters = ret.data["fleet"]["counters"]
    for reason in ("bad_field", "bad_range", "out_of_window", "bad_payload", "unsigned"):
        assert counters.get(f"rejected:{reason}", 0) >= 1, (reason, counters)
    assert ret.data["relay"]["spool_batches"] < 10  # nothing stuck behind the poison


def test_a_gateway_cannot_vouch_for_keys(topology):
    """A gateway publishes a key set (signed with its own, accepted key) vouching its key for
    another gateway, then signs that gateway's readings: the key set is refused (the gateway
    is no trusted syndic), the forged readings are dead-lettered, the genuine ones flow."""
    import json
    import os

    es, top, gateways, brokers = (topology[k] for k in ("es", "top", "gateways", "brokers"))
    gw_a, gw_b = list(GATEWAYS)
    pki = gateways[gw_a].config["pki_dir"]
    with open(os.path.join(pki, "minion.pub"), encoding="ascii") as fh:
        own_pub = fh.read()
    forged_set = {
        "v": 1,
        "syndic": gw_a,
        "ts": int(time.time()),
        "ts_ms": int(time.time() * 1000),
        "keys": {gw_b: own_pub},
    }
    key = signing.load_private_key(os.path.join(pki, "minion.pem"))
    forged_set["sig"] = signing.sign_bytes(key, signing.canonical(gw_a, forged_set))
    cli = gateways[gw_a].salt_call_cli(timeout=120)
    ret = cli.run("event.fire_master", json.dumps(forged_set), f"tributary/keys/{gw_a}")
    assert ret.returncode == 0, ret
    now = int(time.time() * 1000)
    forged = gateway_signed(gateways, gw_a, "forged1", 1, now)  # gw_a's key ...
    with salt.utils.event.get_master_event(top.config, top.config["sock_dir"], listen=False) as bus:
        bus.fire_event(forged, f"salt/beacon/{gw_b}/tributary_mqtt/batch")  # ... gw_b's name
    brokers[gw_b].publish("sensors/forgery-genuine/temperature", ["1", "2", "3"])

    def refused() -> dict:
        ret = top.salt_run_cli(timeout=60).run("tributary.status", check_es=False)
        return ret.data["fleet"]["counters"] if ret.returncode == 0 else {}

    wait_for(
        lambda: refused().get("keyset_rejected:untrusted_syndic", 0) >= 1,
        timeout=90,
        what="the gateway's key set refused",
    )
    wait_for(lambda: es_count(es, gw_b, "forgery-genuine") == 3, timeout=90, what="genuine")
    letters = wait_for(
        lambda: [
            d
            for d in deadletters(es, "bad_signature")
            if d["gateway"] == gw_b and d["original"].get("epoch") == "forged1"
        ],
        timeout=90,
        what="the forged batch dead-lettered",
    )
    assert letters[0]["stage"] == "origin"
    assert es_count(es, gw_b, "poison") == 0
