"""What ``tributary.status`` and ``tributary.gaps`` answer: the fleet summary by default,
per-gateway detail on request (a relay spool on disk, filled as the engine fills it)."""

from __future__ import annotations

import json
import time

import pytest

from saltext.tributary.relay import status
from saltext.tributary.relay.spool import RelaySpool


def _facts(spool: RelaySpool, gw: str, site: str, received_s: float) -> None:
    body = json.dumps({"received_ms": int(received_s * 1000), "site": site, "epoch": "e"})
    spool.db.execute("INSERT OR REPLACE INTO heartbeat_facts VALUES (?,?)", (gw, body))


@pytest.fixture
def opts(tmp_path):
    """Five gateways at two sites: gw-a1 ok, gw-a2 with a gap (51..60), gw-a3 silent for an
    hour, gw-b1 ok, gw-b2 with a lost tail (heartbeat at 30, ledger at 20) and a given-up gap."""
    path = str(tmp_path / "relay.db")
    spool = RelaySpool(path)
    now = time.time()
    led = spool.ledger
    for gw, site in (("gw-a1", "adelaide"), ("gw-a2", "adelaide"), ("gw-b1", "brisbane")):
        led.add_range(gw, "e", 1, 50, now=now - 5)
        led.heartbeat(gw, "e", 50, now=now - 5)
        _facts(spool, gw, site, now - 5)
    led.add_range("gw-a2", "e", 61, 70, now=now - 5)
    led.heartbeat("gw-a2", "e", 70, now=now - 5)
    led.add_range("gw-a3", "e", 1, 10, now=now - 3600)
    led.heartbeat("gw-a3", "e", 10, now=now - 3600)
    _facts(spool, "gw-a3", "adelaide", now - 3600)
    led.add_range("gw-b2", "old", 1, 5, now=now - 7200)
    led.heartbeat("gw-b2", "old", 9, now=now - 7200)
    led.add_range("gw-b2", "e", 1, 20, now=now - 5)
    led.heartbeat("gw-b2", "e", 30, now=now - 5)
    _facts(spool, "gw-b2", "brisbane", now - 5)
    led.refresh(now - 60)
    (old,) = [g for g in led.gaps("gw-b2") if g.epoch == "old"]
    led.give_up(old, "gone")
    spool.bump({("indexed", "gw-a1"): 50})
    spool.close()
    return {
        "cachedir": str(tmp_path / "cache"),
        "engines": [
            {
                "tributary_relay": {
                    "elasticsearch": {"hosts": ["https://127.0.0.1:1"]},
                    "spool_path": path,
                    "health": {"heartbeat_s": 30, "overdue_factor": 3},
                }
            }
        ],
    }


def test_status_default_is_a_fleet_summary(opts):
    st = status.status_from_opts(opts, check_es=False, detail=False)
    assert st["result"] is True and "gateways" not in st
    fleet = st["fleet"]
    assert fleet["gateways"] == 5
    assert fleet["states"] == {"silent": 1, "gaps": 2, "ok": 2}
    assert fleet["open_gaps"] == 2 and fleet["missing_readings"] == 10 + 10
    assert fleet["given_up_gaps"] == 1
    assert st["sites"] == {
        "adelaide": {"gateways": 3, "silent": 1, "gaps": 1, "ok": 1, "open_gaps": 1, "missing": 10},
        "brisbane": {"gateways": 2, "silent": 0, "gaps": 1, "ok": 1, "open_gaps": 1, "missing": 10},
    }
    # silent first, then the most readings missing (a tie: by name); ok gateways never listed
    assert [(w["gateway"], w["state"]) for w in st["worst"]] == [
        ("gw-a3", "silent"),
        ("gw-a2", "gaps"),
        ("gw-b2", "gaps"),
    ]
    assert st["worst"][2] == {
        "gateway": "gw-b2",
        "site": "brisbane",
        "state": "gaps",
        "open_gaps": 1,
        "missing": 10,
        "lag_s": pytest.approx(5, abs=2),
        "behind": 10,
    }
    assert [
        w["gateway"] for w in status.status_from_opts(opts, False, False, worst=1)["worst"]
    ] == ["gw-a3"]


def test_status_detail_on_request(opts):
    full = status.status_from_opts(opts, check_es=False, detail=True)
    assert sorted(full["gateways"]) == ["gw-a1", "gw-a2", "gw-a3", "gw-b1", "gw-b2"]
    a1 = full["gateways"]["gw-a1"]
    assert a1["state"] == "ok" and a1["site"] == "adelaide" and a1["indexed"] == 50
    assert a1["last_seq"] == 50 and a1["gateway_spool"]["site"] == "adelaide"
    b2 = full["gateways"]["gw-b2"]
    assert b2["epoch"] == "e" and set(b2["epochs"]) == {"e", "old"}
    assert b2["given_up_gaps"] == 1 and b2["open_gaps"] == 1 and b2["missing"] == 10
    one = status.status_from_opts(opts, check_es=False, detail=False, gateway="gw-a2")
    assert list(one["gateways"]) == ["gw-a2"] and one["gateways"]["gw-a2"]["missing"] == 10
    assert one["fleet"]["gateways"] == 5  # the summary stays fleet-wide
    site = status.status_from_opts(opts, check_es=False, detail=False, site="bris*")
    assert sorted(site["gateways"]) == ["gw-b1", "gw-b2"]
    both = status.status_from_opts(opts, False, False, gateway="gw-?1", site="adelaide")
    assert list(both["gateways"]) == ["gw-a1"]


def test_gaps_summary_and_detail(opts):
    summary = status.gaps_from_opts(opts)
    assert summary["open"] == 2 and summary["given_up"] == 1
    assert summary["missing_readings"] == 20 and summary["gateways_with_open_gaps"] == 2
    assert summary["sites"] == {
        "adelaide": {"open": 1, "given_up": 0, "missing": 10, "gateways": 1},
        "brisbane": {"open": 1, "given_up": 1, "missing": 10, "gateways": 1},
    }
    assert [(g["gateway"], g["from"], g["to"]) for g in summary["oldest"]] == [
        ("gw-a2", 51, 60),
        ("gw-b2", 21, 30),
    ]
    assert status.gaps_from_opts(opts, oldest=1)["oldest"][0]["site"] == "adelaide"
    every = status.gaps_from_opts(opts, detail=True)
    assert [(g["gateway"], g["state"]) for g in every] == [
        ("gw-a2", "open"),
        ("gw-b2", "open"),
        ("gw-b2", "given_up"),
    ]
    assert [g["epoch"] for g in status.gaps_from_opts(opts, gateway="gw-b2")] == ["e", "old"]
    assert [g["state"] for g in status.gaps_from_opts(opts, gateway="gw-b*", given_up=False)] == [
        "open"
    ]
    assert {g["gateway"] for g in status.gaps_from_opts(opts, site="adelaide")} == {"gw-a2"}
    assert status.gaps_from_opts(opts, gateway="nobody") == []


def test_no_spool_yet(tmp_path):
    opts = {
        "cachedir": str(tmp_path),
        "engines": [{"tributary_relay": {"spool_path": str(tmp_path / "none.db")}}],
    }
    assert status.gaps_from_opts(opts)["open"] == 0
    assert status.gaps_from_opts(opts, detail=True) == []
    assert "no relay spool yet" in status.status_from_opts(opts, check_es=False)["error"]


def test_gateway_state():
    def entry(hb_age, idx_age, open_gaps=0):
        return {
            "epochs": {"e": {"heartbeat_age_s": hb_age, "last_indexed_age_s": idx_age}},
            "open_gaps": open_gaps,
        }

    assert status.gateway_state(entry(10, 500), 90) == "ok"  # heartbeats: alive
    assert status.gateway_state(entry(None, 10), 90) == "ok"  # batches without heartbeats
    assert status.gateway_state(entry(100, None), 90) == "silent"
    assert status.gateway_state(entry(100, 5, open_gaps=2), 90) == "gaps"
    assert status.gateway_state(entry(100, 100, open_gaps=2), 90) == "silent"
    assert status.gateway_state({"epochs": {}}, 90) == "silent"  # only counters known
