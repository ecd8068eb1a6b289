"""The reactor's action table and the reactions an alert event becomes (pure logic; the real
reactor runs them in tests/integration/test_reactor.py)."""

from __future__ import annotations

import pytest

from saltext.tributary.reactor.actions import parse_config, plan, reactions, validate

TABLE = {
    "notify": {"broker": {"host": "mqtt.example", "port": 8883}, "qos": 1},
    "actions": {
        "boiler-hot": {
            "firing": [
                {
                    "command": {
                        "device": "{sensor}",
                        "devices": ["boiler-*"],
                        "command": "setpoint",
                        "payload": 60,
                        "timeout_s": 5,
                    }
                },
                {"state": {"tgt": "gateway", "mods": ["tributary.gateway"]}},
                {"state": {"tgt": "role:syndic", "tgt_type": "grain", "mods": "ops.page"}},
                {"notify": {}},
            ],
            "resolved": [{"notify": {"topic": "ops/{site}/{rule}"}}],
        }
    },
}


def alert(state="firing", **over):
    doc = {
        "@timestamp": 1764500000000,
        "rule": "boiler-hot",
        "state": state,
        "kind": "threshold",
        "severity": "critical",
        "gateway": "gw-brisbane-1",
        "site": "brisbane",
        "sensor": "boiler-1",
        "metric": "temperature",
        "value": 85.0,
        "since": 1764499990000,
        "renotify": False,
        "silenced": False,
    }
    doc.update(over)
    return doc


def cfg():
    c, errors = parse_config(TABLE)
    assert not errors
    return c


def test_firing_alert_becomes_command_state_and_notify():
    out, skipped = plan(cfg(), "tributary/alert/boiler-hot/firing", alert())
    assert not skipped
    assert out["tributary-reactor-boiler-hot-firing-0-command"] == {
        "local.tributary.command": [
            {"tgt": ["gw-brisbane-1"]},
            {"tgt_type": "list"},
            {
                "args": [
                    {"device": "boiler-1"},
                    {"command": "setpoint"},
                    {"payload": 60},
                    {"timeout": 5.0},
                ]
            },
        ]
    }
    assert out["tributary-reactor-boiler-hot-firing-1-state"]["local.state.apply"] == [
        {"tgt": ["gw-brisbane-1"]},
        {"tgt_type": "list"},
        {"args": [{"mods": ["tributary.gateway"]}]},
    ]
    fixed = out["tributary-reactor-boiler-hot-firing-2-state"]["local.state.apply"]
    assert fixed[:2] == [{"tgt": "role:syndic"}, {"tgt_type": "grain"}]
    notify = out["tributary-reactor-boiler-hot-firing-3-notify"]["runner.tributary.notify"]
    args = notify[0]["args"]
    assert args[0] == {"topic": "tributary/alerts/brisbane/boiler-hot/firing"}
    assert args[1]["message"]["value"] == 85.0 and "silenced" not in args[1]["message"]


def test_resolved_uses_its_own_actions():
    out, _ = plan(cfg(), "tributary/alert/boiler-hot/resolved", alert("resolved"))
    assert list(out) == ["tributary-reactor-boiler-hot-resolved-0-notify"]
    args = out["tributary-reactor-boiler-hot-resolved-0-notify"]["runner.tributary.notify"]
    assert args[0]["args"][0] == {"topic": "ops/brisbane/boiler-hot"}


def test_rules_without_actions_and_renotifications_do_nothing():
    other = alert(rule="other")
    assert plan(cfg(), "tributary/alert/other/firing", other) == ({}, [])
    out, why = plan(cfg(), "tributary/alert/boiler-hot/firing", alert(renotify=True))
    assert out == {} and "re-notification" in why[0]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # A gateway can fire events of any tag; Salt adds cmd/id to what it fires.
        (alert(cmd="_minion_event", id="gw-brisbane-1"), "a minion fired"),
        (alert(gateway="*"), "not a minion id"),
        (alert(gateway="gw-1,gw-2"), "not a minion id"),
        (alert(gateway="gw-1 or G@role:master"), "not a minion id"),
        (alert(gateway=["gw-1", "top"]), "not a minion id"),
        (alert(rule="probe-hot"), "disagrees with its tag"),
        (alert(state="resolved"), "disagrees with its tag"),
        ("gateway: gw-1", "not a mapping"),
    ],
)
def test_untrusted_event_data_chooses_no_target(data, reason):
    out, why = plan(cfg(), "tributary/alert/boiler-hot/firing", data)
    assert out == {} and reason in why[0]


@pytest.mark.parametrize(
    "sensor",
    ["boiler-1/../x", "boiler-*", "valve-3", "boiler 1", "boiler-1\nnotify:", "#", None, 7],
)
def test_a_device_from_the_event_must_be_a_name_the_table_allows(sensor):
    out, why = plan(cfg(), "tributary/alert/boiler-hot/firing", alert(sensor=sensor))
    assert not any(k.endswith("-command") for k in out)
    assert any("firing-0" in w for w in why)
    # the other actions (fixed by the table) still run
    assert "tributary-reactor-boiler-hot-firing-2-state" in out


def test_a_topic_is_filled_only_with_names():
    out, why = plan(cfg(), "tributary/alert/boiler-hot/firing", alert(site="a/#"))
    assert not any(k.endswith("-notify") for k in out) and why


@pytest.mark.parametrize("tag", ["tributary/alert/boiler-hot", "tributary/alert/*/firing", "x"])
def test_bad_tags_make_no_reactions(tag):
    out, why = plan(cfg(), tag, alert())
    assert out == {} and "not an alert tag" in why[0]


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"actions": []}, "tributary_reactor.actions: must be a mapping"),
        ({"actions": {"r": {"pending": [{"notify": {}}]}}}, "tributary_reactor.actions.r.pending"),
        ({"actions": {"r": {"firing": [{"exec": {}}]}}}, "actions.r.firing[0]: unknown action"),
        (
            {"actions": {"r": {"firing": [{"command": {"device": "{sensor}", "command": "x"}}]}}},
            "actions.r.firing[0].command.devices: required",
        ),
        (
            {"actions": {"r": {"firing": [{"command": {"device": "{id}", "command": "x"}}]}}},
            "actions.r.firing[0].command.device: unknown field {id}",
        ),
        (
            {"actions": {"r": {"firing": [{"command": {"device": "d", "command": "a b"}}]}}},
            "actions.r.firing[0].command.command",
        ),
        (
            {"actions": {"r": {"firing": [{"state": {"mods": ["x"], "tgt": "{gateway}*"}}]}}},
            "actions.r.firing[0].state.tgt",
        ),
        (
            {"actions": {"r": {"firing": [{"state": {"mods": ["../x"]}}]}}},
            "actions.r.firing[0].state.mods[0]",
        ),
        ({"actions": {"r": {"firing": [{"notify": {}}]}}}, "firing[0].notify: needs"),
        (
            {"notify": {"broker": {}, "topic": "a/+/{rule}"}},
            "tributary_reactor.notify.topic",
        ),
        ({"notify": {"broker": {"port": 0}}}, "tributary_reactor.notify.broker.port"),
        ({"renotify": "yes"}, "tributary_reactor.renotify"),
        ({"action": {}}, "tributary_reactor.action: unknown option"),
    ],
)
def test_bad_configs_name_the_key(table, key):
    c, errors = parse_config(table)
    assert c is None and any(key in e for e in errors), errors
    ok, msg = validate(table)
    assert ok is False and key in msg


def test_validate_never_raises_and_bad_config_means_no_reactions():
    assert validate(TABLE)[0] is True
    assert validate(object())[0] is False
    assert reactions({"tributary_reactor": {"actions": 1}}, "tributary/alert/r/firing", {}) == {}
    assert reactions({}, "tributary/alert/boiler-hot/firing", alert()) == {}
