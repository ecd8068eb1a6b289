"""The detector as a relay subscriber: anomalies become documents and events, models survive
a restart, and a slow subscriber never slows the relay (it is shed and counted)."""

from __future__ import annotations

import random
import threading
from collections import Counter

from saltext.tributary.analysis.detector import DetectorConfig
from saltext.tributary.analysis.service import AnomalyService, Sinks
from saltext.tributary.analysis.store import ModelStore
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.tap import Tap
from tests.unit.analysis.test_detector import DAY, HOUR, MIN, MONDAY, office


def readings(start: int, n: int, value=None, step: int = 10 * MIN):
    rnd = random.Random(1)
    out = []
    for i in range(n):
        ts = start + i * step
        v = office(ts, rnd) if value is None else value
        out.append(
            (
                "gw-a",
                "brisbane",
                "ep",
                0,
                {"sensor": "s1", "metric": "power", "ts_ms": ts, "value": v},
            )
        )
    return out


class Collect:
    def __init__(self):
        self.bulks: list[str] = []
        self.events: list[tuple[str, dict]] = []
        self.counts: Counter = Counter()

    def sinks(self) -> Sinks:
        return Sinks(
            bulk=lambda body: self.bulks.append(body) or {"items": []},
            fire=lambda data, tag: self.events.append((tag, data)),
            index=lambda ts: "tributary-anomalies-x",
            count=lambda name, n: self.counts.update({name: n}),
        )


def test_anomalies_become_documents_and_events(tmp_path):
    c = Collect()
    svc = AnomalyService(DetectorConfig(), c.sinks(), ModelStore(str(tmp_path / "a.db")))
    weeks = 4 * 7 * DAY // (10 * MIN)
    svc.handle(readings(MONDAY, weeks))
    before = len(c.events)
    svc.handle(readings(MONDAY + 4 * 7 * DAY + 6 * DAY + 10 * HOUR, 6, value=50.0))  # Sunday
    tag, data = c.events[-1]
    assert len(c.events) > before and tag == "tributary/anomaly/gw-a/s1/power"
    assert data["context"] == "Sun 10:00 (hour of week)" and data["site"] == "brisbane"
    assert '"context": "Sun 10:00 (hour of week)"' in c.bulks[-1]
    assert c.counts["analysed"] == weeks + 6 and c.counts["anomalies"] == len(c.events)


def test_models_come_back_after_a_restart(tmp_path):
    path = str(tmp_path / "a.db")
    c = Collect()
    svc = AnomalyService(DetectorConfig(), c.sinks(), ModelStore(path))
    svc.handle(readings(MONDAY, 3000))
    svc.close()
    again = AnomalyService(DetectorConfig(), Collect().sinks(), ModelStore(path))
    (model,) = again.detector.models.values()
    assert model.n == 3000  # not back to learning
    again.close()


def test_a_series_evicted_from_memory_resumes_from_its_saved_state(tmp_path):
    store = ModelStore(str(tmp_path / "a.db"))
    svc = AnomalyService(DetectorConfig(), Collect().sinks(), store, max_series=1)
    svc.handle(readings(MONDAY, 500))
    svc.save()
    other = [("gw-b", None, "ep", 0, {"sensor": "x", "metric": "y", "ts_ms": MONDAY, "value": 1.0})]
    svc.handle(other)  # evicts gw-a's model from memory
    assert ("gw-a", "s1", "power") not in svc.detector.models
    svc.handle(readings(MONDAY + 500 * 10 * MIN, 1))
    assert svc.detector.models[("gw-a", "s1", "power")].n == 501


def test_interleaved_series_in_one_batch_are_scored_as_if_each_came_alone():
    """handle() looks a model up once per run of one series' readings: runs that alternate,
    and a gateway whose site changes between two batches of one call, are still exact."""
    a = readings(MONDAY, 400)
    b = [
        ("gw-b", "perth", e, n, {**r, "sensor": "s2", "value": r["value"] * 2})
        for _, _, e, n, r in a
    ]
    mixed = []
    for k in range(0, 400, 7):  # runs of 7 of one series, then 7 of the other
        mixed += a[k : k + 7] + b[k : k + 7]
    moved = [
        ("gw-b", "darwin", e, n, {**r, "ts_ms": r["ts_ms"] + 400 * 10 * MIN})
        for _, _, e, n, r in b[:3]
    ]
    together = AnomalyService(DetectorConfig(), Collect().sinks(), None)
    together.handle(mixed + moved)
    alone = AnomalyService(DetectorConfig(), Collect().sinks(), None)
    for series in (a, b + moved):
        for one in series:
            alone.handle([one])
    assert set(together.detector.models) == {("gw-a", "s1", "power"), ("gw-b", "s2", "power")}
    for key, model in alone.detector.models.items():
        assert together.detector.models[key].seen_ms > 0
        together.detector.models[key].seen_ms = model.seen_ms = 0  # (wall clock)
        assert together.detector.models[key].to_bytes() == model.to_bytes()
    assert together.sites == {"gw-a": "brisbane", "gw-b": "darwin"}


def test_a_series_slower_than_the_point_interval_is_scored_reading_by_reading():
    """point_interval_s changes nothing for a series whose readings are further apart: the
    same anomalies, documents and model state as without it (four weeks, ten minutes apart,
    and an office load on a Sunday)."""
    weeks = 4 * 7 * DAY // (10 * MIN)
    batches = [
        readings(MONDAY, weeks),
        readings(MONDAY + 4 * 7 * DAY + 6 * DAY + 10 * HOUR, 6, value=50.0),
    ]
    out = []
    for interval in (0.0, 0.1, 60.0):
        c = Collect()
        svc = AnomalyService(DetectorConfig(), c.sinks(), None, point_interval_s=interval)
        for batch in batches:
            svc.handle(batch)
        (model,) = svc.detector.models.values()
        model.seen_ms = 0
        docs = [{k: v for k, v in d.items() if k != "detected_at"} for _, d in c.events]
        out.append((docs, model.to_bytes(), c.counts["analysed_points"]))
        assert c.counts["analysed"] == weeks + 6
    assert out[0][0] and out[0] == out[1] == out[2]
    assert out[0][2] == weeks + 6


def test_a_fast_series_is_scored_once_per_point_interval_on_its_mean():
    """1,000 readings a second, point_interval_s 0.1: ten points a second, each the mean of
    its 100 readings (a batch's last interval is scored when the batch ends); a lasting jump
    is an anomaly whose document says how many readings its point averages."""
    c = Collect()
    svc = AnomalyService(DetectorConfig(), c.sinks(), None, point_interval_s=0.1)
    rnd = random.Random(3)

    def fast(start: int, n: int, level: float) -> list[tuple]:
        return [
            (
                "gw-v",
                "perth",
                "ep",
                0,
                {
                    "sensor": "pump",
                    "metric": "vibration",
                    "ts_ms": start + i,
                    "value": level + rnd.gauss(0, 0.1),
                },
            )
            for i in range(n)
        ]

    t = MONDAY + 10 * HOUR
    for k in range(180):  # three minutes of normal vibration, batches of 1,050 readings
        svc.handle(fast(t + k * 1050, 1050, 1.0))
    (model,) = svc.detector.models.values()
    assert c.counts["analysed"] == 180 * 1050
    # 10.5 intervals a batch: 10 whole ones and the batch's last half, scored at its end
    assert model.n == c.counts["analysed_points"] == 180 * 11
    assert not c.events
    # the model learnt interval means (noise 0.1 / sqrt(100)), not single readings (0.1)
    assert model.var < 0.1 * 0.1 / 10
    svc.handle(fast(t + 180 * 1050, 1000, 5.0))  # the pump shakes for a second
    tag, doc = c.events[0]
    assert tag == "tributary/anomaly/gw-v/pump/vibration" and doc["readings"] == 100
    assert doc["@timestamp"] == t + 180 * 1050 and abs(doc["value"] - 5.0) < 0.1
    assert model.n == 180 * 11 + 10


def test_a_slow_subscriber_is_shed_and_counted_never_waited_for():
    counters = Counters()
    release = threading.Event()
    tap = Tap(lambda items: release.wait(10), counters, max_batches=2)
    offered = [tap.offer([("gw", None, "e", 0, {})]) for _ in range(10)]
    assert offered.count(False) >= 7  # the queue holds 2, one is being handled
    assert counters["tap_shed"] == offered.count(False)
    release.set()
    assert tap.drain()
    tap.close()


def test_a_failing_subscriber_never_stops_the_tap():
    counters = Counters()
    seen = []

    def handler(items):
        seen.append(len(items))
        raise RuntimeError("bug")

    tap = Tap(handler, counters)
    tap.offer([1, 2])
    tap.offer([3])
    assert tap.drain()
    assert seen == [2, 1] and counters["tap_failed"] == 3
    tap.close()


def test_saved_models_of_an_older_detector_are_discarded_and_counted(tmp_path):
    path = str(tmp_path / "a.db")
    svc = AnomalyService(DetectorConfig(), Collect().sinks(), ModelStore(path))
    svc.handle(readings(MONDAY, 300))
    other = {"sensor": "x", "metric": "y", "ts_ms": MONDAY, "value": 1.0}
    svc.handle([("gw-b", None, "ep", 0, other)])
    svc.close()
    store = ModelStore(path)
    old = bytearray(store.get(("gw-a", "s1", "power")).to_bytes())
    old[0] = 1  # as the previous detector version wrote it
    update = "UPDATE models SET state=? WHERE key=?"
    store.db.execute(update, (bytes(old), '["gw-a", "s1", "power"]'))
    store.db.commit()
    c = Collect()
    again = AnomalyService(DetectorConfig(), c.sinks(), store)
    assert list(again.detector.models) == [("gw-b", "x", "y")]  # no crash, the other restored
    assert c.counts["models_discarded"] == 1 and store.count() == 1
    again.handle(readings(MONDAY + 300 * 10 * MIN, 1))
    assert again.detector.models[("gw-a", "s1", "power")].n == 1  # learns again
    # the loader path (a series evicted, then back) discards and counts the same way
    store.db.execute(update, (b"\x01junk", '["gw-b", "x", "y"]'))
    store.db.commit()
    assert store.get(("gw-b", "x", "y")) is None and store.discarded == 2
    again.close()


def test_the_model_view_explains_what_is_expected_and_survives_an_old_saved_state(tmp_path):
    from saltext.tributary.analysis.views import model_view

    store = ModelStore(str(tmp_path / "a.db"))
    svc = AnomalyService(DetectorConfig(), Collect().sinks(), store)
    svc.handle(readings(MONDAY, 4 * 7 * 144))  # four weeks, every ten minutes
    svc.save()
    wednesday_11 = MONDAY + 4 * 7 * DAY + 2 * DAY + 11 * HOUR
    v = model_view(store, "gw-a", "s1/power", wednesday_11, DetectorConfig())
    assert v["result"] and v["context"] == "Wed 11:00 (hour of week)" and 45 < v["expected"] < 55
    assert v["band"][0] < v["expected"] < v["band"][1] and v["state"] in ("ok", "quiet")
    assert v["samples"] == 4 * 7 * 144 and v["usual_interval_s"] == 600
    assert v["state_bytes"] == len(store.get(("gw-a", "s1", "power")).to_bytes()) <= 16 * 1024
    update = "UPDATE models SET state=? WHERE key=?"
    store.db.execute(update, (b"\x02" + bytes(100), '["gw-a", "s1", "power"]'))  # version 2
    store.db.commit()
    v = model_view(store, "gw-a", "s1/power", wednesday_11, DetectorConfig())
    assert not v["result"] and "no model saved" in v["error"] and store.discarded == 1
    svc.close()
