"""Payload formats (number, json, senml, flat), good and bad inputs, conversions, topics."""

from __future__ import annotations

import json

import pytest

from saltext.tributary.gateway.sources.payload import (
    MAX_PAYLOAD,
    ConfigError,
    Mapper,
    compile_rules,
)
from saltext.tributary.protocol.reading import RejectedReading

NOW = 1_700_000_000_000


def mapper(*rules):
    return Mapper(compile_rules(list(rules)))


def reason(m, topic, payload):
    with pytest.raises(RejectedReading) as info:
        m.parse(topic, payload, NOW)
    return info.value.reason


NUM = {"topic": "sensors/{sensor}/{metric}", "format": "number", "unit": "C"}
JSON = {
    "topic": "env/{sensor}",
    "format": "json",
    "fields": {"env.temp": {"metric": "temperature", "unit": "C"}, "env.hum": "humidity"},
    "timestamp": {"field": "ts", "format": "s"},
}


def test_number_good():
    (r,) = mapper(NUM).parse("sensors/t1/temperature", b" 21.5\n", NOW)
    assert (r.sensor, r.metric, r.value, r.unit, r.ts_ms) == ("t1", "temperature", 21.5, "C", NOW)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"abc", "not_numeric"),
        (b"", "not_numeric"),
        (b"nan", "not_finite"),
        (b"inf", "not_finite"),
        (b"-Infinity", "not_finite"),
        (b"\xff\xfe", "not_numeric"),
        (b'"21"', "not_numeric"),
        (b"1" * (MAX_PAYLOAD + 1), "too_large"),
    ],
)
def test_number_bad(payload, why):
    assert reason(mapper(NUM), "sensors/t1/temperature", payload) == why


def test_unknown_topic():
    assert reason(mapper(NUM), "other/t1", b"1") == "unknown_topic"
    assert reason(mapper(NUM), "sensors/t1/temperature/extra", b"1") == "unknown_topic"


def test_topics_are_remembered_within_a_bound_and_answer_the_same_every_time(monkeypatch):
    m = mapper(NUM, {"topic": "bad/{sensor}", "format": "number", "sensor": "{nope}"})
    monkeypatch.setattr(Mapper, "TOPIC_CACHE", 8)
    for _ in range(3):  # first sight, then from the cache: same answers
        (r,) = m.parse("sensors/t1/temperature", b"1", NOW)
        assert (r.sensor, r.metric) == ("t1", "temperature")
        assert reason(m, "other/t1", b"1") == "unknown_topic"
        assert reason(m, "bad/x", b"1") == "bad_topic"  # a template it cannot fill: never kept
    assert "bad/x" not in m._topics
    for i in range(50):  # a flood of distinct topics never grows the cache past its bound
        m.parse(f"sensors/s{i}/temperature", b"1", NOW)
        assert len(m._topics) <= 8
    (r,) = m.parse("sensors/t1/temperature", b"2", NOW)
    assert (r.sensor, r.value) == ("t1", 2.0)


def test_json_fields_dotted_and_timestamp_seconds():
    m = mapper(JSON)
    rs = m.parse(
        "env/room1",
        json.dumps({"ts": 1_700_000_001, "env": {"temp": 20, "hum": 40.5}}).encode(),
        NOW,
    )
    assert {(r.metric, r.value, r.unit, r.ts_ms) for r in rs} == {
        ("temperature", 20.0, "C", 1_700_000_001_000),
        ("humidity", 40.5, None, 1_700_000_001_000),
    }


def test_json_iso_and_ms_timestamps():
    rule = dict(JSON, timestamp={"field": "ts", "format": "iso"})
    (r, _) = mapper(rule).parse(
        "env/a", b'{"ts": "2023-11-14T22:13:21Z", "env": {"temp": 1, "hum": 2}}', NOW
    )
    assert r.ts_ms == 1_700_000_001_000
    rule = dict(JSON, timestamp="ts")
    (r, _) = mapper(rule).parse(
        "env/a", b'{"ts": 1700000001234, "env": {"temp": 1, "hum": 2}}', NOW
    )
    assert r.ts_ms == 1_700_000_001_234


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b'{"env": {"temp": 1', "bad_json"),  # truncated
        (b'{"env": {"temp": NaN, "hum": 1}}', "not_finite"),
        (b'{"env": {"temp": Infinity}}', "not_finite"),
        (b"[1, 2]", "not_object"),
        (b"not json", "bad_json"),
        (b'{"ts": "yesterday", "env": {"temp": 1}}', "bad_timestamp"),
        (b'{"ts": 1e300, "env": {"temp": 1}}', "bad_timestamp"),
        (b"{" + b" " * MAX_PAYLOAD + b"}", "too_large"),
    ],
)
def test_json_bad_messages(payload, why):
    assert reason(mapper(JSON), "env/a", payload) == why


def test_json_bad_field_is_set_aside_good_field_kept():
    rejects: list[RejectedReading] = []
    rs = mapper(JSON).parse("env/a", b'{"env": {"temp": "warm", "hum": 50}}', NOW, rejects)
    assert [(r.metric, r.value) for r in rs] == [("humidity", 50.0)]
    assert [e.reason for e in rejects] == ["not_numeric"]
    rejects = []
    rs = mapper(JSON).parse("env/a", b'{"env": {"temp": true, "hum": [1]}}', NOW, rejects)
    assert rs == [] and sorted(e.reason for e in rejects) == ["not_numeric", "not_numeric"]
    rejects = []
    rs = mapper(JSON).parse("env/a", b'{"env": {"temp": 1}}', NOW, rejects)
    assert [e.reason for e in rejects] == ["missing_field"]


def test_senml_base_fields_and_records():
    rule = {"topic": "senml/{sensor}", "format": "senml"}
    pack = [
        {
            "bn": "urn:dev:ow:10e2073a01080063:",
            "bt": 1.700000001e9,
            "bu": "Cel",
            "v": 23.1,
            "n": "temp",
        },
        {"n": "temp", "t": 1, "v": 23.4},
        {"n": "hum", "u": "%RH", "v": 55},
    ]
    rs = mapper(rule).parse("senml/x", json.dumps(pack).encode(), NOW)
    assert [(r.sensor, r.metric, r.value, r.unit, r.ts_ms) for r in rs] == [
        ("urn:dev:ow:10e2073a01080063", "temp", 23.1, "Cel", 1_700_000_001_000),
        ("urn:dev:ow:10e2073a01080063", "temp", 23.4, "Cel", 1_700_000_002_000),
        ("urn:dev:ow:10e2073a01080063", "hum", 55.0, "%RH", 1_700_000_001_000),
    ]


def test_senml_relative_time_and_base_value():
    rule = {"topic": "senml/{sensor}", "format": "senml"}
    rs = mapper(rule).parse("senml/dev1", b'[{"bv": 10, "n": "level", "v": 2, "t": -5}]', NOW)
    assert [(r.sensor, r.metric, r.value, r.ts_ms) for r in rs] == [
        ("dev1", "level", 12.0, NOW - 5000)
    ]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"[]", "bad_senml"),
        (b"[1]", "bad_senml"),
        (b'[{"n": "a", "vs": "text"}]', "not_numeric"),
        (b'[{"n": "a", "v": "1"}]', "not_numeric"),
        (b'[{"n": "a", "v": NaN}]', "not_finite"),
        (b'[{"bn": 5, "v": 1}]', "bad_senml"),
        (b'[{"bt": 1e9}]', "no_values"),
        (b'[{"n": "a", "v": 1, "t": "now"}]', "bad_timestamp"),
        (b'[{"n": "a", "v": 1', "bad_json"),
    ],
)
def test_senml_bad(payload, why):
    assert reason(mapper({"topic": "senml/{sensor}", "format": "senml"}), "senml/a", payload) == why


def test_flat_zigbee2mqtt():
    rule = {"topic": "zigbee2mqtt/{sensor}", "format": "flat"}
    payload = (
        b'{"temperature": 21.3, "humidity": 48, "battery": 97, "linkquality": "good",'
        b' "occupancy": true, "voltage": 3005}'
    )
    rs = mapper(rule).parse("zigbee2mqtt/kitchen", payload, NOW)
    assert {(r.metric, r.value) for r in rs} == {
        ("temperature", 21.3),
        ("humidity", 48.0),
        ("battery", 97.0),
        ("voltage", 3005.0),
    }
    assert {r.sensor for r in rs} == {"kitchen"}


def test_flat_restricted_fields_with_conversion():
    rule = {
        "topic": "zigbee2mqtt/{sensor}",
        "format": "flat",
        "fields": {
            "voltage": {"metric": "voltage", "convert": "mV_to_V"},
            "temperature": "temperature",
        },
    }
    rs = mapper(rule).parse("zigbee2mqtt/k", b'{"voltage": 3005, "battery": 90}', NOW)
    assert [(r.metric, r.value, r.unit) for r in rs] == [("voltage", pytest.approx(3.005), "V")]
    assert reason(mapper(rule), "zigbee2mqtt/k", b'{"battery": 90}') == "no_values"
    assert reason(mapper(rule), "zigbee2mqtt/k", b'{"linkquality": "x"}') == "no_values"


@pytest.mark.parametrize(
    ("convert", "raw", "value", "unit"),
    [
        ("F_to_C", "212", 100.0, "C"),
        ("K_to_C", "273.15", 0.0, "C"),
        ("mC_to_C", "21500", 21.5, "C"),
        ("Pa_to_hPa", "101325", 1013.25, "hPa"),
        ({"scale": 0.1, "offset": -5, "unit": "m"}, "100", 5.0, "m"),
    ],
)
def test_unit_conversions(convert, raw, value, unit):
    rule = {"topic": "x/{sensor}", "format": "number", "metric": "m", "convert": convert}
    (r,) = mapper(rule).parse("x/s", raw.encode(), NOW)
    assert r.value == pytest.approx(value) and r.unit == unit


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"topic": "a/#/b"}, "'#' must be the last level"),
        ({"topic": "a/b", "format": "xml"}, "topics[0].format"),
        ({"topic": "a/b", "format": "json"}, "topics[0].fields"),
        ({"topic": "a/b", "convert": "furlongs"}, "topics[0].convert"),
        ({"topic": "a/b", "convert": {"scale": "x"}}, "topics[0].convert"),
        ({"format": "number"}, "topics[0].topic"),
        (
            {"topic": "a/b", "timestamp": {"field": "t", "format": "weeks"}},
            "topics[0].timestamp.format",
        ),
        ({"topic": "a/b", "sensor": 5}, "topics[0].sensor"),
        # unknown keys are refused at every level, with their path
        ({"topic": "a/b", "formatt": "json"}, "topics[0].formatt: unknown option"),
        (
            {"topic": "a/b", "format": "json", "fields": {"t": {"metric": "t", "unitt": "C"}}},
            "topics[0].fields.t.unitt: unknown option",
        ),
        (
            {"topic": "a/b", "format": "flat", "timestamp": {"field": "t", "fmt": "s"}},
            "topics[0].timestamp.fmt: unknown option",
        ),
        ({"topic": "a/b", "convert": {"scale": 2, "ofset": 1}}, "topics[0].convert.ofset"),
    ],
)
def test_bad_rules_name_the_key(rule, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        compile_rules([rule])


def test_wildcards_and_subscriptions():
    m = mapper({"topic": "site/+/{sensor}/#", "metric": "v"}, {"topic": "x/{sensor}/{metric}"})
    assert m.subscriptions == ["site/+/+/#", "x/+/+"]
    (r,) = m.parse("site/a/s9/deep/er", b"1", NOW)
    assert r.sensor == "s9"
    assert reason(m, "x/bad name/t", b"1") == "bad_sensor"


def test_number_readings_are_the_checked_ones_whichever_path_builds_them():
    """A number topic whose names and unit passed their checks once builds its readings
    without checking them again; every message reads exactly as make_reading (the checked
    path, Mapper._reading) would have it, with the same reasons for what it refuses."""
    import dataclasses

    from saltext.tributary.protocol.reading import TS_MAX_MS

    base = compile_rules([{"topic": "n/{sensor}/{metric}", "format": "number", "unit": "C"}])[0]
    rules = [
        base,
        dataclasses.replace(base, unit=""),
        dataclasses.replace(base, unit=None),
        dataclasses.replace(base, unit="x" * 40),  # too long: bad_unit, message by message
        dataclasses.replace(base, scale=0.1, offset=-3.0),
    ]
    topics = ["n/t1/temperature", "n/bad sensor!/t", "n/t2/" + "m" * 200, "n/h1/humidity"]
    payloads = [b"21.5", b" -0 ", b"1e308", b"1e309", b"nan", b"-inf", b"12abc", b"\xff"]
    times = [NOW, TS_MAX_MS, True, 1.7e12]
    for rule in rules:
        m = Mapper([rule])
        for topic in topics * 2:  # the second time from the remembered route
            for payload in payloads:
                for now in times:
                    try:
                        got: object = m.parse(topic, payload, now)
                    except RejectedReading as exc:
                        got = ("refused", exc.reason)
                    _, sensor, metric = m._route(topic)
                    try:
                        text = payload.decode("ascii").strip()
                        value = float(text)
                    except (UnicodeDecodeError, ValueError):
                        want: object = ("refused", "not_numeric")
                    else:
                        u, k, b = rule.unit, rule.scale, rule.offset
                        try:
                            want = [m._reading(sensor, metric, value, now, u, k, b)]
                        except RejectedReading as exc:
                            want = ("refused", exc.reason)
                    assert got == want, (rule.unit, rule.scale, topic, payload, now, got, want)
