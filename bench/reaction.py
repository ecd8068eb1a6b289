"""The closed loop's latencies through the real topology (issue 14's bench).

    python bench/reaction.py [--cycles 20]

Starts what the integration tests run (tests/support/topology.py): Elasticsearch, the top
master with the relay engine and Salt's reactor (``salt/reactor/alert.sls``), syndic-1 and
gw-brisbane-1 with its Mosquitto broker. Each cycle a fresh simulated boiler
(``boiler-bNN``, tests/support/loop_device.py; a new series each time, so no re-notify or flap
damping is involved) heats past 80; the rule fires; the reactor sends ``tributary.command
boiler-bNN setpoint 60`` to gw-brisbane-1 through the syndic; the boiler cools and the alert
resolves before the next cycle.

Prints JSON with, per cycle and as p50/p90/max:

* ``reading_to_alert_s``: the boiler's publish of its first reading above 80 -> the
  ``tributary/alert/<rule>/firing`` event's ``_stamp`` on the top master's bus;
* ``alert_to_command_s``: that ``_stamp`` -> the command's arrival at the boiler (MQTT);
* split at the job: ``alert_to_publish_s`` (the reactor: event -> the job's id, its publish
  time on the top master, read from the command's audit record in ``tributary-commands-*``)
  and ``publish_to_command_s`` (top master -> salt-syndic -> syndic master -> gateway ->
  broker -> device).

One machine, one clock. A benchmark, not a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

import salt.version  # noqa: E402

from tests.support import topology as topo  # noqa: E402
from tests.support.es import running_elasticsearch  # noqa: E402
from tests.support.loop_device import Boiler  # noqa: E402
from tests.support.mosquitto import running_brokers  # noqa: E402

GW = "gw-brisbane-1"
RULE = "bench-hot"


def stamp_s(data: dict[str, Any]) -> float:
    """An event's ``_stamp`` (UTC, ISO) as epoch seconds."""
    dt = datetime.datetime.fromisoformat(data["_stamp"])
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp()


def jid_s(jid: str) -> float:
    """A Salt job id (``%Y%m%d%H%M%S%f``, the master's local time) as epoch seconds."""
    return datetime.datetime.strptime(jid, "%Y%m%d%H%M%S%f").timestamp()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 3),
        "p90": round(pct(values, 0.9), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20)
    args = ap.parse_args()
    devices = [f"boiler-b{i:02d}" for i in range(args.cycles)]
    # gw-brisbane-1 serves the bench's boilers (its allow-list already admits boiler-* setpoint)
    commands = topo.GATEWAY_COMMANDS[GW]
    commands["devices"] = [*commands["devices"], *devices]
    if "rate" in commands:
        commands["rate"] = {"max": 1000, "window_s": 60}
    rule = {
        "name": RULE,
        "match": {"gateway": GW, "sensor": "boiler-b*"},
        "when": {"above": 80, "clear_below": 75},
        "severity": "critical",
    }
    action = {
        "command": {
            "device": "{sensor}",
            "devices": ["boiler-b*"],
            "command": "setpoint",
            "payload": 60,
        }
    }
    reactor = {
        "reactor": [{f"tributary/alert/{RULE}/*": [str(REPO / "salt" / "reactor" / "alert.sls")]}],
        "tributary_reactor": {"actions": {RULE: {"firing": [action]}}},
    }
    out: dict[str, Any] = {
        "salt": salt.version.__version__,
        "python": platform.python_version(),
        "cycles": args.cycles,
        "beacon_interval_s": 1,
        "device_period_s": 0.2,
    }
    root = tempfile.mkdtemp(prefix="tributary-bench-reaction-")
    with contextlib.ExitStack() as stack:
        es = stack.enter_context(running_elasticsearch(tls=True))
        factories = stack.enter_context(topo.factories_manager(root))
        engines = [{"tributary_relay": topo.relay_engine_config(es, rules=[rule])}]
        top = stack.enter_context(
            topo.running_top_master(factories, es, engines=engines, **reactor)
        )
        syndic = stack.enter_context(topo.running_syndic(top, "syndic-1"))
        brokers = stack.enter_context(running_brokers([GW]))
        stack.enter_context(topo.running_gateways(syndic.master, {GW: "brisbane"}, brokers))
        listener = factories.event_listener
        to_alert: list[float] = []
        to_command: list[float] = []
        to_publish: list[float] = []
        publish_to_command: list[float] = []

        def audit(cid: str) -> list:
            res = es.search(
                "tributary-commands-*", {"size": 1, "query": {"term": {"correlation_id": cid}}}
            )
            return [h["_source"] for h in res["hits"]["hits"]]

        t_start = time.time()
        for device in devices:
            dev = Boiler(brokers[GW].port, device, output=70.0, watch_above=80)
            try:
                since = time.time()

                def events(state: str, device: str = device, since: float = since) -> list:
                    tag = f"tributary/alert/{RULE}/{state}"
                    return [
                        e.full_data
                        for e in listener.get_events([(top.id, tag)], after_time=since)
                        if e.data.get("sensor") == device
                    ]

                dev.target = 95.0
                fired = topo.wait_for(lambda: events("firing"), 60, f"{device} firing", 0.02)
                cmd = topo.wait_for(lambda d=dev: d.commands, 60, f"{device} command", 0.02)
                topo.wait_for(lambda: events("resolved"), 60, f"{device} resolved", 0.05)
                assert dev.crossed_at is not None
                fire_t = stamp_s(fired[0])
                to_alert.append(fire_t - dev.crossed_at)
                to_command.append(cmd[0]["received"] - fire_t)
                (doc,) = topo.wait_for(lambda c=cmd[0]["id"]: audit(c), 60, f"{device} audit")
                to_publish.append(jid_s(doc["jid"]) - fire_t)
                publish_to_command.append(cmd[0]["received"] - jid_s(doc["jid"]))
                print(
                    f"{device}: reading->alert {to_alert[-1]:.3f} s, "
                    f"alert->command {to_command[-1]:.3f} s "
                    f"(alert->publish {to_publish[-1]:.3f} s, "
                    f"publish->command {publish_to_command[-1]:.3f} s)",
                    file=sys.stderr,
                )
            finally:
                dev.close()
        out["elapsed_s"] = round(time.time() - t_start, 1)
    out["reading_to_alert_s"] = summary(to_alert)
    out["alert_to_command_s"] = summary(to_command)
    out["alert_to_publish_s"] = summary(to_publish)
    out["publish_to_command_s"] = summary(publish_to_command)
    out["samples"] = {
        "reading_to_alert_s": [round(v, 3) for v in to_alert],
        "alert_to_command_s": [round(v, 3) for v in to_command],
        "alert_to_publish_s": [round(v, 3) for v in to_publish],
        "publish_to_command_s": [round(v, 3) for v in publish_to_command],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
