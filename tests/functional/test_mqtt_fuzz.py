"""Fuzz the gateway's MQTT intake through a real Mosquitto broker into a real beacon.

Thousands of generated and mutated payloads (every payload format, random bytes, deep nesting,
huge fields, odd unicode in topics) are published, each followed by a good reading. Every good
reading must be emitted exactly once, every message counted as received, and the beacon must
keep running and emitting.

The publisher is a paho-mqtt client on one connection (QoS 1, each publish confirmed by the
broker): ``mosquitto_pub`` starts a process per message, which measured 150 ms per junk/good
pair here, too slow for thousands of messages in the suite.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saltext.tributary.gateway import beacons as gw_beacons
from saltext.tributary.gateway import config as gw_config
from saltext.tributary.protocol.wire import decode_batch
from tests.support.topology import wait_for

EXAMPLES = 70  # 2,100 hostile messages, each followed by a good one
PER_EXAMPLE = 30  # junk messages per example (each followed by a good one)

RULES = [
    {"topic": "num/{sensor}/{metric}", "format": "number", "unit": "C"},
    {
        "topic": "json/{sensor}",
        "format": "json",
        "fields": {"t": "temperature", "env.h": {"metric": "humidity", "unit": "%"}},
        "timestamp": {"field": "ts", "format": "ms"},
    },
    {"topic": "senml/{sensor}", "format": "senml"},
    {"topic": "flat/{sensor}", "format": "flat"},
    {"topic": "good/{sensor}/{metric}", "format": "number"},
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=40,
)
senml_records = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            k: scalars | json_values
            for k in ("bn", "bt", "bu", "bv", "n", "u", "v", "t", "vs", "vb")
        },
    ),
    max_size=8,
)


def _dump(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=200).map(str.encode),
    json_values.map(_dump),
    senml_records.map(_dump),
    st.sampled_from(["1e999", "nan", "-inf", " 12 ", "0x10", "1_000", "", "\x00"]).map(str.encode),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),  # deep
    st.integers(min_value=60_000, max_value=200_000).map(
        lambda n: _dump({"t": 1, "big": "x" * n})  # a huge field
    ),
    json_values.map(_dump).map(lambda b: b[: len(b) // 2]),  # truncated (mutated) JSON
)
odd_names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Cn"), blacklist_characters="+#/\x00"),
    min_size=1,
    max_size=40,
)
topics = st.tuples(st.sampled_from(["num", "json", "senml", "flat", "other"]), odd_names).map(
    lambda t: f"{t[0]}/{t[1]}/value" if t[0] == "num" else f"{t[0]}/{t[1]}"
)


class Publisher:
    """One MQTT connection to the broker; ``send`` returns once the broker has the message."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz-pub")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=30)
        assert info.is_published(), f"broker did not take {topic!r}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def fuzz_broker():
    if not shutil.which("mosquitto_pub") or not (
        shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")
    ):
        pytest.skip("mosquitto is not installed")
    from tests.support.mosquitto import start_broker

    b = start_broker()
    b.publisher = Publisher(b.port)
    yield b
    b.publisher.close()
    b.cleanup()


@pytest.fixture(scope="module")
def fuzz_beacon(fuzz_broker, tmp_path_factory):
    from tests.unit.protocol.test_signing import _keypair

    path = tmp_path_factory.mktemp("fuzz") / "spool.db"
    pki, _ = _keypair(tmp_path_factory.mktemp("pki"), "fuzz-gw")
    opts = {"id": "fuzz-gw", "pki_dir": pki}
    cfg = [
        {"broker": {"host": "127.0.0.1", "port": fuzz_broker.port, "client_id": "fuzz"}},
        {"topics": RULES},
        {"spool": {"path": str(path)}},
        {"site": "fuzz"},
    ]
    assert gw_config.validate_mqtt(cfg) == (True, "valid")
    gw_beacons.run_mqtt_beacon(cfg, opts, {})  # starts the subscriber
    spool = gw_beacons.emitting_spool(gw_config.config_to_dict(cfg), opts)
    wait_for(lambda: spool.status()["state"].get("broker") == "subscribed", 30, "subscription")
    state = {"cfg": cfg, "opts": opts, "spool": spool, "sent": 0, "good": 0, "events": []}
    yield state
    gw_beacons.stop_sources()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.tuples(topics, payloads), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_junk_never_blocks_good_readings(fuzz_beacon, fuzz_broker, messages):
    s = fuzz_beacon
    for topic, payload in messages:
        fuzz_broker.publisher.send(topic, payload)
        fuzz_broker.publisher.send("good/fuzzgood/seq", str(s["good"]).encode())
        s["good"] += 1
        # "other/..." matches no rule, so the beacon never subscribed to it
        s["sent"] += 1 if topic.startswith("other/") else 2
    spool = s["spool"]
    wait_for(
        lambda: spool.status()["counters"].get("received", 0) >= s["sent"],
        60,
        f"{s['sent']} messages received",
    )
    s["events"] += gw_beacons.run_mqtt_beacon(s["cfg"], s["opts"], {})  # the beacon keeps emitting


def test_every_good_reading_arrived_exactly_once(fuzz_beacon):
    s = fuzz_beacon
    assert s["good"] >= 2000, s["good"]  # thousands of hostile payloads went through
    print(f"fuzz: {s['good']} junk messages, {s['sent']} received")
    spool = s["spool"]
    assert spool.status()["counters"]["received"] == s["sent"]
    for _ in range(200):  # drain the rest of the spool through the beacon
        out = gw_beacons.run_mqtt_beacon(s["cfg"], s["opts"], {})
        if not out:
            break
        s["events"] += out
    good = [
        r["value"]
        for e in s["events"]
        for r in decode_batch(e).readings
        if r["sensor"] == "fuzzgood"
    ]
    assert sorted(good) == [float(i) for i in range(s["good"])]
    assert spool.status()["state"]["broker"] == "subscribed"
