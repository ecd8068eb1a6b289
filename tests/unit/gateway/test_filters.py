"""Per-sensor filters: deadband, min/max interval, plausibility limits."""

from __future__ import annotations

import pytest

from saltext.tributary.gateway.filters import FilterConfigError, Filters, compile_filters
from saltext.tributary.protocol.reading import make_reading

T0 = 1_700_000_000_000


def r(value, s=0, sensor="t1", metric="temperature"):
    return make_reading(sensor, metric, value, T0 + int(s * 1000), "C")


def test_no_rules_pass_everything():
    f = Filters([])
    kept, counts, aside = f.apply([r(1), r(1)])
    assert len(kept) == 2 and counts == {} and aside == []


def test_deadband_and_max_interval_keeps_steady_value():
    f = Filters(compile_filters([{"match": "t1/*", "deadband": 0.5, "max_interval_s": 60}]))
    seq = [
        r(20.0, 0),
        r(20.2, 10),
        r(20.4, 20),
        r(20.6, 30),
        r(20.6, 40),
        r(20.6, 91),
        r(20.6, 100),
    ]
    kept, counts, _ = f.apply(seq)
    # 20.0 first; 20.6 is 0.6 from 20.0 -> kept at 30 s; steady again until 60 s after (91 s)
    assert [(k.value, (k.ts_ms - T0) // 1000) for k in kept] == [(20.0, 0), (20.6, 30), (20.6, 91)]
    assert counts == {"filtered:deadband": 4, "filtered": 4}


def test_min_interval():
    f = Filters(compile_filters([{"min_interval_s": 5}]))
    kept, counts, _ = f.apply([r(1, 0), r(2, 1), r(3, 4.9), r(4, 5), r(5, 6)])
    assert [k.value for k in kept] == [1.0, 4.0]
    assert counts["filtered:min_interval"] == 3


def test_plausibility_sets_aside_with_reason():
    f = Filters(compile_filters([{"match": "t1/temperature", "min": -40, "max": 125}]))
    kept, counts, aside = f.apply([r(-41), r(20), r(126), r(20, sensor="other")])
    assert [k.value for k in kept] == [20.0, 20.0]
    assert counts == {"rejected:implausible": 2}
    assert [(a.value, why.split()[0]) for a, why in aside] == [
        (-41.0, "implausible:below_min"),
        (126.0, "implausible:above_max"),
    ]


def test_first_matching_rule_applies_per_sensor():
    f = Filters(compile_filters([{"match": "a/*", "deadband": 10}, {"match": "*", "deadband": 0}]))
    kept, _, _ = f.apply([r(1, 0, "a"), r(2, 1, "a"), r(1, 0, "b"), r(2, 1, "b"), r(2, 2, "b")])
    assert [(k.sensor, k.value) for k in kept] == [("a", 1.0), ("b", 1.0), ("b", 2.0)]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"deadband": "x"}, r"filters\[0\].deadband"),
        ({"deadband": -1}, r"filters\[0\].deadband"),
        ({"min": 5, "max": 1}, r"filters\[0\].min"),
        ({"min_interval_s": 10, "max_interval_s": 5}, r"filters\[0\].min_interval_s"),
        ({"match": ""}, r"filters\[0\].match"),
        ({"bogus": 1}, r"filters\[0\].bogus"),
    ],
)
def test_bad_filter_config_names_key(raw, key):
    with pytest.raises(FilterConfigError, match=key):
        compile_filters([raw])
    with pytest.raises(FilterConfigError, match="filters"):
        compile_filters({"not": "a list"})
