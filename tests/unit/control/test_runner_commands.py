"""The command runner's logic: resolving which gateways serve devices matching a glob (and a
site), one job per device on exactly those gateways, per gateway per device outcomes. The Salt
client is a function over a table of gateways here (its matching is fnmatch on the grain
lists, as Salt's grain matcher does); the real one is tested in tests/integration."""

from __future__ import annotations

import fnmatch

from saltext.tributary.control.commands import check_args, resolve, send, target

FLEET = {
    "gw-brisbane-1": {"site": "brisbane", "devices": ["boiler-1", "boiler-2", "t1"]},
    "gw-brisbane-2": {"site": "brisbane", "devices": ["boiler-3"]},
    "gw-sydney-1": {"site": "sydney", "devices": ["boiler-9", "pump-1"]},
}


class FakeSalt:
    """Answers ``grains.get`` and ``tributary.command`` for compound targets of the two forms
    the runner uses; records every job."""

    def __init__(self, silent=()):
        self.jobs: list[tuple[str, str, list, dict]] = []
        self.silent = set(silent)

    def matches(self, gw: str, tgt: str) -> bool:
        ok = True
        for part in tgt.split(" and "):
            key, _, pat = part[2:].rpartition(":")
            if key == "tributary:devices":
                ok &= any(fnmatch.fnmatchcase(d, pat) for d in FLEET[gw]["devices"])
            elif key == "site":
                ok &= fnmatch.fnmatchcase(FLEET[gw]["site"], pat)
        return ok

    def __call__(self, tgt, fun, arg, kwarg, tgt_type, timeout, expect):
        assert tgt_type == "compound"
        self.jobs.append((tgt, fun, arg, kwarg))
        hit = [gw for gw in FLEET if self.matches(gw, tgt) and gw not in self.silent]
        if fun == "grains.get":
            assert expect is None  # nothing tells which gateways a grain reaches
            return {gw: FLEET[gw]["devices"] for gw in hit}
        assert expect == set(hit) | (expect & self.silent)  # the resolved gateways
        return {
            gw: {"outcome": "test" if kwarg.get("test") else "acked", "id": "c1", "extra": 1}
            for gw in hit
        }


def test_targets_are_grain_compounds():
    assert target("boiler-*") == "G@tributary:devices:boiler-*"
    assert target("boiler-1", "brisbane") == "G@tributary:devices:boiler-1 and G@site:brisbane"


def test_resolve_keeps_only_matching_devices():
    got = resolve({gw: v["devices"] for gw, v in FLEET.items()} | {"odd": "x"}, "boiler-[12]")
    assert got == {"gw-brisbane-1": ["boiler-1", "boiler-2"]}


def test_each_device_goes_to_exactly_the_gateways_that_serve_it():
    salt = FakeSalt()
    out = send(salt, "boiler-*", "setpoint", 70, site="brisbane")
    assert out["result"] is True and out["devices"] == ["boiler-1", "boiler-2", "boiler-3"]
    assert out["gateways"] == {
        "gw-brisbane-1": {
            "boiler-1": {"outcome": "acked", "id": "c1"},
            "boiler-2": {"outcome": "acked", "id": "c1"},
        },
        "gw-brisbane-2": {"boiler-3": {"outcome": "acked", "id": "c1"}},
    }
    sent = [(t, a, k) for t, f, a, k in salt.jobs if f == "tributary.command"]
    assert sent == [
        (
            "G@tributary:devices:boiler-1 and G@site:brisbane",
            ["boiler-1", "setpoint"],
            {"payload": 70},
        ),
        (
            "G@tributary:devices:boiler-2 and G@site:brisbane",
            ["boiler-2", "setpoint"],
            {"payload": 70},
        ),
        (
            "G@tributary:devices:boiler-3 and G@site:brisbane",
            ["boiler-3", "setpoint"],
            {"payload": 70},
        ),
    ]
    assert out["outcomes"] == {"acked": 3}


def test_a_silent_gateway_is_no_return_and_the_result_false():
    salt = FakeSalt()
    first = send(salt, "pump-1", "stop", test=True)
    assert (
        first["result"] is True and first["gateways"]["gw-sydney-1"]["pump-1"]["outcome"] == "test"
    )
    calls = []

    def flaky(tgt, fun, arg, kwarg, tgt_type, timeout, expect):
        calls.append((fun, expect))
        ret = FakeSalt()(tgt, fun, arg, kwarg, tgt_type, timeout, expect)
        return ret if fun == "grains.get" else {}

    out = send(flaky, "pump-1", "stop", job_timeout=3)
    assert out["result"] is False
    assert calls == [("grains.get", None), ("tributary.command", {"gw-sydney-1"})]
    assert out["gateways"]["gw-sydney-1"]["pump-1"] == {
        "outcome": "no_return",
        "reason": "no answer within 3 s",
    }


def test_nothing_serves_it_or_bad_arguments():
    out = send(FakeSalt(), "pump-*", "stop", site="brisbane")
    assert out["result"] is False
    assert out["error"] == "no gateway in site brisbane serves a device matching 'pump-*'"
    assert "device 'a b' is not a name or glob" in send(FakeSalt(), "a b", "x")["error"]
    assert check_args("x", "c*", None) == "command 'c*' is not a name"
    assert "site 'a and b'" in str(check_args("x", "c", "a and b"))
