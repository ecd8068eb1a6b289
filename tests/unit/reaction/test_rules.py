"""Rules and alerts: validation with key paths, and the lifecycle of each condition kind."""

from __future__ import annotations

import pytest

from saltext.tributary.reaction.alerts import AlertBook, RuleEngine, event_tag
from saltext.tributary.reaction.rules import validate_rules
from tests.unit.reaction.helpers import T0, S, reading, rules


def states(docs):
    return [(d["rule"], d["state"]) for d in docs]


@pytest.mark.parametrize(
    ("items", "path"),
    [
        ([{"name": "x"}], "rules[0].when: needs one condition"),
        ([{"name": "x", "when": {"above": 1, "absent_s": 5}}], "one condition kind"),
        ([{"name": "X!", "when": {"above": 1}}], "rules[0].name"),
        ([{"name": "x", "when": {"above": "hot"}}], "rules[0].when.above"),
        ([{"name": "x", "when": {"above": 1, "clear_below": 5}}], "rules[0].when.clear_below"),
        ([{"name": "x", "when": {"above": 1}, "severity": "meh"}], "rules[0].severity"),
        ([{"name": "x", "when": {"above": 1}, "match": {"host": "a"}}], "rules[0].match.host"),
        ([{"name": "x", "when": {"above": 1}}, {"name": "x", "when": {"below": 1}}], "used twice"),
        ("nope", "rules: must be a list"),
    ],
)
def test_bad_rules_fail_naming_the_key(items, path):
    ok, msg = validate_rules(items)
    assert ok is False and path in msg, msg


def test_the_documented_examples_validate():
    import yaml

    from saltext.tributary.reaction import rules as mod

    doc = mod.__doc__.split("\n\n")[1]
    ok, msg = validate_rules(yaml.safe_load(doc)["rules"])
    assert ok, msg


def test_threshold_held_for_a_duration_with_hysteresis():
    eng = RuleEngine(
        rules(
            {
                "name": "hot",
                "match": {"sensor": "boiler-*"},
                "when": {"above": 80, "for_s": 60, "clear_below": 75},
                "severity": "critical",
            }
        )
    )
    assert states(eng.readings([reading(85, T0)], T0)) == [("hot", "pending")]
    assert eng.readings([reading(86, T0 + 30 * S)], T0) == []
    (fired,) = eng.readings([reading(87, T0 + 61 * S)], T0)
    assert fired["state"] == "firing" and fired["severity"] == "critical" and fired["since"] == T0
    assert eng.readings([reading(78, T0 + 70 * S)], T0) == []  # below 80, not below 75
    (resolved,) = eng.readings([reading(74, T0 + 80 * S)], T0)
    assert resolved["state"] == "resolved" and resolved["duration_s"] == 80.0
    assert event_tag(resolved) == "tributary/alert/hot/resolved"
    # a blip shorter than for_s never notifies
    assert states(eng.readings([reading(90, T0 + 100 * S)], T0)) == [("hot", "pending")]
    assert eng.readings([reading(70, T0 + 110 * S)], T0) == []
    assert eng.alerts == {}
    # other sensors are not matched
    assert eng.readings([reading(99, T0, sensor="pump-1")], T0) == []


def test_one_alert_per_rule_and_series():
    eng = RuleEngine(rules({"name": "hot", "when": {"above": 80}}))
    docs = eng.readings([reading(90, T0), reading(91, T0 + S), reading(90, T0, gateway="gw-2")], T0)
    assert [(d["gateway"], d["state"]) for d in docs] == [("gw-1", "firing"), ("gw-2", "firing")]


def test_rate_of_change():
    eng = RuleEngine(rules({"name": "rising", "when": {"rate_above": 0.5}}))
    assert eng.readings([reading(10, T0), reading(11, T0 + 10 * S)], T0) == []  # 0.1/s
    assert states(eng.readings([reading(21, T0 + 20 * S)], T0)) == [("rising", "firing")]
    assert states(eng.readings([reading(21.5, T0 + 30 * S)], T0)) == [("rising", "resolved")]


def test_absence_fires_in_the_masters_time_and_resolves_when_readings_return():
    eng = RuleEngine(rules({"name": "gone", "when": {"absent_s": 60}}))
    eng.readings([reading(1, T0)], T0)
    assert eng.tick(T0 + 30 * S) == []
    assert states(eng.tick(T0 + 61 * S)) == [("gone", "firing")]
    assert eng.tick(T0 + 62 * S) == []  # one alert
    assert states(eng.readings([reading(2, T0 + 70 * S)], T0 + 70 * S)) == [("gone", "resolved")]


def test_anomaly_and_finding_rules():
    eng = RuleEngine(
        rules(
            {"name": "odd", "when": {"anomaly_score": 0.5}},
            {"name": "down", "when": {"finding": "site_outage"}, "severity": "critical"},
        )
    )
    anomaly = {
        "@timestamp": T0,
        "gateway": "gw-1",
        "site": "bne",
        "sensor": "s",
        "metric": "m",
        "score": 0.7,
        "value": 3,
    }
    assert states(eng.anomaly(anomaly)) == [("odd", "firing")]
    assert eng.anomaly({**anomaly, "score": 0.2, "sensor": "t"}) == []
    raised = {"@timestamp": T0, "kind": "site_outage", "state": "raised", "site": "bne"}
    assert states(eng.finding(raised)) == [("down", "firing")]
    assert states(eng.finding({**raised, "state": "cleared"})) == [("down", "resolved")]


def test_renotify_and_silence(tmp_path):
    book = AlertBook(str(tmp_path / "alerts.db"))
    eng = RuleEngine(rules({"name": "hot", "when": {"above": 80}, "renotify_s": 60}), book)
    assert states(eng.readings([reading(90, T0)], T0)) == [("hot", "firing")]
    assert eng.tick(T0 + 30 * S) == []
    (again,) = eng.tick(T0 + 61 * S)
    assert again["state"] == "firing" and again["renotify"] and not again["silenced"]
    book.silence("hot", "gw-*", T0 + 3_600 * S, "maintenance")
    eng._silences_at = 0  # silences are re-read every 5 s; this test does not wait
    (later,) = eng.tick(T0 + 122 * S)
    assert later["silenced"] is True
    assert [h["state"] for h in book.history()] == ["firing", "firing", "firing"]


def test_alerts_survive_a_restart(tmp_path):
    path = str(tmp_path / "alerts.db")
    spec = {"name": "hot", "when": {"above": 80, "for_s": 60}}
    eng = RuleEngine(rules(spec), AlertBook(path))
    eng.readings([reading(90, T0)], T0)  # pending
    again = RuleEngine(rules(spec), AlertBook(path))
    assert states(again.readings([reading(90, T0 + 61 * S)], T0)) == [("hot", "firing")]


def test_the_service_fires_notifications_indexes_transitions_and_shows_them(tmp_path):
    from saltext.tributary.reaction.service import AlertService
    from saltext.tributary.reaction.views import alerts_view

    fired, bodies, counts = [], [], {}
    book = AlertBook(str(tmp_path / "alerts.db"))
    svc = AlertService(
        rules({"name": "hot", "when": {"above": 80, "for_s": 10}, "severity": "critical"}),
        book,
        bodies.append,
        lambda data, tag: fired.append(tag),
        lambda ts: "tributary-alerts-x",
        lambda n, k: counts.__setitem__(n, counts.get(n, 0) + k),
    )
    now = int(__import__("time").time() * 1000)
    svc.readings([reading(90, now - 20 * S), reading(91, now)])
    assert fired == ["tributary/alert/hot/firing"]  # pending is indexed, not fired
    assert counts == {"alerts_pending": 1, "alerts_firing": 1}
    assert sum(b.count('"create"') for b in bodies) == 2
    view = alerts_view(book, now)
    assert view["firing"] == 1 and view["sites"]["bne"]["firing"][0]["rule"] == "hot"
    assert [h["state"] for h in view["recent"]] == ["firing", "pending"]
    svc.close()
