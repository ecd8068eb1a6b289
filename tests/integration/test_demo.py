"""`make demo` runs ``scripts/demo.py``: this runs that program as a subprocess, its output not
a terminal, for a short scenario and checks its plain-line output, its table, the fleet report
and its exit status.

Not part of `make test` (marker ``demo``, deselected in pyproject.toml's addopts: the program
starts its own topology, about 1.5 minutes): ``pytest tests/integration/test_demo.py -m demo``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.topology import GATEWAYS, REPO

pytestmark = pytest.mark.demo

#: Gateway x sensor/metric rows the simulators produce (tests/support/simulator.py).
SERIES = ["boiler-1/temperature", "room-1/humidity", "room-1/temperature", "tank-1/level"]


def test_demo_program_plain_lines_table_and_report(tmp_path):
    report = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--seconds", "8", "--report", report],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "DEMO_SECONDS": "999"},  # the option wins over the variable
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-3000:]}"
    assert "\r" not in out  # not a terminal: plain lines only
    lines = out.splitlines()
    assert any("starting Elasticsearch" in line for line in lines), out
    assert any(line.startswith("Tributary demo: Elasticsearch ") for line in lines), out
    done = re.search(r"^  done: published (\d+), indexed (\d+)$", out, re.M)
    assert done, out
    published, indexed = int(done[1]), int(done[2])
    # 8 s of three sensors (four series) per gateway at 10 Hz: well over a hundred readings
    assert published == indexed > 100
    header = next(i for i, line in enumerate(lines) if line.startswith("gateway "))
    rows = [line.split() for line in lines[header + 1 : header + 1 + len(GATEWAYS) * 4]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (gw, site, series) for gw, site in GATEWAYS.items() for series in SERIES
    )
    assert sum(int(r[3]) for r in rows) == indexed
    for r in rows:  # last within [min, max]
        assert float(r[5]) <= float(r[4]) <= float(r[6]), r
    assert any(line.startswith(f"Fleet report: {report}") for line in lines), out
    assert report.stat().st_size > 0
    assert lines[-1].startswith("Done in ") and "everything it started is stopped" in lines[-1]
