"""The demo's parts, shared by ``scripts/demo.py`` (``make demo``) and its tests.

:func:`start_demo_topology` starts the same real topology as the integration fixtures, from the same
helpers (``tests/support/topology.py``, ``es.py``, ``mosquitto.py``); :func:`run_scenario` runs
sensor simulators against it; :func:`fleet_table` reads back what Elasticsearch holds;
:class:`Progress` is the live progress line.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tests.support.es import running_elasticsearch
from tests.support.mosquitto import running_brokers
from tests.support.simulator import Simulator
from tests.support.topology import (
    GATEWAYS,
    factories_manager,
    running_gateways,
    running_syndic,
    running_top_master,
    wait_for,
)

#: The simulators' sensors, as the table and the counts select them.
DEMO_SENSORS = ["boiler-1", "room-1", "tank-1"]


class Progress:
    """Live progress: on a terminal one line rewritten in place (carriage return), otherwise
    plain lines; updates given ``every`` print at most one plain line per ``every`` seconds.

    :meth:`update` shows a passing state (the line a terminal rewrites); :meth:`line` prints a
    line that stays.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.width = width
        self._shown = 0  # characters of the passing line now on screen (terminal)
        self._last_throttled: float | None = None  # last plain line sent with ``every``

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        return shutil.get_terminal_size((100, 24)).columns

    def update(self, text: str, every: float | None = None) -> None:
        """Show ``text`` as the current state. Not on a terminal, ``every`` (seconds) limits
        how often such a line is printed; ``None`` prints each one."""
        if self.tty:
            # One column short of the width: a full line would wrap and break the rewrite.
            text = text[: max(self._columns() - 1, 10)]
            self.stream.write("\r" + text.ljust(self._shown))
            self._shown = len(text)
        else:
            if every is not None:
                now, last = self.clock(), self._last_throttled
                if last is not None and now - last < every:
                    return
                self._last_throttled = now
            self.stream.write(text.strip() + "\n")
        self.stream.flush()

    def line(self, text: str = "") -> None:
        """Print ``text`` as a line that stays (it replaces the passing line on a terminal)."""
        if self.tty and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def start_demo_topology(
    stack: contextlib.ExitStack, root_dir: str, progress: Progress
) -> dict[str, Any]:
    """Elasticsearch (TLS + auth), the top master with the relay engine, syndic-1, one broker
    per gateway and the gateways, on free loopback ports, each entered into ``stack``: closing
    it stops everything started, last started first (also after a failed or interrupted
    start)."""
    t0 = time.monotonic()

    def step(what: str) -> None:
        progress.update(f"  [{time.monotonic() - t0:4.0f}s] {what}")

    def enter(what: str, cm: Any) -> Any:
        step(f"starting {what} ...")
        obj = stack.enter_context(cm)
        stack.callback(step, f"stopping {what} ...")
        return obj

    es = enter("Elasticsearch", running_elasticsearch(tls=True))
    factories = stack.enter_context(factories_manager(root_dir))
    top = enter("the top master", running_top_master(factories, es))
    syndic = enter("syndic-1", running_syndic(top, "syndic-1"))
    brokers = enter("the Mosquitto brokers", running_brokers(GATEWAYS))
    gateways = enter(
        "the gateways " + ", ".join(GATEWAYS), running_gateways(syndic.master, GATEWAYS, brokers)
    )
    step(f"topology up in {time.monotonic() - t0:.0f}s")
    return {"es": es, "top": top, "syndic": syndic, "gateways": gateways, "brokers": brokers}


def indexed_count(es) -> int:
    return es.count("tributary-readings-*", {"terms": {"sensor": DEMO_SENSORS}})


def run_scenario(
    topo: dict[str, Any], seconds: float, progress: Progress, drain_timeout: float = 120
) -> dict[str, int]:
    """One sensor simulator per gateway publishing real MQTT messages for ``seconds``, with
    published / indexed / lag on the progress line; then waits (bounded) until Elasticsearch
    holds every reading. Returns the counts."""
    es, brokers = topo["es"], topo["brokers"]
    base = indexed_count(es)
    progress.line(
        f"Tributary demo: Elasticsearch {es.version} at {es.url}; gateways "
        + ", ".join(
            f"{gw} (site {site}, broker :{brokers[gw].port})" for gw, site in GATEWAYS.items()
        )
    )
    sims = [Simulator(brokers[gw].port, gw, seed=n) for n, gw in enumerate(GATEWAYS)]
    for s in sims:
        s.start()
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            for s in sims:
                if not s.is_alive():
                    raise RuntimeError(f"the sensor simulator {s.name} stopped")
            published = sum(s.published for s in sims)
            indexed = indexed_count(es) - base
            progress.update(
                f"  {time.monotonic() - start:5.0f}s  published {published:7d}  "
                f"indexed {indexed:7d}  lag {published - indexed:6d}",
                every=10,
            )
            time.sleep(1)  # the progress line's refresh period, not a wait for a condition
    finally:
        for s in sims:
            s.stop()
    published = sum(s.published for s in sims)
    progress.update(f"  simulators stopped: published {published}; draining the backlog ...")
    wait_for(
        lambda: indexed_count(es) - base >= published,
        timeout=drain_timeout,
        what="Elasticsearch to hold every published reading",
    )
    indexed = indexed_count(es) - base
    progress.line(f"  done: published {published}, indexed {indexed}")
    return {"published": published, "indexed": indexed}


def fleet_table(es) -> list[str]:
    """Per gateway, sensor and metric: count, last value, min, max and unit, from
    Elasticsearch aggregations (nested terms: the integ-test zip has no ``multi_terms``)."""
    leaf = {
        "min": {"min": {"field": "value"}},
        "max": {"max": {"field": "value"}},
        "last": {
            "top_hits": {
                "size": 1,
                "sort": [{"@timestamp": "desc"}],
                "_source": ["value", "unit", "site"],
            }
        },
    }
    res = es.search(
        "tributary-readings-*",
        {
            "size": 0,
            "query": {"terms": {"sensor": DEMO_SENSORS}},
            "aggs": {
                "gw": {
                    "terms": {"field": "gateway"},
                    "aggs": {
                        "s": {
                            "terms": {"field": "sensor"},
                            "aggs": {"m": {"terms": {"field": "metric"}, "aggs": leaf}},
                        }
                    },
                }
            },
        },
    )
    lines = [
        f"{'gateway':16} {'site':10} {'sensor/metric':24} {'count':>7} {'last':>9} "
        f"{'min':>9} {'max':>9} unit"
    ]
    for g in res["aggregations"]["gw"]["buckets"]:
        for s in g["s"]["buckets"]:
            for b in s["m"]["buckets"]:
                src = b["last"]["hits"]["hits"][0]["_source"]
                lines.append(
                    f"{g['key']:16} {src.get('site') or '':10} {s['key'] + '/' + b['key']:24} "
                    f"{b['doc_count']:7d} {src['value']:9.2f} {b['min']['value']:9.2f} "
                    f"{b['max']['value']:9.2f} {src.get('unit') or ''}"
                )
    return lines


def write_report(top: Any, out: Path, since: str = "24h", timeout: float = 600) -> dict[str, Any]:
    """``salt-run tributary.report since=<since> out=<out>`` on the demo's top master; the
    runner's answer (``html``: the report's path, ``charts``: the PNGs beside it)."""
    ret = top.salt_run_cli(timeout=timeout).run("tributary.report", f"since={since}", f"out={out}")
    data = ret.data if isinstance(ret.data, dict) else {}
    if ret.returncode != 0 or not data.get("result") or not out.exists():
        detail = (
            data.get("error")
            or (ret.stdout or "").strip()
            or (ret.stderr or "").strip()
            or "no output"
        )
        raise RuntimeError(
            f"salt-run tributary.report out={out} failed (exit {ret.returncode}): {detail[-800:]}"
        )
    return data
