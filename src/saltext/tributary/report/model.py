"""The data behind each chart and table of the fleet report (plain values, before rendering).

Every chart is drawn from one of these objects and nothing else, so the numbers a chart shows
can be checked against the data without looking at pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: Bucket sizes the report chooses from (ms): about :data:`TARGET_BUCKETS` per period.
INTERVALS_MS = (
    60_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
)
TARGET_BUCKETS = 120


def choose_interval(span_ms: int, target: int = TARGET_BUCKETS) -> int:
    """The smallest bucket size giving at most ``target`` buckets over ``span_ms``."""
    for iv in INTERVALS_MS:
        if span_ms / iv <= target:
            return iv
    return INTERVALS_MS[-1]


def interval_text(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms // 1000}s"


@dataclass
class Window:
    """The period a report covers: ``[start_ms, end_ms]`` in buckets of ``interval_ms``
    (bucket keys are multiples of the interval, as Elasticsearch's fixed intervals are)."""

    start_ms: int
    end_ms: int
    interval_ms: int

    def keys(self) -> list[int]:
        first = self.start_ms - self.start_ms % self.interval_ms
        return list(range(first, self.end_ms + 1, self.interval_ms))


@dataclass
class Bucket:
    t: int
    count: int
    min: float
    avg: float
    max: float


@dataclass
class AnomalyMark:
    """The highest-scored anomaly of one series in one bucket (``count`` anomalies there)."""

    t: int
    bucket: int
    count: int
    value: float
    expected: float
    band_lo: float
    band_hi: float
    score: float


@dataclass
class AlertMark:
    """Alert transitions of one series in one bucket."""

    t: int
    rule: str
    state: str
    count: int
    severity: str = ""


@dataclass
class Series:
    site: str
    gateway: str
    sensor: str
    metric: str
    buckets: list[Bucket] = field(default_factory=list)
    anomalies: list[AnomalyMark] = field(default_factory=list)
    alerts: list[AlertMark] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.gateway} {self.sensor}"

    @property
    def count(self) -> int:
        return sum(b.count for b in self.buckets)


@dataclass
class SiteChart:
    """One chart: every series of one metric at one site, each against its siblings'
    envelope (min of the minima, count-weighted mean, max of the maxima per bucket)."""

    site: str
    metric: str
    series: list[Series]
    siblings: list[Bucket]

    @property
    def name(self) -> str:
        return f"site-{self.site}-{self.metric}"


def sibling_envelope(series: list[Series]) -> list[Bucket]:
    acc: dict[int, list[float]] = {}
    for s in series:
        for b in s.buckets:
            a = acc.setdefault(b.t, [0, math.inf, 0.0, -math.inf])
            a[0] += b.count
            a[1] = min(a[1], b.min)
            a[2] += b.avg * b.count
            a[3] = max(a[3], b.max)
    return [
        Bucket(t, int(n), lo, total / n if n else math.nan, hi)
        for t, (n, lo, total, hi) in sorted(acc.items())
    ]


@dataclass
class FleetRow:
    site: str
    gateway: str
    last_seen_ms: int | None = None
    state: str = "unknown"
    findings: list[str] = field(default_factory=list)
    backlog: int | None = None
    lag_s: float | None = None
    open_gaps: int = 0
    readings: int = 0


#: The hops of a reading's way, in order (``hop_ms.<hop>`` of its document, see
#: :func:`saltext.tributary.relay.documents.hops`).
HOPS = ("gateway", "uplink", "relay")
#: Percentiles of each hop's lag the report asks for.
PERCENTS = (50, 95)
#: The relay's cumulative counters whose deltas the pipeline shows, and where each goes.
GAP_COUNTERS = {
    "replays_requested": "replays",
    "gaps_opened": "gaps_opened",
    "gaps_repaired": "gaps_repaired",
    "gaps_filled": "gaps_filled",
    "gaps_given_up": "gaps_given_up",
}


@dataclass
class PipelinePoint:
    t: int
    readings_in: int = 0  # readings measured in this bucket (by their timestamp)
    indexed: int = 0  # readings the relay indexed in this bucket (by relayed_at)
    lag_s: float | None = None  # mean relayed_at - @timestamp of the bucket's readings
    dead_letters: int = 0
    replays: int = 0  # replay requests (delta of the relay's counter)
    gaps_given_up: int = 0
    open_gaps: int | None = None  # the relay's open gaps at the end of the bucket
    #: per hop, its lag's percentiles (s) over the bucket's readings: {hop: {50: s, 95: s}}
    hops: dict[str, dict[int, float]] = field(default_factory=dict)
    gaps_opened: int = 0
    gaps_repaired: int = 0  # closed after a replay request
    gaps_filled: int = 0  # closed by late readings, without a request


@dataclass
class Pipeline:
    points: list[PipelinePoint]
    dead_letter_reasons: dict[str, int]
    totals: dict[str, Any]
    #: {outcome: [count per bucket]} of commands sent, or None without a commands index
    commands: dict[str, list[int]] | None = None
    metrics_present: bool = False


@dataclass
class FindingsChart:
    """Health findings raised per bucket and layer (application = anomalies found)."""

    keys: list[int]
    layers: dict[str, list[int]]
    kinds: dict[str, int]


@dataclass
class Report:
    generated_ms: int
    window: Window
    site: str | None
    fleet: list[FleetRow]
    pipeline: Pipeline
    findings: FindingsChart
    sites: list[SiteChart]
    alerts_by_rule: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
