"""tributary.gateway / tributary.master / tributary.syndic applied for real on the test minion.

The gateway state installs the package, syncs the custom modules and configures the
tributary_mqtt beacon from pillar; the beacon then really subscribes to a broker. The master
and syndic states write their config into a temp dir (manage_service: false: restarting a
salt-master is out of reach of a test minion) and the syndic mirrors the file tree."""

from __future__ import annotations

import filecmp
import json
import pathlib
import shutil
import tempfile

import pytest
import salt.version
import yaml

from tests.integration.states.conftest import (
    REPO,
    apply,
    assert_all_ok,
    changed,
    state_results,
    wait_for,
)
from tests.support.mosquitto import start_broker


@pytest.fixture
def tmp_dir():
    d = pathlib.Path(tempfile.mkdtemp(prefix="trib-states-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_gateway_state_installs_syncs_and_configures_beacons(states_minion, pillar, tmp_dir):
    broker = start_broker()
    pillar.set(
        {
            "tributary": {
                "secrets_dir": str(tmp_dir / "secrets"),
                "beacons": {
                    "tributary_mqtt": {
                        "broker": {
                            "host": "127.0.0.1",
                            "port": broker.port,
                            "username": "tributary",
                            "password": "mqtt-secret",
                        }
                    }
                },
                # per site: the topics; per gateway: the interval
                "sites": {
                    "brisbane": {
                        "beacons": {
                            "tributary_mqtt": {
                                "topics": [
                                    {
                                        "topic": "sensors/{sensor}/{metric}",
                                        "format": "number",
                                        "unit": "C",
                                    }
                                ]
                            }
                        }
                    }
                },
                "gateways": {
                    "gw-brisbane-states": {"beacons": {"tributary_mqtt": {"interval": 1}}}
                },
            }
        }
    )
    cli = states_minion.salt_call_cli(timeout=120)
    try:
        res = assert_all_ok(apply(states_minion, "tributary.gateway"))
        # Salt's beacon.present reports an added beacon in its comment, not in changes
        assert "Adding tributary_mqtt" in res["tributary-gateway-beacon-tributary_mqtt"]["comment"]
        beacons = cli.run("beacons.list", "return_yaml=False").data
        conf = {k: v for item in beacons["tributary_mqtt"] for k, v in item.items()}
        assert conf["broker"]["port"] == broker.port
        # the password is in a 0600 file, not in the beacon config nor in the state output
        pw_file = tmp_dir / "secrets" / "tributary_mqtt.broker-password"
        assert conf["broker"]["password_file"] == str(pw_file) and "password" not in conf["broker"]
        assert pw_file.read_text().strip() == "mqtt-secret" and pw_file.stat().st_mode & 0o077 == 0
        assert "mqtt-secret" not in json.dumps(res)
        assert conf["topics"][0]["topic"] == "sensors/{sensor}/{metric}"
        assert conf["interval"] == 1

        def subscribed():
            ret = cli.run("tributary.status")
            return ret.returncode == 0 and (ret.data.get("state") or {}).get("broker")

        assert wait_for(subscribed, 60, "the beacon's MQTT subscription") == "subscribed"
        res = assert_all_ok(apply(states_minion, "tributary.gateway"))
        assert changed(res) == {}
    finally:
        cli.run("beacons.delete", "tributary_mqtt")
        cli.run("beacons.save")
        broker.cleanup()


def test_master_state_writes_engine_config_and_credentials(states_minion, pillar, tmp_dir):
    relay = {
        "elasticsearch": {
            "hosts": ["https://es.example.internal:9200"],
            "username": "tributary",
            "password": "es-secret",
            "ca_certs": "/etc/tributary/es-ca.pem",
        },
        "index_prefix": "tributary",
    }
    pillar.set(
        {
            "tributary": {
                "master": {"config_dir": str(tmp_dir), "manage_service": False, "relay": relay}
            }
        }
    )
    first = assert_all_ok(apply(states_minion, "tributary.master"))
    path = tmp_dir / "tributary.conf"
    assert path.stat().st_mode & 0o077 == 0  # credentials: owner only
    assert "es-secret" not in json.dumps(first)  # never in the state output
    conf = yaml.safe_load(path.read_text())
    assert conf["order_masters"] is True
    assert conf["engines"] == [{"tributary_relay": relay}]
    assert conf["file_roots"]["base"][0].endswith("/salt/states")
    assert changed(assert_all_ok(apply(states_minion, "tributary.master"))) == {}
    relay["elasticsearch"]["password"] = "es-secret-2"  # a rotated password: changed, not shown
    pillar.set(
        {
            "tributary": {
                "master": {"config_dir": str(tmp_dir), "manage_service": False, "relay": relay}
            }
        }
    )
    res = assert_all_ok(apply(states_minion, "tributary.master"))
    assert "tributary-master-config" in changed(res)
    assert "es-secret" not in json.dumps(res)
    assert "es-secret-2" in path.read_text()


def test_syndic_state_mirrors_the_top_file_tree(states_minion, pillar, tmp_dir):
    tree = tmp_dir / "tree"
    pillar.set(
        {
            "tributary": {
                "syndic": {
                    "config_dir": str(tmp_dir / "master.d"),
                    "mirror_dir": str(tree),
                    "manage_service": False,
                    "syndic_master": "top.example.internal",
                }
            }
        }
    )
    assert_all_ok(apply(states_minion, "tributary.syndic"))
    conf = yaml.safe_load((tmp_dir / "master.d" / "tributary-syndic.conf").read_text())
    assert conf["syndic_master"] == "top.example.internal"
    assert conf["file_roots"] == {"base": [str(tree)]}
    # the engines of a syndic master: keys always, the uplink where salt-syndic cannot forward
    uplink = salt.version.__saltstack_version__.info[0] >= 3008
    assert conf["engines"] == [{"tributary_keys": {"interval": 60}}] + (
        [{"tributary_uplink": {}}] if uplink else []
    )
    # with the uplink on, salt-syndic only passes jobs down (README "Versions tested")
    salt_syndic = {
        k: v for k, v in conf.items() if k.startswith("syndic_") and k != "syndic_master"
    }
    assert salt_syndic == (
        {"syndic_mode": "cluster", "syndic_event_forward_timeout": 3600}
        if uplink
        else {"syndic_event_forward_timeout": 0.5}
    )
    for src, dst in [
        (REPO / "salt" / "_modules", tree / "_modules"),
        (REPO / "salt" / "_beacons", tree / "_beacons"),
        (REPO / "salt" / "states" / "mosquitto", tree / "mosquitto"),
    ]:
        cmp = filecmp.dircmp(src, dst, ignore=["__pycache__"])
        assert not (cmp.left_only or cmp.right_only or cmp.diff_files), (src, cmp.report())
    assert (tree / "top.sls").read_text() == (REPO / "salt" / "states" / "top.sls").read_text()
    # a file removed on the top master disappears from the mirror on the next apply
    (tree / "_modules" / "stale.py").write_text("# gone upstream\n")
    res = assert_all_ok(apply(states_minion, "tributary.syndic"))
    assert not (tree / "_modules" / "stale.py").exists()
    assert set(changed(res)) == {"tributary-syndic-file-tree-_modules"}


def test_syndic_state_writes_a_scaleout_relay(states_minion, pillar, tmp_dir):
    """tributary:syndic:relay set: the syndic master runs its own relay (scale-out, role
    syndic, its id as tributary_keys signs), and the file with its credentials is 0600."""
    relay = {
        "elasticsearch": {
            "hosts": ["https://es.example.internal:9200"],
            "username": "tributary",
            "password": "syn-secret",
        },
        "health": {"enabled": False},
    }
    pillar.set(
        {
            "tributary": {
                "syndic": {
                    "config_dir": str(tmp_dir / "master.d"),
                    "mirror_dir": str(tmp_dir / "tree"),
                    "manage_service": False,
                    "syndic_master": "top.example.internal",
                    "keys": {"interval": 60, "syndic_id": "syn-brisbane"},
                    "relay": relay,
                }
            }
        }
    )
    res = assert_all_ok(apply(states_minion, "tributary.syndic"))
    assert "syn-secret" not in json.dumps(res)
    path = tmp_dir / "master.d" / "tributary-syndic.conf"
    assert path.stat().st_mode & 0o077 == 0
    engines = yaml.safe_load(path.read_text())["engines"]
    (cfg,) = [e["tributary_relay"] for e in engines if "tributary_relay" in e]
    assert cfg == {**relay, "scaleout": {"role": "syndic", "syndic_id": "syn-brisbane"}}
    from saltext.tributary.relay.config import validate_relay

    assert validate_relay(cfg) == (True, "valid")


def test_example_fleet_pillar_renders_for_a_gateway(states_minion, pillar, pillar_root):
    # the repo's pillar/ (top.sls + example fleet) served as is; the minion is a brisbane gateway
    for src in (REPO / "pillar").rglob("*.sls"):
        dst = pillar_root / src.relative_to(REPO / "pillar")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    try:
        cli = states_minion.salt_call_cli(timeout=120)
        # Salt 3008 masks pillar values in pillar.items unless asked (states see them unmasked)
        unmask = ["unmask=True"] if salt.version.__saltstack_version__.info[0] >= 3008 else []
        data = cli.run("pillar.items", *unmask).data
        bridge = data["mosquitto"]["bridges"]["upstream"]
        assert bridge["addresses"][0] == "mqtt-a.brisbane.example.internal:8883"
        assert bridge["remote_clientid"] == "gw-brisbane-states"
        assert data["mosquitto"]["users"]["sensor"]["password"]
        assert "brisbane" in data["tributary"]["sites"]
        assert "sydney" not in data["tributary"]["sites"]
        # the gateway state renders with it (the mosquitto state needs the TLS files, absent
        # here, and says so naming the key)
        ret = cli.run("state.show_sls", "tributary.gateway")
        assert ret.returncode == 0, ret.stdout
        ret = cli.run("state.show_sls", "mosquitto")
        assert "invalid pillar mosquitto:listeners:1:tls:cafile" in ret.stdout
    finally:
        for sub in ("fleet.sls", "roles", "sites"):
            p = pillar_root / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _show(states_minion, sls: str) -> dict:
    ret = states_minion.salt_call_cli(timeout=120).run("state.show_sls", sls)
    assert ret.returncode == 0 and isinstance(ret.data, dict), ret.stdout
    return ret.data


def _args(state: dict, fun: str) -> dict:
    out: dict = {}
    for item in state[fun]:
        if isinstance(item, dict):
            out.update(item)
    return out


def test_service_states_rendered_where_they_cannot_run_here(states_minion, pillar):
    # PID 1 is not systemd here: restarting docker / salt-master / salt-syndic through their
    # services is not exercised, so the rendered service states are checked instead
    pillar.set({})
    docker = _show(states_minion, "docker")
    svc = _args(docker["tributary-docker-service-running"], "service")
    assert svc["name"] == "docker" and svc["enable"] is True
    assert {"file": "tributary-docker-daemon-json"} in svc["watch"]

    master = _show(states_minion, "tributary.master")
    svc = _args(master["tributary-master-service-running"], "service")
    assert svc["name"] == "salt-master"
    assert {"file": "tributary-master-config"} in svc["watch"]
    sync = _args(master["tributary-master-engines-synced"], "cmd")
    assert sync["name"] == "salt-run saltutil.sync_all"

    syndic = _show(states_minion, "tributary.syndic")
    for sid, name in (
        ("tributary-syndic-master-running", "salt-master"),
        ("tributary-syndic-running", "salt-syndic"),
    ):
        svc = _args(syndic[sid], "service")
        assert svc["name"] == name
        assert {"file": "tributary-syndic-config"} in svc["watch"]


def test_master_state_installs_and_removes_the_reactor(states_minion, pillar, tmp_dir):
    actions = {
        "boiler-hot": {
            "firing": [
                {"command": {"device": "{sensor}", "devices": ["boiler-*"], "command": "cool"}},
                {"notify": {}},
            ],
            "resolved": [{"notify": {"topic": "ops/{site}/{rule}"}}],
        }
    }
    notify = {"broker": {"host": "mqtt.example", "port": 8883, "username": "u", "password": "s3"}}
    master = {
        "config_dir": str(tmp_dir),
        "manage_service": False,
        "relay": {"index_prefix": "tributary"},
        "reactor": {
            "enabled": True,
            "dir": str(tmp_dir / "reactor"),
            "actions": actions,
            "notify": notify,
        },
    }
    pillar.set({"tributary": {"master": master}})
    res = assert_all_ok(apply(states_minion, "tributary.master"))
    assert "s3" not in json.dumps(res)  # the broker password is never shown
    installed = tmp_dir / "reactor" / "alert.sls"
    assert filecmp.cmp(installed, REPO / "salt" / "reactor" / "alert.sls", shallow=False)
    conf_path = tmp_dir / "tributary-reactor.conf"
    assert conf_path.stat().st_mode & 0o077 == 0
    conf = yaml.safe_load(conf_path.read_text())
    assert conf["reactor"] == [{"tributary/alert/boiler-hot/*": [str(installed)]}]
    assert conf["tributary_reactor"] == {"actions": actions, "renotify": False, "notify": notify}
    assert changed(assert_all_ok(apply(states_minion, "tributary.master"))) == {}

    # A bad action table: the package's validate() names the key path; nothing is written.
    master["reactor"]["actions"] = {"boiler-hot": {"firing": [{"exec": {"fun": "cmd.run"}}]}}
    pillar.set({"tributary": {"master": master}})
    res = state_results(apply(states_minion, "tributary.master"))
    valid = res["tributary-master-reactor-config-valid"]
    assert valid["result"] is False
    assert "tributary_reactor.actions.boiler-hot.firing[0]: unknown action" in json.dumps(valid)
    assert yaml.safe_load(conf_path.read_text())["tributary_reactor"]["actions"] == actions

    # Not asked for any more: both removed.
    master["reactor"] = {"enabled": False, "dir": str(tmp_dir / "reactor")}
    pillar.set({"tributary": {"master": master}})
    res = assert_all_ok(apply(states_minion, "tributary.master"))
    gone = {"tributary-master-reactor-config", "tributary-master-reactor-files"}
    assert set(changed(res)) >= gone
    assert not conf_path.exists() and not installed.parent.exists()
