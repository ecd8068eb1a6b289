"""A simulated fleet through the session topology: 50 gateways behind two syndics.

The gateways are ``tests/support/fleetsim.py``'s (no salt-minion each): their own key pairs,
accepted on their syndic master (the session's syndic-1 and a second syndic started here
below the same top master), batches built and signed by the product's code and fired on the
syndic masters' buses. Real salt-syndics (and on Salt 3008 the uplink engines) carry them to
the session top master, whose relay verifies each against the key its syndic vouched for and
indexes it. Checked: every reading exactly once in Elasticsearch, per gateway; a batch under
an accepted gateway's name signed with a key nobody accepted is refused (dead-lettered,
reason ``bad_signature``) and none of its readings is indexed.
"""

from __future__ import annotations

import time

import pytest

from saltext.tributary.gateway.beacons import finalize_batch
from saltext.tributary.protocol.wire import SpooledReading, encode_batch
from tests.support.fleetsim import SimFleet, gateway_ids, gateway_keys
from tests.support.topology import es_count, running_syndic, wait_for

SYNDIC_2 = "syndic-2"


@pytest.fixture(scope="module")
def second_syndic(top_master):
    with running_syndic(top_master, SYNDIC_2) as factory:
        yield factory


def es_per_gateway(es, prefix: str) -> dict[str, int]:
    es.refresh()
    res = es.search(
        "tributary-readings-*",
        {
            "size": 0,
            "query": {"prefix": {"gateway": prefix}},
            "aggs": {"gw": {"terms": {"field": "gateway", "size": 1000}}},
        },
    )
    return {b["key"]: b["doc_count"] for b in res["aggregations"]["gw"]["buckets"]}


def test_fifty_gateways_behind_two_syndics_arrive_exactly_once(topology, second_syndic):
    es, syndic = topology["es"], topology["syndic"]
    masters = {"syndic-1": syndic.master.config, SYNDIC_2: second_syndic.master.config}
    fleet = SimFleet(
        masters,
        gateway_ids(masters, 25, prefix="fit"),
        sensors=4,
        batch_every_s=1.0,
        heartbeat_every_s=None,  # no heartbeats: the fleet's silence later is no finding
        respond=False,
    )
    fleet.accept_all()
    try:
        fleet.start()
        try:
            wait_for(
                lambda: len(es_per_gateway(es, "fit-")) == 50,
                timeout=90,
                what="every simulated gateway's readings indexed",
                interval=1,
            )
            # a batch under an accepted gateway's name, signed with a key no master accepted
            rogue = gateway_keys(["fit-rogue"], fleet.gateways["fit-0-0000"].pki_dir + "-rogue")
            rows = [
                SpooledReading(n, "forged/temperature", "C", int(time.time() * 1000), 99.0)
                for n in range(1, 4)
            ]
            forged = encode_batch("forged1", rows, site="fit-site")
            forged = finalize_batch(forged, {"id": "fit-0-0000", "pki_dir": rogue["fit-rogue"]})
            forged["id"] = "fit-0-0000"
            import salt.utils.event

            opts = syndic.master.config
            with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False) as bus:
                bus.fire_event(forged, "salt/beacon/fit-0-0000/tributary_mqtt/batch")
            # the fleet keeps firing around the forgery: ten batches from every gateway
            wait_for(
                lambda: min(g.batches for g in fleet.gateways.values()) >= 10,
                timeout=60,
                what="ten batches from every simulated gateway",
            )
        finally:
            fleet.stop()
        counts = fleet.counts()
        expected = counts["expected"]
        assert counts["errors"] == [] and counts["readings_fired"] == sum(expected.values())
        assert min(expected.values()) >= 40, counts  # ten batches or more each
        wait_for(
            lambda: es_per_gateway(es, "fit-") == expected,
            timeout=60,
            what="exactly the fired readings in Elasticsearch, per gateway",
            interval=1,
        )

        def refused() -> list[dict]:
            res = es.search(
                "tributary-deadletter-*",
                {
                    "size": 10,
                    "query": {
                        "bool": {
                            "must": [
                                {"term": {"gateway": "fit-0-0000"}},
                                {"term": {"reason": "bad_signature"}},
                            ]
                        }
                    },
                },
            )
            return [h["_source"] for h in res["hits"]["hits"]]

        letters = wait_for(refused, timeout=60, what="the forged batch refused")
        assert letters[0]["original"]["epoch"] == "forged1"
        assert letters[0]["stage"] == "origin"
        assert es_count(es, "fit-0-0000", "forged") == 0
        # still exactly once after the refusal (nothing else of the gateway was touched)
        assert es_per_gateway(es, "fit-") == expected
    finally:
        fleet.revoke_all()
