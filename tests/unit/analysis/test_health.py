"""Health layers: device, sensor and population conditions, and the findings' lifecycle."""

from __future__ import annotations

from collections import Counter

from saltext.tributary.analysis.detector import DetectorConfig, SeriesModel
from saltext.tributary.analysis.health import (
    FindingBook,
    HealthConfig,
    HealthMonitor,
    device_conditions,
    population_conditions,
    sensor_conditions,
)
from saltext.tributary.analysis.service import AnomalyService, Sinks

NOW = 1_800_000_000_000
CFG = HealthConfig(heartbeat_s=10)


def hb(site="bne", age_s=1.0, unsent=0, dropped=0, broker="subscribed", skew_s=0.0):
    received = NOW - int(age_s * 1000)
    return {
        "site": site,
        "received_ms": received,
        "ts_ms": received + int(skew_s * 1000),
        "spool_unsent": unsent,
        "dropped": dropped,
        "broker": broker,
    }


def kinds(conds):
    return sorted((c.kind, c.gateway) for c in conds)


def test_device_conditions_from_heartbeats():
    history: dict = {}
    facts = {
        "gw-ok": hb(),
        "gw-silent": hb(age_s=31),
        "gw-broker": hb(broker="disconnected"),
        "gw-clock": hb(skew_s=-300),
    }
    assert kinds(device_conditions(facts, history, NOW, CFG)) == [
        ("broker_disconnected", "gw-broker"),
        ("clock_skew", "gw-clock"),
        ("gateway_silent", "gw-silent"),
    ]


def test_backlog_growing_and_dropping_need_successive_heartbeats():
    history: dict = {}
    for i, (unsent, dropped) in enumerate([(10, 0), (20, 0), (30, 5)]):
        facts = {"gw": {**hb(unsent=unsent, dropped=dropped), "received_ms": NOW - 30_000 + i}}
        conds = device_conditions(facts, history, NOW - 29_000, CFG)
    assert kinds(conds) == [("backlog_growing", "gw"), ("dropping", "gw")]


def model(n=200, dt=1000, seen_ago_s=1.0, stuck=0, mean=20.0, var=1.0):
    m = SeriesModel()
    m.n, m.dt, m.seen_ms, m.same, m.mean, m.var, m.last_value = (
        n,
        float(dt),
        NOW - int(seen_ago_s * 1000),
        stuck,
        mean,
        var,
        mean,
    )
    return m


def test_sensor_silent_after_its_usual_interval_and_stuck_where_it_varies():
    cfg = HealthConfig(silent_factor=5, min_silent_s=2, stuck_n=30)
    models = [
        (("gw", "ok", "t"), model()),
        (("gw", "quiet", "t"), model(seen_ago_s=6)),  # 5 x 1 s
        (("gw", "slow", "t"), model(dt=60_000, seen_ago_s=6)),  # every minute: not yet
        (("gw", "stuck", "t"), model(stuck=40)),
        (("gw", "flat", "t"), model(stuck=40, var=0.0)),  # never varies: not stuck
    ]
    got = sensor_conditions(models, {"gw": "bne"}, NOW, cfg)
    assert sorted((c.kind, c.sensor) for c in got) == [
        ("sensor_silent", "quiet"),
        ("sensor_stuck", "stuck"),
    ]


def test_several_silent_gateways_of_a_site_are_one_outage():
    device = device_conditions(
        {"a1": hb(age_s=60), "a2": hb(age_s=60), "a3": hb(), "b1": hb(site="syd", age_s=60)},
        {},
        NOW,
        CFG,
    )
    pop, kept = population_conditions(
        device, [], {}, {"bne": {"a1", "a2", "a3"}, "syd": {"b1"}}, CFG
    )
    assert [(c.kind, c.site, c.detail["silent_gateways"]) for c in pop] == [
        ("site_outage", "bne", ["a1", "a2"])
    ]
    assert kinds(kept) == [("gateway_silent", "b1")]  # one gateway is a device failure


def test_a_sensor_departing_from_its_siblings():
    models = [((f"gw{i}", "t", "temperature"), model(mean=20.0 + i * 0.1)) for i in range(4)]
    models.append((("gw9", "t", "temperature"), model(mean=35.0)))
    sites = {f"gw{i}": "bne" for i in (0, 1, 2, 3, 9)}
    pop, _ = population_conditions([], models, sites, {}, CFG)
    assert [(c.kind, c.gateway) for c in pop] == [("sensor_departs", "gw9")]


def test_findings_are_raised_once_and_cleared_with_their_duration(tmp_path):
    book = FindingBook(str(tmp_path / "a.db"))
    silent = device_conditions({"gw": hb(age_s=60)}, {}, NOW, CFG)
    (raised,) = book.update(silent, NOW)
    assert raised["state"] == "raised" and raised["kind"] == "gateway_silent"
    assert book.update(silent, NOW + 5_000) == []  # still open: nothing new
    (cleared,) = book.update([], NOW + 65_000)
    assert cleared["state"] == "cleared" and cleared["duration_s"] == 65.0
    assert book.open() == []


def test_the_service_fires_and_indexes_health_transitions(tmp_path):
    import time

    events, counts = [], Counter()
    wall = int(time.time() * 1000)
    facts = {"gw": {**hb(), "received_ms": wall - 60_000, "ts_ms": wall - 60_000}}
    monitor = HealthMonitor(CFG, lambda: facts, FindingBook(str(tmp_path / "a.db")))
    sinks = Sinks(
        bulk=lambda body: {"items": []},
        fire=lambda data, tag: events.append(tag),
        index=lambda ts: "x",
        count=lambda n, k: counts.update({n: k}),
    )
    svc = AnomalyService(DetectorConfig(), sinks, health=monitor)
    svc.check_health(force=True)
    facts["gw"] = {**hb(), "received_ms": wall, "ts_ms": wall}
    svc.check_health(force=True)
    assert events == [
        "tributary/health/gateway_silent/raised",
        "tributary/health/gateway_silent/cleared",
    ]
    assert counts["findings_raised"] == 1 and counts["findings_cleared"] == 1


def test_the_engine_config_defaults_are_the_analysis_defaults():
    """The relay engine's schema (which must not import analysis) states the same defaults."""
    import dataclasses

    from saltext.tributary.relay import config as relay_config

    for engine_cls, lib in (
        (relay_config.HealthConfig, HealthConfig()),
        (relay_config.AnomaliesConfig, DetectorConfig()),
    ):
        for f in dataclasses.fields(engine_cls):
            if hasattr(lib, f.name):
                assert f.default == getattr(lib, f.name), (engine_cls.__name__, f.name)
