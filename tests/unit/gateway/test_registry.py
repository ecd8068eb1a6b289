"""The gateway's registry of long-lived per-beacon objects."""

from __future__ import annotations

from saltext.tributary.gateway.registry import Registry


class Part:
    def __init__(self, events: list, name: str) -> None:
        self.events, self.name = events, name
        events.append(f"start {name}")

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def test_same_config_same_object_changed_config_replaced_old_one_stopped_first():
    events: list = []
    reg = Registry()
    a = reg.ensure("source", "k", {"x": 1}, lambda prev: Part(events, "a"))
    assert reg.ensure("source", "k", {"x": 1}, lambda prev: Part(events, "never")) is a
    seen = []
    b = reg.ensure("source", "k", {"x": 2}, lambda prev: seen.append(prev) or Part(events, "b"))
    assert seen == [a] and reg.get("source", "k") is b
    assert events == ["start a", "stop a", "start b"]  # never two clients at once


def test_drop_and_clear_release_what_they_remove():
    events: list = []
    reg = Registry()
    reg.ensure("source", "a", None, lambda _: Part(events, "a"))
    reg.ensure("source", "b", None, lambda _: Part(events, "b"))
    reg.ensure("filters", "a", [], lambda _: object())  # nothing to release
    reg.drop("source", "a")
    assert reg.get("source", "a") is None and reg.get("source", "b") is not None
    reg.clear()
    assert events == ["start a", "start b", "stop a", "stop b"] and reg.get("source", "b") is None
