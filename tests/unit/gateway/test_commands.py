"""The gateway's command safety, pure: the allow-list (first matching rule decides, payload
limits), its configuration errors with key paths, the rate limit's reason, test mode's plan."""

from __future__ import annotations

import re

import pytest

from saltext.tributary.gateway.commands import (
    check_command,
    check_payload,
    parse_commands,
    plan_command,
    rate_reason,
)

ALLOW = {
    "devices": ["boiler-1", "boiler-2", "valve-3"],
    "allow": [
        {
            "device": "boiler-*",
            "commands": ["setpoint"],
            "payload": {"type": "number", "min": 40, "max": 90, "max_bytes": 16},
        },
        {"device": "boiler-*", "commands": ["reset", "ping*"], "payload": {"type": "none"}},
        {"device": "valve-?", "commands": ["open", "close"]},
    ],
    "rate": {"max": 3, "window_s": 10},
}


def cfg():
    c, errors = parse_commands(ALLOW)
    assert not errors and c is not None
    return c


@pytest.mark.parametrize(
    ("device", "command", "payload", "rule"),
    [
        ("boiler-1", "setpoint", 70, "tributary:commands.allow[0]"),
        ("boiler-2", "setpoint", 40.5, "tributary:commands.allow[0]"),
        ("boiler-1", "reset", None, "tributary:commands.allow[1]"),
        ("boiler-1", "ping-now", None, "tributary:commands.allow[1]"),
        ("valve-3", "open", {"pct": 50}, "tributary:commands.allow[2]"),
    ],
)
def test_allowed_commands_name_the_rule(device, command, payload, rule):
    v = check_command(cfg(), device, command, payload)
    assert v.allowed and v.rule == rule and rule in v.reason


@pytest.mark.parametrize(
    ("device", "command", "payload", "reason"),
    [
        ("boiler-1", "setpoint", 95, "tributary:commands.allow[0].payload.max: 95 is above 90"),
        ("boiler-1", "setpoint", 10, "tributary:commands.allow[0].payload.min: 10 is below 40"),
        ("boiler-1", "setpoint", "hot", "allow[0].payload.type: 'hot' is not a finite number"),
        ("boiler-1", "setpoint", True, "allow[0].payload.type: True is not a finite number"),
        ("boiler-1", "setpoint", None, "allow[0].payload.type: a payload of type number"),
        ("boiler-1", "reset", 1, "allow[1].payload.type: this command takes no payload"),
        ("boiler-1", "open", None, "no rule allows command 'open' for device 'boiler-1'"),
        ("valve-3", "setpoint", 50, "no rule allows command 'setpoint' for device 'valve-3'"),
        ("pump-9", "open", None, "tributary:commands.devices: 'pump-9' is not a device"),
        ("boiler/1", "setpoint", 50, "device 'boiler/1' is not a name"),
        ("boiler-1", "set point", 50, "command 'set point' is not a name"),
    ],
)
def test_refusals_say_which_rule_or_limit(device, command, payload, reason):
    v = check_command(cfg(), device, command, payload)
    assert not v.allowed and reason in v.reason, v.reason


def test_first_matching_rule_decides_even_when_a_later_one_would_allow():
    c, _ = parse_commands(
        {
            "allow": [
                {"device": "b-1", "commands": ["set"], "payload": {"type": "number", "max": 5}},
                {"device": "*", "commands": ["*"]},
            ]
        }
    )
    assert c is not None
    v = check_command(c, "b-1", "set", 9)
    assert not v.allowed and v.rule == "tributary:commands.allow[0]"
    assert check_command(c, "b-2", "set", 9).allowed


def test_no_allow_list_refuses_everything():
    c, errors = parse_commands({"devices": ["boiler-1"]})
    assert not errors and c is not None
    v = check_command(c, "boiler-1", "setpoint", 70)
    assert not v.allowed and "tributary:commands.allow is not set" in v.reason


def test_payload_size_limit_counts_json_bytes():
    c = cfg()
    v = check_command(c, "boiler-1", "setpoint", 70.123456789012345)
    assert not v.allowed and "allow[0].payload.max_bytes" in v.reason and "over 16" in v.reason
    lim = c.rules[2].payload
    assert (
        check_payload(lim, "x" * 300, "p")
        == "p.payload.max_bytes: the payload is 302 bytes of JSON, over 256"
    )
    assert check_payload(lim, "x" * 200, "p") is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"allow": {"device": "x"}}, "tributary:commands.allow: must be a non-empty list"),
        ({"allow": [{"commands": ["a"]}]}, "tributary:commands.allow[0].device: required"),
        ({"allow": [{"device": "a"}]}, "tributary:commands.allow[0].commands: required"),
        ({"allow": [{"device": "a", "commands": "x"}]}, "tributary:commands.allow[0].commands"),
        (
            {"allow": [{"device": "a", "commands": ["x"], "payload": {"type": "float"}}]},
            "tributary:commands.allow[0].payload.type: must be one of",
        ),
        (
            {"allow": [{"device": "a", "commands": ["x"], "payload": {"min": 1}}]},
            "tributary:commands.allow[0].payload.type: min/max need type number",
        ),
        (
            {
                "allow": [
                    {
                        "device": "a",
                        "commands": ["x"],
                        "payload": {"type": "number", "min": 5, "max": 1},
                    }
                ]
            },
            "tributary:commands.allow[0].payload.min: 5 is above max 1",
        ),
        (
            {"allow": [{}, {"device": "a", "commands": ["x"], "limit": 1}]},
            "tributary:commands.allow[1].limit: unknown option",
        ),
        (
            {"allow": [{"device": "a", "commands": ["x"], "payload": {"max_bytes": 0}}]},
            "tributary:commands.allow[0].payload.max_bytes: must be an integer in 1..4096",
        ),
        ({"rate": {"max": 0}}, "tributary:commands.rate.max: must be an integer in 1..100000"),
        ({"rate": {"window": 5}}, "tributary:commands.rate.window: unknown option"),
        ({"rate": 5}, "tributary:commands.rate: must be a mapping"),
    ],
)
def test_config_errors_name_the_key_path(data, key):
    c, errors = parse_commands(data)
    assert c is None and any(key in e for e in errors), errors


def test_rate_reason_names_the_limit():
    assert rate_reason(cfg(), "boiler-1", 3) == (
        "tributary:commands.rate: 3 commands to 'boiler-1' within the last 10 s (at most 3)"
    )


def test_plan_says_what_would_be_sent():
    plan = plan_command(cfg(), "boiler-1", "setpoint", 70)
    assert plan["topic"] == "cmd/boiler-1/setpoint" and plan["qos"] == 1
    assert plan["response_topic"] == "cmd/boiler-1/reply"
    assert re.fullmatch(r"[0-9a-f]{16}", plan["correlation_id"])
    assert plan["message"] == {
        "id": plan["correlation_id"],
        "command": "setpoint",
        "payload": 70,
        "reply_to": "cmd/boiler-1/reply",
    }
    assert plan_command(cfg(), "boiler-1", "x", None)["correlation_id"] != plan["correlation_id"]
