"""Issue 16: scale-out, a relay on each of two syndic masters; one of them goes down.

Both gateways stream readings; mid-stream syndic relay so-syn-1 hangs (SIGSTOP) for longer than
the top relay's ``takeover_s`` and is then killed (Salt's process manager restarts the engine).
Elasticsearch ends up holding every reading of both gateways exactly once; the top relay
skipped what the live syndic relays owned, indexed so-syn-1's gateway itself while that relay
was silent and never so-syn-2's; and the top's ledger, fed by the receipts, accounts for every
sequence of both gateways with no open gap.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil
import pytest

from tests.integration.faults.helpers import Stream, assert_exactly, sleep_outage
from tests.integration.scaleout.conftest import SYNDICS, TAKEOVER_S
from tests.support.topology import es_readings, relay_rows, relay_spool_path, wait_for

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("scaleout_topology")

DOWN, UP = "so-syn-1", "so-syn-2"
OUTAGE_S = 20


def counters(master) -> dict[str, int]:
    out = dict(relay_rows(master, "SELECT name, n FROM counters"))
    for gw, name, n in relay_rows(master, "SELECT gateway, name, n FROM gateway_counters"):
        out[f"{name}@{gw}"] = n
    return out


def ranges(master, gateway: str, epoch: str) -> list[tuple[int, int]]:
    return [
        tuple(r)
        for r in relay_rows(
            master,
            "SELECT lo, hi FROM ledger_ranges WHERE gateway=? AND epoch=? ORDER BY lo",
            (gateway, epoch),
        )
    ]


def relay_engine(master) -> psutil.Process | None:
    """The tributary_relay engine process of a salt-master: its child holding the relay spool
    open (the process title may be cut short; several engines run there)."""
    spool = os.path.realpath(relay_spool_path(master))
    try:
        children = psutil.Process(master.pid).children(recursive=True)
    except psutil.Error:
        return None
    for proc in children:
        try:
            if any(os.path.realpath(f.path) == spool for f in proc.open_files()):
                return proc
        except psutil.Error:
            continue
    return None


def test_two_syndic_relays_one_down_exactly_once(scaleout_topology):
    topo = scaleout_topology
    es, top, syndics, brokers = topo["es"], topo["top"], topo["syndics"], topo["brokers"]
    started = time.monotonic()
    # Each syndic relay is live on the top (its receipts arrive) and owns its gateway (the
    # syndic's key set bound it there).
    wait_for(
        lambda: (
            {s for (s,) in relay_rows(top, "SELECT syndic FROM scaleout_relays")} == set(SYNDICS)
            and {g for (g,) in relay_rows(top, "SELECT gateway FROM gateway_keys")}
            >= set(SYNDICS.values())
        ),
        timeout=90,
        what="receipts and key sets of both syndic relays on the top",
    )
    stream = Stream(brokers, "so-stream", per_tick=10, every=1.0)
    stream.tick()
    for syndic_id, gw in SYNDICS.items():
        wait_for(
            lambda s=syndic_id, g=gw: counters(syndics[s].master).get(f"indexed@{g}", 0) >= 10,
            timeout=90,
            what=f"{syndic_id}'s relay indexing {gw}",
        )
    before = counters(top)
    stream.start()
    stream.wait_ticks(5)

    engine = relay_engine(syndics[DOWN].master)
    assert engine is not None, "the syndic relay engine process"
    engine.send_signal(signal.SIGSTOP)  # hung: no receipts, no indexing
    down = time.monotonic()
    try:
        wait_for(
            lambda: counters(top).get("taken_over", 0) > before.get("taken_over", 0),
            timeout=TAKEOVER_S + 30,
            what="the top relay taking over so-syn-1's gateway",
        )
        sleep_outage(OUTAGE_S, down)  # the outage is the scenario
    finally:
        engine.send_signal(signal.SIGKILL)  # and then it dies; Salt starts it again
        engine.send_signal(signal.SIGCONT)
    wait_for(
        lambda: (p := relay_engine(syndics[DOWN].master)) is not None and p.pid != engine.pid,
        timeout=90,
        what="Salt restarting so-syn-1's relay engine",
    )
    back = time.monotonic()
    stream.wait_ticks(5)  # receipts from the restarted relay: the top leaves it to it again
    stream.stop()
    stream.tick()

    assert_exactly(es, stream, timeout=180, recovered_from=back)
    after = counters(top)
    epochs = {}
    for gw in SYNDICS.values():
        docs = es_readings(es, gw, "so-stream")
        epochs[gw] = docs[0]["epoch"]
        last = max(d["seq"] for d in docs)
        # the top's ledger (receipts, its own takeover, gap repair) accounts for everything
        wait_for(
            lambda g=gw, ep=epochs[gw], n=last: (
                (r := ranges(top, g, ep)) and r[0][0] == 1 and r[0][1] >= n
            ),
            timeout=120,
            interval=1,
            what=f"the top ledger accounting 1..{last} of {gw}",
        )

    def status():
        ret = top.salt_run_cli(timeout=60).run(
            "tributary.status", check_es=False, gateway="so-gw-*"
        )
        assert ret.returncode == 0, ret
        return ret.data

    # no open gap on the top for either gateway (what was skipped is accounted for)
    data = wait_for(
        lambda: (
            (d := status())
            and all(d["gateways"][g]["open_gaps"] == 0 for g in SYNDICS.values())
            and d
        ),
        timeout=60,
        interval=2,
        what="no open gap on the top",
    )
    view = data["fleet"]["syndic_relays"]
    report = {
        "runtime_s": round(time.monotonic() - started, 1),
        "published": {gw: len(v) for gw, v in stream.sent.items()},
        "top": {
            k: after.get(k, 0) - before.get(k, 0)
            for k in (
                "owned_skipped",
                "taken_over",
                "receipts_in",
                "replays_requested",
                *(f"indexed@{gw}" for gw in SYNDICS.values()),
            )
        },
        "syndic_relays": {
            s: {
                k: v for k, v in counters(f.master).items() if k.startswith(("indexed@", "already"))
            }
            for s, f in syndics.items()
        },
        "status": view,
    }
    log.warning("scale-out report: %s", report)
    print("scale-out report:", report)
    top_delta = report["top"]
    assert top_delta["owned_skipped"] > 0, report  # the top left owned gateways to their relays
    assert top_delta["taken_over"] > 0, report
    assert top_delta[f"indexed@{SYNDICS[DOWN]}"] > 0, report  # it indexed so-gw-1 in the outage
    assert top_delta[f"indexed@{SYNDICS[UP]}"] == 0, report  # never so-gw-2: its relay lived
    assert top_delta["receipts_in"] > 0, report
    assert set(view) == set(SYNDICS) and all(v["state"] == "live" for v in view.values()), view
