"""The relay indexes a gateway's command records in ``<prefix>-commands-*`` with the reading
id scheme (a replay rewrites nothing), takes the gateway from the proven origin, and
dead-letters a record of a kind it does not know with its reason."""

from __future__ import annotations

import time

import msgpack

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from saltext.tributary.relay.documents import command_doc
from saltext.tributary.relay.elasticsearch import KINDS
from tests.unit.relay.test_relay import TAG, bulk_ops, make_relay, publish_keys

NOW = int(time.time() * 1000)
RECORD = {
    "device": "boiler-1",
    "command": "setpoint",
    "payload": 70,
    "correlation_id": "0123456789abcdef",
    "outcome": "acked",
    "answer": {"id": "0123456789abcdef", "status": "ok"},
    "latency_ms": 12.5,
    "user": "root",
    "jid": "20261130113000123456",
    "topic": "cmd/boiler-1/setpoint",
    "qos": 1,
    "gateway": "someone-else",  # a record cannot say who sent it: the origin does
}


def signed(gw, keys, kind="@command", body=RECORD):
    rows = [
        SpooledReading(1, "t1/temperature", "C", NOW, 20.5),
        SpooledReading(2, kind, "", NOW + 1, 0.0, body),
    ]
    b = encode_batch("ep1", rows, site="brisbane")
    # what Salt's transport does to event data
    b = msgpack.unpackb(msgpack.packb(b, use_bin_type=True), raw=False)
    signing.sign_batch(b, {"id": gw, "pki_dir": keys[gw][0]})
    return b


def test_a_command_record_becomes_a_commands_document(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys))
    _, ops, bodies = bulk_ops(relay)
    by_index = {
        o["create"]["_index"].split("-")[1]: (o, b) for o, b in zip(ops, bodies, strict=True)
    }
    assert set(by_index) == {"readings", "commands"}
    op, doc = by_index["commands"]
    assert op["create"]["_id"] == "gw-a:ep1:2"
    assert doc["gateway"] == "gw-a" and doc["site"] == "brisbane"
    assert doc["@timestamp"] == NOW + 1 and doc["seq"] == 2 and doc["epoch"] == "ep1"
    assert doc["payload"] == "70" and doc["payload_value"] == 70
    assert doc["outcome"] == "acked" and doc["latency_ms"] == 12.5
    assert doc["answer"] == {"id": "0123456789abcdef", "status": "ok"}
    assert doc["user"] == "root" and doc["jid"] == "20261130113000123456"
    # every field it writes is mapped (the commands mapping is not dynamic)
    assert set(doc) - {"relayed_at"} <= set(KINDS["commands"].properties)


def test_an_unknown_record_kind_is_dead_lettered_with_its_reason(tmp_path, master_pki, keys):
    relay = make_relay(tmp_path, master_pki)
    publish_keys(relay, keys)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, kind="@firmware", body={"x": 1}))
    plan, ops, bodies = bulk_ops(relay)
    kinds = [o["create"]["_index"].split("-")[1] for o in ops]
    assert sorted(kinds) == ["deadletter", "readings"]
    letter = bodies[kinds.index("deadletter")]
    assert letter["reason"] == "unknown_kind" and "firmware" in letter["detail"]
    # the range is still accounted for: the ledger sees 1..2 once this bulk is confirmed
    assert next(iter(plan.rows.values())).range == ("gw-a", "ep1", 1, 2)


def test_command_doc_keeps_odd_fields_out():
    doc = command_doc(
        "gw", None, "ep", 5, NOW, {"device": 5, "payload": {"a": [1]}, "answer": "x"}, NOW
    )
    assert "device" not in doc and doc["payload"] == '{"a": [1]}' and "payload_value" not in doc
    assert doc["answer"] == {"value": "x"}
