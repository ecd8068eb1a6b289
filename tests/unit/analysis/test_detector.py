"""The detector's model: time-of-week context, learning, gaps, quiet, bounds, persistence."""

from __future__ import annotations

import pickle
import random

import pytest

from saltext.tributary.analysis.detector import (
    Detector,
    DetectorConfig,
    SeriesModel,
)

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
MONDAY = 1_700_438_400_000  # 2023-11-20 00:00 UTC, a Monday
CFG = DetectorConfig()


def office(ts: int, rnd: random.Random) -> float:
    """A building's power: high in weekday office hours, low otherwise."""
    day = (ts - MONDAY) // DAY % 7
    hour = (ts - MONDAY) // HOUR % 24
    busy = day < 5 and 8 <= hour < 18
    return (50.0 if busy else 5.0) + rnd.gauss(0, 1.0)


def trained(weeks: int = 4, step: int = 10 * MIN) -> tuple[SeriesModel, int]:
    rnd = random.Random(7)
    m = SeriesModel()
    ts = MONDAY
    while ts < MONDAY + weeks * 7 * DAY:
        m.observe(ts, office(ts, rnd), CFG)
        ts += step
    return m, ts


def feed(m: SeriesModel, start: int, values: list[float], step: int = 10 * MIN):
    return [m.observe(start + i * step, v, CFG) for i, v in enumerate(values)]


def test_normal_for_10am_on_tuesday_is_not_flagged():
    m, end = trained()
    tuesday_10am = end + DAY + 10 * HOUR  # end is a Monday 00:00
    found = feed(m, tuesday_10am, [50.0, 51.0, 49.5, 50.5, 50.0, 49.0])
    assert not any(f.anomaly for f in found)
    assert found[0].context.startswith("Tue 10:00")
    assert 45 < found[0].expected < 55


def test_the_same_value_at_10am_on_sunday_is_an_anomaly_that_explains_itself():
    m, end = trained()
    sunday_10am = end + 6 * DAY + 10 * HOUR
    found = feed(m, sunday_10am, [50.0, 51.0, 49.5, 50.5, 50.0, 49.0])
    flagged = [f for f in found if f.anomaly]
    assert flagged, [round(f.score, 3) for f in found]
    f = flagged[0].as_dict()
    assert f["context"] == "Sun 10:00 (hour of week)"
    assert f["expected"] < 10 and f["band"][1] < 50 < f["value"] + 1 and f["deviation"] > 3
    assert f["samples"] > 4000 and f["context_samples"] >= 4 and f["state"] == "ok"


def test_learning_state_scores_nothing():
    m = SeriesModel()
    found = feed(m, MONDAY, [float(i % 7) for i in range(CFG.learn_n - 1)] + [1e6])
    assert all(f.state == "learning" and f.score == 0.0 for f in found)


def test_one_alert_then_quiet():
    m, end = trained()
    found = feed(m, end + 6 * DAY + 10 * HOUR, [50.0] * 30)
    assert sum(f.anomaly for f in found) == 1
    first = next(i for i, f in enumerate(found) if f.anomaly)
    assert all(f.state == "quiet" for f in found[first + 1 :])


def test_resuming_after_a_gap_is_not_an_anomaly_by_itself():
    rnd = random.Random(3)
    m = SeriesModel()
    ts = MONDAY
    for _ in range(2000):  # a flat series, every minute
        m.observe(ts, 20.0 + rnd.gauss(0, 0.1), CFG)
        ts += MIN
    found = feed(m, ts + 3 * DAY, [20.0 + rnd.gauss(0, 0.1) for _ in range(50)], step=MIN)
    assert not any(f.anomaly for f in found)


def test_irregular_intervals_do_not_alarm():
    rnd = random.Random(5)
    m = SeriesModel()
    ts = MONDAY
    alerts = 0
    for _ in range(5000):
        ts += rnd.choice([1, 2, 5, 30, 90]) * 1000
        alerts += m.observe(ts, 10.0 + rnd.gauss(0, 1), CFG).anomaly
    assert alerts <= 3  # noise, nothing else


def test_state_is_bounded_and_survives_a_round_trip():
    m, end = trained(weeks=2)
    data = m.to_bytes()
    assert len(data) == m.size() <= 16 * 1024
    again = SeriesModel.from_bytes(data)
    pickled = pickle.loads(pickle.dumps(m))
    assert pickled.to_bytes() == data
    a = feed(m, end + 6 * DAY + 10 * HOUR, [50.0] * 5)
    b = feed(again, end + 6 * DAY + 10 * HOUR, [50.0] * 5)
    c = feed(pickled, end + 6 * DAY + 10 * HOUR, [50.0] * 5)
    assert [f.as_dict() for f in a] == [f.as_dict() for f in b] == [f.as_dict() for f in c]


def test_the_running_histogram_total_stays_the_histograms_sum_through_rescales():
    """The empirical tail reads a running total instead of summing the 64 bins per point; it
    must stay the bins' sum, across the rescale (every ~28k scored points) and a restart."""
    rnd = random.Random(3)
    m = SeriesModel()
    rescaled = False
    for i in range(32_000):
        w = m.hist_w
        m.observe(MONDAY + i * MIN, rnd.gauss(10.0, 1.0), CFG)
        rescaled = rescaled or m.hist_w < w
        if i % 997 == 0 or m.hist_w < w:
            assert m.hist_sum == pytest.approx(sum(m.hist), rel=1e-9)
    assert rescaled
    assert SeriesModel.from_bytes(m.to_bytes()).hist_sum == pytest.approx(m.hist_sum, rel=1e-12)


def test_least_recently_seen_series_are_evicted_and_counted():
    d = Detector(max_series=3)
    for key in ("a", "b", "c", "a", "d", "e"):
        d.observe(key, MONDAY, 1.0)
    assert list(d.models) == ["a", "d", "e"] and d.evicted == 2


def test_expect_says_what_and_why():
    m, end = trained()
    e = m.expect(end + 2 * DAY + 11 * HOUR, CFG)  # Wednesday 11:00
    assert e["context"] == "Wed 11:00 (hour of week)" and 45 < e["expected"] < 55
    assert e["band"][0] < e["expected"] < e["band"][1] and e["state"] in ("ok", "quiet")


def test_a_value_beyond_every_value_seen_is_an_anomaly_that_says_so():
    rnd = random.Random(5)
    m = SeriesModel()
    ts = MONDAY
    for _ in range(1000):
        m.observe(ts, 10.0 + rnd.uniform(-1, 1), CFG)
        ts += 5 * MIN
    f = m.observe(ts, 13.0, CFG)  # 2 sigma-ish of a uniform's range beyond its maximum
    assert f.anomaly and f.reason == "beyond range" and f.as_dict()["reason"] == "beyond range"
    assert f.band[0] < f.expected < f.band[1] and f.samples == 1001


def test_bursts_that_recur_stop_alarming_once_they_are_usual():
    """The same burst every 120 points: the score is calibrated on the running empirical
    tail of the series' own smoothed scores, and a burst of a shape seen before is familiar,
    so recurring bursts mostly stop alarming (the Gaussian likelihood alone, the previous
    detector, alarmed on every one of them, 125 of 125 in the second half)."""
    rnd = random.Random(9)
    m = SeriesModel()
    ts = MONDAY
    late = 0
    for i in range(30_000):
        v = (50.0 + rnd.gauss(0, 1)) if i % 120 < 4 else 1.0 + rnd.gauss(0, 0.1)
        late += m.observe(ts, v, CFG).anomaly and i >= 15_000
        ts += 5 * MIN
    assert late <= 20


def test_a_saved_state_of_another_version_is_refused():
    m, _ = trained(weeks=1)
    data = bytearray(m.to_bytes())
    data[0] = 1  # the previous detector's format
    with pytest.raises(ValueError, match="version"):
        SeriesModel.from_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        SeriesModel.from_bytes(m.to_bytes()[:-8])


def test_a_second_departure_after_a_calm_spell_alerts_again():
    m, end = trained()
    sunday_10am = end + 6 * DAY + 10 * HOUR
    calm = [5.0 + 0.1 * (i % 3) for i in range(CFG.rearm_n + 5)]
    found = feed(m, sunday_10am, [50.0] * 3 + calm + [50.0] * 3)
    alerts = [i for i, f in enumerate(found) if f.anomaly]
    assert len(alerts) == 2 and alerts[1] >= 3 + CFG.rearm_n, alerts
    assert all(f.state == "quiet" for f in found[alerts[0] + 1 : alerts[1]])
    # without a calm spell in between, one alert only (the same departure, still going on)
    m, end = trained()
    found = feed(m, sunday_10am, [50.0] * 3 + calm[:5] + [50.0] * 3)
    assert sum(f.anomaly for f in found) == 1


def test_absurd_values_never_break_the_model():
    """Values at the ends of the float range (overflowing its statistics) are scored without
    an exception, and the model still round-trips."""
    m, end = trained(weeks=1)
    found = feed(m, end, [1e308, -1e308, 1e308, 5.0, 0.0, -1e-308] + [5.0] * 10)
    assert found[0].reason == "beyond range" and len(found) == 16
    SeriesModel.from_bytes(m.to_bytes())
