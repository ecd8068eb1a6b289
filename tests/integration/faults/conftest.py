"""A topology of our own for the fault tests: they stop, kill and restart its daemons.

Package scoped, so every fault test shares one topology (start-up costs about two minutes)::

    Elasticsearch (own node, TLS + basic auth)
    top master "ftop" (relay engine, tuned for short outages: backoff <= 5 s, gap grace 8 s)
      <- salt-syndic "fsyn-1" + its master (tributary_keys engine publishing gateway keys)
           <- gateways fgw-brisbane / fgw-sydney, each with its own Mosquitto broker and a
              health heartbeat every 5 s (it reveals a lost tail to the relay's ledger)

Nothing here is shared with the session topology of ``tests/integration/conftest.py``, so
stopping a daemon never disturbs another test. The daemons log at info to their files; when a
test fails, those logs (and Elasticsearch's) are copied under ``.run/failed-logs/`` and the
failure report names the directory (``tests.support.daemonlogs``).
"""

from __future__ import annotations

import pytest

from tests.support.es import start_elasticsearch
from tests.support.mosquitto import start_broker
from tests.support.topology import VERBOSE, running_gateways, running_top_master, syndic_kwargs

FGATEWAYS = {"fgw-brisbane": "brisbane", "fgw-sydney": "sydney"}
SYNDIC_ID = "fsyn-1"


def fault_relay_config(es_node) -> dict:
    return {
        "elasticsearch": {**es_node.client_config, "request_timeout": 10},
        "index_prefix": "tributary",
        "bulk": {"max_docs": 5000, "max_wait_s": 0.1},
        "backoff": {"min_s": 0.5, "max_s": 5},
        "key_wait_s": 120,
        "trusted_syndics": [SYNDIC_ID],
        "metrics_interval_s": 5,
        # every reading a detector point: test_top_master_stopped_one_minute counts the
        # model's samples against the readings it sent (ten a tick, within milliseconds,
        # which the default point_interval_s would score as one point)
        "anomalies": {"persist_s": 2, "point_interval_s": 0},
        "health": {"heartbeat_s": 5, "check_s": 1},
        # test_alert_restart.py: an alert across a restart; rules on the heartbeat's grains
        "rules": [
            {
                "name": "f-hot",
                "match": {"sensor": "f-alert-probe", "metric": "temperature"},
                "when": {"above": 80, "clear_below": 75},
                "severity": "critical",
            },
            {
                "name": "f-role-hot",
                "match": {"sensor": "f-grain-probe", "grains": {"role": "gate*"}},
                "when": {"above": 80},
            },
            {
                "name": "f-boiler-room-hot",
                "match": {"sensor": "f-grain-probe", "grains": {"role": "boiler-room"}},
                "when": {"above": 80},
            },
            {  # test_alert_flapping.py
                "name": "f-flappy",
                "match": {"sensor": "f-flap-probe"},
                "when": {"above": 80, "clear_below": 75},
                "flap": {"changes": 3, "window_s": 120, "stable_s": 4},
            },
        ],
        "gaps": {
            "grace_s": 8,
            "check_s": 2,
            "backoff_s": 10,
            "backoff_max_s": 30,
            "per_minute": 60,
            "max_attempts": 20,
            "timeout_s": 30,
        },
    }


@pytest.fixture(scope="package")
def f_es():
    node = start_elasticsearch(tls=True)
    yield node
    node.cleanup()


@pytest.fixture(scope="package")
def f_top(salt_factories, f_es):
    with running_top_master(
        salt_factories, f_es, "ftop", relay=fault_relay_config(f_es), logs=VERBOSE
    ) as factory:
        yield factory


@pytest.fixture(scope="package")
def f_syndic(f_top):
    factory = f_top.salt_syndic_daemon(SYNDIC_ID, **syndic_kwargs(SYNDIC_ID, VERBOSE))
    with factory.started():
        yield factory


@pytest.fixture(scope="package")
def f_brokers():
    started = {gw: start_broker() for gw in FGATEWAYS}
    yield started
    for b in started.values():
        b.cleanup()


@pytest.fixture(scope="package")
def f_gateways(f_syndic, f_brokers):
    with running_gateways(
        f_syndic.master, FGATEWAYS, f_brokers, VERBOSE, heartbeat_s=5
    ) as factories:
        yield factories


@pytest.fixture(scope="package")
def faults(f_es, f_top, f_syndic, f_gateways, f_brokers):
    return {
        "es": f_es,
        "top": f_top,
        "syndic": f_syndic,
        "gateways": f_gateways,
        "brokers": f_brokers,
    }
