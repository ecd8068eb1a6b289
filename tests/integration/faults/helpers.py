"""Streams of real MQTT readings and exact-count checks for the fault tests."""

from __future__ import annotations

import threading
import time

from tests.support.topology import es_readings, wait_for


class Stream:
    """Publish ``per_tick`` readings per gateway every ``every`` seconds on a background thread.

    Each reading of a stream has a distinct value (a running counter), so the final check can
    prove that every published reading is in Elasticsearch exactly once.
    """

    def __init__(self, brokers, sensor: str, per_tick: int = 10, every: float = 1.0) -> None:
        self.brokers = brokers
        self.sensor = sensor
        self.per_tick = per_tick
        self.every = every
        self.sent: dict[str, list[int]] = {gw: [] for gw in brokers}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def tick(self) -> None:
        for gw, broker in self.brokers.items():
            start = len(self.sent[gw])
            values = list(range(start, start + self.per_tick))
            try:
                broker.publish(f"sensors/{self.sensor}/temperature", [str(v) for v in values])
            except Exception as exc:  # recorded; the test fails on it
                self.errors.append(f"{gw}: {exc}")
                continue
            self.sent[gw].extend(values)

    def start(self) -> Stream:
        def loop() -> None:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(self.every)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def wait_ticks(self, n: int, timeout: float = 60) -> None:
        """Wait until every gateway has been sent ``n`` more ticks of readings (the stream
        going on through a fault), with a deadline."""
        goal = {gw: len(v) + n * self.per_tick for gw, v in self.sent.items()}
        wait_for(
            lambda: all(len(self.sent[gw]) >= g for gw, g in goal.items()) or self.errors,
            timeout,
            what=f"{n} more ticks of {self.sensor}",
        )
        assert not self.errors, self.errors

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=60)
        assert not self.errors, self.errors


def _ranges(values: list[float]) -> str:
    """``1-5, 9, 12-14``: a short form of the missing values for failure messages."""
    out: list[str] = []
    for v in sorted(int(x) for x in values):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


#: Time to recovery of each fault test: seconds from the end of its fault (the failed part
#: back) until Elasticsearch held every reading exactly once. Printed at the end of the run.
RECOVERY: dict[str, float] = {}


def assert_exactly(
    es, stream: Stream, timeout: float = 240, recovered_from: float | None = None
) -> None:
    """Elasticsearch holds every reading of the stream exactly once, for every gateway; with
    ``recovered_from`` (the monotonic time the fault ended), the time to recovery is kept."""
    for gw, values in stream.sent.items():
        expected = sorted(float(v) for v in values)
        deadline = time.monotonic() + timeout
        while True:
            docs = es_readings(es, gw, stream.sensor)
            if len(docs) >= len(expected):
                break
            if time.monotonic() > deadline:
                missing = sorted(set(expected) - {d["value"] for d in docs})
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {len(expected)} {stream.sensor}"
                    f" readings of {gw}: {len(docs)} indexed, missing values {_ranges(missing)}"
                )
            time.sleep(2)
        assert len(docs) == len(expected), (gw, len(docs), len(expected))
        assert sorted(d["value"] for d in docs) == expected
        seqs = [(d["epoch"], d["seq"]) for d in docs]
        assert len(set(seqs)) == len(seqs), "duplicate sequence numbers"
        assert {d["gateway"] for d in docs} == {gw}
    if recovered_from is not None:
        RECOVERY[stream.sensor] = round(time.monotonic() - recovered_from, 1)


def sleep_outage(seconds: float, since: float) -> None:
    """The outage itself (the scenario demands its length), measured from ``since``."""
    left = seconds - (time.monotonic() - since)
    if left > 0:
        time.sleep(left)
