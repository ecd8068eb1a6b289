"""Gateway loader modules through Salt's loaders (no daemons): beacons, execution module, grains.

Beacons, ``tributary`` execution functions and the ``tributary`` grain are synced from the
repo's ``salt/`` tree with ``saltutil.sync_all`` (file_client local), as on a gateway.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest
import salt.config
import salt.crypt
import salt.loader
import salt.utils.data
import yaml
from saltfactories.utils.functional import Loaders

from saltext.tributary.gateway import beacons as gw_beacons
from saltext.tributary.gateway import config as gw_config
from tests.support.keys import write_keypair
from tests.support.topology import wait_for
from tests.unit.gateway.test_sysfs import put, w1_text

REPO = pathlib.Path(__file__).resolve().parents[2]
BEACONS = ("tributary_mqtt", "tributary_sysfs", "tributary_health")


def make_tree(root: pathlib.Path) -> None:
    r = str(root)
    put(r, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    put(r, "sys/class/thermal/thermal_zone0/temp", "47250\n")
    put(r, "sys/class/hwmon/hwmon0/name", "lm75\n")
    put(r, "sys/class/hwmon/hwmon0/temp1_input", "30125\n")
    put(r, "sys/bus/w1/devices/28-000005e2fdc3/w1_slave", w1_text(0x0191))
    dev = "sys/bus/iio/devices/iio:device0"
    put(r, f"{dev}/name", "bme280\n")
    put(r, f"{dev}/in_humidityrelative_input", "41250\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("loaders")
    tree = base / "sysfs"
    make_tree(tree)
    spool = base / "spool.db"
    return {"base": base, "tree": tree, "spool": str(spool)}


def beacon_cfgs(env) -> dict:
    spool = {"path": env["spool"]}
    return {
        "tributary_sysfs": [
            {"root": str(env["tree"])},
            {"sources": [{"kind": "thermal"}, {"kind": "hwmon"}, {"kind": "w1"}, {"kind": "iio"}]},
            {"filters": [{"match": "*/temperature", "min": -55, "max": 125}]},
            {"spool": spool},
        ],
        "tributary_health": [
            {"root": str(env["tree"])},
            {"spool": spool},
            {"grains": ["role", "tributary:site", "kernel", "not-set"]},  # for alert rules
        ],
    }


@pytest.fixture(scope="module")
def minion_opts(env):
    base = env["base"]
    opts = salt.config.minion_config(None)
    # static grains are read from the minion config file, as on a real minion
    conf = base / "minion"
    conf.write_text(yaml.safe_dump({"grains": {"site": "lab", "role": "gateway"}}))
    opts.update(
        conf_file=str(conf),
        id="gw-functional",
        root_dir=str(base),
        cachedir=str(base / "cache"),
        pki_dir=str(base / "pki"),
        sock_dir=str(base / "sock"),
        extension_modules=str(base / "extmods"),
        file_client="local",
        file_roots={"base": [str(REPO / "salt")]},
        pillar_roots={"base": []},
        grains={"site": "lab", "role": "gateway"},
        beacons=beacon_cfgs(env),
        log_level="warning",
    )
    # batches are signed with the minion's own key (origin authentication), as on a gateway
    os.makedirs(opts["pki_dir"], exist_ok=True)
    write_keypair(opts["pki_dir"])
    return opts


@pytest.fixture(scope="module")
def loaders(minion_opts):
    ldr = Loaders(minion_opts)
    yield ldr
    gw_beacons.stop_sources()


@pytest.fixture(scope="module")
def beacons(loaders):
    return salt.loader.beacons(loaders.opts, loaders.modules)


def docstring_examples(name: str) -> list:
    text = (REPO / "salt" / "_beacons" / f"{name}.py").read_text()
    doc = text.split('"""')[1]
    out = []
    for block in re.findall(r"::\n\n((?:(?: {4}.*)?\n)+)", doc):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "beacons" in data:
            out.append(data["beacons"][name])
    return out


@pytest.mark.parametrize("name", BEACONS)
def test_every_documented_yaml_example_validates(beacons, name):
    examples = docstring_examples(name)
    assert examples, f"{name} documents no YAML example"
    for cfg in examples:
        ok, msg = beacons[f"{name}.validate"](cfg)
        assert ok, (cfg, msg)


@pytest.mark.parametrize(
    ("name", "cfg", "key"),
    [
        ("tributary_mqtt", [{"topics": []}], "topics"),
        ("tributary_mqtt", [{"topics": [{"topic": "a/#/b"}]}], "topic 'a/#/b'"),
        ("tributary_mqtt", [{"broker": {"port": 0}}, {"topics": [{"topic": "a"}]}], "broker.port"),
        ("tributary_mqtt", [{"broker": "x"}, {"topics": [{"topic": "a"}]}], "broker"),
        (
            "tributary_mqtt",
            [{"topics": [{"topic": "a"}]}, {"spool": {"max_bytes": "lots"}}],
            "spool.max_bytes",
        ),
        (
            "tributary_mqtt",
            [{"topics": [{"topic": "a"}]}, {"batch": {"max_bytes": 10**9}}],
            "batch.max_bytes",
        ),
        (
            "tributary_mqtt",
            [{"topics": [{"topic": "a"}]}, {"filters": [{"deadband": "x"}]}],
            "filters[0].deadband",
        ),
        (
            "tributary_mqtt",
            [{"topics": [{"topic": "a"}]}, {"bandwidth": {"window_s": 5}}],
            "bandwidth.bytes_per_s",
        ),
        ("tributary_mqtt", "not a list", "list of mappings"),
        ("tributary_sysfs", [{"sources": [{"kind": "gpio"}]}], "sources[0].kind"),
        (
            "tributary_sysfs",
            [{"sources": [{"kind": "w1", "interval_s": -1}]}],
            "sources[0].interval_s",
        ),
        ("tributary_sysfs", [{"root": 5}, {"sources": [{"kind": "w1"}]}], "root"),
        ("tributary_sysfs", [{"root": "/"}], "sources"),
        ("tributary_health", [{"spool_metrics": "yes"}], "spool_metrics"),
        ("tributary_health", [{"spool": ["x"]}], "spool"),
        ("tributary_health", [{"bandwidth": {"bytes_per_s": -3}}], "bandwidth.bytes_per_s"),
        ("tributary_health", 42, "list of mappings"),
        # unknown keys are refused, with their path, at every level
        ("tributary_health", [{"intervall": 30}], "intervall: unknown option"),
        ("tributary_sysfs", [{"sources": [{"kind": "w1"}]}, {"topics": []}], "topics: unknown"),
        ("tributary_health", [{"spool": {"max_byte": 5}}], "spool.max_byte: unknown option"),
        ("tributary_health", [{"batch": {"bytes": 5}}], "batch.bytes: unknown option"),
        (
            "tributary_mqtt",
            [{"broker": {"hots": "x"}}, {"topics": [{"topic": "a"}]}],
            "broker.hots: unknown option",
        ),
        (
            "tributary_mqtt",
            [{"broker": {"password": "p"}}, {"topics": [{"topic": "a"}]}],
            "broker.username",
        ),
        ("tributary_health", [{"site": "x" * 100}], "site"),
    ],
)
def test_bad_configs_fail_naming_the_key(beacons, name, cfg, key):
    ok, msg = beacons[f"{name}.validate"](cfg)
    assert ok is False
    assert key in msg, msg


def test_sysfs_and_health_beacons_share_one_spool(beacons, env, minion_opts):
    cfgs = beacon_cfgs(env)
    events = beacons["tributary_sysfs.beacon"](cfgs["tributary_sysfs"])
    assert [e["tag"] for e in events] == ["batch"]
    (batch,) = events
    from saltext.tributary.protocol.wire import decode_batch

    dec = decode_batch(batch)
    got = {(r["sensor"], r["metric"]): r["value"] for r in dec.readings}
    assert got == {
        ("cpu-thermal", "temperature"): 47.25,
        ("lm75-temp1", "temperature"): 30.125,
        ("28-000005e2fdc3", "temperature"): 25.062,
        ("bme280", "humidity"): 41.25,
    }
    assert batch["site"] == "lab" and dec.first == 1
    # not due again yet: nothing new, nothing emitted
    assert beacons["tributary_sysfs.beacon"](cfgs["tributary_sysfs"]) == []
    events = beacons["tributary_health.beacon"](cfgs["tributary_health"])
    assert [e["tag"] for e in events] == ["batch", "health"]
    hb = events[-1]
    assert hb["v"] == 1 and hb["epoch"] == batch["epoch"]  # one spool, one epoch
    assert hb["last_seq"] == events[0]["last"]  # the heartbeat covers its own readings
    assert hb["cpu_temp_c"] == 47.25 and hb["spool_unsent"] == 0
    assert hb["counters"]["emitted"] == hb["last_seq"]
    # the heartbeat is signed with the minion's own key, like the batches (origin authentication)
    from saltext.tributary.protocol import signing

    pub = pathlib.Path(minion_opts["pki_dir"], "minion.pub").read_text()
    assert isinstance(hb["sig"], str) and hb["site"] == "lab"
    signing.verify_event(minion_opts["id"], hb, pub)
    with pytest.raises(signing.SignatureError):
        signing.verify_event(minion_opts["id"], {**hb, "last_seq": hb["last_seq"] + 1}, pub)
    # the grain paths it was told to carry (alert rules on the top master match on them),
    # under the same signature: a gateway cannot be given another's grains on the way
    assert hb["grains"] == {"role": "gateway", "tributary:site": "lab", "kernel": "Linux"}
    with pytest.raises(signing.SignatureError):
        signing.verify_event(minion_opts["id"], {**hb, "grains": {"role": "boiler-room"}}, pub)
    health_keys = {r["metric"] for r in decode_batch(events[0]).readings}
    assert {"cpu_temp_c", "spool_unsent", "dropped"} <= health_keys


def test_implausible_and_power_on_values_are_counted(beacons, env, loaders):
    cfgs = beacon_cfgs(env)
    put(str(env["tree"]), "sys/class/hwmon/hwmon0/temp1_input", "150000\n")  # 150 C: implausible
    put(str(env["tree"]), "sys/bus/w1/devices/28-000005e2fdc3/w1_slave", w1_text(0x0550))
    try:
        gw_beacons.stop_sources()  # forget the poller's schedule: everything is due now
        beacons["tributary_sysfs.beacon"](cfgs["tributary_sysfs"])
        st = loaders.modules.tributary.status()
        assert st["counters"]["rejected:implausible"] >= 1
        assert st["counters"]["rejected:w1_power_on"] >= 1
        (aside,) = loaders.modules.tributary.tail(1, aside=True)  # kept with its reason
        assert aside["value"] == 150.0 and aside["reason"].startswith("implausible:above_max")
    finally:
        make_tree(env["tree"])


def test_execution_module(loaders, env):
    mods = loaders.modules
    st = mods.tributary.status()
    assert set(st["sources"]) == {"tributary_sysfs", "tributary_health"}
    assert st["last_seq"] > 0 and st["epoch"] and st["spool_depth"] == st["last_seq"]
    assert "dropped" in st and "spool_bytes" in st
    read = mods.tributary.read()
    assert read["readings"]["cpu-thermal/temperature"]["value"] == 47.25
    assert "health/cpu_temp_c" in read["readings"]
    only = mods.tributary.read("28-*")
    assert set(only["readings"]) == {"28-000005e2fdc3/temperature"}
    tail = mods.tributary.tail(3)
    assert [t["seq"] for t in tail] == list(range(st["last_seq"] - 2, st["last_seq"] + 1))
    tr = mods.tributary.trim()
    assert tr["dropped_unsent"] == 0 and tr["held_after"]["last"] == st["last_seq"]
    bad = mods.tributary.replay("nope", 1, 2)
    assert bad["result"] is False and f"holds epoch {st['epoch']}" in bad["error"]
    reset = mods.tributary.reset_counters()
    assert reset["previous"]["spooled"] == st["counters"]["spooled"]
    assert mods.tributary.status()["counters"] == {}
    for fn in ("read", "status", "replay", "tail", "trim", "reset_counters", "command"):
        doc = getattr(mods.tributary, fn).__doc__ if hasattr(mods.tributary, fn) else None
        doc = doc or mods[f"tributary.{fn}"].__doc__
        assert "CLI Example" in doc and "salt" in doc, fn


def test_tributary_grain_targets_sensors(loaders):
    grains = loaders.grains
    tg = grains["tributary"]
    assert tg["site"] == "lab" and tg["role"] == "gateway" and tg["hardware"]
    assert {"temperature", "humidity"} <= set(tg["sensors"])
    assert "28-000005e2fdc3/temperature" in tg["sensor_ids"]
    # what `salt -G 'tributary:sensors:temperature'` evaluates on the minion
    assert salt.utils.data.subdict_match(grains, "tributary:sensors:temperature")
    assert not salt.utils.data.subdict_match(grains, "tributary:sensors:radiation")
    # devices: what `salt -G 'tributary:devices:<device>' tributary.command ...` targets
    assert "28-000005e2fdc3" in tg["devices"]
    assert salt.utils.data.subdict_match(grains, "tributary:devices:28-000005e2fdc3")


@pytest.fixture
def broker():
    if not shutil.which("mosquitto") and not os.path.exists("/usr/sbin/mosquitto"):
        pytest.skip("mosquitto is not installed")
    from tests.support.mosquitto import start_broker

    b = start_broker()
    yield b
    b.cleanup()


def test_mqtt_beacon_filters_and_emits(beacons, broker, tmp_path):
    cfg = [
        {"broker": {"host": "127.0.0.1", "port": broker.port, "client_id": "fn-mqtt"}},
        {"topics": [{"topic": "sensors/{sensor}/{metric}", "unit": "C"}]},
        {"filters": [{"match": "*", "min": 0, "max": 100}]},
        {"spool": {"path": str(tmp_path / "mqtt.db")}},
        {"site": "lab"},
    ]
    try:
        beacons["tributary_mqtt.beacon"](cfg)  # starts the subscriber
        spool = gw_beacons.emitting_spool(gw_config.config_to_dict(cfg), {})
        wait_for(lambda: spool.status()["state"].get("broker") == "subscribed", 30, "subscription")
        broker.publish("sensors/t9/temperature", ["1", "500", "2", "junk"])
        wait_for(lambda: spool.status()["counters"].get("received", 0) >= 4, 30, "4 messages")
        events = beacons["tributary_mqtt.beacon"](cfg)
        from saltext.tributary.protocol.wire import decode_batch

        values = [r["value"] for e in events for r in decode_batch(e).readings]
        assert values == [1.0, 2.0]
        c = spool.status()["counters"]
        assert c["rejected:implausible"] == 1 and c["rejected:not_numeric"] == 1
        assert spool.set_aside()[-1]["value"] == 500.0
    finally:
        gw_beacons.stop_sources()


def test_mqtt_source_restart_does_not_redeliver_spooled_messages(broker, tmp_path):
    """stop() commits and acknowledges before disconnecting: no duplicate after a restart."""
    from saltext.tributary.gateway.sources.mqtt import BrokerConfig, MqttSource
    from saltext.tributary.gateway.sources.payload import Mapper, compile_rules
    from saltext.tributary.gateway.spool import GatewaySpool

    path = str(tmp_path / "restart.db")
    rules = compile_rules([{"topic": "sensors/{sensor}/{metric}"}])

    def source():
        s = MqttSource(BrokerConfig(port=broker.port, client_id="fn-restart"), Mapper(rules), path)
        s.start()
        wait_for(lambda: s.subscribed, 30, "subscription")
        return s

    spool = GatewaySpool(path)
    src = source()
    try:
        broker.publish("sensors/r1/temperature", [str(i) for i in range(300)])
        wait_for(lambda: spool.counters().get("received", 0) >= 300, 60, "300 received")
    finally:
        src.stop()
    src = source()
    try:
        broker.publish("sensors/r1/temperature", ["1000"])  # after any redelivery, in order
        wait_for(lambda: 1000.0 in [t["value"] for t in spool.tail(5)], 60, "the sentinel")
        values = [t["value"] for t in spool.tail(1000)]
        assert values == [*range(300), 1000.0], f"{len(values)} readings"
    finally:
        src.stop()
        spool.close()
