"""Fault tests with real daemons: each ends with Elasticsearch holding exactly the readings
published, with zero duplicates. One topology (``conftest.py``) is shared; the tests run in the
order of this file, the cheap ones first. Outage lengths are the scenarios of issue 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import time

import psutil
import pytest

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import MAX_SENSORS, SpooledReading, encode_batch
from tests.integration.faults.conftest import FGATEWAYS
from tests.integration.faults.helpers import Stream, assert_exactly, sleep_outage
from tests.support.topology import (
    SALT_VERSION,
    dumps,
    es_count,
    es_readings,
    gateway_subscribed,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("faults")

GW_A, GW_B = list(FGATEWAYS)


def relay_status(top) -> dict:
    ret = top.salt_run_cli(timeout=60).run("tributary.status", detail=True)
    assert ret.returncode == 0, ret
    return ret.data


def _spool_meta(factory, key: str) -> str | None:
    """A meta value of a gateway's spool, read from its SQLite file (works while the minion
    and its master are down)."""
    path = pathlib.Path(factory.config["cachedir"]) / "tributary" / "spool.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        row = db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
    return row[0] if row else None


def spool_cursor(factory) -> int:
    """The last sequence the gateway's beacons have emitted."""
    return int(_spool_meta(factory, "cursor") or 0)


def spool_epoch(factory) -> str:
    return str(_spool_meta(factory, "epoch"))


def power_cut(factory) -> None:
    """SIGKILL a minion's whole process tree at once, as a power cut would."""
    root = psutil.Process(factory.pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    factory.terminate()


def silent_gateways(top) -> set[str]:
    """Gateways with an open ``gateway_silent`` finding (``salt-run tributary.health``)."""
    ret = top.salt_run_cli(timeout=60).run("tributary.health", check_es=False, detail=True)
    assert ret.returncode == 0, ret
    return {
        f["gateway"]
        for site in ret.data["sites"].values()
        for f in site["device"]
        if f["kind"] == "gateway_silent"
    }


def deadletters(es, gateway: str) -> list[dict]:
    res = es.search(
        "tributary-deadletter-*",
        {"size": 1000, "query": {"term": {"gateway": gateway}}},
    )
    return [h["_source"] for h in res["hits"]["hits"]]


def test_mapping_conflict_dead_letters_one_doc_and_indexes_the_rest(faults):
    es, brokers = faults["es"], faults["brokers"]
    # An index for one past day (within the relay's max_age_s) whose mapping refuses the
    # documents' unit (keyword there).
    now = int(time.time() * 1000)
    old = (now // 86_400_000 - 10) * 86_400_000 + 43_200_000  # noon UTC, ten days ago
    day = time.strftime("%Y.%m.%d", time.gmtime(old / 1000))
    code, body = es.request(
        "PUT",
        f"/tributary-readings-{day}",
        json.dumps({"mappings": {"properties": {"unit": {"type": "integer"}}}}).encode(),
    )
    assert code == 200, body
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
    back = time.monotonic()
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, recovered_from=back)


def test_syndic_sigkill_mid_stream(faults):
    es, syndic, brokers = faults["es"], faults["syndic"], faults["brokers"]
    stream = Stream(brokers, "f3-syndic-kill", per_tick=10, every=0.5).start()
    stream.wait_ticks(6)  # mid-stream
    os.kill(syndic.pid, signal.SIGKILL)
    wait_for(lambda: not syndic.is_running(), timeout=30, what="salt-syndic gone")
    stream.wait_ticks(6)  # the stream goes on while the syndic is dead
    syndic.terminate()
    syndic.start()
    back = time.monotonic()
    stream.wait_ticks(6)
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, recovered_from=back)


def saved_model(top, gateway: str, series: str) -> dict:
    ret = top.salt_run_cli(timeout=60).run("tributary.model", gateway, series)
    return ret.data if ret.returncode == 0 and ret.data.get("result") else {}


def test_top_master_stopped_one_minute(faults):
    """...and the detector's models come back from their saved state (no relearning)."""
    es, top, brokers = faults["es"], faults["top"], faults["brokers"]
    stream = Stream(brokers, "f2-top-down", per_tick=10, every=1).start()
    series = "f2-top-down/temperature"
    before = wait_for(
        lambda: (m := saved_model(top, GW_A, series)).get("samples", 0) >= 100 and m,
        timeout=120,
        what="a saved model with 100 samples",
    )
    top.terminate()
    down = time.monotonic()
    sleep_outage(60, down)
    top.start()
    back = time.monotonic()
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, timeout=300, recovered_from=back)
    # every reading was scored once by a model that kept learning across the restart: a model
    # lost with the process would hold only what came after it (at most N - 100)
    n = len(stream.sent[GW_A])
    after = wait_for(
        lambda: (m := saved_model(top, GW_A, series)).get("samples", 0) >= n - 20 and m,
        timeout=60,
        what=f"the model restored and fed all {n} readings",
    )
    assert after["samples"] > before["samples"] and after["state"] != "learning"


def test_syndic_master_down_one_minute_gaps_replayed(faults):
    """The gateways' master is down for a minute and one gateway loses power in the middle.

    What gateway B's beacon emits while its master is down can only wait in the memory of B's
    minion (Salt 3007 holds or drops beacon events while the master is unreachable), so
    killing B's whole process tree loses it in transit for certain: those readings are past
    the cursor of B's spool and nowhere else. Gap repair must bring every one of them back
    exactly once. Gateway A rides the outage out: Salt may deliver what it queued after the
    master returns, or drop it and gap repair replays it; either way each reading arrives once.
    """
    es, top, syndic = faults["es"], faults["top"], faults["syndic"]
    brokers, gateways = faults["brokers"], faults["gateways"]
    gw_b = gateways[GW_B]
    status_before = relay_status(top)
    before = status_before["gateways"].get(GW_B, {}).get("replays_requested", 0)
    # the ledger's gap counters, as `salt-run tributary.status` reports them (relay.counters)
    # (replays_answered: the gateway's answer to a replay job came back on the top's bus)
    gaps_before = {
        k: status_before["relay"]["counters"].get(k, 0)
        for k in ("gaps_opened", "gaps_repaired", "replays_answered")
    }
    stream = Stream(brokers, "f4-lost", per_tick=10, every=1).start()
    wait_for(lambda: es_count(es, GW_B, "f4-lost") > 0, timeout=60, what="f4 readings flowing")
    # The top judges B silent from the last heartbeat its relay holds: have one before the
    # outage (run alone, right after the topology starts, B's first heartbeat may not be there;
    # on Salt 3006.29 it was not, and B was never found silent).
    wait_for(
        lambda: relay_status(top)["gateways"].get(GW_B, {}).get("gateway_spool"),
        timeout=30,
        what=f"a heartbeat of {GW_B} held by the top's relay",
    )
    syndic.master.terminate()
    down = time.monotonic()
    # Everything past this cursor is emitted while no master runs.
    first_lost = spool_cursor(gw_b) + 1
    wait_for(
        lambda: spool_cursor(gw_b) >= first_lost + 100,
        timeout=45,
        what=f"{GW_B} emitting 100 readings while its master is down",
    )
    power_cut(gw_b)
    last_lost = spool_cursor(gw_b)
    # no heartbeat for three intervals (5 s each): the top master finds the gateways silent
    wait_for(lambda: GW_B in silent_gateways(top), timeout=50, what=f"{GW_B} found silent")
    sleep_outage(60, down)
    syndic.master.start()
    if not syndic.is_running() or SALT_VERSION < (3007,):
        # Salt 3006's salt-syndic keeps its restarted master's old root key and cannot
        # publish jobs down any more ("Unable to forward pub data: Authentication error
        # occurred", measured): it needs a restart with its master (README, Versions tested).
        syndic.terminate()
        syndic.start()
    gw_b.start()
    back = time.monotonic()
    wait_for(lambda: gateway_subscribed(gw_b), timeout=120, what=f"{GW_B} back and subscribed")
    after_restart = len(stream.sent[GW_B])
    wait_for(
        lambda: es_count(es, GW_B, "f4-lost") > after_restart,
        timeout=120,
        what=f"{GW_B}'s readings flowing again",
    )
    stream.stop()
    stream.tick()
    assert_exactly(es, stream, timeout=300, recovered_from=back)
    # The range lost with B's minion is complete in Elasticsearch (all sensors; sequence
    # numbers are contiguous per gateway spool), and gap repair is what brought it back.
    epoch = spool_epoch(gw_b)
    lost = es.count(
        "tributary-readings-*",
        {
            "bool": {
                "must": [
                    {"term": {"gateway": GW_B}},
                    {"term": {"epoch": epoch}},
                    {"range": {"seq": {"gte": first_lost, "lte": last_lost}}},
                ]
            }
        },
    )
    assert lost == last_lost - first_lost + 1, (first_lost, last_lost, lost)
    # the relay persists its counters with its next confirmed bulk (heartbeats every 5 s)
    wait_for(
        lambda: relay_status(top)["gateways"][GW_B]["replays_requested"] > before,
        timeout=60,
        what=f"a replay requested from {GW_B}",
    )

    def open_gaps_in_lost_range() -> list:
        ret = top.salt_run_cli(timeout=60).run("tributary.gaps", gateway=GW_B)
        assert ret.returncode == 0, ret
        return [g for g in ret.data if g["epoch"] == epoch and g["from"] <= last_lost]

    # none open, none given up (a heartbeat may open a short-lived tail gap past the range)
    wait_for(lambda: not open_gaps_in_lost_range(), timeout=60, what="the lost range closed")
    # The ledger counted the lost range's gap opening and then closing after a replay request
    # (gaps_repaired, not gaps_filled). The status runner refreshes the ledger after reading the
    # counters, so a close it just saw shows in its next answer: poll.
    gap_counts: dict[str, int] = {}

    def gap_counters_rose() -> bool:
        counters = relay_status(top)["relay"]["counters"]
        gap_counts.update({k: counters.get(k, 0) for k in gaps_before})
        return all(gap_counts[k] > gaps_before[k] for k in gaps_before)

    try:
        wait_for(gap_counters_rose, timeout=30, what="the gap and replay counters rising")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: before {gaps_before}, now {gap_counts}") from None
    wait_for(lambda: GW_B not in silent_gateways(top), timeout=60, what=f"{GW_B} cleared")
