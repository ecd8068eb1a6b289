"""``make demo``: the whole Tributary pipeline live on this machine, then what it holds.

Starts its own topology on free loopback ports with real parts (Elasticsearch with TLS and
authentication, a top master with the relay engine, a syndic, two gateway minions in two sites,
each with its own Mosquitto broker and a sensor simulator publishing MQTT), runs the simulators
for ``--seconds`` (``DEMO_SECONDS``, default 60) with a live progress line, waits until
Elasticsearch holds every reading, prints a table per gateway, sensor and metric, writes the
fleet report with ``salt-run tributary.report out=<path>`` on its top master and prints the
report's path. Everything it started is stopped on the way out: at the end, on an error, on
Ctrl-C and on SIGTERM. Exit status: 0 done, 1 failed (with the reason), 130 interrupted.

The topology helpers are the integration tests' own (``tests/support``), so the demo runs
exactly what the tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

from tests.support.demo import (  # noqa: E402
    Progress,
    fleet_table,
    run_scenario,
    start_demo_topology,
    write_report,
)


class Stopped(Exception):
    """SIGTERM or SIGHUP: stop everything as on Ctrl-C."""


def _raise_stopped(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("DEMO_SECONDS", "60")),
        help="how long the sensor simulators publish (default: $DEMO_SECONDS or 60)",
    )
    parser.add_argument(
        "--report",
        type=pathlib.Path,
        default=REPO / ".run" / "demo" / "report.html",
        help="where the fleet report goes (default: .run/demo/report.html)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    report = args.report.resolve()
    progress = Progress()
    root = tempfile.mkdtemp(prefix="tributary-demo-")
    # Daemon log records at warning and above (forwarded by salt-factories' log server) and
    # this program's own go to a file, not over the progress line.
    handler = logging.FileHandler(os.path.join(root, "demo.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    _drop_salt_console_handler()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stopped)
    t0 = time.monotonic()
    status = 1
    stack = contextlib.ExitStack()
    try:
        topo = start_demo_topology(stack, root, progress)
        counts = run_scenario(topo, args.seconds, progress)
        if counts["indexed"] != counts["published"]:
            raise RuntimeError(
                f"published {counts['published']} readings but Elasticsearch holds "
                f"{counts['indexed']}"
            )
        progress.line()
        for row in fleet_table(topo["es"]):
            progress.line(row)
        progress.line()
        progress.update("  writing the fleet report (salt-run tributary.report) ...")
        # The report covers the demo's run (the minutes since it started).
        since = f"{int((time.monotonic() - t0) // 60) + 2}m"
        written = write_report(topo["top"], report, since=since)
        charts = len(written.get("charts") or [])
        progress.line(
            f"Fleet report: {report}" + (f" ({charts} charts beside it as PNG)" if charts else "")
        )
        status = 0
    except (KeyboardInterrupt, Stopped) as exc:
        status = 130
        progress.line(f"interrupted ({str(exc) or 'Ctrl-C'}): stopping everything it started")
    except Exception as exc:
        progress.line(f"demo failed: {exc}")
    finally:
        # A second Ctrl-C must not cut the stopping short (that would leave daemons behind).
        _ignore_signals(progress)
        try:
            stack.close()
        except Exception as exc:
            status = status or 1
            progress.line(f"demo failed while stopping: {exc}")
        left = _reap(root)
        if left:
            progress.line(f"  stopped {left} process(es) still running after their daemon's stop")
    _drop_salt_console_handler()
    logging.getLogger().removeHandler(handler)
    handler.close()
    if status == 0:
        progress.line(f"Done in {time.monotonic() - t0:.0f}s; everything it started is stopped.")
        shutil.rmtree(root, ignore_errors=True)
    else:
        progress.line(f"Everything it started is stopped. Daemon logs and warnings: {root}")
    return status


def _reap(root: str, timeout: float = 30) -> int:
    """Salt daemons' children still shutting down after their daemon stopped (their command
    line names the run directory): wait for them within ``timeout``, then kill the rest.
    Returns how many had to be killed."""
    import psutil

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid != os.getpid() and any(root in a for a in proc.info["cmdline"] or ()):
                found.append(proc)
        return found

    _gone, alive = psutil.wait_procs(ours(), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


def _drop_salt_console_handler() -> None:
    """Salt's import installs a console handler that keeps every record (the daemons' ones
    too, through the log server) and writes them all to stderr at exit: drop it."""
    try:
        from salt._logging.handlers import DeferredStreamHandler
    except ImportError:
        return
    for h in list(logging.root.handlers):
        if isinstance(h, DeferredStreamHandler):
            logging.root.removeHandler(h)
            h._DeferredStreamHandler__messages.clear()  # type: ignore[attr-defined]


def _ignore_signals(progress: Progress) -> None:
    """While the topology stops: further Ctrl-C / SIGTERM are noted, not obeyed."""

    def note(_signum, _frame):
        progress.line("  still stopping everything it started ...")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note)


if __name__ == "__main__":
    sys.exit(main())
