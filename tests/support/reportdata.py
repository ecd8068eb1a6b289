"""Known and synthetic documents for the fleet report's tests and bench, written into a
dedicated index prefix of a real Elasticsearch (so they never meet other tests' data)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from saltext.tributary.relay.elasticsearch import index_name, install_templates

MIN = 60_000


def bulk(client: Any, prefix: str, kind: str, docs: Iterable[dict], chunk: int = 20_000) -> int:
    """Index ``docs`` (each with ``@timestamp``) into ``<prefix>-<kind>-<day>``; refresh."""
    n = 0
    lines: list[str] = []

    def flush() -> None:
        if not lines:
            return
        resp = client.bulk(operations="\n".join(lines) + "\n", refresh=False)
        if resp["errors"]:
            bad = next(i for i in resp["items"] if next(iter(i.values())).get("error"))
            raise RuntimeError(f"bulk into {prefix}-{kind}: {bad}")
        lines.clear()

    for doc in docs:
        lines.append(json.dumps({"index": {"_index": index_name(prefix, kind, doc["@timestamp"])}}))
        lines.append(json.dumps(doc))
        n += 1
        if len(lines) >= 2 * chunk:
            flush()
    flush()
    client.indices.refresh(index=f"{prefix}-*", ignore_unavailable=True, allow_no_indices=True)
    return n


class Known:
    """A small fleet with hand-made values over the 24 hours before ``now_ms``: two sites,
    three gateways, one spike with its anomaly and alert, findings, heartbeats, dead letters,
    relay metrics and commands. ``readings`` etc. hold exactly what was indexed."""

    def __init__(self, now_ms: int, prefix: str) -> None:
        self.now = now_ms
        self.prefix = prefix
        self.start = now_ms - 24 * 3_600_000
        # readings every 10 minutes from 23h50m ago (inside the window)
        self.times = [now_ms - 10 * MIN * k for k in range(143, -1, -1)]
        self.spike_at = self.times[100]
        self.readings: list[dict] = []
        for i, t in enumerate(self.times):
            a1 = 95.0 if t == self.spike_at else 20.0 + i % 6
            self.readings.append(self._r("alpha", "gw-r-a1", "boiler", "temperature", t, a1, i))
            self.readings.append(
                self._r("alpha", "gw-r-a2", "boiler", "temperature", t, 21.0 + i % 4, i)
            )
            # gateway-aggregated readings: the window's own min and max count
            r = self._r("beta", "gw-r-b1", "tank", "level", t, 50.0 + i % 3, i)
            r["agg"] = {"window_s": 600, "min": 40.0 + i % 3, "max": 60.0 + i % 5, "count": 10}
            self.readings.append(r)
        self.anomalies = [
            {
                "@timestamp": self.spike_at,
                "gateway": "gw-r-a1",
                "site": "alpha",
                "sensor": "boiler",
                "metric": "temperature",
                "value": 95.0,
                "score": 0.993,
                "anomaly": True,
                "expected": 22.5,
                "band": [19.0, 26.0],
                "deviation": 40.2,
                "state": "ok",
            },
            {  # scored but not an anomaly: never drawn
                "@timestamp": self.times[50],
                "gateway": "gw-r-a2",
                "site": "alpha",
                "sensor": "boiler",
                "metric": "temperature",
                "value": 22.0,
                "score": 0.4,
                "anomaly": False,
                "expected": 22.0,
                "band": [19.0, 25.0],
            },
        ]
        alert = {"rule": "boiler-hot", "gateway": "gw-r-a1", "site": "alpha", "sensor": "boiler"}
        alert |= {"metric": "temperature", "severity": "critical", "kind": "threshold"}
        self.alerts = [
            {"@timestamp": self.spike_at, "state": "firing", "value": 95.0, **alert},
            {"@timestamp": self.times[102], "state": "resolved", "value": 22.0, **alert},
        ]
        self.findings = [
            self._f("gateway_silent", "device", "raised", self.times[20], "beta", "gw-r-b1"),
            self._f("gateway_silent", "device", "cleared", self.times[30], "beta", "gw-r-b1"),
            self._f("sensor_departs", "population", "raised", self.times[40], "alpha", "gw-r-a2"),
        ]
        self.heartbeats = [
            {
                "@timestamp": now_ms - 60 * MIN,
                "gateway": "gw-r-a1",
                "site": "alpha",
                "spool_unsent": 50,
                "last_seq": 10,
                "epoch": "e1",
            },
            {
                "@timestamp": now_ms - 1 * MIN,
                "gateway": "gw-r-a1",
                "site": "alpha",
                "spool_unsent": 5,
                "last_seq": 20,
                "epoch": "e1",
            },
            {
                "@timestamp": now_ms - 2 * MIN,
                "gateway": "gw-r-b1",
                "site": "beta",
                "spool_unsent": 0,
                "last_seq": 20,
                "epoch": "e1",
            },
        ]
        # three dead letters a second apart, in the 15-minute bucket of times[60] whatever
        # the clock (from times[60] itself they crossed into the next bucket 2 s in 900)
        letters_at = self.times[60] - self.times[60] % (15 * MIN)
        self.dead_letters = [
            {
                "@timestamp": letters_at + k * 1000,
                "gateway": "gw-r-a2",
                "reason": "bad_signature",
                "stage": "origin",
                "detail": "x",
            }
            for k in range(3)
        ]

        # the relay's cumulative counters: 10 before the window, then 12 and 15; gaps opened
        # 4 -> 7 -> 7, repaired 2 -> 2 -> 4, filled late 1 -> 1 -> 2
        def gaps(opened: int, repaired: int, filled: int) -> dict:
            return {"gaps_opened": opened, "gaps_repaired": repaired, "gaps_filled": filled}

        self.metrics = [
            {
                "@timestamp": self.start - 30 * MIN,
                "relay": "top",
                "counters": {"replays_requested": 10, "gaps_given_up": 1, **gaps(4, 2, 1)},
                "open_gaps": 0,
            },
            {
                "@timestamp": self.times[70],
                "relay": "top",
                "counters": {"replays_requested": 12, "gaps_given_up": 1, **gaps(7, 2, 1)},
                "open_gaps": 2,
            },
            {
                "@timestamp": self.times[90],
                "relay": "top",
                "counters": {"replays_requested": 15, "gaps_given_up": 2, **gaps(7, 4, 2)},
                "open_gaps": 1,
            },
        ]
        self.commands = [
            {
                "@timestamp": self.times[110] + k,
                "gateway": "gw-r-a1",
                "site": "alpha",
                "outcome": o,
                "command": "restart",
            }
            for k, o in enumerate(("acked", "acked", "timeout"))
        ]

    #: each reading's lag per hop (ms), adding up to its 2.5 s relayed_at - @timestamp:
    #: the two alpha gateways alike, beta's (aggregating) gateway holds its readings longer
    HOPS = {
        "alpha": {"gateway": 1000, "uplink": 300, "relay": 1200},
        "beta": {"gateway": 1500, "uplink": 600, "relay": 400},
    }

    def local(self) -> dict:
        """What ``salt-run tributary.status`` on the top master would add (its status store):
        the relay's fleet counters and gaps, and per gateway its lag and open gaps."""
        return {
            "fleet": {
                "counters": {"readings_in": 448, "indexed": 432, "dead_lettered": 3},
                "open_gaps": 1,
                "missing_readings": 13,
            },
            "gateways": {
                "gw-r-a1": {"lag_s": 2.5, "open_gaps": 0},
                "gw-r-a2": {"lag_s": 2.6, "open_gaps": 1},
                "gw-r-b1": {"lag_s": 2.5, "open_gaps": 0},
            },
            "findings": [{"kind": "sensor_departs", "gateway": "gw-r-a2", "site": "alpha"}],
            "heartbeat_s": 30,
            "overdue_factor": 3,
        }

    def _r(self, site, gw, sensor, metric, t, value, seq) -> dict:
        return {
            "hop_ms": dict(self.HOPS[site]),
            "@timestamp": t,
            "gateway": gw,
            "site": site,
            "sensor": sensor,
            "metric": metric,
            "value": value,
            "unit": "",
            "seq": seq,
            "epoch": "e1",
            "relayed_at": t + 2500,  # 2.5 s after measurement
        }

    def _f(self, kind, layer, state, t, site, gw) -> dict:
        return {
            "@timestamp": t,
            "kind": kind,
            "layer": layer,
            "state": state,
            "site": site,
            "gateway": gw,
            "raised_at": t,
        }

    def load(self, client: Any, commands: bool = True) -> None:
        install_templates(client, self.prefix, replicas=0)
        bulk(client, self.prefix, "readings", self.readings)
        bulk(client, self.prefix, "anomalies", self.anomalies)
        bulk(client, self.prefix, "alerts", self.alerts)
        bulk(client, self.prefix, "findings", self.findings)
        bulk(client, self.prefix, "health", self.heartbeats)
        bulk(client, self.prefix, "deadletter", self.dead_letters)
        bulk(client, self.prefix, "metrics", self.metrics)
        if commands:
            client.indices.put_index_template(
                name=f"{self.prefix}-commands",
                index_patterns=[f"{self.prefix}-commands-*"],
                template={
                    "settings": {"number_of_replicas": 0},
                    "mappings": {
                        "properties": {
                            "@timestamp": {"type": "date"},
                            "outcome": {"type": "keyword"},
                            "site": {"type": "keyword"},
                        }
                    },
                },
                priority=200,
            )
            bulk(client, self.prefix, "commands", self.commands)


def synthetic_readings(
    now_ms: int, n_series: int, days: float, every_ms: int, per_site: int = 50
) -> Iterator[dict]:
    """``n_series`` series (five sensors per gateway, ``per_site`` series per site), one
    reading every ``every_ms`` over ``days`` before ``now_ms``: a daily cycle plus noise, each
    with its lag per hop (``hop_ms``) adding up to its 1.5 s relay lag."""
    import math
    import random

    rnd = random.Random(7)
    start = now_ms - int(days * 86_400_000)
    for s in range(n_series):
        site = f"site-{s // per_site:02d}"
        gw = f"gw-{site}-{(s % per_site) // 5}"
        sensor = f"sensor-{s % 5}"
        base = 15 + s % 7
        for t in range(start - start % every_ms + every_ms, now_ms, every_ms):
            day = (t % 86_400_000) / 86_400_000
            held = 500 + (t // every_ms) % 700  # the gateway holds it 0.5-1.2 s
            yield {
                "hop_ms": {"gateway": held, "uplink": 200, "relay": 1300 - held},
                "@timestamp": t,
                "gateway": gw,
                "site": site,
                "sensor": sensor,
                "metric": "temperature",
                "value": round(base + 5 * math.sin(2 * math.pi * day) + rnd.gauss(0, 0.5), 3),
                "unit": "C",
                "seq": t // every_ms,
                "epoch": "bench",
                "relayed_at": t + 1500,
            }
