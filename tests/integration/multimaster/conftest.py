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

from tests.conftest import QUIET, REPO, beacon_config, gateway_subscribed, wait_for
from tests.integration.faults.conftest import fault_relay_config
from tests.support.es import free_port
from tests.support.mosquitto import start_broker

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
            overrides={
                **QUIET,
                "ret_port": port,
                # the syndic routes a job's return to the syndic_master entry equal to master_id
                "master_id": f"127.0.0.1:{port}",
                "engines_dirs": [str(REPO / "salt" / "_engines")],
                "runner_dirs": [str(REPO / "salt" / "_runners")],
                "engines": [{"tributary_relay": mm_relay_config(es_node)}],
            },
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
    factory = top_a.salt_syndic_daemon(
        SYNDIC_ID,
        master_overrides={
            **QUIET,
            "file_roots": {"base": [str(REPO / "salt")]},
            "pillar_roots": {"base": [str(REPO / "pillar")]},
        },
        minion_overrides={**QUIET, "publish_port": 4506, **SYNDIC_RETRY},
        overrides={
            **QUIET,
            "syndic_master": [f"127.0.0.1:{mm_ports[name]}" for name in TOPS],
            "syndic_event_forward_timeout": 0.5,
            "engines_dirs": [str(REPO / "salt" / "_engines")],
            "engines": [{"tributary_keys": {"interval": 5, "syndic_id": SYNDIC_ID}}],
        },
    )
    with factory.started():
        yield factory


@pytest.fixture(scope="package")
def mm_broker():
    broker = start_broker()
    yield broker
    broker.cleanup()


@pytest.fixture(scope="package")
def mm_gateway(mm_syndic, mm_broker):
    factory = mm_syndic.master.salt_minion_daemon(
        GATEWAY,
        overrides={
            **QUIET,
            # Salt runs beacons once a second and lets a beacon with ``interval: 1`` run when
            # calls x loop_interval >= 1; salt-factories' loop_interval 0.05 would make that
            # every 20 s. Salt's default (1) gives the production cadence: a batch a second.
            "loop_interval": 1,
            "grains": {"site": "darwin", "role": "gateway"},
            "beacons": {"tributary_mqtt": beacon_config(mm_broker.port)},
        },
    )
    factory.start()
    try:
        ret = factory.salt_call_cli(timeout=120).run("saltutil.sync_all")
        assert ret.returncode == 0, ret
        ret = factory.salt_call_cli(timeout=60).run("saltutil.refresh_beacons")
        assert ret.returncode == 0, ret
        wait_for(lambda: gateway_subscribed(factory), timeout=90, what="mgw-1's MQTT subscription")
        yield factory
    finally:
        factory.terminate()


@pytest.fixture(scope="package")
def multimaster(es_node, mm_tops, mm_syndic, mm_gateway, mm_broker):
    return {
        "es": es_node,
        "tops": mm_tops,
        "syndic": mm_syndic,
        "gateway": mm_gateway,
        "broker": mm_broker,
    }
