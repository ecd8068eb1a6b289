"""The report page: one HTML file with its style and charts inline (inline SVG, no script,
no font file, no external URL), so it opens offline and can be mailed as one file."""

from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape
from typing import Any

from saltext.tributary.report.model import Report, interval_text
from saltext.tributary.report.render import Chart

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:1.5em;
color:#222;max-width:1100px}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ccc;
padding-bottom:.2em;margin-top:1.6em}h3{font-size:1em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:.6em 0}
.card{border:1px solid #ddd;border-radius:4px;padding:.4em .8em;min-width:7em}
.card b{display:block;font-size:1.3em}
.ok{color:#2ca02c}.degraded{color:#ff7f0e}.silent,.outage{color:#d62728}.unknown{color:#999}
figure{margin:.8em 0}figure svg{max-width:100%;height:auto}
figcaption{font-size:.8em;color:#666}
.note{background:#fff8e1;border:1px solid #f0d98c;padding:.3em .6em;font-size:.85em}
"""


def _ts(ms: int | None) -> str:
    if ms is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _age(now_ms: int, ms: int | None) -> str:
    if ms is None:
        return ""
    s = max(0, (now_ms - ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit} ago"
    return f"{s:.0f} s ago"


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else escape(str(v))


def _figure(chart: Chart, files: dict[str, str]) -> str:
    link = files.get(chart.name, "")
    cap = escape(chart.title) + (f" &middot; <code>{escape(link)}</code>" if link else "")
    return f'<figure id="{escape(chart.name)}">{chart.svg}<figcaption>{cap}</figcaption></figure>'


def page(
    report: Report,
    pipeline: Chart,
    findings: Chart,
    sites: Iterable[tuple[str, list[Chart]]],
    files: dict[str, str],
) -> str:
    w = report.window
    now = report.generated_ms
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Tributary fleet report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Tributary fleet report</h1>",
        f'<p class="meta">{_ts(w.start_ms)} &rarr; {_ts(w.end_ms)}, buckets of '
        f"{interval_text(w.interval_ms)}"
        + (f", sites matching <code>{escape(report.site)}</code>" if report.site else "")
        + f". Generated {_ts(now)}.</p>",
    ]
    out += [f'<p class="note">{escape(n)}</p>' for n in report.notes]
    out.append(
        '<p class="meta"><a href="#fleet">Fleet</a> &middot; <a href="#sites">Sensors by site</a>'
        ' &middot; <a href="#health">Health findings</a> &middot; <a href="#pipeline">Pipeline</a>'
        "</p>"
    )
    # fleet overview
    out.append('<h2 id="fleet">Fleet overview</h2><div class="cards">')
    for label, value in report.pipeline.totals.items():
        out.append(f'<div class="card"><b>{_num(value)}</b>{escape(label)}</div>')
    out.append("</div>")
    out.append(
        "<table><tr><th>Site</th><th>Gateway</th><th>Last seen</th><th>State</th>"
        "<th>Open findings</th><th>Spool backlog</th><th>Lag (s)</th><th>Open gaps</th>"
        "<th>Readings in period</th></tr>"
    )
    for r in report.fleet:
        out.append(
            f"<tr><td>{escape(r.site)}</td><td>{escape(r.gateway)}</td>"
            f'<td title="{_ts(r.last_seen_ms)}">{_age(now, r.last_seen_ms) or "never"}</td>'
            f'<td class="{escape(r.state)}">{escape(r.state)}</td>'
            f"<td>{escape(', '.join(r.findings))}</td>"
            f'<td class="n">{_num(r.backlog)}</td><td class="n">{_num(r.lag_s)}</td>'
            f'<td class="n">{r.open_gaps}</td><td class="n">{r.readings:,}</td></tr>'
        )
    out.append("</table>")
    # per site
    out.append('<h2 id="sites">Sensors by site</h2>')
    out.append(
        '<p class="meta">Each series: its min-max band and mean per interval, against its '
        "siblings (the same metric at the same site, grey); anomalies as red crosses with "
        "the detector's expected value and band in orange; alert transitions as dashed lines "
        "(red firing, orange pending, green resolved).</p>"
    )
    last_site = None
    any_site = False
    for site, charts in sites:
        any_site = True
        if site != last_site:
            out.append(f"<h3>{escape(site)}</h3>")
            last_site = site
        out += [_figure(c, files) for c in charts]
    if not any_site:
        out.append('<p class="meta">No readings in this period.</p>')
    # health
    out.append('<h2 id="health">Health findings</h2>')
    out.append(_figure(findings, files))
    if report.findings.kinds:
        out.append("<table><tr><th>Kind</th><th>Raised</th></tr>")
        for kind, n in sorted(report.findings.kinds.items()):
            out.append(f'<tr><td>{escape(kind)}</td><td class="n">{n:,}</td></tr>')
        out.append("</table>")
    if report.alerts_by_rule:
        out.append('<h2 id="alerts">Alerts</h2><table><tr><th>Rule</th><th>Transitions</th></tr>')
        for rule, states in report.alerts_by_rule.items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
            out.append(f"<tr><td>{escape(rule)}</td><td>{escape(text)}</td></tr>")
        out.append("</table>")
    # pipeline
    out.append('<h2 id="pipeline">Pipeline</h2>')
    out.append(
        '<p class="meta">Lag per hop, by the readings\' own time: <i>gateway</i> from the '
        "reading to its batch's emission, <i>uplink</i> from there to the relay's intake (the "
        "gateway's master, syndics, the top master's bus; two clocks), <i>relay</i> from intake "
        "to the bulk request that indexes it; the 50th percentile solid, the 95th dashed, the "
        "mean of the whole way grey. Gaps are holes in a gateway's sequence the relay's ledger "
        "saw open, and closed: <i>repaired</i> after a replay request, <i>filled late</i> "
        "without one.</p>"
    )
    out.append(_figure(pipeline, files))
    if report.pipeline.dead_letter_reasons:
        out.append("<table><tr><th>Dead-letter reason</th><th>Count</th></tr>")
        for reason, n in report.pipeline.dead_letter_reasons.items():
            out.append(f'<tr><td>{escape(reason)}</td><td class="n">{n:,}</td></tr>')
        out.append("</table>")
    if report.pipeline.commands is None:
        out.append('<p class="meta">No commands recorded in this period.</p>')
    if not report.pipeline.metrics_present:
        out.append(
            '<p class="meta">No relay self-metrics in this period: replay requests and gaps '
            "per interval are not shown.</p>"
        )
    out.append("</body></html>")
    return "\n".join(out)
