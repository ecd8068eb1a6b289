"""How the shipper treats a bulk Elasticsearch refuses as a whole or in part.

The client here answers as Elasticsearch does for the cases a live cluster cannot be made to
produce on demand (413 for a body over ``http.max_content_length``, per-document 429); it raises
the real ``elasticsearch.ApiError`` the client library raises. Shipping to a real cluster is
covered by the integration tests.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import elasticsearch
import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig

from saltext.tributary.relay.config import BulkConfig
from saltext.tributary.relay.shipper import http_status
from tests.unit.relay.test_planner import NOW, signed
from tests.unit.relay.test_relay import TAG, make_relay, publish_keys


def api_error(status: int) -> elasticsearch.ApiError:
    meta = ApiResponseMeta(status, "1.1", HttpHeaders(), 0.01, NodeConfig("http", "h", 9200))
    return elasticsearch.ApiError(f"status {status}", meta, {})


class Cluster:
    """Answers bulks: a request over ``max_body`` bytes gets 413; a document whose ``seq`` is in
    ``busy`` gets 429 (every time); a create of an id already stored gets 409; every other
    document is created (and can be read back with ``mget``)."""

    def __init__(self, max_body: int = 10**9, busy: frozenset[int] = frozenset()) -> None:
        self.max_body = max_body
        self.busy = busy
        self.requests: list[int] = []
        self.created: list[dict] = []
        self.stored: dict[str, dict] = {}

    def mget(self, docs, source_includes=(), **_kw):
        out = []
        for d in docs:
            src = self.stored.get(d["_id"])
            found = {"_id": d["_id"], "found": src is not None}
            if src is not None:
                found["_source"] = {k: src[k] for k in source_includes if k in src}
            out.append(found)
        return {"docs": out}

    def bulk(self, operations: str, **_kw):
        self.requests.append(len(operations))
        if len(operations) > self.max_body:
            raise api_error(413)
        lines = operations.splitlines()
        items = []
        for action, source in zip(lines[0::2], lines[1::2], strict=True):
            meta, doc = json.loads(action)["create"], json.loads(source)
            if doc.get("seq") in self.busy:
                items.append({"create": {"_index": meta["_index"], "status": 429}})
                continue
            if meta.get("_id") in self.stored:
                items.append({"create": {"_index": meta["_index"], "status": 409}})
                continue
            if meta.get("_id"):
                self.stored[meta["_id"]] = doc
            self.created.append(doc)
            items.append({"create": {"_index": meta["_index"], "status": 201}})
        return {"errors": any(i["create"]["status"] != 201 for i in items), "items": items}


def relay_with(tmp_path, master_pki, keys, client, **kw):
    relay = make_relay(tmp_path, master_pki, **kw)
    relay.shipper.client = client
    publish_keys(relay, keys)
    return relay


def ship_all(relay, rounds: int = 10) -> None:
    for _ in range(rounds):
        plan = relay.prepare(relay.spool)
        if plan is None:
            return
        try:
            relay.finish(relay.spool, plan, relay.shipper.send(plan))
        except RuntimeError:
            continue  # rows to retry stay spooled


def test_status_of_client_errors():
    assert http_status(api_error(413)) == 413
    assert http_status(ConnectionError("refused")) is None


def test_a_413_splits_the_bulk_until_it_fits(tmp_path, master_pki, keys):
    es = Cluster(max_body=40_000)
    relay = relay_with(tmp_path, master_pki, keys, es, bulk=BulkConfig(max_bytes=1024**2))
    for i in range(4):
        relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=1 + 100 * i, n=100))
    ship_all(relay)
    assert sorted(d["seq"] for d in es.created) == list(range(1, 401))
    assert relay.spool.depth()[0] == 0
    assert relay.spool.counters()["bulks_split"] >= 3


def test_a_document_refused_alone_is_dead_lettered(tmp_path, master_pki, keys):
    es = Cluster(max_body=2_000)
    relay = relay_with(tmp_path, master_pki, keys, es)
    rows = signed("gw-a", keys, n=3)
    relay.accept(TAG.format("gw-a"), rows)
    big = signed("gw-a", keys, first=4, n=1, site="y" * 3_000)
    relay.accept(TAG.format("gw-a"), big)
    ship_all(relay)
    assert sorted(d["seq"] for d in es.created if "seq" in d) == [1, 2, 3]
    assert relay.spool.depth()[0] == 0
    # its dead letter (trimmed original) is larger than this cluster takes either: counted
    assert relay.spool.counters()["deadletter_failed"] == 1


@pytest.mark.parametrize("attempts", [1, 3])
def test_documents_answered_429_are_retried_then_dead_lettered(
    tmp_path, master_pki, keys, attempts
):
    es = Cluster(busy=frozenset({2}))
    relay = relay_with(tmp_path, master_pki, keys, es, bulk=BulkConfig(max_attempts=attempts))
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3))
    relay.accept(TAG.format("gw-b"), signed("gw-b", keys, n=3))
    ship_all(relay, rounds=attempts + 2)
    assert relay.spool.depth()[0] == 0
    created = {(d.get("gateway"), d.get("seq"), d.get("reason")) for d in es.created}
    assert ("gw-a", None, "retries_exhausted") in created
    assert {("gw-a", 1, None), ("gw-a", 3, None), ("gw-b", 1, None), ("gw-b", 3, None)} <= created
    # both rows were sent `attempts` times: seqs 1 and 3 answered 409 on every retry
    assert relay.spool.counters().get("already_present", 0) == 4 * (attempts - 1)


def test_a_409_for_another_reading_is_a_collision_not_a_duplicate(tmp_path, master_pki, keys):
    es = Cluster()
    relay = relay_with(tmp_path, master_pki, keys, es)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3))
    ship_all(relay)
    # the same readings again (a replay): already present, nothing else
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3, replay=1))
    # other readings under the same ids (a spool restored from a backup, say)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3, ts=NOW + 5_000))
    ship_all(relay)
    counters = relay.spool.counters()
    assert counters["already_present"] == 3  # the collisions are not among them
    assert counters["id_collisions"] == 3
    letters = [d for d in es.created if d.get("reason") == "id_collision"]
    assert sorted(d["original"]["seq"] for d in letters) == [1, 2, 3]
    assert relay.spool.gateway_counters()["gw-a"]["id_collisions"] == 3


def test_subscribers_get_the_readings_elasticsearch_created_once(tmp_path, master_pki, keys):
    es = Cluster()
    relay = relay_with(tmp_path, master_pki, keys, es)
    got: list = []
    tap = relay.subscribe(got.extend)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3))
    ship_all(relay)
    relay.accept(TAG.format("gw-a"), signed("gw-a", keys, n=3, replay=1))  # 409s: not again
    relay.accept(TAG.format("gw-b"), signed("gw-b", keys, n=2, d=[99]))  # refused: nothing
    ship_all(relay)
    assert tap.drain()
    assert [(g, r["seq"]) for g, _site, _ep, _now, r in got] == [
        ("gw-a", 1),
        ("gw-a", 2),
        ("gw-a", 3),
    ]
    tap.close()


class HeldCluster(Cluster):
    """A :class:`Cluster` that holds its first bulk's answer until a second bulk arrives or
    ``hold_s`` passes, and records whether they overlapped."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s
        self.arrived = threading.Condition()
        self.docs: list[int] = []
        self.overlapped: bool | None = None

    def bulk(self, operations: str, **kw):
        with self.arrived:
            self.docs.append(operations.count("\n") // 2)
            self.arrived.notify_all()
            if len(self.docs) == 1:
                self.overlapped = self.arrived.wait_for(lambda: len(self.docs) > 1, self.hold_s)
        return super().bulk(operations, **kw)


@pytest.mark.parametrize(
    ("batches", "overlapped"),
    [
        # 500 readings waiting, bulks of 400: 100 are left once the first bulk leaves, less
        # than a bulk, so they go when it is answered (with what arrived meanwhile)
        (5, False),
        # 900 waiting: a full second bulk goes while the first is in flight
        (9, True),
    ],
)
def test_a_second_bulk_goes_in_flight_only_when_full(
    tmp_path, master_pki, keys, batches, overlapped
):
    es = HeldCluster(hold_s=3.0 if not overlapped else 30.0)
    relay = relay_with(tmp_path, master_pki, keys, es, bulk=BulkConfig(max_docs=400, concurrency=2))
    for i in range(batches):
        relay.accept(TAG.format("gw-a"), signed("gw-a", keys, first=1 + 100 * i, n=100))
    switch = sys.getswitchinterval()
    relay.shipper.start()
    try:
        deadline = time.monotonic() + 30
        while len(es.created) < 100 * batches:
            assert time.monotonic() < deadline, f"shipped {len(es.created)}"
            time.sleep(0.01)
    finally:
        relay.shipper.stop()
        sys.setswitchinterval(switch)
    assert es.overlapped is overlapped
    assert es.docs[:2] == [400, 400 if overlapped else 100]
    assert sorted(d["seq"] for d in es.created) == list(range(1, 100 * batches + 1))
