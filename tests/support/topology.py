"""The three-tier test topology without fixtures: constants, Salt daemon settings, helpers.

Shared by the integration fixtures (``tests/integration/conftest.py``), the demo and the bench.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import salt.version

log = logging.getLogger(__name__)


REPO = pathlib.Path(__file__).resolve().parent.parent.parent


SALT_VERSION = tuple(salt.version.__saltstack_version__.info[:2])


log = logging.getLogger(__name__)


GATEWAYS = {"gw-brisbane-1": "brisbane", "gw-sydney-1": "sydney"}


QUIET = {"log_level_logfile": "warning", "log_level": "warning"}


#: Daemons of the fault topologies log at info to their files (``fire_master failed``, job
#: starts, the relay's gap repair), kept on failure by ``tests.support.daemonlogs``.
VERBOSE = {"log_level_logfile": "info", "log_level": "warning"}


#: Salt 3008's salt-syndic forwards no events and, after the first, no job returns: the
#: syndic masters run the ``tributary_uplink`` engine instead (README, "Versions tested").
NEEDS_UPLINK = SALT_VERSION >= (3008,)


#: Salt 3008: salt-syndic left to pass jobs down only. Its event forwarding (a timer every
#: ``syndic_event_forward_timeout``) makes a synchronous request from inside its event loop
#: that does not complete, which stalls the loop 15-30 s at a time, so publications from the
#: top master reached the gateways 7-52 s late. ``cluster`` queues only jobs' minion lists
#: (not every gateway event) and the long timer runs that forwarding once an hour; the
#: ``tributary_uplink`` engine carries events, job returns and minion lists instead (README,
#: "Versions tested"; the ``tributary.syndic`` state sets the same).
SYNDIC_3008 = {"syndic_mode": "cluster", "syndic_event_forward_timeout": 3600}


#: Gateway minions: Salt calls beacons once a second but counts a beacon's ``interval`` in
#: ``loop_interval`` units, and salt-factories sets ``loop_interval: 0.05``, which turned
#: ``interval: 1`` into one beacon run every 20 s. Salt's default of 1 s is what fleets run.
GATEWAY_LOOP = {"loop_interval": 1}


def in_order(events: Any) -> list[Any]:
    """salt-factories' ``EventListener.get_events`` answers a *set*: its events in the order
    the daemon stamped them."""
    return sorted(events, key=lambda e: e.stamp)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60,
    what: str = "condition",
    interval: float = 0.25,
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def relay_engine_config(es_node, **extra) -> dict:
    cfg = {
        "elasticsearch": es_node.client_config,
        "index_prefix": "tributary",
        "bulk": {"max_docs": 5000, "max_wait_s": 0.1},
        # syndic-2: the second syndic tests/integration/test_fleet.py starts below "top"
        "trusted_syndics": ["syndic-1", "syndic-2"],
        "anomalies": {"persist_s": 2},  # models saved soon after they learn (tests read them)
        "health": {"check_s": 1, "min_silent_s": 4},  # findings within seconds
        "rules": [
            {
                "name": "probe-hot",
                "match": {"sensor": "alert-probe", "metric": "temperature"},
                "when": {"above": 80, "clear_below": 75},
                "severity": "critical",
            },
            # the closed loop's rule: the session top master's reactor acts on it alone
            {
                "name": REACTOR_RULE,
                "match": {"gateway": "gw-brisbane-1", "sensor": LOOP_DEVICE},
                "when": {"above": 80, "clear_below": 75},
                "severity": "critical",
            },
        ],
    }
    cfg.update(extra)
    return cfg


#: The closed loop (tests/integration/test_reactor.py): the rule the session top master's
#: reactor acts on (no other rule has actions, so no other test's alert makes Salt act), and
#: the simulated device on gw-brisbane-1 that the reaction commands.
REACTOR_RULE = "loop-hot"
LOOP_DEVICE = "boiler-loop"
LOOP_SETPOINT = 60


def reactor_overrides(notify_port: int) -> dict[str, Any]:
    """Top-master settings for Salt's real reactor on :data:`REACTOR_RULE` with the repo's
    ``salt/reactor/alert.sls``: the firing alert commands the device (on the alert's own
    gateway, through the syndic) and both transitions are published to the upstream broker on
    ``notify_port`` (``ops/<site>/<rule>/<state>``)."""
    return {
        "reactor": [
            {f"tributary/alert/{REACTOR_RULE}/*": [str(REPO / "salt" / "reactor" / "alert.sls")]}
        ],
        "tributary_reactor": {
            "notify": {
                "broker": {"host": "127.0.0.1", "port": notify_port},
                "topic": "ops/{site}/{rule}/{state}",
            },
            "actions": {
                REACTOR_RULE: {
                    "firing": [
                        {
                            "command": {
                                "device": "{sensor}",
                                "devices": [LOOP_DEVICE],
                                "command": "setpoint",
                                "payload": LOOP_SETPOINT,
                            }
                        },
                        {"notify": {}},
                    ],
                    "resolved": [{"notify": {}}],
                }
            },
        },
    }


def syndic_kwargs(syndic_id: str, logs: Mapping[str, str] = QUIET) -> dict[str, Any]:
    """``salt_syndic_daemon`` arguments of a Tributary syndic: the syndic master serves the
    repo's states and pillar and runs the key-publishing engine for origin authentication."""
    return {
        "master_overrides": {
            **logs,
            "file_roots": {"base": [str(REPO / "salt")]},
            "pillar_roots": {"base": [str(REPO / "pillar")]},
        },
        "minion_overrides": {**logs, "publish_port": 4506},
        # master.d/syndic.conf (these overrides) sets the syndic master's engines list too, so
        # the key-publishing engine goes here.
        "overrides": {
            **logs,
            "syndic_event_forward_timeout": 0.5,
            **(SYNDIC_3008 if NEEDS_UPLINK else {}),
            "engines_dirs": [str(REPO / "salt" / "_engines")],
            "engines": [
                {"tributary_keys": {"interval": 5, "syndic_id": syndic_id}},
                *([{"tributary_uplink": {}}] if NEEDS_UPLINK else []),
            ],
        },
    }


def master_ports(master: Any) -> dict[str, int]:
    """A minion's view of its master's ports, as a fleet on default ports has it.

    salt-factories gives each master random ports but tells its minions only ``master_port``.
    Salt 3007's minion, after its first reconnect to a restarted master, schedules
    ``status.master``, which looks for a connection to ``publish_port`` (default 4505): without
    the real port it declared the master lost every second, re-initialised its channels each
    time and dropped the events and jobs in between (the gap-repair fault test's flakiness).
    """
    return {"publish_port": int(master.config["publish_port"])}


def relay_master_overrides(
    relay: Mapping[str, Any], logs: Mapping[str, str] = QUIET, **extra: Any
) -> dict[str, Any]:
    """Settings of a master that runs the relay engine with ``relay`` and serves the repo's
    runners; ``extra`` adds to them (ports, a reactor, other engines' settings)."""
    return {
        **logs,
        "engines_dirs": [str(REPO / "salt" / "_engines")],
        "runner_dirs": [str(REPO / "salt" / "_runners")],
        "engines": [{"tributary_relay": dict(relay)}],
        **extra,
    }


def top_master_overrides(es_node, **extra: Any) -> dict[str, Any]:
    """Settings of the top master "top": the relay engine on ``es_node`` and the repo's
    runners; ``extra`` adds to them (a reactor, other engines' settings)."""
    return relay_master_overrides(relay_engine_config(es_node), **extra)


@contextlib.contextmanager
def running_top_master(
    factories: Any,
    es_node,
    master_id: str = "top",
    *,
    relay: Mapping[str, Any] | None = None,
    logs: Mapping[str, str] = QUIET,
    **extra: Any,
) -> Iterator[Any]:
    """A top master (order_masters) started by ``factories`` (a salt-factories
    ``FactoriesManager``) with the relay engine (``relay``, by default the session's
    :func:`relay_engine_config`), terminated on the way out."""
    config = relay if relay is not None else relay_engine_config(es_node)
    factory = factories.salt_master_daemon(
        master_id, order_masters=True, overrides=relay_master_overrides(config, logs, **extra)
    )
    with factory.started():
        yield factory


@contextlib.contextmanager
def running_syndic(top_master: Any, syndic_id: str = "syndic-1") -> Iterator[Any]:
    """A syndic master + salt-syndic below ``top_master``, terminated on the way out."""
    factory = top_master.salt_syndic_daemon(syndic_id, **syndic_kwargs(syndic_id))
    with factory.started():
        yield factory


@contextlib.contextmanager
def factories_manager(root_dir: str, start_timeout: int = 120) -> Iterator[Any]:
    """salt-factories' ``FactoriesManager`` outside pytest (the demo), built as its pytest
    plugin builds the ``salt_factories`` fixture: an ``EventListener`` (daemons forward their
    events to it; it confirms they started) and a ``LogServer`` (daemons forward their log
    records at ``warning`` and above into this process's logging), both on loopback."""
    from saltfactories.manager import FactoriesManager
    from saltfactories.plugins.event_listener import EventListener
    from saltfactories.plugins.log_server import LogServer

    class _Manager(FactoriesManager):
        def final_common_config_tweaks(self, config, role):
            super().final_common_config_tweaks(config, role)
            config[f"pytest-{role}"]["log"]["level"] = self.log_server_level

    listener = EventListener()
    listener.host = "127.0.0.1"  # its default binds every interface
    listener.address = f"tcp://127.0.0.1:{listener.port}"
    log_server = LogServer(log_host="127.0.0.1", log_level="warning")
    with listener:
        log_server.start()
        try:
            yield _Manager(
                root_dir=root_dir,
                start_timeout=start_timeout,
                inject_sitecustomize=False,
                event_listener=listener,
                log_server_host=log_server.log_host,
                log_server_port=log_server.log_port,
                log_server_level=log_server.log_level,
            )
        finally:
            log_server.stop()


def beacon_config(broker_port: int) -> list[dict]:
    return [
        {"broker": {"host": "127.0.0.1", "port": broker_port}},
        {
            "topics": [
                {"topic": "sensors/{sensor}/level", "metric": "level", "unit": "%"},
                {"topic": "sensors/{sensor}/{metric}", "format": "number", "unit": "C"},
                {
                    "topic": "json/{sensor}",
                    "format": "json",
                    "fields": {
                        "temp": {"metric": "temperature", "unit": "C"},
                        "env.hum": {"metric": "humidity", "unit": "%"},
                    },
                    "timestamp": {"field": "ts", "format": "ms"},
                },
            ]
        },
        {"interval": 1},
    ]


def gateway_subscribed(factory) -> bool:
    ret = factory.salt_call_cli(timeout=60).run("tributary.status")
    return ret.returncode == 0 and (ret.data.get("state") or {}).get("broker") == "subscribed"


#: What each test gateway serves and allows (``tributary:commands`` in its minion config, so
#: the ``tributary`` grain lists the devices): tests/integration/test_commands.py relies on
#: boiler-1 being served by gw-brisbane-1 only and pump-1 by gw-sydney-1 only.
GATEWAY_COMMANDS: dict[str, dict[str, Any]] = {
    "gw-brisbane-1": {
        "devices": ["boiler-1", "valve-1", LOOP_DEVICE],
        "timeout_s": 5,
        "allow": [
            {
                "device": "boiler-*",
                "commands": ["setpoint"],
                "payload": {"type": "number", "min": 40, "max": 90},
            },
            {"device": "valve-*", "commands": ["open", "close"], "payload": {"type": "none"}},
        ],
        "rate": {"max": 30, "window_s": 60},
    },
    "gw-sydney-1": {
        "devices": ["pump-1", "boiler-9"],
        "timeout_s": 5,
        "allow": [
            {"device": "pump-*", "commands": ["start", "stop"], "payload": {"type": "none"}},
            {
                "device": "boiler-*",
                "commands": ["setpoint"],
                "payload": {"type": "number", "min": 40, "max": 90},
            },
        ],
        "rate": {"max": 30, "window_s": 60},
    },
}


@contextlib.contextmanager
def running_gateways(
    syndic_master: Any,
    sites: Mapping[str, str],
    brokers: Mapping[str, Any],
    logs: Mapping[str, str] = QUIET,
    heartbeat_s: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Gateway minions below ``syndic_master`` (id -> site), each with the tributary_mqtt
    beacon on its own broker (and the tributary_health heartbeat every ``heartbeat_s`` seconds
    when given): started, synced, and subscribed before they are yielded."""
    factories = {}
    try:
        for gw, site in sites.items():
            beacons: dict[str, Any] = {"tributary_mqtt": beacon_config(brokers[gw].port)}
            if heartbeat_s:
                # the heartbeat carries the role grain: alert rules may match on it
                beacons["tributary_health"] = [{"interval": heartbeat_s}, {"grains": ["role"]}]
            factory = syndic_master.salt_minion_daemon(
                gw,
                overrides={
                    **logs,
                    **GATEWAY_LOOP,
                    **master_ports(syndic_master),
                    "grains": {"site": site, "role": "gateway"},
                    "beacons": beacons,
                    **(
                        {"tributary": {"commands": GATEWAY_COMMANDS[gw]}}
                        if gw in GATEWAY_COMMANDS
                        else {}
                    ),
                },
            )
            factories[gw] = factory  # before start(): a failed start is terminated below too
            factory.start()
        for factory in factories.values():
            ret = factory.salt_call_cli(timeout=120).run("saltutil.sync_all")
            assert ret.returncode == 0, ret
            # The beacon module arrived with the sync: reload beacons so it runs.
            ret = factory.salt_call_cli(timeout=60).run("saltutil.refresh_beacons")
            assert ret.returncode == 0, ret
        for factory in factories.values():
            wait_for(
                lambda f=factory: gateway_subscribed(f),
                timeout=90,
                what=f"{factory.id}'s MQTT subscription",
            )
        yield factories
    finally:
        for factory in factories.values():
            factory.terminate()


def sqlite_rows(path: str, sql: str, args: tuple = (), timeout: float = 10) -> list[tuple]:
    """Rows of ``sql`` from the SQLite file at ``path``, opened read-only (the daemon writing it
    may be running or down); [] before the file or the table exists."""
    if not os.path.exists(path):
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # table not created yet
        return []
    finally:
        db.close()


def relay_spool_path(master: Any) -> str:
    """The relay engine's spool (SQLite) on ``master``."""
    return os.path.join(master.config["cachedir"], "tributary", "relay.db")


def relay_rows(master: Any, sql: str, args: tuple = ()) -> list[tuple]:
    """:func:`sqlite_rows` of the relay's spool on ``master``."""
    return sqlite_rows(relay_spool_path(master), sql, args)


def es_readings(es_node, gateway: str, sensor: str | None = None, size: int = 10000) -> list[dict]:
    must: list[dict] = [{"term": {"gateway": gateway}}]
    if sensor:
        must.append({"term": {"sensor": sensor}})
    res = es_node.search(
        "tributary-readings-*",
        {"size": size, "query": {"bool": {"must": must}}, "sort": [{"seq": "asc"}]},
    )
    return [h["_source"] | {"_id": h["_id"]} for h in res["hits"]["hits"]]


def es_count(es_node, gateway: str, sensor: str | None = None) -> int:
    must: list[dict] = [{"term": {"gateway": gateway}}]
    if sensor:
        must.append({"term": {"sensor": sensor}})
    return es_node.count("tributary-readings-*", {"bool": {"must": must}})


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
