"""Two top masters above one syndic (Salt multi-syndic), both running the relay.

Package scoped; it shares only the session Elasticsearch (``es_node``) with the rest of the
suite, so stopping a top master here disturbs no other test::

    top master "mtop-a" (relay, own spool) ---+
    top master "mtop-b" (relay, own spool) ---+--> the same Elasticsearch, index_prefix tributary
                                              |
      salt-syndic "msyn-1": syndic_master: [127.0.0.1:<ret port a>, 127.0.0.1:<ret port b>]
        + its master (tributary_keys engine publishing the gateway keys upward)
           <- gateway "mgw-1" with its own Mosquitto broker and the tributary_mqtt beacon

How Salt 3007 treats the list (salt/minion.py ``SyndicManager``): one ``Syndic`` connection per
entry (``host:port`` is parsed per entry by ``prep_ip_port``); every forwarded event goes to
*every* connected master in turn (``_call_syndic`` loops over all of them), while job returns go
to the master whose ``master_id`` the job carried, else to one master picked by
``syndic_failover``. So each top master sets ``master_id`` to its own ``syndic_master`` entry;
without it a replay's answer lands on a random master and the requesting relay times out.
The two top masters share one master key pair (see :func:`share_master_key`).
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

from tests.integration.faults.conftest import fault_relay_config
from tests.support.es import free_port
from tests.support.mosquitto import start_broker
from tests.support.topology import (
    relay_master_overrides,
    running_gateways,
    syndic_kwargs,
)

GATEWAY = "mgw-1"
SYNDIC_ID = "msyn-1"
TOPS = ("mtop-a", "mtop-b")

#: salt-syndic forwards each event batch to every master with a *synchronous* request; to a
#: stopped master that request blocks the syndic's loop for timeout x tries (minion defaults:
#: 5..10 s x 3). Shorter timers bound that stall; they live in the syndic's minion config
#: because Salt's syndic_config lets the minion options win over master.d/syndic.conf.
SYNDIC_RETRY = {"return_retry_timer": 1, "return_retry_timer_max": 2, "return_retry_tries": 1}


def mm_relay_config(es_node) -> dict:
    cfg = fault_relay_config(es_node)
    cfg["trusted_syndics"] = [SYNDIC_ID]
    cfg["gaps"] = {
        **cfg["gaps"],
        "grace_s": 6,
        "check_s": 1,
        "backoff_s": 8,
        "backoff_max_s": 20,
        "timeout_s": 20,
    }
    return cfg


def share_master_key(source, target) -> None:
    """Give ``target`` the master key pair of ``source`` (before ``target`` first starts).

    A syndic keeps one master public key for all its masters (``<pki_dir>/syndic_master.pub``,
    like a multi-master minion's ``minion_master.pub``): with two different master keys it
    refuses the second master for good ("The master key has changed"), so masters of a
    multi-syndic must share one key pair, as Salt's multi-master documentation requires.
    """
    src, dst = pathlib.Path(source.config["pki_dir"]), pathlib.Path(target.config["pki_dir"])
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("master.pem", "master.pub"):
        shutil.copy2(src / name, dst / name)


@pytest.fixture(scope="package")
def mm_ports():
    return {name: free_port() for name in TOPS}


@pytest.fixture(scope="package")
def mm_tops(salt_factories, es_node, mm_ports):
    factories = {}
    for name in TOPS:
        port = mm_ports[name]
        factories[name] = salt_factories.salt_master_daemon(
            name,
            order_masters=True,
            overrides=relay_master_overrides(
                mm_relay_config(es_node),
                ret_port=port,
                # the syndic routes a job's return to the syndic_master entry equal to master_id
                master_id=f"127.0.0.1:{port}",
            ),
        )
    first, *others = factories.values()
    try:
        first.start()  # generates the master key pair the others share
        for factory in others:
            share_master_key(first, factory)
            factory.start()
        yield factories
    finally:
        for factory in factories.values():
            factory.terminate()


@pytest.fixture(scope="package")
def mm_syndic(mm_tops, mm_ports):
    top_a = mm_tops[TOPS[0]]
    kw = syndic_kwargs(SYNDIC_ID)
    kw["minion_overrides"].update(SYNDIC_RETRY)
    kw["overrides"]["syndic_master"] = [f"127.0.0.1:{mm_ports[name]}" for name in TOPS]
    factory = top_a.salt_syndic_daemon(SYNDIC_ID, **kw)
    with factory.started():
        yield factory


@pytest.fixture(scope="package")
def mm_broker():
    broker = start_broker()
    yield broker
    broker.cleanup()


@pytest.fixture(scope="package")
def mm_gateway(mm_syndic, mm_broker):
    with running_gateways(mm_syndic.master, {GATEWAY: "darwin"}, {GATEWAY: mm_broker}) as gws:
        yield gws[GATEWAY]


@pytest.fixture(scope="package")
def multimaster(es_node, mm_tops, mm_syndic, mm_gateway, mm_broker):
    return {
        "es": es_node,
        "tops": mm_tops,
        "syndic": mm_syndic,
        "gateway": mm_gateway,
        "broker": mm_broker,
    }
