"""bench/factories_engines/pytest_engine.py (bench only): salt-factories' event-forwarding
engine that forwards the start events salt-factories waits for and the auth events it accepts
keys on, nothing else."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location(
    "bench_pytest_engine", REPO / "bench/factories_engines/pytest_engine.py"
)
assert spec is not None and spec.loader is not None
engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(engine)


def test_only_start_events_and_the_stop_sentinel_are_queued() -> None:
    q = engine.StartsOnly(maxlen=10)
    for tag in (
        "salt/master/top/start",
        "salt/syndic/fleet-syndic-1/start",
        "salt/minion/gw-1/start",
        "salt/auth",
        "salt/beacon/sim-0-0001/tributary_mqtt/batch",
        "salt/job/20261130181800123456/ret/sim-0-0001",
        "salt/master/top/start/extra",
        "tributary/keys/fleet-syndic-1",
    ):
        q.append({"id": "top", "tag": tag, "data": {}})
    q.append(None)
    assert [e and e["tag"] for e in q] == [
        "salt/master/top/start",
        "salt/syndic/fleet-syndic-1/start",
        "salt/minion/gw-1/start",
        "salt/auth",
        None,
    ]


def test_loaded_only_in_a_salt_factories_daemon() -> None:
    engine.__opts__ = {"__role": "master"}
    assert engine.__virtual__()[0] is False
    engine.__opts__ = {"__role": "master", "pytest-master": {"returner_address": {}}}
    assert engine.__virtual__() is True
