"""One poisoned event of each class reaches the real relay engine on the real top master bus
while two gateways stream: their readings are indexed exactly once, each poison is in the
dead-letter index with its reason, and ``salt-run tributary.status`` counts it."""

from __future__ import annotations

import json
import random
import time

import pytest
import salt.utils.event

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from tests.support.topology import GATEWAYS, es_count, es_readings, wait_for

pytestmark = pytest.mark.usefixtures("topology")

N = 400
SENSOR = "poison-stream"
FLOOD = 1000
JUNK = 400


def gateway_signed(gateways, gw: str, epoch: str, first: int, ts: int, **patch) -> dict:
    """A batch signed with ``gw``'s real minion key (a compromised or buggy gateway's)."""
    rows = [SpooledReading(first + i, "poison/temperature", "C", ts + i, 20.0) for i in range(3)]
    b = encode_batch(epoch, rows, site="x") | patch
    signing.sign_batch(b, {"id": gw, "pki_dir": gateways[gw].config["pki_dir"]})
    return b


def deadletters(es, reason: str) -> list[dict]:
    es.refresh("tributary-deadletter-*")
    res = es.search("tributary-deadletter-*", {"size": 100, "query": {"term": {"reason": reason}}})
    return [h["_source"] for h in res["hits"]["hits"]]


def test_poisoned_events_never_stop_the_relay(topology):
    es, top, gateways, brokers = (topology[k] for k in ("es", "top", "gateways", "brokers"))
    gw_a, gw_b = list(GATEWAYS)
    now = int(time.time() * 1000)
    # a reading already indexed under the id <gw_b>:pz9:1 (a spool restored from a backup
    # numbers a new reading with it): the new one is an id collision, not a duplicate
    index = time.strftime("tributary-readings-%Y.%m.%d", time.gmtime(now / 1000))
    stored = {"@timestamp": now - 60_000, "gateway": gw_b, "epoch": "pz9", "seq": 1}
    stored |= {"sensor": "poison-old", "metric": "temperature", "value": 99.0}
    code, body = es.request("PUT", f"/{index}/_create/{gw_b}:pz9:1", json.dumps(stored).encode())
    assert code == 201, body

    def stream(part: int) -> None:  # the two streams the poison must not disturb
        for gw in GATEWAYS:
            values = [f"{i / 10:.1f}" for i in range(part * N // 2, (part + 1) * N // 2)]
            brokers[gw].publish(f"sensors/{SENSOR}/temperature", values)

    stream(0)
    poison = [
        # decimals that overflow a float (10**400): the batch is refused
        (gw_a, gateway_signed(gateways, gw_a, "pz1", 1, now, d=[400]), "bad_field"),
        # sequence numbers beyond SQLite's integer range
        (gw_a, gateway_signed(gateways, gw_a, "pz2", 2**62, now), "bad_range"),
        # sensors with broken clocks (2090, 2001): no daily index is created for them
        (gw_b, gateway_signed(gateways, gw_b, "pz3", 1, 3_800_000_000_000), "out_of_window"),
        (gw_a, gateway_signed(gateways, gw_a, "pz5", 1, 978_307_200_000), "out_of_window"),
        # map keys of mixed types (cannot be canonicalised to check the signature)
        (gw_b, {1: "x", "v": 1, "epoch": "pz4", "sig": "AAAA"}, "bad_payload"),
        # a new reading under an id already taken by another
        (gw_b, gateway_signed(gateways, gw_b, "pz9", 1, now), "id_collision"),
    ]
    # 40 junk events of 1 MB each, unsigned, under a real gateway's name; 5 more of 600 KB
    # signed with the gateway's own key (origin holds, the wire format does not; Salt trims
    # an event over its max_event_size, 1 MiB, so a signed one that large would arrive with
    # a broken signature)
    junk = [{"v": 1, "epoch": f"junk{i}", "junk": "x" * 2**20} for i in range(40)]
    signed_junk = []
    for i in range(5):
        data = {"v": 1, "epoch": f"sjunk{i}", "junk": "y" * 600_000}
        signing.sign_batch(data, {"id": gw_a, "pki_dir": gateways[gw_a].config["pki_dir"]})
        signed_junk.append(data)
    # a flood from one source: 1,000 events, each claiming another gateway id
    flood = [{"v": 1, "epoch": f"flood{i}", "first": 1, "last": 1} for i in range(FLOOD)]
    with salt.utils.event.get_master_event(top.config, top.config["sock_dir"], listen=False) as bus:
        for gw, data, _ in poison:
            bus.fire_event(data, f"salt/beacon/{gw}/tributary_mqtt/batch")
        for data in junk:
            bus.fire_event(data, f"salt/beacon/{gw_b}/tributary_mqtt/batch")
        for data in signed_junk:
            bus.fire_event(data, f"salt/beacon/{gw_a}/tributary_mqtt/batch")
        for i, data in enumerate(flood):
            bus.fire_event(data, f"salt/beacon/flood-{i}/tributary_mqtt/batch")
    stream(1)
    published = time.monotonic()
    for gw in GATEWAYS:
        wait_for(
            lambda gw=gw: es_count(es, gw, SENSOR) >= N, timeout=120, what=f"{gw} stream indexed"
        )
    on_time = time.monotonic() - published
    print(f"poison: both streams indexed {on_time:.1f} s after the last reading was published")
    for _, _, reason in [*poison, (None, None, "unsigned"), (None, None, "missing_field")]:
        letters = wait_for(
            lambda r=reason: deadletters(es, r), timeout=60, what=f"a {reason} dead letter"
        )
        assert all(len(str(d["original"])) < 40_000 for d in letters)  # trimmed
    unsigned = {"term": {"reason": "unsigned"}}
    wait_for(
        lambda: es.count("tributary-deadletter-*", unsigned) >= 40 + FLOOD,
        timeout=90,
        what="all unsigned junk and the flood dead-lettered",
    )
    wait_for(lambda: len(deadletters(es, "missing_field")) >= 5, 60, "signed junk dead-lettered")
    for gw in GATEWAYS:
        assert es_count(es, gw, SENSOR) == N  # exactly once
    assert on_time < 60, on_time  # on time: the poison holds nothing up
    # the collision: the stored reading is untouched, the new one is in the dead letter
    assert es_readings(es, gw_b, "poison-old")[0]["value"] == 99.0
    assert [r["seq"] for r in es_readings(es, gw_b, "poison") if r["epoch"] == "pz9"] == [2, 3]
    for year in ("2090", "2001"):
        code, body = es.request("GET", f"/_cat/indices/tributary-readings-{year}*?format=json")
        assert code == 200 and body.strip() == b"[]", body
    ret = top.salt_run_cli(timeout=60).run("tributary.status", check_es=False, detail=True)
    assert ret.returncode == 0, ret
    counters = ret.data["fleet"]["counters"]
    print(f"poison: tributary.status fleet counters {counters}")
    for reason in ("bad_field", "bad_range", "out_of_window", "bad_payload", "unsigned"):
        assert counters.get(f"rejected:{reason}", 0) >= 1, (reason, counters)
    assert counters.get("rejected:unsigned", 0) >= 40 + FLOOD, counters
    assert counters.get("id_collisions", 0) >= 1, counters
    assert ret.data["gateways"][gw_b]["id_collisions"] >= 1
    # the flood's claimed ids are counted together, never one entry each
    assert not [gw for gw in ret.data.get("gateways", {}) if gw.startswith("flood-")]
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
    forged_indexed = {
        "bool": {"must": [{"term": {"gateway": gw_b}}, {"term": {"epoch": "forged1"}}]}
    }
    assert es.count("tributary-readings-*", forged_indexed) == 0


def junk_messages(n: int, seed: int = 12) -> list[tuple[str, bytes]]:
    """``n`` hostile MQTT messages for the session beacon's topic rules: random bytes, deep
    nesting, huge fields, truncated JSON, values no float holds, odd unicode in topics."""
    rng = random.Random(seed)
    odd = [
        "é",
        "温度",
        "\u202e",
        "\ufeff",
        "\U0001d530\U0001d522\U0001d52b",
        "a" * 300,
        " ",
        "\u0301",
        "☃☃",
    ]

    def name() -> str:
        return "".join(rng.choice(odd) for _ in range(rng.randint(1, 4)))

    out = []
    for i in range(n):
        kind = i % 8
        topic = rng.choice([f"sensors/{name()}/temperature", f"json/{name()}", "json/fz-json"])
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 4096))
        elif kind == 1:
            depth = rng.randint(1_000, 100_000)
            body = b'{"temp":' + b"[" * depth + b"]" * depth + b"}"
        elif kind == 2:
            body = json.dumps({"temp": 1, "x": "z" * rng.randint(60_000, 300_000)}).encode()
        elif kind == 3:
            body = json.dumps({"temp": rng.random(), "env": {"hum": "a"}})[:-3].encode()
        elif kind == 4:
            body = rng.choice([b"1e999", b"nan", b"-inf", b"0x10", b"", b"\x00", b"1" * 5000])
            topic = f"sensors/{name()}/temperature"
        elif kind == 5:
            body = json.dumps({"temp": {"a": [1, 2]}, "ts": 10**30, "env": []}).encode()
        elif kind == 6:
            body = json.dumps({"temp": 2**80, "ts": -5}).encode()
        else:
            body = "\ud800".encode("utf-8", "surrogatepass")
        out.append((topic, body))
    return out


def test_junk_on_a_real_gateways_broker_never_blocks_its_readings(topology):
    """Hostile payloads on a real gateway's broker, each followed by a good reading, through the
    real beacon in the running minion, its syndic and the relay: every good reading is indexed
    exactly once, and the gateway keeps streaming."""
    import paho.mqtt.client as mqtt

    es, brokers = topology["es"], topology["brokers"]
    gw = next(iter(GATEWAYS))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="poison-junk")
    client.connect("127.0.0.1", brokers[gw].port)
    client.loop_start()
    try:
        junk = junk_messages(JUNK)
        started = time.monotonic()
        for i, (topic, body) in enumerate(junk):
            for t, b in ((topic, body), ("sensors/junk-good/temperature", str(i).encode())):
                info = client.publish(t, b, qos=1)
                info.wait_for_publish(timeout=30)
                assert info.is_published(), t
    finally:
        client.loop_stop()
        client.disconnect()
    wait_for(lambda: es_count(es, gw, "junk-good") >= JUNK, timeout=120, what="good readings")
    print(f"junk: {JUNK} hostile + {JUNK} good in {time.monotonic() - started:.1f} s")
    values = sorted(r["value"] for r in es_readings(es, gw, "junk-good"))
    assert values == [float(i) for i in range(JUNK)]  # each exactly once
    brokers[gw].publish("sensors/junk-after/temperature", ["1", "2"])  # still streaming
    wait_for(lambda: es_count(es, gw, "junk-after") == 2, timeout=60, what="readings after junk")


def test_a_key_the_top_master_accepted_signs_only_for_its_own_id(topology):
    """The syndic host's minion key is accepted by the top master itself (as ``syndic-1``): a
    batch it signs under a gateway's name is dead-lettered, whatever the syndic vouches for."""
    import os

    es, top, syndic = topology["es"], topology["top"], topology["syndic"]
    gw_b = list(GATEWAYS)[1]
    pki = syndic.minion.config["pki_dir"]
    with open(os.path.join(pki, "minion.pub"), encoding="ascii") as fh:
        own = fh.read()
    with open(os.path.join(top.config["pki_dir"], "minions", "syndic-1"), encoding="ascii") as fh:
        assert fh.read().strip() == own.strip()  # the very key the top master accepted
    rows = [SpooledReading(1, "poison/temperature", "C", int(time.time() * 1000), 1.0)]
    forged = encode_batch("forged2", rows, site="x")
    signing.sign_batch(forged, {"id": "syndic-1", "pki_dir": pki})
    with salt.utils.event.get_master_event(top.config, top.config["sock_dir"], listen=False) as bus:
        bus.fire_event(forged, f"salt/beacon/{gw_b}/tributary_mqtt/batch")
    letters = wait_for(
        lambda: [
            d
            for d in deadletters(es, "bad_signature")
            if d["gateway"] == gw_b and d["original"].get("epoch") == "forged2"
        ],
        timeout=60,
        what="the batch signed by syndic-1's key under a gateway's name dead-lettered",
    )
    assert letters[0]["stage"] == "origin"
    q = {"bool": {"must": [{"term": {"gateway": gw_b}}, {"term": {"epoch": "forged2"}}]}}
    assert es.count("tributary-readings-*", q) == 0
