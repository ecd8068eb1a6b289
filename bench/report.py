"""The fleet report at scale: 500 series over 7 days in a real Elasticsearch.

    python bench/report.py [--series 500] [--days 7] [--every 300]

Starts Elasticsearch (as ``make bench`` does), loads synthetic readings (``--series`` series,
one reading every ``--every`` seconds over ``--days`` days, 50 series per site, five sensors
per gateway) with anomalies and alert transitions on some series, then builds the report
twice (cold and warm caches) and prints JSON: the readings loaded, the time spent in
Elasticsearch queries and in rendering, the HTML size and the chart files' sizes, and the
process's peak RSS. Figures are measurements, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

import saltext.tributary.report as report  # noqa: E402
from saltext.tributary.relay.elasticsearch import install_templates  # noqa: E402
from saltext.tributary.report import queries  # noqa: E402
from tests.support.reportdata import bulk, synthetic_readings  # noqa: E402

PREFIX = "benchreport"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def events(now: int, n_series: int, days: float) -> tuple[list[dict], list[dict]]:
    """Anomalies on every 10th series (three each), a firing and a resolved alert on every 50th."""
    anomalies, alerts = [], []
    span = int(days * 86_400_000)
    for s in range(0, n_series, 10):
        site = f"site-{s // 50:02d}"
        gw, sensor = f"gw-{site}-{(s % 50) // 5}", f"sensor-{s % 5}"
        for k in range(3):
            t = now - span + (k + 1) * span // 4 + s * 1000
            anomalies.append(
                {
                    "@timestamp": t,
                    "gateway": gw,
                    "site": site,
                    "sensor": sensor,
                    "metric": "temperature",
                    "value": 60.0,
                    "score": 0.99,
                    "anomaly": True,
                    "expected": 18.0,
                    "band": [14.0, 22.0],
                }
            )
        if s % 25 == 0:
            t = now - span // 2 + s * 1000
            for state, dt in (("firing", 0), ("resolved", 1_800_000)):
                alerts.append(
                    {
                        "@timestamp": t + dt,
                        "rule": "hot",
                        "state": state,
                        "gateway": gw,
                        "site": site,
                        "sensor": sensor,
                        "metric": "temperature",
                        "severity": "warning",
                    }
                )
    return anomalies, alerts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=500)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--every", type=float, default=300, help="seconds between readings")
    args = ap.parse_args()
    from tests.support.es import start_elasticsearch

    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "series": args.series,
        "days": args.days,
        "reading_every_s": args.every,
    }
    node = start_elasticsearch(tls=False, heap_mb=1024)
    workdir = tempfile.mkdtemp(prefix="tributary-bench-report-")
    try:
        out["elasticsearch"] = node.version
        client = node.client()
        install_templates(client, PREFIX, replicas=0)
        now = int(time.time() * 1000)
        t0 = time.monotonic()
        n = bulk(
            client,
            PREFIX,
            "readings",
            synthetic_readings(now, args.series, args.days, int(args.every * 1000)),
        )
        anomalies, alerts = events(now, args.series, args.days)
        bulk(client, PREFIX, "anomalies", anomalies)
        bulk(client, PREFIX, "alerts", alerts)
        client.indices.forcemerge(index=f"{PREFIX}-*", max_num_segments=1)
        out["loaded"] = {
            "readings": n,
            "anomalies": len(anomalies),
            "alert_transitions": len(alerts),
            "seconds": round(time.monotonic() - t0, 1),
        }
        log(f"loaded {n} readings in {out['loaded']['seconds']} s")
        search = queries.client_search(client)
        runs = []
        for run in ("cold", "warm"):
            if run == "cold":
                client.indices.clear_cache(index=f"{PREFIX}-*")
            t1 = time.monotonic()
            rep = report.build(search, PREFIX, now, f"{args.days}d")
            t2 = time.monotonic()
            written = report.write(rep, os.path.join(workdir, run, "report.html"))
            t3 = time.monotonic()
            pngs = [os.path.getsize(p) for p in written["charts"]]
            runs.append(
                {
                    "run": run,
                    "query_s": round(t2 - t1, 2),
                    "render_s": round(t3 - t2, 2),
                    "total_s": round(t3 - t1, 2),
                    "html_bytes": written["html_bytes"],
                    "charts": len(pngs),
                    "png_bytes_total": sum(pngs),
                    "png_bytes_max": max(pngs),
                    "series": sum(len(c.series) for c in rep.sites),
                    "buckets_per_series": len(rep.window.keys()),
                    "interval": report.model.interval_text(rep.window.interval_ms),
                    "anomalies_marked": sum(len(s.anomalies) for c in rep.sites for s in c.series),
                }
            )
            log(f"{run}: {runs[-1]}")
        out["runs"] = runs
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    finally:
        node.cleanup()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
