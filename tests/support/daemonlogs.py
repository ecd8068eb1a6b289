"""Keep the Salt daemons' logs of a failed integration test, so a CI failure can be read later.

On failure the log files of every daemon a test used (masters with the relay engine, syndics,
gateway minions) and of Elasticsearch are copied under ``.run/failed-logs/<test>-<time>/`` in
the repo (``TRIBUTARY_FAILED_LOGS`` overrides the root), and the failure report gains a
section naming that directory with the last lines of each log that mention Tributary or an
error, so the cause is often readable in the CI output itself.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
#: Lines worth showing in the failure output (everything is in the kept files).
INTERESTING = re.compile(
    r"\]\[(WARNING|ERROR|CRITICAL) *\]|Traceback|tributary (relay|mqtt|keys)|fire_master failed"
    r"|Connection to master|Minion is ready|\]\[(WARN|ERROR) *\]\[o\.e"
)
#: Salt's loader reports every beacon it cannot load, at ERROR, on each beacon refresh.
NOISE = re.compile(r"Unable to load \S+ beacon|No validate function found|Unable to process beacon")
TAIL_LINES = 40


def log_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TRIBUTARY_FAILED_LOGS") or REPO / ".run" / "failed-logs")


def _daemon_logs(factory: Any) -> Iterator[tuple[str, pathlib.Path]]:
    """(label, path) of the log files of a salt-factories daemon and the daemons it wraps."""
    seen: set[int] = set()
    stack = [factory]
    while stack:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        config = getattr(f, "config", None) or {}
        path = config.get("log_file")
        if path:
            kind = type(f).__name__.replace("Salt", "").lower()
            yield f"{getattr(f, 'id', 'daemon')}-{kind}", pathlib.Path(path)
        # a syndic factory carries its own master and minion
        stack.extend([getattr(f, "master", None), getattr(f, "minion", None)])


def collect(factories: Iterable[Any], extra: Iterable[tuple[str, pathlib.Path]] = ()) -> list:
    out: list[tuple[str, pathlib.Path]] = []
    for factory in factories:
        out.extend(_daemon_logs(factory))
    out.extend(extra)
    return out


def keep(test_name: str, logs: list[tuple[str, pathlib.Path]]) -> tuple[pathlib.Path, str]:
    """Copy ``logs`` under a fresh directory; returns it and a report of the relevant tails."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)[:120]
    dest = log_root() / f"{safe}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    report = [f"daemon logs of this failure kept under {dest}"]
    for label, path in logs:
        if not path.is_file():
            report.append(f"-- {label}: no log at {path}")
            continue
        target = dest / f"{label}.log"
        shutil.copyfile(path, target)
        with open(path, errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if INTERESTING.search(ln) and not NOISE.search(ln)]
        report.append(f"-- {label} ({target.name}, {len(lines)} relevant lines, last shown)")
        report.extend(lines[-TAIL_LINES:])
    return dest, "\n".join(report)


def attach(item: Any, report: Any, factories: Iterable[Any], es: Any = None) -> pathlib.Path:
    """Keep the logs of ``factories`` (and of the Elasticsearch node ``es``) for a failed test
    and add the report section that names where they are."""
    extra = []
    if es is not None:
        logs = sorted(pathlib.Path(es.workdir, "logs").glob("*.log"))
        extra = [(f"es-{p.stem}", p) for p in logs if not p.stem.startswith("gc")]
    dest, text = keep(item.nodeid, collect(factories, extra))
    report.sections.append(("kept daemon logs", text))
    return dest
