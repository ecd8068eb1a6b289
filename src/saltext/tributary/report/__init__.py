"""The fleet report: one self-contained HTML page (and a PNG per chart beside it) built from
Elasticsearch aggregations and the relay's status store.

:func:`build` asks Elasticsearch (through a ``search(index, body)`` callable) and returns the
:class:`~saltext.tributary.report.model.Report`: the data behind every chart and table.
:func:`write` renders it (matplotlib, see :mod:`.render`) and writes the files. ``salt-run
tributary.report`` is their Salt face.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from saltext.tributary.report import queries
from saltext.tributary.report.model import Report, Window, choose_interval

__all__ = ["build", "span_ms", "write", "write_isolated"]


def span_ms(since: Any) -> int:
    """``24h``, ``7d``, ``30m`` or seconds, in ms (ValueError names ``since``)."""
    from saltext.tributary.analysis.views import span_ms as _span

    ms = _span(since)
    if ms <= 0:
        raise ValueError(f"since: {since!r} must be a positive period")
    return ms


def build(
    search: queries.Search,
    prefix: str,
    now_ms: int,
    since: Any = "24h",
    site: str | None = None,
    local: Mapping[str, Any] | None = None,
) -> Report:
    """The report's data. ``local`` holds what the top master knows besides Elasticsearch
    (``salt-run tributary.status``'s ``gateways`` and ``fleet``, the open ``findings``,
    ``heartbeat_s`` and ``overdue_factor``); without it the fleet table comes from
    Elasticsearch alone."""
    span = span_ms(since)
    window = Window(now_ms - span, now_ms, choose_interval(span))
    local = local or {}
    notes: list[str] = []
    series = queries.series_buckets(search, prefix, window, site)
    anomalies = queries.anomaly_marks(search, prefix, window, site)
    alerts, by_rule = queries.alert_marks(search, prefix, window, site)
    charts = queries.site_charts(series, anomalies, alerts)
    fleet = queries.fleet_rows(search, prefix, window, site)
    pipeline = queries.pipeline(search, prefix, window, site)
    findings = queries.findings_chart(search, prefix, window, site)
    _merge_local(fleet, local, now_ms, site)
    pipeline.totals = _totals(local, pipeline, findings, series, by_rule)
    if not local.get("fleet"):
        notes.append(
            "The relay's status store was not read: lag, open gaps and relay totals are missing."
        )
    return Report(now_ms, window, site, fleet, pipeline, findings, charts, by_rule, notes)


def _merge_local(fleet: list, local: Mapping[str, Any], now_ms: int, site: str | None) -> None:
    from fnmatch import fnmatchcase

    gateways = local.get("gateways") or {}
    rows = {r.gateway: r for r in fleet}
    for gw, st in gateways.items():
        hb = st.get("gateway_spool") or {}
        row = rows.get(gw)
        if row is None:
            hb_site = str(hb.get("site") or queries.NO_SITE)
            if site and not fnmatchcase(hb_site, site):
                continue
            row = rows[gw] = queries.FleetRow(hb_site, gw)
            fleet.append(row)
        row.lag_s = st.get("lag_s")
        row.open_gaps = int(st.get("open_gaps") or 0)
        if hb.get("spool_unsent") is not None:
            row.backlog = int(hb["spool_unsent"])
        received = hb.get("received_ms")
        if received and (row.last_seen_ms is None or received > row.last_seen_ms):
            row.last_seen_ms = int(received)
    findings = local.get("findings") or []
    outage_sites = {f.get("site") for f in findings if f.get("kind") == "site_outage"}
    overdue_ms = float(local.get("heartbeat_s", 30)) * float(local.get("overdue_factor", 3)) * 1000
    for row in fleet:
        kinds = sorted(
            {
                str(f["kind"])
                for f in findings
                if f.get("gateway") == row.gateway
                or (f.get("kind") == "site_outage" and f.get("site") == row.site)
            }
        )
        row.findings = kinds
        if row.site in outage_sites:
            row.state = "outage"
        elif "gateway_silent" in kinds or (
            row.last_seen_ms is not None and now_ms - row.last_seen_ms > overdue_ms
        ):
            row.state = "silent"
        elif kinds:
            row.state = "degraded"
        elif row.last_seen_ms is not None:
            row.state = "ok"
    fleet.sort(key=lambda r: (r.site, r.gateway))


def _totals(local, pipeline, findings, series, by_rule) -> dict[str, Any]:
    c = (local.get("fleet") or {}).get("counters") or {}
    fl = local.get("fleet") or {}
    out: dict[str, Any] = {}
    if fl:
        out.update(
            {
                "readings received (all time)": c.get("readings_in", 0),
                "indexed (all time)": c.get("indexed", 0),
                "dead-lettered (all time)": c.get("dead_lettered", 0),
                "open gaps": fl.get("open_gaps", 0),
                "missing readings": fl.get("missing_readings", 0),
            }
        )
    out.update(
        {
            "series": len(series),
            "readings in period": sum(p.readings_in for p in pipeline.points),
            "dead letters in period": sum(p.dead_letters for p in pipeline.points),
            "anomalies in period": sum(findings.layers.get("application", [])),
            "alerts firing in period": sum(s.get("firing", 0) for s in by_rule.values()),
        }
    )
    return out


def write(report: Report, out: str, png: bool = True) -> dict[str, Any]:
    """Render ``report`` to ``out`` (the HTML file) and, beside it, ``<stem>-<chart>.png``
    per chart. Returns the paths, sizes and render time."""
    from saltext.tributary.report import html, render

    render.require()
    started = time.monotonic()
    out = os.path.abspath(out)
    directory = os.path.dirname(out)
    os.makedirs(directory, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    w = report.window
    pipeline = render.pipeline_chart(report.pipeline, w)
    findings = render.findings_chart(report.findings, w)
    sites: list[tuple[str, list[render.Chart]]] = [
        (c.site, list(render.site_charts(c, w))) for c in report.sites
    ]
    charts = [pipeline, findings, *(ch for _, cs in sites for ch in cs)]
    files: dict[str, str] = {}
    written = []
    for ch in charts:
        name = f"{stem}-{ch.name}.png"
        if png:
            path = os.path.join(directory, name)
            _atomic(path, ch.png)
            written.append(path)
            files[ch.name] = name
    text = html.page(report, pipeline, findings, sites, files)
    _atomic(out, text.encode("utf-8"))
    return {
        "html": out,
        "html_bytes": os.path.getsize(out),
        "charts": written,
        "render_s": round(time.monotonic() - started, 2),
    }


def write_isolated(report: Report, out: str, timeout: float = 600) -> dict[str, Any]:
    """:func:`write` in a Python process of its own (``python -m saltext.tributary.report``):
    matplotlib and numpy stay out of the caller's process. In a ``salt-run`` process on the
    test topology's top master, numpy's scalar formatting failed inside matplotlib ("NumPy
    internal error: unable to get format_options context variable"); the same code renders
    in a plain Python process. Raises RuntimeError with the child's error."""
    import pickle
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "saltext.tributary.report", out],
        input=pickle.dumps(report),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(err[-1] if err else f"renderer exited with {proc.returncode}")
    return dict(json.loads(proc.stdout))


def _atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
