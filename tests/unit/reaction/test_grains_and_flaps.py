"""Rules on gateway grains (carried by the signed heartbeat) and flap damping."""

from __future__ import annotations

import pytest

from saltext.tributary.gateway.config import validate_health
from saltext.tributary.gateway.sources.health import GRAINS_MAX_BYTES, pick_grains
from saltext.tributary.reaction.alerts import AlertBook, RuleEngine, bounded_grains, event_tag
from saltext.tributary.reaction.rules import grains_match, validate_rules
from saltext.tributary.util import clock
from tests.unit.reaction.helpers import T0, S, reading, rules


def states(docs):
    return [d["state"] for d in docs]


# -- grains ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("match", "path"),
    [
        ({"grains": "role=x"}, "rules[0].match.grains: must be a mapping"),
        ({"grains": {"role": 3}}, "rules[0].match.grains.role: must be a non-empty string"),
        ({"grains": {"role": ""}}, "rules[0].match.grains.role: must be a non-empty string"),
        ({"grains": {"a b": "x"}}, "rules[0].match.grains.a b: a grain path"),
        ({"grains": {"a::b": "x"}}, "rules[0].match.grains.a::b: a grain path"),
        ({"grains": {f"g{i}": "x" for i in range(17)}}, "at most 16 grain paths"),
    ],
)
def test_bad_grain_matches_fail_naming_the_key(match, path):
    ok, msg = validate_rules([{"name": "x", "match": match, "when": {"above": 1}}])
    assert ok is False and path in msg, msg


def test_grain_patterns_match_scalars_and_list_items():
    grains = {"role": "boiler-room", "tributary:devices": ["pump-1", "boiler-2"], "rack": 3}
    assert grains_match({"role": "boiler-*"}, grains)
    assert grains_match({"tributary:devices": "boiler-*", "rack": "3"}, grains)
    assert not grains_match({"tributary:devices": "fan-*"}, grains)
    assert not grains_match({"floor": "*"}, grains)  # a grain the heartbeat lacks never matches


def test_a_rule_on_grains_matches_only_gateways_whose_heartbeat_carries_them():
    eng = RuleEngine(
        rules(
            {
                "name": "boiler-room-hot",
                "match": {"grains": {"role": "boiler-room", "tributary:devices": "boiler-*"}},
                "when": {"above": 80},
            }
        )
    )
    hot = [reading(90, T0, gateway="gw-1"), reading(90, T0, gateway="gw-2")]
    assert eng.readings(hot, T0) == []  # no heartbeat yet: no grains, no match
    assert eng.set_grains(
        {
            "gw-1": {"role": "boiler-room", "tributary:devices": ["boiler-1"]},
            "gw-2": {"role": "office", "tributary:devices": ["boiler-1"]},
        }
    )
    assert not eng.set_grains(
        {
            "gw-1": {"role": "boiler-room", "tributary:devices": ["boiler-1"]},
            "gw-2": {"role": "office", "tributary:devices": ["boiler-1"]},
        }
    )
    docs = eng.readings([reading(91, T0 + S, gateway="gw-1"), reading(91, T0 + S, "gw-2")], T0)
    assert [(d["gateway"], d["state"]) for d in docs] == [("gw-1", "firing")]
    # the grains change (gw-2 moved to the boiler room): the cached matching is redone
    eng.set_grains({"gw-2": {"role": "boiler-room", "tributary:devices": "boiler-7"}})
    docs = eng.readings([reading(92, T0 + 2 * S, gateway="gw-2")], T0)
    assert [(d["gateway"], d["state"]) for d in docs] == [("gw-2", "firing")]


def test_grains_are_bounded_on_the_top_master_too():
    assert bounded_grains({"role": "x", "devices": ["a", "b"]}) == {
        "role": "x",
        "devices": ["a", "b"],
    }
    assert bounded_grains({f"g{i}": 1 for i in range(17)}) is None
    assert bounded_grains({"nested": {"a": 1}}) is None
    assert bounded_grains({"big": ["x"] * 1000}) is None
    assert bounded_grains("role=x") is None
    eng = RuleEngine(rules({"name": "r", "match": {"grains": {"role": "*"}}, "when": {"above": 1}}))
    eng.set_grains({"gw-1": {"role": {"deep": "x"}}})
    assert eng.readings([reading(5, T0)], T0) == []


def test_the_gateway_picks_bounded_grain_paths_for_its_heartbeat():
    grains = {
        "role": "boiler-room",
        "tributary": {"devices": ["boiler-1", "pump-2"], "site": "bne"},
        "ip4": ["10.0.0.1"] * 300,
    }
    got, skipped = pick_grains(grains, ["role", "tributary:devices", "tributary", "ip4", "nope"])
    assert got == {"role": "boiler-room", "tributary:devices": ["boiler-1", "pump-2"]}
    assert [s.split(":")[0] for s in skipped] == ["tributary", "ip4"]
    got, skipped = pick_grains({f"g{i}": "x" * 1000 for i in range(8)}, [f"g{i}" for i in range(8)])
    assert len(str(got)) < GRAINS_MAX_BYTES and skipped and "bytes" in skipped[0]


def test_the_health_beacon_validates_its_grain_paths():
    assert validate_health([{"grains": ["role", "tributary:devices"]}]) == (True, "valid")
    ok, msg = validate_health([{"grains": ["role", "bad path"]}])
    assert not ok and "grains[1]: a grain path" in msg
    ok, msg = validate_health([{"grains": "role"}])
    assert not ok and "grains: must be a list" in msg


def test_the_service_reads_grains_from_the_heartbeat_facts(tmp_path):
    from saltext.tributary.reaction.service import AlertService

    facts = {"gw-1": {"epoch": "e", "last_seq": 3, "grains": {"role": "boiler-room"}}}
    fired: list[str] = []
    svc = AlertService(
        rules({"name": "r", "match": {"grains": {"role": "boiler-*"}}, "when": {"above": 80}}),
        AlertBook(str(tmp_path / "alerts.db")),
        None,
        lambda data, tag: fired.append(tag),
        lambda ts: "i",
        lambda n, k: None,
        facts=lambda: facts,
    )
    now = clock.now_ms()
    svc.readings([reading(90, now), reading(90, now, gateway="gw-2")])
    assert fired == ["tributary/alert/r/firing"]
    svc.close()


# -- flap damping ----------------------------------------------------------------------------
FLAPPY = {
    "name": "hot",
    "when": {"above": 80, "clear_below": 75},
    "flap": {"changes": 4, "window_s": 600, "stable_s": 60},
}


def flap_to_flapping(eng, t=T0):
    """fire, resolve, fire, then the fourth change: flapping (one notification)."""
    seen = []
    for i, v in enumerate((85, 70, 85, 70)):
        seen += states(eng.readings([reading(v, t + i * 10 * S)], t + i * 10 * S))
    return seen


@pytest.mark.parametrize(
    ("flap", "path"),
    [
        ({"changes": 1}, "rules[0].flap.changes"),
        ({"window_s": "long"}, "rules[0].flap.window_s"),
        ({"stable": 5}, "rules[0].flap.stable: unknown option"),
        ("yes", "rules[0].flap: must be a mapping"),
    ],
)
def test_bad_flap_config_fails_naming_the_key(flap, path):
    ok, msg = validate_rules([{"name": "x", "when": {"above": 1}, "flap": flap}])
    assert ok is False and path in msg, msg
    ok, msg = validate_rules([{"name": "x", "when": {"anomaly_score": 0.5}, "flap": {}}])
    assert ok is False and "rules[0].flap: not for anomaly rules" in msg


def test_flapping_notifies_once_and_settles_firing_when_stable():
    eng = RuleEngine(rules(FLAPPY))
    assert flap_to_flapping(eng) == ["firing", "resolved", "firing", "flapping"]
    assert eng.alerts["hot|gw-1|boiler-1|temperature"]["state"] == "flapping"
    # more flapping: followed silently
    t = T0 + 40 * S
    for i, v in enumerate((85, 70, 85)):
        assert eng.readings([reading(v, t + i * 5 * S)], t) == []
    # 85 since t+10 s; stable for 60 s in the readings' time -> settles firing, once
    assert eng.readings([reading(86, t + 40 * S)], t) == []
    (settled,) = eng.readings([reading(87, t + 71 * S)], t)
    assert settled["state"] == "firing" and settled["flapped"] is True
    assert event_tag(settled) == "tributary/alert/hot/firing"
    assert eng.readings([reading(88, t + 80 * S)], t) == []  # firing: no more notifications
    # the count started again: one resolution is just a resolution
    assert states(eng.readings([reading(70, t + 90 * S)], t)) == ["resolved"]


def test_a_flapping_alert_settles_resolved_on_the_masters_clock_without_readings():
    eng = RuleEngine(rules(FLAPPY))
    flap_to_flapping(eng)  # flapping with the condition off (70) since T0 + 30 s
    assert eng.tick(T0 + 60 * S) == []
    (settled,) = eng.tick(T0 + 91 * S)
    assert settled["state"] == "resolved" and settled["flapped"] is True
    assert eng.alerts == {}


def test_slow_changes_outside_the_window_never_flap():
    eng = RuleEngine(rules({**FLAPPY, "flap": {"changes": 3, "window_s": 60, "stable_s": 30}}))
    got = []
    for i, v in enumerate((85, 70, 85, 70, 85)):
        t = T0 + i * 40 * S  # 40 s apart: at most two changes in any 60 s
        got += states(eng.readings([reading(v, t)], t))
        got += states(eng.tick(t))
    assert got == ["firing", "resolved", "firing", "resolved", "firing"]


def test_flapping_state_and_counts_survive_a_restart(tmp_path):
    path = str(tmp_path / "alerts.db")
    eng = RuleEngine(rules(FLAPPY), AlertBook(path))
    got = []
    for i, v in enumerate((85, 70, 85)):
        got += states(eng.readings([reading(v, T0 + i * 10 * S)], T0))
    assert got == ["firing", "resolved", "firing"]
    eng = RuleEngine(rules(FLAPPY), AlertBook(path))  # restarted: the three changes are kept
    assert states(eng.readings([reading(70, T0 + 30 * S)], T0)) == ["flapping"]
    eng = RuleEngine(rules(FLAPPY), AlertBook(path))  # restarted while flapping
    assert eng.alerts["hot|gw-1|boiler-1|temperature"]["state"] == "flapping"
    assert eng.readings([reading(85, T0 + 40 * S)], T0) == []  # no second flapping
    (settled,) = eng.readings([reading(85, T0 + 101 * S)], T0)
    assert settled["state"] == "firing"


def test_the_service_fires_one_flapping_event_with_a_controlled_clock(tmp_path, monkeypatch):
    from saltext.tributary.reaction.service import AlertService
    from saltext.tributary.reaction.views import alerts_view

    now = [T0]
    monkeypatch.setattr(clock, "now_ms", lambda: now[0])
    fired, bodies = [], []
    book = AlertBook(str(tmp_path / "alerts.db"))
    svc = AlertService(
        rules(FLAPPY),
        book,
        bodies.append,
        lambda data, tag: fired.append((tag, data.get("changes"))),
        lambda ts: "tributary-alerts-x",
        lambda n, k: None,
        tick_s=0,
    )
    for i, v in enumerate((85, 70, 85, 70, 85, 70)):
        now[0] = T0 + i * 10 * S
        svc.readings([reading(v, now[0])])
    assert [t for t, _ in fired] == [
        "tributary/alert/hot/firing",
        "tributary/alert/hot/resolved",
        "tributary/alert/hot/firing",
        "tributary/alert/hot/flapping",
    ]
    assert fired[-1][1] == 4
    view = alerts_view(book, now[0])
    assert view["flapping"] == 1 and view["sites"]["bne"]["flapping"][0]["rule"] == "hot"
    now[0] += 61 * S  # stable (off) for 61 s on the master's clock, no readings
    svc.tick()
    assert fired[-1][0] == "tributary/alert/hot/resolved"
    assert sum(b.count('"create"') for b in bodies) == 5
    svc.close()
