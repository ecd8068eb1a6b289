"""Fault tests with real daemons: each ends with Elasticsearch holding exactly the readings
published, with zero duplicates. One topology (``conftest.py``) is shared; the tests run in the
order of this file, the cheap ones first. Outage lengths are the scenarios of issue 4.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from saltext.tributary import signing
from saltext.tributary.wire import MAX_SENSORS, SpooledReading, encode_batch
from tests.conftest import dumps, es_count, es_readings, wait_for
from tests.integration.faults.conftest import FGATEWAYS
from tests.integration.faults.helpers import Stream, assert_exactly, sleep_outage

pytestmark = pytest.mark.usefixtures("faults")

GW_A, GW_B = list(FGATEWAYS)


def relay_status(top) -> dict:
    ret = top.salt_run_cli(timeout=60).run("tributary.status")
    assert ret.returncode == 0, ret
    return ret.data


def deadletters(es, gateway: str) -> list[dict]:
    res = es.search(
        "tributary-deadletter-*",
        {"size": 1000, "query": {"term": {"gateway": gateway}}},
    )
    return [h["_source"] for h in res["hits"]["hits"]]


def test_mapping_conflict_dead_letters_one_doc_and_indexes_the_rest(faults):
    es, brokers = faults["es"], faults["brokers"]
    # An index for one past day whose mapping refuses the documents' unit (keyword there).
    code, body = es.request(
        "PUT",
        "/tributary-readings-2001.01.01",
        json.dumps({"mappings": {"properties": {"unit": {"type": "integer"}}}}).encode(),
    )
    assert code == 200, body
    now = int(time.time() * 1000)
    old = 978_350_400_000  # 2001-01-01T12:00Z
    msgs = [dumps({"ts": old if i == 5 else now - 1000 + i, "temp": 20 + i}) for i in range(12)]
    brokers[GW_A].publish("json/f5-conflict", msgs)
    wait_for(lambda: es_count(es, GW_A, "f5-conflict") >= 11, timeout=120, what="11 indexed")
    wait_for(
        lambda: [d for d in deadletters(es, GW_A) if d.get("stage") == "index"],
        timeout=60,
        what="the dead letter",
    )
    (dl,) = [d for d in deadletters(es, GW_A) if d.get("stage") == "index"]
    assert dl["reason"] in ("document_parsing_exception", "mapper_parsing_exception"), dl
    assert dl["original"]["sensor"] == "f5-conflict" and dl["original"]["value"] == 25.0
    docs = es_readings(es, GW_A, "f5-conflict")
    assert sorted(d["value"] for d in docs) == [20.0 + i for i in range(12) if i != 5]
    # the rejected reading belongs to the same batch range as the indexed ones
    seq = int(dl["doc_id"].rsplit(":", 1)[1])
    assert min(d["seq"] for d in docs) < seq < max(d["seq"] for d in docs)
    status = relay_status(faults["top"])
    assert status["fleet"]["counters"].get("dead_lettered", 0) >= 1
    assert status["gateways"][GW_A]["dead_lettered"] >= 1
    assert status["gateways"][GW_A]["last_seq"] >= max(d["seq"] for d in docs)


def _sign(batch: dict, factory) -> dict:
    return signing.sign_batch(batch, {"id": factory.id, "pki_dir": factory.config["pki_dir"]})


def _batch(epoch: str, sensor: str, first: int = 1, n: int = 3) -> dict:
    rows = [
        SpooledReading(first + i, f"{sensor}/temperature", "C", int(time.time() * 1000), 1.0 + i)
        for i in range(n)
    ]
    return encode_batch(epoch, rows, site="brisbane")


def test_malformed_and_forged_batches_rejected_with_reasons(faults):
    es, top, gateways, brokers = faults["es"], faults["top"], faults["gateways"], faults["brokers"]
    a = gateways[GW_A]
    ok = Stream(brokers, "f6-ok", per_tick=10)
    ok.tick()
    forged = _sign(_batch("f6-forged", "f6-forged"), a)
    unsigned = _batch("f6-unsigned", "f6-unsigned")
    bad_version = _sign({**_batch("f6-v", "f6-v"), "v": 2}, a)
    bad_types = _sign({**_batch("f6-t", "f6-t"), "first": "one"}, a)
    oversized = _batch("f6-big", "f6-big", n=1)
    oversized["sensors"] = [f"s{i}/m" for i in range(MAX_SENSORS + 1)]
    oversized["units"] = [""] * (MAX_SENSORS + 1)
    oversized["d"] = [None] * (MAX_SENSORS + 1)
    oversized = _sign(oversized, a)
    bad_row = _batch("f6-row", "f6-row")
    bad_row["r"][1][2] = "hot"
    bad_row = _sign(bad_row, a)
    sends = [
        (forged, GW_B),  # gateway A's batch published under gateway B's name
        (unsigned, GW_A),
        (bad_version, GW_A),
        (bad_types, GW_A),
        (oversized, GW_A),
        (bad_row, GW_A),
    ]
    for data, claimed in sends:
        ret = a.salt_call_cli(timeout=60).run(
            "event.fire_master", json.dumps(data), f"salt/beacon/{claimed}/tributary_mqtt/batch"
        )
        assert ret.returncode == 0 and ret.data is True, ret
    ok.tick()
    want = {
        (GW_B, "bad_signature"),
        (GW_A, "unsigned"),
        (GW_A, "bad_version"),
        (GW_A, "bad_field"),
        (GW_A, "oversized"),
        (GW_A, "not_numeric"),
    }

    def reasons() -> set:
        return {(gw, d["reason"]) for gw in FGATEWAYS for d in deadletters(es, gw)}

    wait_for(lambda: want <= reasons(), timeout=120, what=f"dead letters {want}")
    # the good rows of the batch with one bad row are indexed; nothing of the forged one is
    assert sorted(d["value"] for d in es_readings(es, GW_A, "f6-row")) == [1.0, 3.0]
    assert es_count(es, GW_B, "f6-forged") == 0 and es_count(es, GW_A, "f6-forged") == 0
    for sensor in ("f6-unsigned", "f6-v", "f6-t", "f6-big"):
        assert es_count(es, GW_A, sensor) == 0
    # nothing else disturbed
    assert_exactly(es, ok)
    counters = relay_status(top)["fleet"]["counters"]
    for reason in ("bad_signature", "unsigned", "bad_version", "bad_field", "oversized"):
        assert counters.get(f"rejected:{reason}", 0) >= 1, (reason, counters)


def test_elasticsearch_down_two_minutes(faults):
    es, brokers = faults["es"], faults["brokers"]
    stream = Stream(brokers, "f1-es-down", per_tick=20, every=2)
    stream.tick()
    assert_exactly(es, stream)
    stream.start()
    es.stop()
    down = time.monotonic()
    sleep_outage(120, down)
    es.start()
    stream.stop()
    stream.tick()
    assert_exactly(es, stream)


def test_syndic_sigkill_mid_stream(faults):
    es, syndic, brokers = faults["es"], faults["syndic"], faults["brokers"]
    stream = Stream(brokers, "f3-syndic-kill", per_tick=10, every=0.5).start()
    time.sleep(3)  # mid-stream
    os.kill(syndic.pid, signal.SIGKILL)
    wait_for(lambda: not syndic.is_running(), timeout=30, what="salt-syndic gone")
    time.sleep(3)  # the stream goes on while the syndic is dead
    syndic.terminate()
    syndic.start()
    time.sleep(3)
    stream.stop()
    stream.tick()
    assert_exactly(es, stream)


def test_top_master_stopped_one_minute(faults):
    es, top, brokers = faults["es"], faults["top"], faults["brokers"]
    stream = Stream(brokers, "f2-top-down", per_tick=10, every=1).start()
    time.sleep(3)
    top.terminate()
    down = time.monotonic()
    sleep_outage(60, down)
    top.start()
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, timeout=300)


def test_syndic_master_down_one_minute_gaps_replayed(faults):
    es, top, syndic, brokers = faults["es"], faults["top"], faults["syndic"], faults["brokers"]
    before = relay_status(top)["fleet"]["counters"].get("replays_requested", 0)
    stream = Stream(brokers, "f4-lost", per_tick=10, every=1).start()
    time.sleep(3)
    syndic.master.terminate()
    down = time.monotonic()
    sleep_outage(60, down)
    syndic.master.start()
    if not syndic.is_running():
        syndic.start()
    time.sleep(5)
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, timeout=300)
    status = relay_status(top)
    assert status["fleet"]["counters"].get("replays_requested", 0) > before, status
    ret = top.salt_run_cli(timeout=60).run("tributary.gaps", given_up=False)
    assert ret.returncode == 0, ret
