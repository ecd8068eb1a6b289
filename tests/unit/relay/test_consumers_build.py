"""The relay's subscriber process connects to the master's event bus when it is built, not at
the first anomaly (that first connection imports Salt's transport and master modules)."""

from __future__ import annotations

import salt.utils.event

from saltext.tributary import consumers
from saltext.tributary.relay import elasticsearch as es_lib
from saltext.tributary.relay.config import parse_relay


class Bus:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def connect_pull(self, timeout: float = 1) -> bool:
        self.calls.append("connect_pull")
        if self.fail:
            raise OSError("no such socket")
        return True

    def fire_event(self, data, tag) -> bool:
        self.calls.append("fire_event")
        return True


def build_with(monkeypatch, tmp_path, bus: Bus) -> consumers.Consumers:
    monkeypatch.setattr(salt.utils.event, "get_master_event", lambda *a, **k: bus)
    monkeypatch.setattr(es_lib, "make_client", lambda cfg: object())
    rcfg, errors = parse_relay(
        {
            "elasticsearch": {"hosts": ["http://127.0.0.1:9"]},
            "spool_path": str(tmp_path / "relay.db"),
            "anomalies": {"enabled": False},
        }
    )
    assert errors == []
    return consumers.build({"sock_dir": str(tmp_path)}, {}, rcfg, lambda *a, **k: None)


def test_the_bus_is_connected_when_the_consumers_are_built(monkeypatch, tmp_path):
    bus = Bus()
    build_with(monkeypatch, tmp_path, bus)
    assert bus.calls == ["connect_pull"]


def test_a_bus_not_there_yet_is_logged_and_the_consumers_still_built(monkeypatch, tmp_path):
    bus = Bus(fail=True)
    assert isinstance(build_with(monkeypatch, tmp_path, bus), consumers.Consumers)
    assert bus.calls == ["connect_pull"]
