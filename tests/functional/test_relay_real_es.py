"""The relay's shipper against a real Elasticsearch whose request limit is small.

A node started with ``http.max_content_length: 1mb`` answers 413 to any bulk over 1 MiB, as a
cluster configured below the relay's ``bulk.max_bytes`` does: the bulk is split until its parts
fit, and every reading is created exactly once. The same node answers 409 for ids already
taken: a re-sent reading is counted as already present, a different reading under a taken id
is an id collision (counted, dead-lettered with what is stored).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.elasticsearch import install_templates
from saltext.tributary.relay.pipeline import Relay
from tests.unit.protocol.test_signing import _keypair

TAG = "salt/beacon/{}/tributary_mqtt/batch"


@pytest.fixture(scope="module")
def small_es():
    from tests.support.es import running_elasticsearch

    try:
        with running_elasticsearch(
            heap_mb=512, extra_settings={"http.max_content_length": "1mb"}
        ) as node:
            yield node
    except RuntimeError as exc:
        if "make setup" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture
def relay(tmp_path, small_es):
    base = tmp_path / "keys"
    keys = {name: _keypair(base, name) for name in ("gw-a", "syndic-1")}
    pki = tmp_path / "master-pki"
    (pki / "minions").mkdir(parents=True)
    (pki / "minions" / "syndic-1").write_text(keys["syndic-1"][1])
    cfg = RelayConfig(
        spool_path=str(tmp_path / "relay.db"),
        pki_dir=str(pki),
        trusted_syndics=["syndic-1"],
        elasticsearch=small_es.client_config,
    )
    client = small_es.client()
    install_templates(client, "tributary", replicas=0)  # as the engine does at start
    r = Relay(client, cfg)
    keyset = signing.sign_keyset(
        "syndic-1", {"gw-a": keys["gw-a"][1]}, os.path.join(keys["syndic-1"][0], "minion.pem")
    )
    assert r.accept("syndic/syndic-1/tributary/keys/syndic-1", keyset)
    r.test_pki = keys["gw-a"][0]
    return r


def batch(relay, epoch: str, first: int, n: int, value: float = 20.0) -> dict:
    now = int(time.time() * 1000)
    rows = [
        SpooledReading(first + i, f"s{i % 50}/temperature", "C", now - n + i, value)
        for i in range(n)
    ]
    b = encode_batch(epoch, rows, site="x")
    signing.sign_batch(b, {"id": "gw-a", "pki_dir": relay.test_pki})
    return b


def ship_all(relay, rounds: int = 20) -> None:
    for _ in range(rounds):
        plan = relay.prepare(relay.spool)
        if plan is None:
            return
        relay.finish(relay.spool, plan, relay.shipper.send(plan))
    raise AssertionError("the spool did not drain")


def stored(es, epoch: str) -> list[int]:
    es.refresh("tributary-readings-*")
    q = {"term": {"epoch": epoch}}
    res = es.search("tributary-readings-*", {"size": 10000, "query": q, "sort": [{"seq": "asc"}]})
    return [h["_source"]["seq"] for h in res["hits"]["hits"]]


def test_a_bulk_over_the_clusters_limit_is_split_and_indexed_once(relay, small_es):
    for k in range(10):  # 5,000 readings: one bulk of ~1.35 MB by the relay's own bounds
        assert relay.accept(TAG.format("gw-a"), batch(relay, "big1", 1 + 500 * k, 500))
    t0 = time.monotonic()
    ship_all(relay)
    took = time.monotonic() - t0
    counters = relay.spool.counters()
    print(f"413: {counters.get('bulks_split')} splits, 5,000 readings in {took:.1f} s")
    assert counters.get("bulks_split", 0) >= 1, counters
    assert stored(small_es, "big1") == list(range(1, 5001))  # each exactly once
    assert relay.spool.depth()[0] == 0


def test_a_409_is_a_duplicate_only_when_the_stored_reading_is_the_same(relay, small_es):
    first = batch(relay, "rst1", 1, 3, value=20.0)
    assert relay.accept(TAG.format("gw-a"), first)
    ship_all(relay)
    assert stored(small_es, "rst1") == [1, 2, 3]
    # the same readings sent again (a replay): already present, not a collision
    relay.intake._recent.clear()  # past the intake's de-duplication window
    assert relay.accept(TAG.format("gw-a"), json.loads(json.dumps(first)))
    ship_all(relay)
    counters = relay.spool.counters()
    assert counters.get("already_present", 0) == 3 and not counters.get("id_collisions"), counters
    # other readings under the same ids (a spool restored from a backup, same epoch)
    assert relay.accept(TAG.format("gw-a"), batch(relay, "rst1", 2, 2, value=99.0))
    ship_all(relay)
    counters = relay.spool.counters()
    assert counters.get("id_collisions") == 2, counters
    assert counters.get("already_present") == 3, counters
    small_es.refresh("tributary-deadletter-*")
    res = small_es.search(
        "tributary-deadletter-*", {"size": 10, "query": {"term": {"reason": "id_collision"}}}
    )
    assert len(res["hits"]["hits"]) == 2
    res = small_es.search(
        "tributary-readings-*", {"size": 10, "query": {"term": {"epoch": "rst1"}}}
    )
    assert {h["_source"]["value"] for h in res["hits"]["hits"]} == {20.0}  # the first stays


def test_templates_leave_the_refresh_interval_to_elasticsearch_unless_set(small_es):
    """Unset, Elasticsearch skips refreshes of shards nobody searches; any value set, even
    its default 1s, turns that off (relay/elasticsearch.py)."""
    client = small_es.client()

    def index_settings(name: str) -> dict:
        client.indices.create(index=name)
        return client.indices.get_settings(index=name)[name]["settings"]["index"]

    install_templates(client, "refresh", replicas=0)
    assert "refresh_interval" not in index_settings("refresh-readings-a")
    install_templates(client, "refresh", replicas=0, refresh_interval="5s")
    assert index_settings("refresh-readings-b")["refresh_interval"] == "5s"
