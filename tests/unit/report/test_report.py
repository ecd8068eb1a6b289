"""The fleet report's pure parts: bucket sizes, sibling envelopes, the state of a gateway, and
a page rendered from a hand-made model (one file: no script, no external URL)."""

from __future__ import annotations

import re

import pytest

import saltext.tributary.report as report
from saltext.tributary.report import html, render
from saltext.tributary.report.model import (
    AlertMark,
    AnomalyMark,
    Bucket,
    FindingsChart,
    FleetRow,
    Pipeline,
    PipelinePoint,
    Report,
    Series,
    SiteChart,
    Window,
    choose_interval,
    interval_text,
    sibling_envelope,
)

H = 3_600_000


@pytest.mark.parametrize(
    ("span", "interval"),
    [(H, 60_000), (24 * H, 900_000), (7 * 24 * H, 2 * H), (90 * 24 * H, 24 * H)],
)
def test_interval_gives_at_most_120_buckets(span, interval):
    assert choose_interval(span) == interval
    assert span / interval <= 120 or interval == 24 * H


def test_interval_text_and_window_keys():
    assert interval_text(900_000) == "15m" and interval_text(2 * H) == "2h"
    w = Window(start_ms=10 * H + 5, end_ms=12 * H, interval_ms=H)
    assert w.keys() == [10 * H, 11 * H, 12 * H]  # aligned like Elasticsearch's fixed interval


def test_sibling_envelope_is_min_weighted_mean_max():
    a = Series("s", "gw-1", "t1", "temperature", [Bucket(0, 1, 1.0, 2.0, 3.0)])
    b = Series(
        "s", "gw-2", "t1", "temperature", [Bucket(0, 3, 0.5, 6.0, 9.0), Bucket(H, 1, 1, 1, 1)]
    )
    env = sibling_envelope([a, b])
    assert env[0] == Bucket(0, 4, 0.5, (2.0 + 18.0) / 4, 9.0)
    assert env[1] == Bucket(H, 1, 1, 1, 1)


def test_span_refuses_bad_periods():
    assert report.span_ms("7d") == 7 * 24 * H
    for bad in ("yesterday", "0h", -5):
        with pytest.raises(ValueError, match="since"):
            report.span_ms(bad)


def test_state_from_findings_and_last_seen():
    now = 100 * H
    fleet = [
        FleetRow("a", "gw-ok", last_seen_ms=now - 1000),
        FleetRow("a", "gw-late", last_seen_ms=now - H),
        FleetRow("b", "gw-degraded", last_seen_ms=now - 1000),
        FleetRow("c", "gw-out", last_seen_ms=now - 1000),
    ]
    local = {
        "gateways": {
            "gw-ok": {"lag_s": 1.5, "open_gaps": 2, "gateway_spool": {"spool_unsent": 7}},
            "gw-new": {"gateway_spool": {"site": "d", "spool_unsent": 0, "received_ms": now}},
        },
        "findings": [
            {"kind": "dropping", "gateway": "gw-degraded", "site": "b"},
            {"kind": "site_outage", "site": "c"},
        ],
        "heartbeat_s": 30,
        "overdue_factor": 3,
    }
    report._merge_local(fleet, local, now, None)
    rows = {r.gateway: r for r in fleet}
    assert rows["gw-ok"].state == "ok" and rows["gw-ok"].backlog == 7
    assert rows["gw-ok"].lag_s == 1.5 and rows["gw-ok"].open_gaps == 2
    assert rows["gw-late"].state == "silent"  # older than 3 heartbeats
    assert rows["gw-degraded"].state == "degraded" and rows["gw-degraded"].findings == ["dropping"]
    assert rows["gw-out"].state == "outage"
    assert rows["gw-new"].site == "d" and rows["gw-new"].state == "ok"
    # a site filter keeps gateways of other sites out
    fleet2: list = []
    report._merge_local(fleet2, local, now, "a*")
    assert fleet2 == []


def test_shrink_svg_minifies_paths_only_and_drops_metadata():
    svg = (
        '<?xml version="1.0"?>\n<svg><metadata><rdf:RDF>https://matplotlib.org/</rdf:RDF>'
        '</metadata><path d="M 1.23456 -7.891 \nL 3 4 \nL 5.04 -6 \nz\n"/>'
        "<text>12.345</text></svg>"
    )
    assert (
        render.shrink_svg(svg)
        == '<svg><path d="M1.2-7.9l1.8 11.9 2-10z"/><text>12.345</text></svg>'
    )
    # lines relative to the previous rounded point (no drift), curves absolute, a command
    # letter only where it changes, a closed path returns to its start
    assert render.minify_path(
        "M 0 0 L 1 1 C 1 2 3 4 5 6 C 7 8 9 10 11 12 L -0.01 2 L 0.52 0.3 z L 1 1"
    ) == ("M0 0l1 1C1 2 3 4 5 6 7 8 9 10 11 12l-11-10 .5-1.7zl1 1")


def _model() -> Report:
    w = Window(0, 24 * H, H)
    keys = w.keys()
    s1 = Series(
        "alpha",
        "gw-1",
        "boiler",
        "temperature",
        [Bucket(t, 6, 20.0 + i % 3, 21.0 + i % 3, 22.0 + i % 3) for i, t in enumerate(keys)],
        [AnomalyMark(5 * H + 10, 5 * H, 1, 90.0, 21.0, 18.0, 24.0, 0.99)],
        [AlertMark(5 * H + 10, "hot", "firing", 1), AlertMark(6 * H, "hot", "resolved", 1)],
    )
    s2 = Series("alpha", "gw-2", "boiler", "temperature", [Bucket(t, 6, 19, 20, 21) for t in keys])
    points = [PipelinePoint(t, 6, 6, 2.5, i % 2, 0, 0, 1) for i, t in enumerate(keys)]
    for i, pt in enumerate(points):  # lag per hop, gaps opened and closed
        pt.hops = {"gateway": {50: 1.0, 95: 4.0}, "uplink": {50: 0.05, 95: 0.2}}
        pt.hops["relay"] = {50: 0.002, 95: 0.01 * (1 + i % 3)}
        pt.gaps_opened, pt.gaps_repaired, pt.gaps_filled = i % 3, i % 2, int(i == 5)
    return Report(
        generated_ms=24 * H,
        window=w,
        site=None,
        fleet=[FleetRow("alpha", "gw-1", 24 * H - 1000, "ok", [], 3, 1.2, 0, 144)],
        pipeline=Pipeline(
            points, {"bad_signature": 12}, {"series": 2}, {"acked": [1] * len(keys)}, True
        ),
        findings=FindingsChart(
            keys,
            {
                "device": [1] * len(keys),
                "population": [0] * len(keys),
                "application": [0] * len(keys),
            },
            {"gateway_silent": 25},
        ),
        sites=[SiteChart("alpha", "temperature", [s1, s2], sibling_envelope([s1, s2]))],
        alerts_by_rule={"hot": {"firing": 1, "resolved": 1}},
    )


@pytest.mark.skipif(not render.HAS_MATPLOTLIB, reason=render.MISSING)
def test_page_is_one_file_without_script_or_external_url(tmp_path):
    out = report.write(_model(), str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert out["html_bytes"] == len(text.encode())
    assert sorted(p.rsplit("/", 1)[1] for p in out["charts"]) == [
        "r-findings.png",
        "r-pipeline.png",
        "r-site-alpha-temperature.png",
    ]
    for path in out["charts"]:
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in text.lower()
    # the only URLs are the SVG namespaces (identifiers, never fetched)
    urls = set(re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!#|data:)""", text)
    assert "@import" not in text and not re.search(r"url\((?!#)", text)
    assert text.count("<svg") == 3
    assert "gw-1 boiler" in text and "bad_signature" in text and "1 anomalies" in text
    # the pipeline's lag per hop and gap lines are drawn (SVG text stays text)
    for label in ("gateway p50", "uplink p95", "relay p95", "opened", "repaired", "filled late"):
        assert f">{label}<" in text, label


@pytest.mark.skipif(not render.HAS_MATPLOTLIB, reason=render.MISSING)
def test_anomaly_bands_off_centre_or_unknown_are_drawn(tmp_path):
    m = _model()
    s = m.sites[0].series[0]
    nan = float("nan")
    s.anomalies.append(AnomalyMark(7 * H, 7 * H, 1, 50.0, 30.0, 31.0, 40.0, 0.9))  # below band
    s.anomalies.append(AnomalyMark(8 * H, 8 * H, 1, 50.0, nan, nan, nan, 0.9))
    assert report.write(m, str(tmp_path / "r.html"))["html_bytes"] > 0


def test_html_escapes_names():
    m = _model()
    m.fleet[0].gateway = "<gw>&"
    page = html.page(m, *(render.Chart(n, n, "<svg></svg>", b"") for n in ("p", "f")), [], {})
    assert "&lt;gw&gt;&amp;" in page and "<gw>" not in page


def test_missing_matplotlib_is_named(monkeypatch):
    monkeypatch.setattr(render, "HAS_MATPLOTLIB", False)
    monkeypatch.setattr(render, "MISSING", "the fleet report needs matplotlib (x)")
    with pytest.raises(RuntimeError, match="needs matplotlib"):
        report.write(_model(), "/nonexistent/r.html")


@pytest.mark.skipif(not render.HAS_MATPLOTLIB, reason=render.MISSING)
def test_rendering_in_a_process_of_its_own(tmp_path):
    out = report.write_isolated(_model(), str(tmp_path / "r.html"))
    assert out["html"] == str(tmp_path / "r.html") and len(out["charts"]) == 3
    assert (tmp_path / "r.html").stat().st_size == out["html_bytes"]
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="Error"):  # a directory that is a file
        report.write_isolated(_model(), str(tmp_path / "file" / "r.html"))


def test_percentiles_in_seconds_by_percent():
    from saltext.tributary.report.queries import percentiles_s

    assert percentiles_s({"values": {"50.0": 1500.0, "95.0": 61000.0}}) == {50: 1.5, 95: 61.0}
    # no document had the field: Elasticsearch answers null per percent
    assert percentiles_s({"values": {"50.0": None, "95.0": None}}) == {}
    assert percentiles_s(None) == {} and percentiles_s({"values": []}) == {}
