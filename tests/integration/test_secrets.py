"""Secrets are targeted by minion id: a gateway that claims another role or site with grains it
sets on itself gets neither the relay's Elasticsearch credentials nor another site's bridge
passwords (the repo's pillar/ served by the syndic master, as in the example fleet)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("topology")

GW = "gw-brisbane-1"


def test_a_gateway_claiming_role_master_gets_no_relay_credentials(topology):
    cli = topology["gateways"][GW].salt_call_cli(timeout=120)

    def pillar(key: str):
        assert cli.run("saltutil.refresh_pillar", "wait=True").returncode == 0
        ret = cli.run("pillar.get", key)
        assert ret.returncode == 0, ret
        return ret.data

    before = {k: cli.run("grains.get", k).data for k in ("role", "site")}
    assert pillar("tributary:sites:brisbane")  # its own site's data reaches it
    try:
        assert cli.run("grains.setval", "role", "master").returncode == 0
        assert cli.run("grains.setval", "site", "sydney").returncode == 0
        assert pillar("tributary:master:relay") in ("", {}, None)
        assert pillar("tributary:sites:sydney") in ("", {}, None)
        bridge = pillar("mosquitto:bridges:upstream:addresses")
        assert all("sydney" not in a for a in bridge)
    finally:
        for key, value in before.items():
            cli.run("grains.setval", key, value)
        cli.run("saltutil.refresh_pillar", "wait=True")
