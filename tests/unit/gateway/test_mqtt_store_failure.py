"""A message whose readings the spool cannot store is rejected, counted and acknowledged: it
never blocks the messages behind it (no broker needed: the flush is called directly)."""

from __future__ import annotations

from collections import Counter

import pytest

from saltext.tributary.gateway.sources.mqtt import BrokerConfig, MqttSource, storable
from saltext.tributary.gateway.sources.payload import Mapper, compile_rules
from saltext.tributary.gateway.spool import GatewaySpool
from saltext.tributary.protocol.reading import Reading, make_reading

pytest.importorskip("paho.mqtt.client")

T0 = 1_700_000_000_000


def source(path: str) -> MqttSource:
    rules = compile_rules([{"topic": "s/{sensor}/{metric}"}])
    return MqttSource(BrokerConfig(client_id="gw-store"), Mapper(rules), path)


def test_unstorable_readings_are_rejected_and_the_rest_committed(tmp_path):
    path = str(tmp_path / "spool.db")
    src = source(path)
    spool = GatewaySpool(path)
    good = [make_reading("t1", "temperature", 20.0 + i, T0 + i, "C") for i in range(3)]
    # built around make_reading's checks (a unit that is not text), as a parser bug would
    bad = Reading("t2", "temperature", 1.0, T0, {"not": "a unit"})  # type: ignore[arg-type]
    assert not storable(bad) and all(storable(r) for r in good)
    src._append(spool, [good[0], bad, *good[1:]], Counter({"received": 2}), [], [(7, b"d")], [])
    assert [r["value"] for r in spool.tail(10)] == [20.0, 21.0, 22.0]
    counters = spool.counters()
    assert counters["rejected:store_error"] == 1 and counters["received"] == 2
    # the message is recorded as committed: a redelivery would be recognised, not renumbered
    assert spool.committed_unacked("gw-store", 7, b"d")
    spool.close()
