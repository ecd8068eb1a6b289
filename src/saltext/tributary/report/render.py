"""Charts of the fleet report, drawn with matplotlib from the model (no pyplot, no global
backend: a :class:`~matplotlib.figure.Figure` per chart, rendered to SVG for the page and PNG
for mail and chat)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from saltext.tributary.report.model import (
    HOPS,
    PERCENTS,
    FindingsChart,
    Pipeline,
    Series,
    SiteChart,
    Window,
)

try:
    import matplotlib
    import numpy as np
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure

    HAS_MATPLOTLIB = True
    MISSING = ""
except ImportError as _exc:  # the report extra is not installed
    HAS_MATPLOTLIB = False
    MISSING = (
        f"the fleet report needs matplotlib ({_exc}): install the package's report extra, "
        "e.g. pip install 'saltext.tributary[report]'"
    )

#: Series drawn per figure of a site chart (more make a second figure of the same chart).
PER_FIGURE = 24
COLUMNS = 3
PALETTE = (
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#17becf",
    "#bcbd22",
    "#e377c2",
    "#393b79",
)
LAYER_COLOURS = {"device": "#ff7f0e", "population": "#9467bd", "application": "#d62728"}
ALERT_COLOURS = {"firing": "#d62728", "pending": "#ff7f0e", "resolved": "#2ca02c"}
OUTCOME_COLOURS = {
    "acked": "#2ca02c",
    "refused": "#d62728",
    "timeout": "#ff7f0e",
    "unreachable": "#7f7f7f",
    "invalid": "#8c564b",
}
RC: dict[Any, Any] = {
    "svg.fonttype": "none",  # text stays text: no glyph outlines, no font file
    "font.size": 8,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # one name in each text's style, not matplotlib's ten
    "axes.titlesize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": True,
}


def require() -> None:
    if not HAS_MATPLOTLIB:
        raise RuntimeError(MISSING)


@dataclass
class Chart:
    """One rendered chart: its file name stem, title, SVG text and PNG bytes."""

    name: str
    title: str
    svg: str
    png: bytes


def _t(ms: list[int]) -> Any:
    return np.array(ms, dtype="datetime64[ms]")


def _time_axis(ax: Any, window: Window, grid: bool = True) -> None:
    loc = mdates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.set_xlim(_t([window.start_ms])[0], _t([window.end_ms])[0])
    if grid:
        ax.grid(True, color="#e5e5e5", linewidth=0.5)


_D_ATTR = re.compile(r'(\sd=")([^"]*)(")')
_TOKEN = re.compile(r"[A-Za-z]|-?(?:\d+\.?\d*|\.\d+)")
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_BETWEEN_TAGS = re.compile(r">\s+<")
_NO_ROTATION = re.compile(r' transform="rotate\(-?0 [^"]*\)"')


def _tenths(n: int) -> str:
    sign = "-" if n < 0 else ""
    whole, frac = divmod(abs(n), 10)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole or ''}.{frac}"


def minify_path(d: str) -> str:
    """SVG path data at 1/10 pt and as short as it gets: lines as relative moves from the
    previous (rounded) point, so nothing drifts; no separator before a minus sign; a command
    letter only where it changes (``M 1.23 4.0 L 5 6 L 7 8`` becomes ``M1.2 4l3.8 2 2 2``)."""
    out: list[str] = []
    cur = start = (0, 0)
    last = ""  # the command letter in force
    need_sep = False

    def emit(cmd: str, nums: list[int]) -> None:
        nonlocal last, need_sep
        if cmd != last:
            out.append(cmd)
            last = cmd
            need_sep = False
        for n in nums:
            text = _tenths(n)
            if need_sep and not text.startswith("-"):
                out.append(" ")
            out.append(text)
            need_sep = True

    tokens = _TOKEN.findall(d)
    i = 0
    cmd = ""
    while i < len(tokens):
        tok = tokens[i]
        if tok.isalpha():
            cmd = tok
            i += 1
            if cmd in "zZ":
                emit("z", [])
                last = "z"
                cur = start
                continue
            continue
        nums: list[int] = []
        arity = 6 if cmd == "C" else 4 if cmd == "Q" else 2
        while i < len(tokens) and not tokens[i].isalpha() and len(nums) < arity:
            nums.append(round(float(tokens[i]) * 10))
            i += 1
        if len(nums) < arity:
            break  # malformed tail: leave it out
        if cmd == "M":
            emit("M", nums)
            last = "M*"  # after M, more pairs would be lines: say so explicitly
            cur = start = (nums[0], nums[1])
            cmd = "L"
        elif cmd == "L":
            emit("l", [nums[0] - cur[0], nums[1] - cur[1]])
            cur = (nums[0], nums[1])
        elif cmd in ("C", "Q"):
            emit(cmd, nums)
            cur = (nums[-2], nums[-1])
        else:  # a command matplotlib does not write: keep the rest as it was
            return "".join(out) + " " + " ".join([cmd, *tokens[i - len(nums) :]])
    return "".join(out)


def shrink_svg(svg: str) -> str:
    """Drop matplotlib's XML prolog and RDF metadata (it names matplotlib's web site) and
    minify path data (:func:`minify_path`)."""
    start = svg.find("<svg")
    svg = svg[start:] if start >= 0 else svg
    svg = _METADATA.sub("", svg)
    svg = _NO_ROTATION.sub("", _BETWEEN_TAGS.sub("><", svg))
    return _D_ATTR.sub(lambda m: m.group(1) + minify_path(m.group(2)) + m.group(3), svg)


def _render(fig: Any, name: str, title: str, png_dpi: int) -> Chart:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=png_dpi)
    return Chart(name, title, shrink_svg(buf.getvalue()), small_png(raw.getvalue()))


def small_png(data: bytes, colours: int = 64) -> bytes:
    """A PNG with a palette of ``colours`` (a third of the size of matplotlib's RGBA for these
    flat-coloured charts); the original if Pillow cannot read it."""
    try:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        out = io.BytesIO()
        img.quantize(colors=colours, method=Image.Quantize.FASTOCTREE).save(
            out, format="PNG", optimize=True
        )
    except (ImportError, OSError, ValueError):
        return data
    return out.getvalue() if out.tell() < len(data) else data


def _edges(keys: list[int], window: Window) -> Any:
    """Bucket edges for :meth:`Axes.stairs` (one path per series, not a patch per bar)."""
    return mdates.date2num(_t([*keys, (keys[-1] if keys else 0) + window.interval_ms]))


#: Colour of each hop's lag (p50 solid, p95 dashed).
HOP_COLOURS = {"gateway": "#2ca02c", "uplink": "#1f77b4", "relay": "#ff7f0e"}


def pipeline_chart(p: Pipeline, window: Window, png_dpi: int = 80) -> Chart:
    keys = [pt.t for pt in p.points]
    x = _t([t + window.interval_ms // 2 for t in keys])  # each bucket at its middle
    edges = _edges(keys, window)
    rows = 5 if p.commands else 4
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 1.9 * rows), layout="constrained")
        axes = fig.subplots(rows, 1, sharex=True)
        a = axes[0]
        a.stairs([pt.readings_in for pt in p.points], edges, color="#1f77b4", label="in")
        a.stairs(
            [pt.indexed for pt in p.points], edges, color="#ff7f0e", label="indexed", linestyle="--"
        )
        a.set_title("Readings per interval: measured (in) and indexed", loc="left")
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=2)
        a = axes[1]
        lag = [math.nan if pt.lag_s is None else pt.lag_s for pt in p.points]
        a.plot(x, lag, color="#7f7f7f", linewidth=0.8, label="total (mean)")
        for hop in HOPS:
            colour = HOP_COLOURS.get(hop, "#9467bd")
            for pct, style in zip(PERCENTS, ("-", "--"), strict=False):
                ys = [pt.hops.get(hop, {}).get(pct, math.nan) for pt in p.points]
                if all(math.isnan(v) for v in ys):
                    continue
                a.plot(x, ys, color=colour, linestyle=style, linewidth=1, label=f"{hop} p{pct}")
        a.set_yscale("symlog", linthresh=0.01)
        a.set_title("Lag per hop (s)", loc="left")
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=7, fontsize=7)
        a = axes[2]
        for values, colour, label in (
            ([pt.dead_letters for pt in p.points], "#d62728", "dead letters"),
            ([pt.replays for pt in p.points], "#17becf", "replay requests"),
        ):
            a.stairs(values, edges, fill=True, alpha=0.6, color=colour, label=label)
        a.set_title("Dead letters and replay requests per interval", loc="left")
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=2)
        a = axes[3]
        for values, colour, label in (
            ([pt.gaps_opened for pt in p.points], "#d62728", "opened"),
            ([pt.gaps_repaired for pt in p.points], "#2ca02c", "repaired"),
            ([pt.gaps_filled for pt in p.points], "#bcbd22", "filled late"),
            ([pt.gaps_given_up for pt in p.points], "#7f7f7f", "given up"),
        ):
            a.stairs(values, edges, color=colour, linewidth=1.5, label=label)
        if p.metrics_present:
            og, last = [], math.nan  # a gauge: it holds until the next self-metrics document
            for pt in p.points:
                last = last if pt.open_gaps is None else pt.open_gaps
                og.append(last)
            a.stairs(og, edges, color="#000000", linewidth=0.8, linestyle=":", label="open")
        a.set_title("Gaps in the sequence per interval (the relay's ledger)", loc="left")
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=5)
        if p.commands:
            a = axes[4]
            bottom = np.zeros(len(keys))
            for i, (outcome, counts) in enumerate(sorted(p.commands.items())):
                colour = OUTCOME_COLOURS.get(outcome, PALETTE[i % len(PALETTE)])
                top = bottom + np.array(counts)
                a.stairs(top, edges, baseline=bottom, fill=True, color=colour, label=outcome)
                bottom = top
            a.set_title("Commands sent, by outcome", loc="left")
            a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=5)
        for a in axes:
            _time_axis(a, window)
        return _render(fig, "pipeline", "Pipeline", png_dpi)


def findings_chart(f: FindingsChart, window: Window, png_dpi: int = 80) -> Chart:
    edges = _edges(f.keys, window)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 2.2), layout="constrained")
        a = fig.subplots()
        bottom = np.zeros(len(f.keys))
        for layer, counts in f.layers.items():
            top = bottom + np.array(counts)
            a.stairs(
                top,
                edges,
                baseline=bottom,
                fill=True,
                label=layer,
                color=LAYER_COLOURS.get(layer, "#7f7f7f"),
            )
            bottom = top
        a.set_title("Health findings raised per interval, by layer", loc="left")
        a.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=3)
        _time_axis(a, window)
        return _render(fig, "findings", "Health findings", png_dpi)


def _on_keys(buckets: list, keys: list[int]) -> tuple[Any, Any, Any]:
    """min, mean, max per window bucket, NaN where a series has none (a gap in the line)."""
    at = {b.t: b for b in buckets}
    nan = math.nan
    lo = np.array([at[t].min if t in at else nan for t in keys])
    mean = np.array([at[t].avg if t in at else nan for t in keys])
    hi = np.array([at[t].max if t in at else nan for t in keys])
    return lo, mean, hi


def _series_axes(a: Any, s: Series, chart: SiteChart, colour: str, window: Window) -> None:
    keys = window.keys()
    x = _t([t + window.interval_ms // 2 for t in keys])  # each bucket at its middle
    if chart.siblings and len(chart.series) > 1:
        lo, _, hi = _on_keys(chart.siblings, keys)
        a.fill_between(x, lo, hi, color="#d9d9d9", linewidth=0, label="siblings")
    lo, mean, hi = _on_keys(s.buckets, keys)
    a.fill_between(x, lo, hi, color=colour, alpha=0.35, linewidth=0, label="min-max")
    a.plot(x, mean, color=colour, linewidth=1, label="mean")
    if s.anomalies:
        ax_ = _t([m.t for m in s.anomalies])
        exp = np.array([m.expected for m in s.anomalies])
        lo = np.array([m.band_lo for m in s.anomalies])
        hi = np.array([m.band_hi for m in s.anomalies])
        # the band as a bar from its low to its high end and the expected value as a tick (not
        # an error bar: a band need not be centred on the expected value, and may be unknown)
        a.vlines(ax_, lo, hi, color="#ff7f0e", linewidth=1.5, label="expected band")
        a.scatter(ax_, exp, marker="_", s=30, color="#ff7f0e", zorder=4)
        a.scatter(
            ax_,
            [m.value for m in s.anomalies],
            marker="x",
            s=18,
            color="#d62728",
            zorder=5,
            label="anomaly",
        )
    for m in s.alerts:
        a.axvline(
            _t([m.t])[0], color=ALERT_COLOURS.get(m.state, "#7f7f7f"), linewidth=0.8, linestyle="--"
        )
    extra = []
    if s.anomalies:
        extra.append(f"{sum(m.count for m in s.anomalies)} anomalies")
    if s.alerts:
        firing = sum(m.count for m in s.alerts if m.state == "firing")
        extra.append(f"{firing} alerts firing")
    a.set_title(s.label + (f"  ({', '.join(extra)})" if extra else ""), loc="left")
    _time_axis(a, window, grid=False)


def site_charts(chart: SiteChart, window: Window, png_dpi: int = 80) -> Iterator[Chart]:
    """One figure per :data:`PER_FIGURE` series of a site chart."""
    parts = [chart.series[i : i + PER_FIGURE] for i in range(0, len(chart.series), PER_FIGURE)] or [
        []
    ]
    for n, part in enumerate(parts, 1):
        cols = min(COLUMNS, max(1, len(part)))
        rows = max(1, math.ceil(len(part) / cols))
        height = 0.9 + 1.7 * rows
        with matplotlib.rc_context(RC):
            # a fixed layout (inches): constrained layout cost half the rendering time at scale
            fig = Figure(figsize=(10, height))
            axes = np.atleast_1d(
                fig.subplots(
                    rows,
                    cols,
                    sharex=True,
                    squeeze=False,
                    gridspec_kw={
                        "left": 0.05,
                        "right": 0.99,
                        "top": 1 - 0.62 / height,
                        "bottom": 0.45 / height,
                        "wspace": 0.16,
                        "hspace": 0.32 / 1.38,
                    },
                )
            ).ravel()
            for i, s in enumerate(part):
                _series_axes(axes[i], s, chart, PALETTE[i % len(PALETTE)], window)
            for i, a in enumerate(axes):
                if i >= len(part):
                    a.set_visible(False)
                elif i + cols >= len(part):  # nothing drawn below it: it shows the time axis
                    a.xaxis.set_tick_params(labelbottom=True)
            handles, labels = axes[0].get_legend_handles_labels()
            for a in axes[1 : len(part)]:
                for h, label in zip(*a.get_legend_handles_labels(), strict=True):
                    if label not in labels:
                        handles.append(h)
                        labels.append(label)
            if handles:
                fig.legend(
                    handles,
                    labels,
                    loc="upper right",
                    bbox_to_anchor=(0.99, 1),
                    ncols=6,
                    frameon=False,
                )
            suffix = f" ({n}/{len(parts)})" if len(parts) > 1 else ""
            fig.suptitle(
                f"{chart.site}: {chart.metric}{suffix}",
                x=0.01,
                y=1 - 0.08 / height,
                ha="left",
                va="top",
                fontsize=9,
            )
            name = chart.name if len(parts) == 1 else f"{chart.name}-{n}"
            yield _render(fig, _safe(name), f"{chart.site}: {chart.metric}{suffix}", png_dpi)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
