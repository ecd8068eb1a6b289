"""Shared fixtures: real Elasticsearch, real Mosquitto brokers, a real three-tier Salt topology.

Topology (pytest-salt-factories, session scoped)::

    top master "top" (order_masters, engine tributary_relay -> Elasticsearch)
      <- salt-syndic "syndic-1" + its master (file_roots = repo salt/, pillar_roots = pillar/)
           <- gateway minions gw-brisbane-1 (site brisbane), gw-sydney-1 (site sydney),
              each with its own Mosquitto broker and the tributary_mqtt beacon.
"""

from __future__ import annotations

import tempfile

import pytest

from tests.support.es import running_elasticsearch
from tests.support.mosquitto import running_brokers
from tests.support.topology import (
    GATEWAYS,
    reactor_overrides,
    running_gateways,
    running_syndic,
    running_top_master,
)


@pytest.fixture(scope="session")
def es_node():
    with running_elasticsearch(tls=True) as node:
        yield node


@pytest.fixture(scope="session")
def salt_factories_config():
    root = tempfile.mkdtemp(prefix="tributary-salt-")
    return {"root_dir": root, "start_timeout": 120, "inject_sitecustomize": False}


@pytest.fixture(scope="session")
def upstream_broker():
    """The ops broker the session reactor's notifications go to (tests/integration/
    test_reactor.py)."""
    with running_brokers(["upstream"]) as started:
        yield started["upstream"]


@pytest.fixture(scope="session")
def top_master(salt_factories, es_node, upstream_broker):
    # The same top master as the demo's (tests/support/topology.py); extra settings go in as
    # keyword arguments: here Salt's reactor, on the closed loop's rule only.
    with running_top_master(
        salt_factories, es_node, **reactor_overrides(upstream_broker.port)
    ) as factory:
        yield factory


@pytest.fixture(scope="session")
def syndic(top_master):
    with running_syndic(top_master, "syndic-1") as factory:
        yield factory


@pytest.fixture(scope="session")
def brokers():
    with running_brokers(GATEWAYS) as started:
        yield started


@pytest.fixture(scope="session")
def gateways(syndic, brokers):
    with running_gateways(syndic.master, GATEWAYS, brokers) as factories:
        yield factories


@pytest.fixture(scope="session")
def topology(es_node, top_master, syndic, gateways, brokers):
    return {
        "es": es_node,
        "top": top_master,
        "syndic": syndic,
        "gateways": gateways,
        "brokers": brokers,
    }


#: Fixtures that yield a topology dict (es, top, syndic, gateways): a failed test using one keeps
#: its daemons' logs (``tests.support.daemonlogs``).
TOPOLOGY_FIXTURES = ("faults", "topology")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when not in ("setup", "call"):
        return
    from tests.support import daemonlogs

    for name in TOPOLOGY_FIXTURES:
        topo = getattr(item, "funcargs", {}).get(name)
        if isinstance(topo, dict):
            factories = [topo["top"], topo["syndic"], *topo["gateways"].values()]
            daemonlogs.attach(item, report, factories, topo.get("es"))
            return


def pytest_terminal_summary(terminalreporter):
    """Each outage test's time to recovery (README states what to expect): the fault package,
    scale-out and multi-master record theirs with ``faults.helpers.assert_exactly``. Here, not
    in the fault package, so that a session without that package (``make test`` runs it in a
    session of its own) still prints the others'."""
    from tests.integration.faults.helpers import RECOVERY

    if RECOVERY:
        terminalreporter.section("time to recovery (fault ended -> every reading indexed once)")
        for name, seconds in RECOVERY.items():
            terminalreporter.write_line(f"{name}: {seconds} s")
