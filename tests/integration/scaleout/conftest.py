"""A scale-out topology of our own: a relay on each of two syndic masters, one on the top.

Package scoped; it shares only the session Elasticsearch (``es_node``) with the rest of the
suite, so stopping a syndic relay here disturbs no other test::

    top master "so-top" (tributary_relay, scaleout.role top, syndic_relays [so-syn-1, so-syn-2])
      <- salt-syndic "so-syn-1" + its master (tributary_keys; tributary_relay role syndic)
           <- gateway "so-gw-1" (own Mosquitto broker, heartbeat every 2 s)
      <- salt-syndic "so-syn-2" + its master (tributary_keys; tributary_relay role syndic)
           <- gateway "so-gw-2" (own Mosquitto broker, heartbeat every 2 s)
"""

from __future__ import annotations

import contextlib

import pytest

from tests.support.mosquitto import running_brokers
from tests.support.topology import running_gateways, running_top_master, syndic_kwargs

SYNDICS = {"so-syn-1": "so-gw-1", "so-syn-2": "so-gw-2"}
TAKEOVER_S = 6


def _es(es_node) -> dict:
    return {**es_node.client_config, "request_timeout": 10}


def top_relay_config(es_node) -> dict:
    return {
        "elasticsearch": _es(es_node),
        "bulk": {"max_docs": 5000, "max_wait_s": 0.1},
        "backoff": {"min_s": 0.5, "max_s": 5},
        "trusted_syndics": list(SYNDICS),
        "anomalies": {"enabled": False},
        "health": {"enabled": False},
        "metrics_interval_s": 0,
        "gaps": {
            "grace_s": 5,
            "check_s": 1,
            "backoff_s": 5,
            "backoff_max_s": 15,
            "per_minute": 120,
            "max_attempts": 20,
            "timeout_s": 20,
        },
        "scaleout": {"role": "top", "syndic_relays": list(SYNDICS), "takeover_s": TAKEOVER_S},
    }


def syndic_relay_config(es_node, syndic_id: str) -> dict:
    return {
        "elasticsearch": _es(es_node),
        "bulk": {"max_docs": 5000, "max_wait_s": 0.1},
        "backoff": {"min_s": 0.5, "max_s": 5},
        "anomalies": {"enabled": False},
        "health": {"enabled": False},
        "metrics_interval_s": 0,
        "scaleout": {"role": "syndic", "syndic_id": syndic_id, "receipt_s": 1},
    }


@pytest.fixture(scope="package")
def so_top(salt_factories, es_node):
    with running_top_master(
        salt_factories, es_node, "so-top", relay=top_relay_config(es_node)
    ) as factory:
        yield factory


@pytest.fixture(scope="package")
def so_syndics(so_top, es_node):
    with contextlib.ExitStack() as stack:
        out = {}
        for syndic_id in SYNDICS:
            kw = syndic_kwargs(syndic_id)
            kw["overrides"]["engines"].append(
                {"tributary_relay": syndic_relay_config(es_node, syndic_id)}
            )
            factory = so_top.salt_syndic_daemon(syndic_id, **kw)
            out[syndic_id] = stack.enter_context(factory.started())
        yield out


@pytest.fixture(scope="package")
def so_brokers():
    with running_brokers(list(SYNDICS.values())) as started:
        yield started


@pytest.fixture(scope="package")
def so_gateways(so_syndics, so_brokers):
    with contextlib.ExitStack() as stack:
        out = {}
        for syndic_id, gw in SYNDICS.items():
            started = stack.enter_context(
                running_gateways(
                    so_syndics[syndic_id].master,
                    {gw: "scaleout"},
                    so_brokers,
                    heartbeat_s=2,
                )
            )
            out.update(started)
        yield out


@pytest.fixture(scope="package")
def scaleout_topology(es_node, so_top, so_syndics, so_gateways, so_brokers):
    return {
        "es": es_node,
        "top": so_top,
        "syndics": so_syndics,
        "gateways": so_gateways,
        "brokers": so_brokers,
    }
