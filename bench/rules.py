"""Cost of the alert rules per confirmed reading: 100 rules (globs on site, sensor, metric;
thresholds with duration and hysteresis, rates, absences) over 1,000 series.

    python bench/rules.py [--rules 100] [--readings 200000]

Prints JSON: microseconds of CPU per reading with the rules, and without any rule (the bare
call), measured with ``time.process_time``; and the same rules with a grain match on every
other rule (100 gateways with heartbeat grains) and flap damping on every threshold rule.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saltext.tributary.reaction.alerts import RuleEngine
from saltext.tributary.reaction.rules import parse_rules


def make_rules(n: int, extras: bool = False) -> list:
    specs = []
    for i in range(n):
        kind = i % 4
        match: dict = {"site": f"site-{i % 10}", "sensor": f"s{i % 50}*", "metric": "temperature"}
        when = (
            {"above": 80 + i % 10, "for_s": 60, "clear_below": 75}
            if kind in (0, 1)
            else ({"rate_above": 0.5} if kind == 2 else {"absent_s": 600})
        )
        spec = {"name": f"r{i}", "match": match, "when": when}
        if extras and i % 2:
            match["grains"] = {"role": "boiler-*", "tributary:devices": f"s{i % 50}*"}
        if extras and kind in (0, 1):
            spec["flap"] = {"changes": 4, "window_s": 600, "stable_s": 300}
        specs.append(spec)
    rules, errors = parse_rules(specs)
    assert not errors, errors
    return rules


def run(n_rules: int, n: int, extras: bool = False) -> float:
    eng = RuleEngine(make_rules(n_rules, extras) if n_rules else [])
    if extras:
        eng.set_grains(
            {
                f"gw-{g}": {
                    "role": "boiler-room",
                    "tributary:devices": [f"s{k}" for k in range(60)],
                }
                for g in range(100)
            }
        )
    rnd = random.Random(1)
    batch = []
    t_ms = 1_800_000_000_000
    for i in range(n):
        series = i % 1000
        batch.append(
            (
                f"gw-{series % 100}",
                f"site-{series % 10}",
                "ep",
                0,
                {
                    "sensor": f"s{series % 60}",
                    "metric": "temperature",
                    "ts_ms": t_ms + i * 10,
                    "value": 70 + rnd.random() * 15,
                },
            )
        )
    t0 = time.process_time()
    for lo in range(0, n, 1000):
        eng.readings(batch[lo : lo + 1000], t_ms)
    return (time.process_time() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=100)
    ap.add_argument("--readings", type=int, default=200_000)
    a = ap.parse_args()
    out = {
        "rules": a.rules,
        "readings": a.readings,
        "us_per_reading_with_rules": round(run(a.rules, a.readings), 2),
        "us_per_reading_without_rules": round(run(0, a.readings), 2),
        "us_per_reading_with_grains_and_flap": round(run(a.rules, a.readings, True), 2),
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
