"""Health metrics and the heartbeat event."""

from __future__ import annotations

import os

from saltext.tributary import health


def test_collect_from_fake_root_and_spool_status(tmp_path):
    root = tmp_path
    for i, t in enumerate(("41000", "55500")):
        d = root / f"sys/class/thermal/thermal_zone{i}"
        d.mkdir(parents=True)
        (d / "temp").write_text(t + "\n")
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(
        "MemTotal:  1000 kB\nMemFree: 100 kB\nMemAvailable:  250 kB\n"
    )
    (root / "proc/uptime").write_text("12345.67 999.0\n")
    status = {
        "unsent": 7,
        "held": {"count": 100},
        "bytes": 4096,
        "oldest_age_s": 3.5,
        "dropped": 2,
        "counters": {"received": 10},
        "state": {"broker": "subscribed"},
    }
    m = health.collect(status, root=str(root), disk_path=str(tmp_path))
    assert m["cpu_temp_c"] == 55.5
    assert m["mem_total_bytes"] == 1_024_000 and m["mem_used_pct"] == 75.0
    assert m["uptime_s"] == 12345.7
    assert m["broker"] == "subscribed" and m["broker_connected"] is True
    assert (m["spool_unsent"], m["spool_held"], m["spool_bytes"], m["dropped"]) == (7, 100, 4096, 2)
    assert 0 <= m["disk_used_pct"] <= 100 and "load1" in m
    rs = health.readings(m, 1_700_000_000_000)
    by = {r.metric: r for r in rs}
    assert by["broker_connected"].value == 1.0 and by["cpu_temp_c"].unit == "C"
    assert {r.sensor for r in rs} == {"health"}


def test_missing_sources_are_left_out(tmp_path):
    m = health.collect({}, root=str(tmp_path), disk_path=os.devnull + "-missing")
    assert "cpu_temp_c" not in m and "mem_total_bytes" not in m and "uptime_s" not in m
    assert m["broker"] == "unknown" and "broker_connected" not in m


def test_event_shape():
    ev = health.event("ep1", 42, {"load1": 0.5}, 1_700_000_000_000)
    assert ev["tag"] == "health" and ev["v"] == 1 and ev["epoch"] == "ep1" and ev["last_seq"] == 42
    assert ev["load1"] == 0.5 and ev["_stamp"] == 1_700_000_000_000
