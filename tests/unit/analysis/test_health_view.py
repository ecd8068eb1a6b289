"""What ``tributary.health`` answers: counts per site by default, the findings on request."""

from __future__ import annotations

from saltext.tributary.analysis.views import health_view

NOW = 1_800_000_000_000


def finding(kind, layer, site, gateway=None, age_s=60.0, **detail):
    return {
        "kind": kind,
        "layer": layer,
        "site": site,
        "gateway": gateway,
        "sensor": None,
        "metric": None,
        "detail": detail,
        "raised_ms": NOW - int(age_s * 1000),
    }


FACTS = {
    "gw-a1": {"site": "adelaide", "received_ms": NOW - 5_000},
    "gw-a2": {"site": "adelaide", "received_ms": NOW - 3_600_000},
    "gw-b1": {"site": "brisbane", "received_ms": NOW - 3_600_000},
    "gw-b2": {"site": "brisbane", "received_ms": NOW - 3_600_000},
    "gw-c1": {"site": "cairns", "received_ms": NOW - 5_000},
}
FINDINGS = [
    finding("gateway_silent", "device", "adelaide", "gw-a2", age_s=3000, last_heartbeat_s=3600),
    finding("clock_skew", "device", "adelaide", "gw-a1", age_s=100, skew_s=300),
    finding("site_outage", "population", "brisbane", age_s=3500, silent_gateways=["gw-b1"]),
]


def view(**kw):
    return health_view(FINDINGS, FACTS, {"adelaide": 4}, NOW, 30.0, 3.0, **kw)


def test_default_is_counts_per_site():
    out = view(detail=False)
    assert out["fleet"] == {
        "sites": 3,
        "states": {"outage": 1, "degraded": 1, "ok": 1},
        "gateways": 5,
        "gateways_reporting": 2,
        "open_findings": 3,
        "sites_in_outage": ["brisbane"],
        "anomalies_last_hour": 4,
    }
    assert out["sites"]["adelaide"] == {
        "gateways": 2,
        "gateways_reporting": 1,
        "open": {"device": {"gateway_silent": 1, "clock_skew": 1}, "population": {}},
        "anomalies_last_hour": 4,
        "state": "degraded",
    }
    assert out["sites"]["brisbane"]["state"] == "outage"
    assert out["sites"]["cairns"]["state"] == "ok"
    assert "device" not in out["sites"]["adelaide"]  # no finding lists by default
    # the oldest open findings of the fleet, with their site and layer
    assert [(f["kind"], f["site"], f["layer"]) for f in out["oldest"]] == [
        ("site_outage", "brisbane", "population"),
        ("gateway_silent", "adelaide", "device"),
        ("clock_skew", "adelaide", "device"),
    ]
    assert out["oldest"][1]["open_s"] == 3000.0 and out["oldest"][1]["gateway"] == "gw-a2"
    assert len(view(detail=False, oldest=1)["oldest"]) == 1


def test_findings_listed_on_request():
    out = view(detail=True)
    device = out["sites"]["adelaide"]["device"]
    assert [(f["kind"], f["gateway"], f["open_s"]) for f in device] == [
        ("gateway_silent", "gw-a2", 3000.0),
        ("clock_skew", "gw-a1", 100.0),
    ]
    assert out["sites"]["brisbane"]["population"][0]["detail"] == {"silent_gateways": ["gw-b1"]}
    assert out["sites"]["cairns"]["device"] == [] and out["sites"]["cairns"]["population"] == []
    one = view(detail=False, site="bris*")
    assert list(one["sites"]) == ["brisbane"] and one["sites"]["brisbane"]["population"]
    assert one["fleet"]["sites"] == 3  # totals stay fleet-wide
    assert view(detail=False, site="nowhere")["sites"] == {}
