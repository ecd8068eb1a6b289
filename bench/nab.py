"""Score Tributary's anomaly detector on the Numenta Anomaly Benchmark (NAB).

    python bench/nab.py --data ../shared/data/nab \
        --windows ../shared/data/nab/combined_windows.json \
        --out .run/nab

Each ``<category>/<file>.csv`` (``timestamp,value``) is streamed point by point through the same
detector class the relay uses (one fresh series model per file, no look-ahead: nothing is known
of a file before its points arrive). Results are written in NAB's format,
``<out>/results/tributary/<category>/tributary_<file>.csv`` (``timestamp,value,anomaly_score``),
so NAB's own scorer can read them, and scored here with NAB's published rules:

* probationary period: the first 15 % of each file, at most 750 points, is not scored;
* anomaly windows: the first detection inside a window is a true positive weighted by the
  scaled sigmoid of its position (earlier is better), a window with none is a false negative,
  a detection outside any window is a false positive weighted by the sigmoid of its distance
  past the previous window;
* profiles (A_TP, A_FP, A_FN): standard (1, 0.11, 1), reward_low_FP_rate (1, 0.22, 1),
  reward_low_FN_rate (1, 0.11, 2);
* one threshold per profile, optimised over the whole corpus; the score is normalised so that
  the null detector (never detects) scores 0 and the perfect one 100.

It prints one JSON document: the three scores overall and per category, the thresholds, the CPU
time per point and the bytes of state per series.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saltext.tributary.analysis.detector import DetectorConfig, SeriesModel

PROFILES = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_FP_rate": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_FN_rate": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}
PROBATION = 0.15


def scaled_sigmoid(x: float) -> float:
    """NAB's scaled sigmoid: 1 at the far left of a window, -1 well past it."""
    if x > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.strip())


def probation_length(n: int) -> int:
    return int(min(math.floor(PROBATION * n), PROBATION * 5000))


class Scored:
    """One file's points as NAB's sweeper sees them: per point its window (or None), its
    unweighted sigmoid score and whether it is past the probationary period."""

    def __init__(self, timestamps: list[datetime], scores: list[float], windows) -> None:
        self.scores = scores
        n = len(timestamps)
        self.window = [None] * n
        self.sig = [0.0] * n
        index = {t: i for i, t in enumerate(timestamps)}
        spans = []
        for lo, hi in windows:
            a, b = index.get(parse_ts(lo)), index.get(parse_ts(hi))
            if a is None or b is None:  # windows use the file's own timestamps
                a = next(i for i, t in enumerate(timestamps) if t >= parse_ts(lo))
                b = max(i for i, t in enumerate(timestamps) if t <= parse_ts(hi))
            spans.append((a, b))
        self.n_windows = len(spans)
        prev_right = prev_width = None
        cur = None
        w_id = 0
        for i in range(n):
            if spans and cur is None and i == spans[0][0]:
                cur = spans.pop(0)
                w_id += 1
            if cur is not None:
                width = cur[1] - cur[0] + 1
                self.window[i] = w_id
                self.sig[i] = scaled_sigmoid(-(cur[1] - i + 1) / width)  # TP, unweighted
            elif prev_right is None:
                self.sig[i] = -1.0
            else:
                self.sig[i] = scaled_sigmoid(abs(prev_right - i) / float(prev_width - 1))
            if cur is not None and i == cur[1]:
                prev_right, prev_width = i, cur[1] - cur[0] + 1
                cur = None
        self.start = probation_length(n)


MAX_TP = scaled_sigmoid(-1.0)


def file_score(s: Scored, threshold: float, prof: dict) -> float:
    """NAB's score of one file at one threshold (the first detection in a window counts)."""
    total = 0.0
    detected: set[int] = set()
    for i in range(s.start, len(s.scores)):
        if s.scores[i] < threshold:
            continue
        w = s.window[i]
        if w is None:
            total += s.sig[i] * prof["fp"]
        elif w not in detected:
            detected.add(w)
            total += s.sig[i] * prof["tp"] / MAX_TP
    # windows in the probationary period are scored too (as misses unless detected after it)
    total -= prof["fn"] * (s.n_windows - len(detected))
    return total


def optimise(files: list[Scored], prof: dict) -> tuple[float, float]:
    """The threshold maximising the corpus score, swept over every score that occurs (NAB
    sweeps the distinct anomaly scores from the highest down)."""
    points = []
    for f_id, s in enumerate(files):
        for i in range(s.start, len(s.scores)):
            points.append((s.scores[i], f_id, i))
    points.sort(key=lambda p: -p[0])
    total = -sum(prof["fn"] * s.n_windows for s in files)
    best = (total, 1.1)
    best_in: dict[tuple[int, int], float] = {}
    k = 0
    while k < len(points):
        thr = points[k][0]
        while k < len(points) and points[k][0] == thr:
            _, f_id, i = points[k]
            s = files[f_id]
            w = s.window[i]
            if w is None:
                total += s.sig[i] * prof["fp"]
            else:
                val = s.sig[i] * prof["tp"] / MAX_TP
                key = (f_id, w)
                old = best_in.get(key)
                if old is None:
                    total += val + prof["fn"]
                    best_in[key] = val
                elif val > old:
                    total += val - old
                    best_in[key] = val
            k += 1
        if total > best[0]:
            best = (total, thr)
    return best[1], best[0]


def run_detector(
    path: Path, cfg: DetectorConfig
) -> tuple[list[datetime], list[float], list[float], float, int]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    stamps = [parse_ts(r["timestamp"]) for r in rows]
    values = [float(r["value"]) for r in rows]
    model = SeriesModel()
    scores = []
    t0 = time.process_time()
    for t, v in zip(stamps, values, strict=True):
        ts = int(t.replace(tzinfo=timezone.utc).timestamp() * 1000)
        scores.append(model.observe(ts, v, cfg).score)
    cpu = time.process_time() - t0
    return stamps, values, scores, cpu, model.size()


def normalised(files: list[Scored], thr: float, prof: dict) -> float:
    """NAB's normalised score of ``files`` at one threshold (null 0, perfect 100)."""
    raw = sum(file_score(s, thr, prof) for s in files)
    null = -sum(prof["fn"] * s.n_windows for s in files)
    perfect = sum(prof["tp"] * s.n_windows for s in files)
    return 100 * (raw - null) / (perfect - null)


def split_check(paths: list[Path], windows: dict, cfg: DetectorConfig, grid: list[float]) -> dict:
    """Generality check of the threshold: the files split in two halves (alternately within
    each category); for each half, the threshold is chosen on it alone (the detector run at
    each threshold of ``grid``, so its quiet-after-alert uses it) and the *other* half is
    scored at that threshold."""
    halves: list[list[int]] = [[], []]
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        by_cat[path.parent.name].append(i)
    for idx in by_cat.values():
        for j, i in enumerate(idx):
            halves[j % 2].append(i)
    runs = {}
    for thr in grid:
        c = DetectorConfig(**{**cfg.__dict__, "threshold": thr})
        scored = []
        for path in paths:
            stamps, _values, scores, _cpu, _size = run_detector(path, c)
            scored.append(Scored(stamps, scores, windows[f"{path.parent.name}/{path.name}"]))
        runs[thr] = scored
    out: dict = {"halves": [[f"{paths[i].parent.name}/{paths[i].name}" for i in h] for h in halves]}
    for name, prof in PROFILES.items():
        res = []
        for tune, test in ((0, 1), (1, 0)):
            best = max(grid, key=lambda t: normalised([runs[t][i] for i in halves[tune]], t, prof))
            res.append(
                {
                    "tuned_on_half": tune,
                    "threshold": best,
                    "score_on_tuning_half": round(
                        normalised([runs[best][i] for i in halves[tune]], best, prof), 1
                    ),
                    "score_on_held_out_half": round(
                        normalised([runs[best][i] for i in halves[test]], best, prof), 1
                    ),
                }
            )
        out[name] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # defaults: the labelled data beside the project (../shared/data/nab), results in .run/
    nab = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "nab"
    ap.add_argument("--data", default=nab, type=Path)
    ap.add_argument("--windows", default=nab / "combined_windows.json", type=Path)
    ap.add_argument("--out", default=Path(".run") / "nab-results", type=Path)
    ap.add_argument("--detector", default="tributary")
    ap.add_argument("--set", action="append", default=[], help="detector option, key=value")
    ap.add_argument(
        "--split-check",
        metavar="LO:HI:STEP",
        help="also choose the threshold on half the files and score the other half",
    )
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = type(getattr(DetectorConfig(), k))(v)
    cfg = DetectorConfig(**overrides)
    windows = json.loads(args.windows.read_text())
    files: list[Scored] = []
    cats: list[str] = []
    cpu = 0.0
    points = 0
    size = 0
    for path in sorted(args.data.glob("*/*.csv")):
        rel = f"{path.parent.name}/{path.name}"
        if rel not in windows:
            continue
        stamps, values, scores, secs, nbytes = run_detector(path, cfg)
        cpu += secs
        points += len(scores)
        size = max(size, nbytes)
        out = args.out / "results" / args.detector / path.parent.name
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"{args.detector}_{path.name}").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value", "anomaly_score"])
            for t, v, s in zip(stamps, values, scores, strict=True):
                w.writerow([t.strftime("%Y-%m-%d %H:%M:%S"), v, s])
        files.append(Scored(stamps, scores, windows[rel]))
        cats.append(path.parent.name)
    report: dict = {
        "detector": args.detector,
        "config": cfg.__dict__,
        "files": len(files),
        "points": points,
        "cpu_us_per_point": round(cpu / points * 1e6, 2) if points else None,
        "state_bytes_per_series": size,
        "profiles": {},
    }
    for name, prof in PROFILES.items():
        thr, raw = optimise(files, prof)
        null = -sum(prof["fn"] * s.n_windows for s in files)
        perfect = sum(prof["tp"] * s.n_windows for s in files)
        per_cat = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        for s, c in zip(files, cats, strict=True):
            sc = file_score(s, thr, prof)
            per_cat[c][0] += sc
            per_cat[c][3] += file_score(s, cfg.threshold, prof)
            per_cat[c][1] += -prof["fn"] * s.n_windows
            per_cat[c][2] += prof["tp"] * s.n_windows
        at_cfg = sum(file_score(s, cfg.threshold, prof) for s in files)
        report["profiles"][name] = {
            "score": round(100 * (raw - null) / (perfect - null), 1),
            "threshold": thr,
            # the score at the detector's own threshold (the one its quiet-after-alert used)
            "score_at_config_threshold": round(100 * (at_cfg - null) / (perfect - null), 1),
            "by_category": {
                c: (round(100 * (v[0] - v[1]) / (v[2] - v[1]), 1) if v[2] > v[1] else None)
                for c, v in sorted(per_cat.items())
            },
            "by_category_at_config_threshold": {
                c: (round(100 * (v[3] - v[1]) / (v[2] - v[1]), 1) if v[2] > v[1] else None)
                for c, v in sorted(per_cat.items())
            },
        }
    if args.split_check:
        lo, hi, step = (float(v) for v in args.split_check.split(":"))
        grid = [round(lo + k * step, 6) for k in range(round((hi - lo) / step) + 1)]
        paths = [
            p for p in sorted(args.data.glob("*/*.csv")) if f"{p.parent.name}/{p.name}" in windows
        ]
        report["split_check"] = split_check(paths, windows, cfg, grid)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
