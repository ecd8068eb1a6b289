"""Salt's own reactor renders the repo's ``salt/reactor/alert.sls`` (``#!py``, ``tag`` and
``data`` handed in by Salt) into the reactions of the action table in the master's opts, and
compiles them as it would before running them; no daemons (the closed loop with daemons is
tests/integration/test_reactor.py)."""

from __future__ import annotations

import pytest
import salt.config
import salt.utils.reactor

from tests.support.topology import REPO

SLS = str(REPO / "salt" / "reactor" / "alert.sls")
TABLE = {
    "actions": {
        "boiler-hot": {
            "firing": [
                {
                    "command": {
                        "device": "{sensor}",
                        "devices": ["boiler-*"],
                        "command": "setpoint",
                        "payload": 60,
                    }
                },
                {"state": {"tgt": "gateway", "mods": ["tributary.gateway"]}},
            ]
        }
    }
}
ALERT = {
    "rule": "boiler-hot",
    "state": "firing",
    "gateway": "gw-brisbane-1",
    "site": "brisbane",
    "sensor": "boiler-1",
    "value": 85.0,
}


@pytest.fixture
def reactor(tmp_path):
    opts = salt.config.master_config(None)
    opts.update(
        {
            "root_dir": str(tmp_path),
            "cachedir": str(tmp_path / "cache"),
            "pki_dir": str(tmp_path / "pki"),
            "sock_dir": str(tmp_path / "sock"),
            "extension_modules": str(tmp_path / "ext"),
            "file_roots": {"base": [str(tmp_path)]},
            "tributary_reactor": TABLE,
        }
    )
    reactor = salt.utils.reactor.Reactor(opts)
    yield reactor
    minion = getattr(reactor, "minion", None)
    if hasattr(minion, "destroy"):
        minion.destroy()


def test_salt_renders_and_compiles_the_reactions(reactor):
    high = reactor.render_reaction(SLS, "tributary/alert/boiler-hot/firing", dict(ALERT))
    assert set(high) == {
        "tributary-reactor-boiler-hot-firing-0-command",
        "tributary-reactor-boiler-hot-firing-1-state",
    }
    compiled = reactor.compile_high_data(high)
    # Salt 3007+ returns (chunks, errors); 3006 the chunks
    chunks, errors = compiled if isinstance(compiled, tuple) else (compiled, [])
    assert not errors and len(chunks) == 2
    by_fun = {c["fun"]: c for c in chunks}
    cmd = by_fun["tributary.command"]
    assert (cmd["state"], cmd["tgt"], cmd["tgt_type"]) == ("local", ["gw-brisbane-1"], "list")
    assert cmd["args"] == [{"device": "boiler-1"}, {"command": "setpoint"}, {"payload": 60}]
    assert by_fun["state.apply"]["args"] == [{"mods": ["tributary.gateway"]}]


def test_events_a_minion_fired_or_with_hostile_names_make_no_reactions(reactor):
    tag = "tributary/alert/boiler-hot/firing"
    forged = {**ALERT, "cmd": "_minion_event", "id": "gw-brisbane-1"}
    assert reactor.render_reaction(SLS, tag, forged) == {}
    hostile = {**ALERT, "gateway": "* or G@role:master", "sensor": "boiler-1\n  local.cmd.run:"}
    assert reactor.render_reaction(SLS, tag, hostile) == {}
    odd = reactor.render_reaction(SLS, tag, {**ALERT, "sensor": "boiler-1/../../x"})
    assert list(odd) == ["tributary-reactor-boiler-hot-firing-1-state"]
