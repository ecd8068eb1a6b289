"""The beacons' config schemas: one parse per beacon, used by ``validate()`` and the run."""

from __future__ import annotations

import pytest

from saltext.tributary.gateway import config as gw_config
from saltext.tributary.gateway.sources.payload import Conversion, TimestampOptions, TopicRule
from saltext.tributary.gateway.sources.sysfs import SourceSpec


def test_health_defaults_live_in_the_schema():
    health, errors = gw_config.parse_health([{"interval": 60}, {"_beacon_name": "h"}])
    assert errors == [] and health == gw_config.HealthBeaconOptions(interval=60)
    assert (health.root, health.disk_path, health.sensor) == ("/", None, "health")
    assert health.spool_metrics is True and health.grains is None
    assert health.spool == gw_config.SpoolOptions() and health.batch == gw_config.BatchOptions()


def test_every_problem_of_a_health_config_is_named():
    ok, msg = gw_config.validate_health(
        [
            {"root": ""},
            {"sensor": 5},
            {"spool_metrics": "yes"},
            {"grains": ["role", "bad path", "x:y"]},
            {"site": "a b"},
            {"batch": {"max_bytes": 1}},
        ]
    )
    assert not ok
    for part in (
        "root: must be a non-empty string",
        "sensor: must be a non-empty string",
        "spool_metrics: must be true or false",
        "grains[1]: a grain path such as role or tributary:devices, got 'bad path'",
        "site: must be a short name",
        "batch.max_bytes: must be an integer in 1024..131072, got 1",
    ):
        assert part in msg, (part, msg)
    ok, msg = gw_config.validate_health([{"grains": [f"g{i}" for i in range(17)]}])
    assert not ok and "grains: must be a list of at most 16 grain paths" in msg
    assert gw_config.validate_health([{"grains": []}]) == (True, "valid")


def test_sysfs_sources_parse_to_specs_with_their_defaults():
    sysfs, errors = gw_config.parse_sysfs(
        [{"root": "/tmp/x"}, {"sources": [{"kind": "w1"}, {"kind": "iio", "match": "bme*"}]}]
    )
    assert errors == [] and sysfs.root == "/tmp/x"
    assert sysfs.sources == [SourceSpec("w1", 10.0, "*"), SourceSpec("iio", 10.0, "bme*")]
    _, errors = gw_config.parse_sysfs([{"root": "/"}])
    assert errors == ["sources: required"]
    _, errors = gw_config.parse_sysfs(
        [{"sources": [{"interval_s": 5}, {"kind": "w1", "interval_s": 0}, "w1"]}]
    )
    assert errors == [
        "sources[0].kind: required",
        "sources[1].interval_s: must be a positive number, got 0",
        "sources[2]: must be a mapping",
    ]
    assert gw_config.parse_sysfs([{"sources": []}])[1] == [
        "sources: must be a non-empty list of sources"
    ]


def test_mqtt_topic_rules_parse_with_their_shorthands():
    mqtt, errors = gw_config.parse_mqtt(
        [
            {"broker": {"port": 1884}},
            {
                "topics": [
                    {"topic": "a/{sensor}", "convert": "F_to_C"},
                    {
                        "topic": "b/{sensor}",
                        "format": "json",
                        "fields": {"env.t": "temperature", "env.h": {"unit": "%"}},
                        "timestamp": "ts",
                    },
                    {
                        "topic": "c/#",
                        "format": "flat",
                        "convert": {"scale": 0.1},
                        "timestamp": {"field": "t", "format": "s"},
                    },
                ]
            },
        ]
    )
    assert errors == [] and mqtt.broker.port == 1884 and mqtt.broker.host == "127.0.0.1"
    first, second, third = mqtt.topics
    assert first.convert == "F_to_C" and first.format == "number"
    assert third.convert == Conversion(scale=0.1) and third.timestamp == TimestampOptions("t", "s")
    rule = TopicRule.from_options(second)
    assert [(f.path, f.metric, f.unit) for f in rule.fields] == [
        (["env", "t"], "temperature", None),
        (["env", "h"], "h", "%"),
    ]
    assert (rule.ts_field, rule.ts_format) == (["ts"], "ms")
    assert TopicRule.from_options(first).unit == "C"


def test_every_problem_of_the_topic_rules_is_named():
    _, errors = gw_config.parse_mqtt(
        [
            {
                "topics": [
                    {"topic": "a/#/b", "format": "json"},
                    {"topic": "x", "convert": 5},
                    {"sensor": "s", "timestamp": {"format": "ms"}},
                    {"topic": "y", "convert": "furlongs"},
                    {"topic": "z", "format": "flat", "fields": {"a.t": {"metric": "bad name"}}},
                ]
            },
            {"broker": {"password": "p"}},
        ]
    )
    assert errors == [
        "broker.username: required when broker.password is set",
        "topics[0].topic: topic 'a/#/b': '#' must be the last level",
        "topics[0].fields: format json needs a field map",
        "topics[1].convert: must be a string or a mapping",
        "topics[2].topic: required",
        "topics[2].timestamp.field: required",
        "topics[3].convert: must be one of 'F_to_C', 'K_to_C', 'C_to_F', 'mC_to_C',"
        " 'Pa_to_hPa', 'mV_to_V', 'mA_to_A', got 'furlongs'",
        "topics[4].fields.a.t.metric: metric name 'bad name' is not [A-Za-z0-9_.:@-]{1,128}",
    ]


@pytest.mark.parametrize("parse", [gw_config.parse_mqtt, gw_config.parse_sysfs])
def test_a_changed_config_makes_the_run_refuse_with_the_key_path(parse):
    with pytest.raises(ValueError, match=r"beacon: .*unknown option"):
        gw_config.parsed("beacon", parse, [{"nope": 1}])
