"""Gateway glue without Salt: config validation, spooling in-process sources, emit paths."""

from __future__ import annotations

import pytest

from saltext.tributary.gateway import beacons as gw_beacons
from saltext.tributary.gateway import config as gw_config
from saltext.tributary.gateway.spool import SpoolFull
from saltext.tributary.protocol.reading import RejectedReading, make_reading
from saltext.tributary.protocol.wire import decode_batch, packed_size
from tests.support.keys import write_keypair

T0 = 1_700_000_000_000


@pytest.fixture(autouse=True)
def clean_registry():
    yield
    gw_beacons.stop_sources()


@pytest.fixture(scope="module")
def opts(tmp_path_factory):

    pki = tmp_path_factory.mktemp("pki")
    write_keypair(pki)
    return {"id": "gw", "pki_dir": str(pki)}


@pytest.fixture
def cfg(tmp_path):
    return {"_beacon_name": "t", "spool": {"path": str(tmp_path / "s.db")}}


def test_validate_never_raises_and_names_keys():
    for fn in (gw_config.validate_mqtt, gw_config.validate_sysfs, gw_config.validate_health):
        for bad in (None, 5, "x", [{"spool": object()}], [{"filters": "x"}]):
            ok, msg = fn(bad)
            assert ok is False and isinstance(msg, str)
    ok, msg = gw_config.validate_health([{"bandwidth": {"bytes_per_s": 10, "speed": 1}}])
    assert not ok and "bandwidth.speed" in msg


def test_spool_readings_filters_and_counts(cfg, opts):
    cfg["filters"] = [{"match": "*", "max": 50}]
    rs = [make_reading("a", "t", v, T0 + i, "C") for i, v in enumerate((1, 99, 2))]
    first, last = gw_beacons.spool_readings(cfg, {}, rs, [RejectedReading("w1_crc", "x")])
    assert (first, last) == (1, 2)
    c = gw_beacons.emitting_spool(cfg, {}).counters()
    assert c["received"] == 4 and c["rejected:w1_crc"] == 1 and c["rejected:implausible"] == 1
    (ev,) = gw_beacons.emit(cfg, opts, {"site": "x"})
    assert ev["tag"] == "batch" and [r["value"] for r in decode_batch(ev).readings] == [1.0, 2.0]


def test_spool_full_is_counted_as_dropped(cfg, monkeypatch):
    spool = gw_beacons.emitting_spool(cfg, {})

    def full(*a, **k):
        raise SpoolFull("spool: filesystem full")

    monkeypatch.setattr(spool, "append", full)
    assert gw_beacons.spool_readings(cfg, {}, [make_reading("a", "t", 1, T0, None)], []) == (0, 0)
    assert spool.counters()["dropped:disk_full"] == 1


def test_emit_with_bandwidth_budget_aggregates(cfg, opts):
    cfg["bandwidth"] = {"bytes_per_s": 1, "window_s": 60, "burst_s": 1}
    rs = [make_reading(f"s{i % 3}", "t", 20 + i % 5, T0 + i * 100, "C") for i in range(3000)]
    gw_beacons.spool_readings(cfg, {}, rs, [])
    events = gw_beacons.emit(cfg, opts, {})
    assert len(events) == 1 and events[0]["agg"] == 60
    dec = decode_batch(events[0])
    assert sum(r["agg"]["count"] for r in dec.readings) == 3000
    assert gw_beacons.emit(cfg, opts, {}) == []  # budget spent


def test_budget_is_per_gateway_whichever_beacon_emits(cfg, opts):
    limited = dict(cfg, bandwidth={"bytes_per_s": 1, "window_s": 60, "burst_s": 1})
    other = dict(cfg, _beacon_name="health")  # same spool, no bandwidth key of its own
    gw_beacons.spool_readings(limited, {}, [make_reading("a", "t", 1, T0, "C")], [])
    assert gw_beacons.emit(limited, opts, {})  # registers the budget, spends the bucket
    rs = [make_reading("a", "t", i % 3, T0 + 1000 + i, "C") for i in range(500)]
    gw_beacons.spool_readings(other, {}, rs, [])
    assert gw_beacons.emit(other, opts, {}) == []  # the other beacon is held to the same budget
    assert gw_beacons.emitting_spool(cfg, {}).status()["unsent"] == 500  # waiting, not dropped


def test_closing_one_beacon_leaves_the_others_running(tmp_path):
    """Salt calls ``close`` for the one beacon it removes: only that beacon's parts stop."""
    opts = {"id": "gw", "cachedir": str(tmp_path)}
    spool = {"path": str(tmp_path / "s.db")}
    src = [{"kind": "thermal", "interval_s": 10}]
    a = {"_beacon_name": "sysfs_a", "root": str(tmp_path), "spool": spool, "sources": src}
    b = {"_beacon_name": "sysfs_b", "root": str(tmp_path), "spool": spool, "sources": src}
    source_b = gw_beacons.sysfs_source(b, opts)
    gw_beacons.sysfs_source(a, opts)
    shared = gw_beacons.emitting_spool(a, opts)
    gw_beacons.close_beacon([{k: v} for k, v in a.items()], opts, "tributary_sysfs")
    assert gw_beacons.REGISTRY.get("source", f"{spool['path']}|sysfs_a") is None
    assert gw_beacons.sysfs_source(b, opts) is source_b  # not restarted
    assert gw_beacons.emitting_spool(b, opts) is shared  # the shared spool stays open
    shared.status()


def test_the_heartbeat_reports_what_was_emitted_not_a_held_backlog(cfg, opts):
    """A backlog the bandwidth budget holds back is not a gap: the heartbeat's ``last_seq``
    is the last sequence emitted (the relay chases only that), ``numbered_seq`` the last one
    numbered."""
    limited = dict(cfg, bandwidth={"bytes_per_s": 1, "window_s": 60, "burst_s": 1})
    gw_beacons.spool_readings(limited, {}, [make_reading("a", "t", 1, T0, "C")], [])
    (ev,) = gw_beacons.emit(limited, opts, {})  # spends the bucket
    rs = [make_reading("a", "t", i % 3, T0 + 1000 + i, "C") for i in range(500)]
    gw_beacons.spool_readings(limited, {}, rs, [])
    health = dict(cfg, _beacon_name="health", spool_metrics=False)
    out = gw_beacons.run_health_beacon(health, opts, {})
    hb = out[-1]
    assert hb["tag"] == "health" and [e for e in out[:-1] if e["tag"] == "batch"] == []
    assert hb["last_seq"] == ev["last"] == 1  # emitted
    assert hb["numbered_seq"] == 501  # numbered, held back by the budget


@pytest.mark.parametrize(
    ("wmem", "cap"),
    [("212992\n", 106_496), ("65536\n", 32_768), ("4194304\n", gw_config.HARD_RUN_BYTES)],
)
def test_run_cap_is_half_the_kernels_socket_send_buffer(tmp_path, wmem, cap):
    path = tmp_path / "wmem_default"
    path.write_text(wmem)
    assert gw_config.run_bytes_cap(str(path)) == cap


def test_run_cap_without_the_kernels_figure_is_the_hard_cap(tmp_path):
    assert gw_config.run_bytes_cap(str(tmp_path / "absent")) == gw_config.HARD_RUN_BYTES
    (tmp_path / "junk").write_text("")
    assert gw_config.run_bytes_cap(str(tmp_path / "junk")) == gw_config.HARD_RUN_BYTES


def test_a_run_never_emits_more_than_the_machines_cap(cfg, opts, monkeypatch):
    """On a kernel with a 64 KiB send buffer a run asked for 96 KiB emits at most 32 KiB (the
    rest waits for the next run) and says once why."""
    monkeypatch.setattr(gw_beacons, "run_bytes_cap", lambda: 32_768)
    cfg["batch"] = {"max_bytes": 8192, "max_run_bytes": 98_304}
    rs = [make_reading(f"s{i % 50}", "t", i * 1.25, T0 + i, "C") for i in range(40_000)]
    gw_beacons.spool_readings(cfg, {}, rs, [])
    warned: list[str] = []
    monkeypatch.setattr(gw_beacons.log, "warning", lambda msg, *a: warned.append(msg % a))
    monkeypatch.setattr(gw_beacons, "_WARNED_CAPS", set())
    first = gw_beacons.emit(cfg, opts, {})
    second = gw_beacons.emit(cfg, opts, {})
    for run in (first, second):  # the batches, plus each event's signature and tag
        assert run and sum(packed_size(ev) for ev in run) <= 32_768 + 512 * len(run)
    assert second[0]["first"] == first[-1]["last"] + 1
    assert [w for w in warned if "lowered to 32768" in w] == warned and len(warned) == 1
