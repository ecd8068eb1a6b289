"""Issue 4: two top masters running the relay (multi-master) create no duplicates.

One gateway streams 10 readings a second for about a minute; mid-stream each top master in turn
is stopped (the syndic keeps forwarding to the other) and started again. In the end
Elasticsearch holds every published reading exactly once, each relay's ledger accounts for
every sequence (its holes were replayed), both relays indexed documents, and the documents
the two relays both received were counted as already present (409) by one of them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from typing import Any

import pytest

from tests.integration.faults.helpers import Stream, assert_exactly, sleep_outage
from tests.integration.multimaster.conftest import GATEWAY, SYNDIC_ID, TOPS
from tests.support.topology import es_count, es_readings, relay_rows, sqlite_rows, wait_for

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("multimaster")

A, B = TOPS
OUTAGE_S = 15


def counters(top) -> dict[str, int]:
    """The relay's fleet counters, and this gateway's as ``<name>@gateway``."""
    out = dict(relay_rows(top, "SELECT name, n FROM counters"))
    rows = relay_rows(top, "SELECT name, n FROM gateway_counters WHERE gateway=?", (GATEWAY,))
    out.update({f"{name}@gateway": n for name, n in rows})
    return out


def key_sources(top) -> set[str]:
    rows = relay_rows(top, "SELECT source FROM gateway_keys WHERE gateway=?", (GATEWAY,))
    return {r[0] for r in rows}


def ledger_ranges(top, epoch: str) -> list[tuple[int, int]]:
    return [
        (lo, hi)
        for lo, hi in relay_rows(
            top,
            "SELECT lo, hi FROM ledger_ranges WHERE gateway=? AND epoch=? ORDER BY lo",
            (GATEWAY, epoch),
        )
    ]


class Timeline:
    """Every 0.5 s: the gateway's emitted batches and each relay's intake, as change points.

    Measures which master received the gateway's batches when (read-only SQLite reads of the
    gateway spool and both relay spools; nothing waits on it).
    """

    def __init__(self, gateway, tops) -> None:
        self.gw_spool = os.path.join(gateway.config["cachedir"], "tributary", "spool.db")
        self.tops = tops
        self.t0 = time.monotonic()
        self.points: list[tuple] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def mark(self, what: str) -> None:
        self.marks.append((round(time.monotonic() - self.t0, 1), what))

    def sample(self) -> tuple:
        gw = dict(sqlite_rows(self.gw_spool, "SELECT name, n FROM counters", timeout=5))
        row: list[int] = [gw.get("batches", 0), gw.get("emitted", 0)]
        for top in self.tops.values():
            c = counters(top)
            row += [c.get("readings_in", 0), c.get("already_present", 0)]
        return tuple(row)

    def _loop(self) -> None:
        last = None
        while not self._stop.wait(0.5):
            try:
                row = self.sample()
            except sqlite3.Error:
                continue
            if row != last:
                self.points.append((round(time.monotonic() - self.t0, 1), *row))
                last = row

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def snapshot(tops) -> dict[str, dict[str, int]]:
    keys = ("batches_in", "indexed@gateway", "already_present", "replays_requested")
    out = {}
    for name, top in tops.items():
        c = counters(top)
        out[name] = {k: c.get(k, 0) for k in keys}
    return out


def delta(after: dict, before: dict) -> dict:
    return {n: {k: after[n][k] - before[n][k] for k in after[n]} for n in after}


def test_two_top_masters_no_duplicates(multimaster):
    es, tops, broker = multimaster["es"], multimaster["tops"], multimaster["broker"]
    started = time.monotonic()

    # Both relays hold the gateway's key, published by the syndic master's tributary_keys
    # engine: the syndic forwards that event to both top masters.
    for top in tops.values():
        wait_for(
            lambda t=top: SYNDIC_ID in key_sources(t),
            timeout=90,
            what=f"{top.id}'s key set for {GATEWAY}",
        )

    stream = Stream({GATEWAY: broker}, "mm-failover", per_tick=10, every=1.0)
    stream.tick()  # warm-up: both relays receive and account the first batch
    wait_for(lambda: es_count(es, GATEWAY, "mm-failover") == 10, timeout=90, what="warm-up")
    epoch = es_readings(es, GATEWAY, "mm-failover")[0]["epoch"]
    for top in tops.values():
        wait_for(
            lambda t=top: sum(hi - lo + 1 for lo, hi in ledger_ranges(t, epoch)) >= 10,
            timeout=60,
            what=f"{top.id} accounting the warm-up batch",
        )

    phases: list[tuple[str, dict]] = []
    mark = snapshot(tops)

    timeline = Timeline(multimaster["gateway"], tops).start()

    def phase(name: str) -> None:
        nonlocal mark
        timeline.mark(name)
        now = snapshot(tops)
        phases.append((name, delta(now, mark)))
        mark = now

    def receiving(top, more: int = 30) -> None:
        """Wait (mid-stream) until ``top``'s relay took in ``more`` readings beyond now."""
        base = counters(top).get("readings_in", 0)
        wait_for(
            lambda: counters(top).get("readings_in", 0) >= base + more,
            timeout=60,
            what=f"{top.id} receiving the stream",
        )

    stream.start()
    for top in tops.values():
        receiving(top, 50)  # mid-stream, both masters up and receiving
    phase("both up")

    timeline.mark(f"stopping {A}")
    tops[A].terminate()
    down = time.monotonic()
    sleep_outage(OUTAGE_S, down)  # the outage is the scenario
    phase(f"{A} down")
    timeline.mark(f"starting {A}")
    tops[A].start()
    receiving(tops[A])  # the syndic forwards to the restarted master again
    phase(f"{A} back")

    timeline.mark(f"stopping {B}")
    tops[B].terminate()
    down = time.monotonic()
    sleep_outage(OUTAGE_S, down)
    phase(f"{B} down")
    timeline.mark(f"starting {B}")
    tops[B].start()
    receiving(tops[B])
    phase(f"{B} back")

    stream.stop()
    stream.tick()
    # Elasticsearch: exactly the published readings, every value once, no duplicate seq.
    assert_exactly(es, stream, timeout=240)
    docs = es_readings(es, GATEWAY, "mm-failover")
    published = len(stream.sent[GATEWAY])
    assert len(docs) == published
    seqs = sorted(d["seq"] for d in docs)
    assert len(set(seqs)) == len(seqs)
    assert {d["_id"] for d in docs} == {f"{GATEWAY}:{epoch}:{s}" for s in seqs}
    assert {d["epoch"] for d in docs} == {epoch}
    last = seqs[-1]
    assert seqs == list(range(1, last + 1)), "sequences of a fresh epoch run 1..last"

    # Each relay's ledger settles: its holes (the other master's outage, lost forwards) were
    # replayed, re-indexed as already present, and nothing stays open.
    for top in tops.values():
        wait_for(
            lambda t=top: ledger_ranges(t, epoch) == [(1, last)],
            timeout=150,
            interval=1,
            what=f"{top.id}'s ledger accounting 1..{last}",
        )
    phase("settled")
    # The runner agrees: no open gap, nothing missing. (It also gives a replay request still
    # in flight time to finish: the relay counts a request when its answer is back.)
    for top in tops.values():
        ret = top.salt_run_cli(timeout=60).run("tributary.status", check_es=False, gateway=GATEWAY)
        assert ret.returncode == 0, ret
        gw = ret.data["gateways"][GATEWAY]
        assert gw["open_gaps"] == 0 and gw["missing"] == 0, (top.id, gw)
    timeline.stop()

    totals = {name: counters(top) for name, top in tops.items()}
    report: dict[str, Any] = {
        "published": published,
        "runtime_s": round(time.monotonic() - started, 1),
        "phases": phases,
        "marks": timeline.marks,
        "timeline (t, gw batches, gw emitted, a readings_in, a 409s, b readings_in, b 409s)": (
            timeline.points
        ),
        "totals": {
            n: {
                k: c.get(k, 0)
                for k in (
                    "batches_in",
                    "indexed@gateway",
                    "already_present",
                    "replays_requested",
                    "replays_failed",
                    "duplicate_events",
                )
            }
            for n, c in totals.items()
        },
    }
    log.warning("multimaster report: %s", report)
    print("multimaster report:", report)

    indexed = {n: c.get("indexed@gateway", 0) for n, c in totals.items()}
    present = {n: c.get("already_present", 0) for n, c in totals.items()}
    # Both relays wrote to Elasticsearch ...
    assert all(v > 0 for v in indexed.values()), report
    # ... and between them created each reading at most once (warm-up included; measured: the
    # sum equals ``published``, but a relay stopped between Elasticsearch's answer and saving
    # its counters may lose that bulk's counts); what one relay created and the other received
    # too was answered 409 and counted as already present by the other, never indexed twice.
    assert sum(indexed.values()) <= published, report
    assert all(v > 0 for v in present.values()), report
    assert sum(indexed.values()) + sum(present.values()) >= published, report
