"""The fleet report against a real Elasticsearch, in a real headless Chromium, and from
``salt-run tributary.report`` on the session topology's top master.

Known documents go into their own index prefix (``rpt*``), so they never meet other tests'
data, and the numbers behind every chart are checked against them: bucket counts, minima and
maxima, anomaly and alert positions, findings per layer, pipeline counts.
"""

from __future__ import annotations

import io
import os
import time

import pytest

import saltext.tributary.report as report
from saltext.tributary.report import queries, render
from saltext.tributary.report.model import HOPS
from tests.support.browser import Browser, chromium_path
from tests.support.reportdata import Known
from tests.support.topology import es_count, wait_for

pytestmark = pytest.mark.skipif(not render.HAS_MATPLOTLIB, reason=render.MISSING)


@pytest.fixture(scope="module")
def known(es_node):
    client = es_node.client()
    now = int(time.time() * 1000)
    data = Known(now, "rpt")
    data.load(client)
    yield data, queries.client_search(client)
    client.indices.delete(index="rpt-*", ignore_unavailable=True, allow_no_indices=True)


def _buckets(docs, interval):
    """Expected per-bucket (count, min, max) of readings, from the documents themselves."""
    out: dict[int, list] = {}
    for d in docs:
        t = d["@timestamp"] - d["@timestamp"] % interval
        lo = min(d["value"], d.get("agg", {}).get("min", d["value"]))
        hi = max(d["value"], d.get("agg", {}).get("max", d["value"]))
        e = out.setdefault(t, [0, lo, hi])
        e[0] += 1
        e[1], e[2] = min(e[1], lo), max(e[2], hi)
    return {t: tuple(v) for t, v in out.items()}


def test_numbers_behind_each_chart_match_the_documents(known):
    data, search = known
    rep = report.build(search, "rpt", data.now, "24h")
    iv = rep.window.interval_ms
    assert iv == 900_000  # 24 h in buckets of 15 minutes

    # per site and metric: every series, each bucket's count, min (agg.min counts), max
    charts = {(c.site, c.metric): c for c in rep.sites}
    assert sorted(charts) == [("alpha", "temperature"), ("beta", "level")]
    for chart in rep.sites:
        for s in chart.series:
            docs = [
                d
                for d in data.readings
                if (d["gateway"], d["sensor"], d["metric"]) == (s.gateway, s.sensor, s.metric)
            ]
            assert {b.t: (b.count, b.min, b.max) for b in s.buckets} == _buckets(docs, iv)
            assert s.count == len(docs) == 144
    alpha = charts[("alpha", "temperature")]
    assert [s.gateway for s in alpha.series] == ["gw-r-a1", "gw-r-a2"]
    spike = next(b for b in alpha.series[0].buckets if b.t == data.spike_at - data.spike_at % iv)
    assert spike.max == 95.0
    # siblings: the envelope spans both gateways
    env = {b.t: b for b in alpha.siblings}
    assert env[spike.t].max == 95.0 and env[spike.t].count == spike.count * 2
    beta = charts[("beta", "level")].series[0]
    assert min(b.min for b in beta.buckets) == 40.0 and max(b.max for b in beta.buckets) == 64.0

    # the anomaly at its own timestamp, with the detector's expected value and band; the
    # scored non-anomaly is not drawn
    (mark,) = alpha.series[0].anomalies
    assert (mark.t, mark.value, mark.expected, mark.band_lo, mark.band_hi) == (
        data.spike_at,
        95.0,
        22.5,
        19.0,
        26.0,
    )
    assert alpha.series[1].anomalies == []
    # alert transitions where they happened
    assert [(a.t, a.rule, a.state) for a in alpha.series[0].alerts] == [
        (data.spike_at, "boiler-hot", "firing"),
        (data.times[102], "boiler-hot", "resolved"),
    ]
    assert rep.alerts_by_rule == {"boiler-hot": {"firing": 1, "resolved": 1}}

    # health findings per layer and bucket (raised only), anomalies as the application layer
    f = rep.findings
    at = {t: i for i, t in enumerate(f.keys)}
    for layer, t in (
        ("device", data.times[20]),
        ("population", data.times[40]),
        ("application", data.spike_at),
    ):
        assert sum(f.layers[layer]) == 1
        assert f.layers[layer][at[t - t % iv]] == 1
    assert f.kinds == {"gateway_silent": 1, "sensor_departs": 1, "anomaly": 1}

    # pipeline: readings measured and indexed per bucket, the 2.5 s lag, dead letters,
    # replay requests and given-up gaps from the relay counters' deltas, open gaps, commands
    p = {pt.t: pt for pt in rep.pipeline.points}
    expected_in: dict[int, int] = {}
    for d in data.readings:
        t = d["@timestamp"] - d["@timestamp"] % iv
        expected_in[t] = expected_in.get(t, 0) + 1
    assert {t: pt.readings_in for t, pt in p.items() if pt.readings_in} == expected_in
    indexed: dict[int, int] = {}
    for d in data.readings:  # indexed by the end of the window (the last ones are not yet)
        if d["relayed_at"] <= data.now:
            t = d["relayed_at"] - d["relayed_at"] % iv
            indexed[t] = indexed.get(t, 0) + 1
    assert {t: pt.indexed for t, pt in p.items() if pt.indexed} == indexed
    assert {pt.lag_s for pt in p.values() if pt.lag_s is not None} == {2.5}
    # lag per hop (percentiles of hop_ms): in every bucket two of three readings are the
    # alpha gateways', so theirs is the median; the 95th lies towards beta's
    alpha, beta = Known.HOPS["alpha"], Known.HOPS["beta"]
    for pt in p.values():
        if not pt.readings_in:
            assert pt.hops == {}
            continue
        assert set(pt.hops) == set(HOPS)
        for hop in HOPS:
            assert pt.hops[hop][50] == alpha[hop] / 1000, (pt.t, hop, pt.hops)
            lo, hi = sorted((alpha[hop], beta[hop]))
            assert lo / 1000 <= pt.hops[hop][95] <= hi / 1000, (pt.t, hop, pt.hops)
        assert pt.hops["gateway"][95] > pt.hops["gateway"][50]  # beta's gateway holds longer
        assert pt.hops["relay"][95] == 1.2  # beta's relay hop is the shortest
    t60 = data.times[60] - data.times[60] % iv
    assert {t: pt.dead_letters for t, pt in p.items() if pt.dead_letters} == {t60: 3}
    assert rep.pipeline.dead_letter_reasons == {"bad_signature": 3}
    t70, t90 = (data.times[k] - data.times[k] % iv for k in (70, 90))
    assert {t: pt.replays for t, pt in p.items() if pt.replays} == {t70: 2, t90: 3}
    assert {t: pt.gaps_given_up for t, pt in p.items() if pt.gaps_given_up} == {t90: 1}
    assert {t: pt.gaps_opened for t, pt in p.items() if pt.gaps_opened} == {t70: 3}
    assert {t: pt.gaps_repaired for t, pt in p.items() if pt.gaps_repaired} == {t90: 2}
    assert {t: pt.gaps_filled for t, pt in p.items() if pt.gaps_filled} == {t90: 1}
    assert (p[t70].open_gaps, p[t90].open_gaps) == (2, 1)
    t110 = data.times[110] - data.times[110] % iv
    cmds = rep.pipeline.commands
    assert cmds is not None and set(cmds) == {"acked", "timeout"}
    assert cmds["acked"][rep.window.keys().index(t110)] == 2 and sum(cmds["acked"]) == 2
    assert sum(cmds["timeout"]) == 1

    # fleet: last seen, the backlog of each gateway's latest heartbeat
    fleet = {r.gateway: r for r in rep.fleet}
    assert sorted(fleet) == ["gw-r-a1", "gw-r-a2", "gw-r-b1"]
    assert (fleet["gw-r-a1"].backlog, fleet["gw-r-b1"].backlog, fleet["gw-r-a2"].backlog) == (
        5,
        0,
        None,
    )
    assert fleet["gw-r-a1"].last_seen_ms == data.now  # its last reading is newer than its heartbeat
    assert fleet["gw-r-a1"].readings == 144 and fleet["gw-r-b1"].site == "beta"
    assert rep.pipeline.totals["readings in period"] == 432
    assert rep.notes  # without the status store, the page says what is missing
    with_local = report.build(search, "rpt", data.now, "24h", local=data.local())
    assert with_local.notes == [] and with_local.pipeline.totals["open gaps"] == 1
    assert {r.gateway: r.state for r in with_local.fleet} == {
        "gw-r-a1": "ok",
        "gw-r-a2": "degraded",  # its open finding
        "gw-r-b1": "ok",
    }

    # a site filter keeps to that site
    only = report.build(search, "rpt", data.now, "24h", site="bet*")
    assert [(c.site, c.metric) for c in only.sites] == [("beta", "level")]
    assert [r.gateway for r in only.fleet] == ["gw-r-b1"]


def test_absent_indices_leave_their_charts_empty(known, es_node):
    data, _ = known
    search = queries.client_search(es_node.client())
    rep = report.build(search, "rpt-none", data.now, "24h")
    assert rep.sites == [] and rep.fleet == [] and rep.pipeline.commands is None
    assert not rep.pipeline.metrics_present
    # the known fleet without a commands index: no commands chart, the rest as before
    Known(data.now, "rptnocmd").load(es_node.client(), commands=False)
    try:
        rep = report.build(search, "rptnocmd", data.now, "24h")
        assert rep.pipeline.commands is None and len(rep.sites) == 2
    finally:
        es_node.client().indices.delete(index="rptnocmd-*", ignore_unavailable=True)


def _colours(png: bytes, box: dict) -> tuple[int, float, set]:
    """Distinct colours, grey-level spread and the set of colours in a box of a screenshot."""
    from PIL import Image, ImageStat

    img = Image.open(io.BytesIO(png)).convert("RGB")
    crop = img.crop(
        (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
    )
    colours = {c for _, c in crop.getcolors(maxcolors=1 << 20)}
    return len(colours), ImageStat.Stat(crop.convert("L")).stddev[0], colours


def _near(colours: set, rgb: tuple[int, int, int], tol: int = 40) -> bool:
    return any(all(abs(a - b) <= tol for a, b in zip(c, rgb, strict=True)) for c in colours)


@pytest.mark.skipif(chromium_path() is None, reason="no chromium (make setup installs it)")
def test_page_loads_offline_in_chromium_and_shows_the_charts(known, tmp_path):
    data, search = known
    rep = report.build(search, "rpt", data.now, "24h", local=data.local())
    out = report.write(rep, str(tmp_path / "r.html"))
    assert len(out["charts"]) == 4 and all(os.path.getsize(p) > 1000 for p in out["charts"])
    bait = tmp_path / "bait.html"  # the same checks see a page that does reach out
    bait.write_text('<html><body><img src="http://example.com/x.png"><script>no_such()</script>')
    with Browser(width=1200, height=900) as b:
        load = b.load(out["html"])
        assert load.requests == [load.url], load.requests
        assert load.failed == [] and load.errors == [], (load.failed, load.console)
        boxes = b.evaluate(
            "JSON.stringify([...document.querySelectorAll('figure svg')].map(e => {"
            " const r = e.getBoundingClientRect();"
            " return {id: e.parentNode.id, x: r.x + scrollX, y: r.y + scrollY,"
            " width: r.width, height: r.height}; }))"
        )
        png = b.screenshot()
        baited = b.load(str(bait))
    assert any(u.startswith("http://example.com") for u in baited.requests)
    assert baited.failed and baited.errors  # blocked request and the script error are seen

    import json

    figs = {f["id"]: f for f in json.loads(boxes)}
    assert set(figs) == {
        "pipeline",
        "findings",
        "site-alpha-temperature",
        "site-beta-level",
    }
    for name, box in figs.items():
        assert box["width"] > 600 and box["height"] > 150, (name, box)
        n, spread, _ = _colours(png, box)
        assert n >= 20 and spread > 5, (name, n, spread)  # drawn, not blank
    # the anomaly cross (red) and the series band (blue) are in the alpha chart; the device
    # (orange) and population (purple) bars in the findings chart
    _, _, alpha = _colours(png, figs["site-alpha-temperature"])
    assert _near(alpha, (0xD6, 0x27, 0x28)) and _near(alpha, (0x1F, 0x77, 0xB4))
    _, _, findings = _colours(png, figs["findings"])
    assert _near(findings, (0xFF, 0x7F, 0x0E)) and _near(findings, (0x94, 0x67, 0xBD))
    # the pipeline: the gateway hop's lag (green), gaps opened (red), commands acked (green)
    _, _, pipeline = _colours(png, figs["pipeline"])
    assert _near(pipeline, (0x2C, 0xA0, 0x2C)) and _near(pipeline, (0xD6, 0x27, 0x28))
    shot = os.environ.get("TRIBUTARY_REPORT_SHOT")
    if shot:  # README screenshot: TRIBUTARY_REPORT_SHOT=docs/report.png
        import shutil

        from tests.support.browser import main as shoot

        assert shoot([out["html"], shot, "1100", "1500", "0.7"]) == 0
        # and the pipeline chart's own PNG (as mailed), beside it: report-pipeline.png
        (pipeline_png,) = [p for p in out["charts"] if p.endswith("-pipeline.png")]
        shutil.copyfile(pipeline_png, os.path.join(os.path.dirname(shot), "report-pipeline.png"))


GW = "gw-brisbane-1"
SENSOR = "report-probe"


def test_salt_run_report_writes_the_page_and_charts(topology, tmp_path):
    es, top, brokers = topology["es"], topology["top"], topology["brokers"]
    brokers[GW].publish(f"sensors/{SENSOR}/temperature", ["21.5", "22.0", "22.5"])
    wait_for(lambda: es_count(es, GW, SENSOR) >= 3, 90, "the probe readings indexed")
    out = tmp_path / "fleet" / "report.html"
    ret = top.salt_run_cli(timeout=120).run("tributary.report", since="1h", out=str(out))
    assert ret.returncode == 0 and ret.data["result"] is True, (ret.data, ret.stdout, ret.stderr)
    assert ret.data["html"] == str(out) and out.stat().st_size == ret.data["html_bytes"]
    assert "brisbane" in ret.data["sites"] and ret.data["interval"] == "1m"
    for path in ret.data["charts"]:
        assert os.path.dirname(path) == str(out.parent) and os.path.getsize(path) > 1000
    page = out.read_text()
    assert f"{GW} {SENSOR}" in page and "<script" not in page
    # the probe readings came the whole way (gateway, its master and syndic, the relay): each
    # carries its lag per hop, adding up to relayed_at - @timestamp, one clock on this machine
    hits = es.client().search(
        index="tributary-readings-*",
        query={"bool": {"filter": [{"term": {"gateway": GW}}, {"term": {"sensor": SENSOR}}]}},
        size=10,
    )["hits"]["hits"]
    assert len(hits) >= 3
    for hit in hits:
        doc = hit["_source"]
        hop = doc["hop_ms"]
        assert set(hop) == set(HOPS) and min(hop.values()) >= 0, hop
        assert sum(hop.values()) == doc["relayed_at"] - doc["@timestamp"]
    assert "uplink p50" in page and "gateway p95" in page  # drawn in the pipeline chart
    assert "The relay&#x27;s status store was not read" not in page  # the top master's was
    ret = top.salt_run_cli(timeout=60).run("tributary.report", since="yesterday")
    assert ret.data["result"] is False and "since" in ret.data["error"]
