"""Streaming anomaly detection per series, with time-of-week context.

One :class:`SeriesModel` per (gateway, sensor, metric), fed point by point with no look-ahead:

* **Expected value** from the most specific context that has learnt enough: the hour of the
  week (168 slots: "10am on Tuesday"), else the hour of the day for weekdays or weekends
  (48 slots), else the series as a whole (non-seasonal fallback while the profiles learn).
  Each context keeps an exponentially weighted mean and variance, so it follows slow drift.
* **Raw score**: how far the value is from what its context expects, in standard deviations.
* **Anomaly likelihood** (the post-processing Numenta's HTM detector uses): the average raw
  score of the last few points compared with the distribution of raw scores the series usually
  has, twice: as a Gaussian tail, and as a running *empirical* tail (the decayed share of past
  averages at least as high, a 64-bin histogram); the point takes the less surprising of the
  two, so a bursty, heavy-tailed series calibrates itself. A series that is always noisy does
  not alarm on noise; a quiet one alarms on a small departure that persists. The score is that
  tail probability on a log scale in 0..1.
* **Beyond range**: a value outside every value seen so far by more than ``range_margin``
  (10 %) of their range scores 1 (``reason: "beyond range"``): the running range, never the
  file's or the future's.
* **Familiar shapes**: the last five values, each quantised to one of eight levels of the range
  seen so far, index one bit of a 32,768-bit pattern memory; a departure whose shape has been
  seen before scores ``familiar_gain`` (half) of what it would: a burst that recurs is usual.
* **States**: ``learning`` until ``learn_n`` points (scores 0); ``ok``; after an alert,
  ``quiet`` for ``quiet_n`` points (one anomaly, one alert), unless the score stayed below the
  threshold for ``rearm_n`` points first (a second, separate departure alerts again). A data
  gap longer than ``gap_factor`` times the series' usual interval resets the short-term
  memory, so a series resuming after a gap does not alarm for that alone.
* **Bounded**: about 10 KiB of arrays per series (versioned: a state of another version is
  refused and its series learns again); :class:`Detector` keeps at most
  ``max_series`` models, evicting the least recently seen (counted).

Every anomaly explains itself (:class:`Finding`): expected value and band, how far off, the
context slot it was judged in, samples seen in that slot and overall, model state.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

HOUR_MS = 3_600_000
#: 1970-01-01 was a Thursday: shift so that slot 0 is Monday 00:00.
WEEK_SHIFT_H = 72
WEEK_SLOTS = 168
DAY_SLOTS = 48  # weekday hours 0-23, weekend hours 24-47
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
LOG_SCALE = math.log(1e-10)  # log(1 - likelihood) is scaled by this (HTM's log likelihood)
#: the empirical distribution of the smoothed raw score: bins of HIST_STEP sigmas up to clip_z
HIST_BINS = 64
STATE_VERSION = 3
#: pattern memory: PATTERN_N consecutive values quantised to PATTERN_Q levels, one bit each
PATTERN_Q = 8
PATTERN_N = 5
PATTERN_SIZE = PATTERN_Q**PATTERN_N


@dataclass(frozen=True)
class DetectorConfig:
    """Tuning of the detector (README: Anomaly detection)."""

    learn_n: int = 150  # points before any score
    short_n: int = 5  # points averaged for the likelihood
    long_n: int = 2000  # memory of the raw-score distribution (points)
    value_n: int = 600  # memory of the whole-series mean/variance (points)
    slot_n: int = 12  # memory of one context slot (visits)
    slot_min: int = 4  # visits before a slot is trusted
    threshold: float = 0.1345  # score at or above which a point is an anomaly (NAB-optimised)
    quiet_n: int = 100  # points without a new alert after one
    rearm_n: int = 20  # ... unless the score stayed below the threshold this long (0: never)
    gap_factor: float = 5.0  # a gap longer than this many usual intervals resets short memory
    clip_z: float = 8.0  # raw scores are capped (one wild point cannot dominate)
    season_gain: float = 0.6  # a time context is used when its error is below this share
    robust_z: float = 4.0  # values further out than this many sigmas are learnt as if there
    robust_rate: float = 1.0  # ... and at this share of the usual rate
    tail_n: int = 2000  # memory (points) of the smoothed raw scores' empirical distribution
    range_margin: float = 0.1  # beyond the range seen by this share of it: an anomaly
    familiar_gain: float = 0.5  # the score of a departure whose shape has been seen before


@dataclass(slots=True)
class Finding:
    """One scored point: the score and why."""

    score: float
    anomaly: bool
    value: float
    expected: float
    band: tuple[float, float]
    deviation: float  # (value - expected) / sigma
    context: str  # e.g. "Tue 10:00 (hour of week)"
    context_samples: int
    samples: int
    state: str  # learning | ok | quiet
    #: why it scored: "departure" from its context, or "beyond range" (outside every value seen)
    reason: str = "departure"

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "anomaly": self.anomaly,
            "value": self.value,
            "expected": round(self.expected, 6),
            "band": [round(self.band[0], 6), round(self.band[1], 6)],
            "deviation": round(self.deviation, 3),
            "context": self.context,
            "context_samples": self.context_samples,
            "samples": self.samples,
            "state": self.state,
            "reason": self.reason,
        }


class SeriesModel:
    """The state of one series (see the module docstring)."""

    __slots__ = (
        "calm",
        "dt",
        "dy",
        "err_f",
        "err_s",
        "hi",
        "hist",
        "hist_sum",
        "hist_w",
        "last_ts",
        "last_value",
        "lo",
        "mean",
        "n",
        "pattern",
        "quiet",
        "r_mean",
        "r_n",
        "r_var",
        "ring",
        "ring_i",
        "ring_n",
        "ring_sum",
        "same",
        "seen",
        "seen_ms",
        "var",
        "wk",
    )

    def __init__(self) -> None:
        self.n = 0
        self.last_ts = 0
        self.dt = 0.0
        self.mean = 0.0
        self.var = 0.0
        self.r_mean = 0.0
        self.r_var = 0.0
        self.r_n = 0
        self.ring = array("d", bytes(8 * 32))
        self.ring_i = 0
        self.ring_n = 0
        self.ring_sum = 0.0
        self.quiet = 0
        self.calm = 0  # points below the threshold since the last alert
        self.last_value = math.nan
        self.same = 0  # consecutive readings equal to the previous one (a stuck sensor)
        self.seen_ms = 0  # wall-clock time the last reading arrived (set by the caller)
        self.err_s = 1.0  # EW squared error of the time context's expectation
        self.err_f = 1.0  # ... and of the whole series' mean
        # per slot: mean, variance, visits (as floats)
        self.wk = array("d", bytes(8 * 3 * WEEK_SLOTS))
        self.dy = array("d", bytes(8 * 3 * DAY_SLOTS))
        # the smoothed raw scores seen (exponentially decayed counts: a new count weighs
        # hist_w, which grows; both are rescaled before they get large)
        self.hist = array("d", bytes(8 * HIST_BINS))
        self.hist_sum = 0.0  # sum(hist), kept as it changes (not stored: from_bytes sums it)
        self.hist_w = 1.0
        self.lo = math.inf  # the range of values seen
        self.hi = -math.inf
        self.pattern = 0  # the last PATTERN_N quantised values, as one number
        self.seen = bytearray(PATTERN_SIZE // 8)  # the patterns seen, one bit each

    # -- the one hot method ---------------------------------------------------------------
    def observe(self, ts_ms: int, x: float, cfg: DetectorConfig) -> Finding:
        # (written for speed: locals instead of repeated attribute reads)
        n = self.n
        gap = False
        if n:
            step = ts_ms - self.last_ts
            dt = self.dt
            if dt and step > cfg.gap_factor * dt:
                gap = True
            elif step > 0:
                self.dt = step if not dt else dt + (step - dt) * 0.05
        self.last_ts = ts_ms
        self.same = self.same + 1 if x == self.last_value else 0
        self.last_value = x
        w = (ts_ms // HOUR_MS + WEEK_SHIFT_H) % WEEK_SLOTS
        d = (24 if w >= 120 else 0) + w % 24
        wk, dy = self.wk, self.dy
        wi, di = 3 * w, 3 * d
        mean = self.mean
        var = self.var
        slot_min = cfg.slot_min
        # a context's spread never goes below a small share of the series' own
        floor = 0.01 * var + 1e-12 * (mean * mean + 1.0)
        sigma = math.sqrt(var if var > floor else floor)
        mu, seen, kind = mean, float(n), 2
        z = (x - mu) / sigma
        # the most specific time context that has learnt enough, used while it explains the
        # series better than the series as a whole does (a daily pattern), else not
        if wk[wi + 2] >= slot_min:
            s_mu, s_var, s_seen, s_kind = wk[wi], wk[wi + 1], wk[wi + 2], 0
        elif dy[di + 2] >= slot_min:
            s_mu, s_var, s_seen, s_kind = dy[di], dy[di + 1], dy[di + 2], 1
        else:
            s_kind = 2
        if s_kind != 2:
            s_sigma = math.sqrt(s_var if s_var > floor else floor)
            s_z = (x - s_mu) / s_sigma
            # both contexts' errors, measured in the series' own spread
            e_s = (x - s_mu) / sigma
            err_s = self.err_s
            err_f = self.err_f
            err_s += (e_s * e_s - err_s) * 0.01
            err_f += (z * z - err_f) * 0.01
            self.err_s = err_s
            self.err_f = err_f
            if err_s < cfg.season_gain * err_f:
                mu, sigma, z, seen, kind = s_mu, s_sigma, s_z, s_seen, s_kind
        raw = z if z >= 0 else -z
        clip_z = cfg.clip_z
        if raw > clip_z:
            raw = clip_z
        # likelihood of the recent raw scores against the usual ones
        score = 0.0
        state = "ok"
        reason = "departure"
        k = cfg.short_n
        ring = self.ring
        if gap:
            ring_n = 0
            i = 0
            ring_sum = 0.0
        else:
            ring_n = self.ring_n
            i = self.ring_i
            ring_sum = self.ring_sum
        if ring_n >= k:
            ring_sum -= ring[i]
        else:
            ring_n += 1
        ring[i] = raw
        ring_sum += raw
        self.ring_i = (i + 1) % k
        self.ring_n = ring_n
        self.ring_sum = ring_sum
        lo, hi = self.lo, self.hi
        if n < cfg.learn_n:
            state = "learning"
        elif ring_n >= k and self.r_n:
            # how rare the recent raw scores are: both as a Gaussian tail of the usual raw
            # scores (HTM's likelihood) and as the share of past smoothed scores at least as
            # high (the running empirical tail: heavy-tailed, bursty series calibrate
            # themselves); the point scores by the less surprising of the two
            avg = ring_sum / k
            r_var = self.r_var
            r_sd = math.sqrt(r_var) if r_var > 1e-6 else 1e-3
            # P(Z > (avg - r_mean) / r_sd) for a standard normal Z
            tail = 0.5 * math.erfc((avg - self.r_mean) / r_sd / 1.4142135623730951)
            hist = self.hist
            fb = avg * HIST_BINS / clip_z
            bi = int(fb) if fb < HIST_BINS else HIST_BINS - 1  # (NaN: the top bin)
            hw = self.hist_w
            total = self.hist_sum
            # the share at or above bin bi, summing the shorter side (the smoothed score is
            # usually low, so the bins below it are few)
            above = total - sum(hist[:bi]) if bi < HIST_BINS // 2 else sum(hist[bi:])
            emp = (above + hw) / (total + hw)
            if emp > tail:
                tail = emp
            score = math.log(tail + 1e-10) / LOG_SCALE
            if score > 1.0:
                score = 1.0
            elif score < 0.0:
                score = 0.0
            if not gap:
                hist[bi] += hw
                total += hw
                hw /= 1.0 - 1.0 / cfg.tail_n
                if hw > 1e6:
                    for j in range(HIST_BINS):
                        hist[j] /= hw
                    hw = 1.0
                    total = sum(hist)
                self.hist_w = hw
                self.hist_sum = total
            # a value beyond every value seen (by a share of their range) is an anomaly
            rng = hi - lo
            if rng <= 0.0:
                rng = 1e-3 * abs(hi) or 1e-9
            margin = cfg.range_margin
            if x > hi + margin * rng or x < lo - margin * rng:
                score = 1.0
                reason = "beyond range"
        if x < lo:
            self.lo = lo = x
        if x > hi:
            self.hi = hi = x
        # pattern memory: the last PATTERN_N values, each quantised to one of PATTERN_Q levels
        # of the range seen so far, index one bit; a departure whose shape has been seen
        # before (its bit already set) is familiar and scores less
        rng = hi - lo
        fq = PATTERN_Q * (x - lo) / rng if rng > 0.0 else 0.0
        q = int(fq) if fq < PATTERN_Q else (PATTERN_Q - 1 if fq >= PATTERN_Q else 0)  # NaN: 0
        pat = self.pattern = (self.pattern * PATTERN_Q + q) % PATTERN_SIZE
        seen_bits = self.seen
        byte, bit = pat >> 3, 1 << (pat & 7)
        if seen_bits[byte] & bit:
            score *= cfg.familiar_gain
        else:
            seen_bits[byte] |= bit
        anomaly = False
        threshold = cfg.threshold
        quiet = self.quiet
        if quiet and not (score >= threshold and 0 < cfg.rearm_n <= self.calm):
            # quiet after an alert; a new departure after rearm_n calm points alerts again
            self.quiet = quiet - 1
            self.calm = self.calm + 1 if score < threshold else 0
            state = "quiet"
            score = 0.0
        elif score >= threshold:
            anomaly = True
            self.quiet = cfg.quiet_n
            self.calm = 0
        # learn: raw-score distribution (not from a gap's first point), then the contexts
        if not gap:
            r_n = self.r_n = self.r_n + 1
            long_n = cfg.long_n
            a = 1.0 / (r_n if r_n < long_n else long_n)
            r_mean = self.r_mean
            dr = raw - r_mean
            self.r_mean = r_mean + a * dr
            self.r_var = (1.0 - a) * (self.r_var + a * dr * dr)
        # a wild value moves the statistics like a 3-sigma one, and at a quarter of the
        # usual rate (robust: one anomaly does not widen the band it is judged by, while a
        # lasting level shift is still learnt)
        lim = cfg.robust_z * sigma
        xv = mu + lim if x - mu > lim else (mu - lim if mu - x > lim else x)
        slow = cfg.robust_rate if xv != x else 1.0
        if not n:
            xv = x
        n1 = self.n = n + 1
        value_n = cfg.value_n
        a = 1.0 / (n1 if n1 < value_n else value_n)
        if n >= slot_min:
            a *= slow
        dm = (x if n < slot_min else xv) - mean
        self.mean = mean + a * dm
        self.var = (1.0 - a) * (var + a * dm * dm)
        slot_n = cfg.slot_n
        # the hour-of-week slot, then the hour-of-day slot
        for arr, j in ((wk, wi), (dy, di)):
            cnt = arr[j + 2] + 1.0
            arr[j + 2] = cnt
            b = 1.0 / (cnt if cnt < slot_n else slot_n)
            v = x if cnt <= slot_min else xv
            if cnt > slot_min:
                b *= slow
            if cnt == 1.0:
                arr[j] = v
                arr[j + 1] = 0.0
            else:
                dv = v - arr[j]
                arr[j] += b * dv
                arr[j + 1] = (1.0 - b) * (arr[j + 1] + b * dv * dv)
        return Finding(
            score,
            anomaly,
            x,
            mu,
            (mu - 3.0 * sigma, mu + 3.0 * sigma),
            z,
            CONTEXTS[kind][w],
            int(seen),
            n1,
            state,
            reason,
        )

    # -- persistence ----------------------------------------------------------------------
    _HEAD = struct.Struct("<BqqdddddqqqdqHdddqqdddqq")

    def to_bytes(self) -> bytes:
        """The whole state, for a restart (``from_bytes`` restores it)."""
        head = self._HEAD.pack(
            STATE_VERSION,
            self.n,
            self.last_ts,
            self.dt,
            self.mean,
            self.var,
            self.r_mean,
            self.r_var,
            self.r_n,
            self.ring_i,
            self.ring_n,
            self.ring_sum,
            self.quiet,
            len(self.ring),
            self.err_s,
            self.err_f,
            self.last_value,
            self.same,
            self.seen_ms,
            self.hist_w,
            self.lo,
            self.hi,
            self.pattern,
            self.calm,
        )
        arrays = self.ring.tobytes() + self.wk.tobytes() + self.dy.tobytes() + self.hist.tobytes()
        return head + arrays + bytes(self.seen)

    @classmethod
    def from_bytes(cls, data: bytes) -> SeriesModel:
        """The model ``to_bytes`` wrote; :class:`ValueError` for a state of another version
        (an older detector's: its caller discards it and the series learns again) or a
        truncated one."""
        if not data or data[0] != STATE_VERSION:
            raise ValueError(
                f"model state version {data[0] if data else None}, not {STATE_VERSION}"
            )
        if len(data) < cls._HEAD.size:
            raise ValueError("truncated model state")
        m = cls()
        (
            _version,
            m.n,
            m.last_ts,
            m.dt,
            m.mean,
            m.var,
            m.r_mean,
            m.r_var,
            m.r_n,
            m.ring_i,
            m.ring_n,
            m.ring_sum,
            m.quiet,
            ring_len,
            m.err_s,
            m.err_f,
            m.last_value,
            m.same,
            m.seen_ms,
            m.hist_w,
            m.lo,
            m.hi,
            m.pattern,
            m.calm,
        ) = cls._HEAD.unpack_from(data)
        off = cls._HEAD.size
        for name, length in (
            ("ring", ring_len),
            ("wk", 3 * WEEK_SLOTS),
            ("dy", 3 * DAY_SLOTS),
            ("hist", HIST_BINS),
        ):
            arr = array("d")
            arr.frombytes(data[off : off + 8 * length])
            if len(arr) != length:
                raise ValueError("truncated model state")
            setattr(m, name, arr)
            off += 8 * length
        m.hist_sum = sum(m.hist)
        m.seen = bytearray(data[off : off + PATTERN_SIZE // 8])
        if len(m.seen) != PATTERN_SIZE // 8:
            raise ValueError("truncated model state")
        return m

    def size(self) -> int:
        """Bytes of state (what ``to_bytes`` writes)."""
        arrays = len(self.ring) + len(self.wk) + len(self.dy) + len(self.hist)
        return self._HEAD.size + 8 * arrays + len(self.seen)

    def expect(self, ts_ms: int, cfg: DetectorConfig) -> dict[str, Any]:
        """What the model expects at ``ts_ms``, and from which context (no learning)."""
        w = (ts_ms // HOUR_MS + WEEK_SHIFT_H) % WEEK_SLOTS
        d = (24 if w >= 120 else 0) + w % 24
        wi, di = 3 * w, 3 * d
        if self.wk[wi + 2] >= cfg.slot_min:
            kind, mu, var, seen = 0, self.wk[wi], self.wk[wi + 1], self.wk[wi + 2]
        elif self.dy[di + 2] >= cfg.slot_min:
            kind, mu, var, seen = 1, self.dy[di], self.dy[di + 1], self.dy[di + 2]
        else:
            kind, mu, var, seen = 2, self.mean, self.var, float(self.n)
        sigma = math.sqrt(max(var, 0.01 * self.var, 1e-12))
        return {
            "expected": mu,
            "band": [mu - 3 * sigma, mu + 3 * sigma],
            "context": _context(kind, w),
            "context_samples": int(seen),
            "samples": self.n,
            "state": "learning" if self.n < cfg.learn_n else ("quiet" if self.quiet else "ok"),
        }


def _context(kind: int, w: int) -> str:
    hour = w % 24
    if kind == 0:
        return f"{DAYS[w // 24]} {hour:02d}:00 (hour of week)"
    if kind == 1:
        return f"{'weekend' if w >= 120 else 'weekday'} {hour:02d}:00 (hour of day)"
    return "whole series (profiles still learning)"


#: every context description, by kind and hour-of-week slot (``observe`` looks them up)
CONTEXTS = tuple(tuple(_context(k, w) for w in range(WEEK_SLOTS)) for k in range(3))


@dataclass
class Detector:
    """Models for many series: at most ``max_series``, least recently seen evicted."""

    config: DetectorConfig = field(default_factory=DetectorConfig)
    max_series: int = 100_000
    models: OrderedDict[Hashable, SeriesModel] = field(default_factory=OrderedDict)
    evicted: int = 0
    #: a series not in memory is looked up here first (its saved state), else starts learning
    loader: Callable[[Hashable], SeriesModel | None] | None = None

    def observe(self, key: Hashable, ts_ms: int, value: float) -> Finding:
        return self.model(key).observe(ts_ms, value, self.config)

    def model(self, key: Hashable) -> SeriesModel:
        """The model of ``key`` (restored or new if not in memory), now the most recently
        seen; past ``max_series`` the least recently seen is evicted."""
        models = self.models
        m = models.get(key)
        if m is None:
            m = models[key] = (self.loader(key) if self.loader else None) or SeriesModel()
            if len(models) > self.max_series:
                models.popitem(last=False)
                self.evicted += 1
        else:
            models.move_to_end(key)
        return m
