"""The process tap: the subscriber runs in a child process, fed through a bounded queue."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.tap import CHILD_NICE, ProcessTap
from tests.support.topology import wait_for


class Recorder:
    """A subscriber that writes what it gets to a file (the test reads it back)."""

    def __init__(self, path: str, count) -> None:
        self.path = path
        self.count = count
        self.log = logging.getLogger("tributary.test.recorder")

    def handle(self, readings) -> None:
        if any(r[4].get("crash") for r in readings):
            os._exit(3)  # a hard crash, as a segfault or the OOM killer would end it
        if any(r[4].get("raise") for r in readings):
            raise ValueError("a subscriber bug")
        with open(self.path, "a") as fh:
            for r in readings:
                fh.write(json.dumps([r[0], r[4]["seq"], os.getpid(), os.nice(0)]) + "\n")
        self.count("recorded", len(readings))
        self.count("recorded_by_gw", len(readings), gateway=readings[0][0])
        if any(r[4].get("slow") for r in readings):
            time.sleep(r[4]["slow"])  # a subscriber that falls behind (the test's subject)

    def tick(self) -> None:
        self.log.warning("tick from the child")

    def close(self) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(["closed"]) + "\n")


def recorder(path: str, count) -> Recorder:
    return Recorder(path, count)


def batch(gw: str, first: int, n: int, **extra):
    return [(gw, "brisbane", "e1", 0, {"seq": first + i, **extra}) for i in range(n)]


def lines(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()]


class Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_readings_reach_the_child_and_its_counts_come_back(tmp_path):
    seen = Seen()
    logging.getLogger("tributary.test.recorder").addHandler(seen)
    out = tmp_path / "got.jsonl"
    counters = Counters()
    tap = ProcessTap(recorder, (str(out),), counters, idle_s=0.2)
    try:
        assert tap.offer(batch("gw-1", 1, 3))
        assert tap.offer(batch("gw-2", 1, 2))
        assert tap.drain()
        got = lines(out)
        assert [(g, s) for g, s, _, _ in got] == [
            ("gw-1", 1),
            ("gw-1", 2),
            ("gw-1", 3),
            ("gw-2", 1),
            ("gw-2", 2),
        ]
        assert {pid for _, _, pid, _ in got} == {tap._proc.pid} != {os.getpid()}
        # the child yields the CPU to the relay under contention
        assert {nice for *_, nice in got} == {min(19, os.nice(0) + CHILD_NICE)}
        assert counters["recorded"] == 5
        assert counters[("recorded_by_gw", "gw-1")] == 3
        # the child's log records are handled by the parent's loggers
        wait_for(
            lambda: any(r.getMessage() == "tick from the child" for r in seen.records),
            10,
            what="a log record from the child",
        )
    finally:
        tap.close()
        logging.getLogger("tributary.test.recorder").removeHandler(seen)
    assert lines(out)[-1] == ["closed"]  # the subscriber saved its state at stop
    assert not tap.alive()


def test_a_failing_batch_is_counted_and_the_next_one_handled(tmp_path):
    out = tmp_path / "got.jsonl"
    counters = Counters()
    tap = ProcessTap(recorder, (str(out),), counters)
    try:
        tap.offer(batch("gw-1", 1, 2, **{"raise": True}))
        tap.offer(batch("gw-1", 3, 1))
        assert tap.drain()
        assert counters["tap_failed"] == 2
        assert [row[1] for row in lines(out)] == [3]
    finally:
        tap.close()


def test_a_full_queue_sheds_and_counts_and_never_blocks(tmp_path):
    out = tmp_path / "got.jsonl"
    counters = Counters()
    tap = ProcessTap(recorder, (str(out),), counters, max_batches=2)
    try:
        tap.offer(batch("gw-1", 1, 1, slow=3))
        assert wait_for(lambda: lines(out), 20, what="the slow batch taken")
        taken = [tap.offer(batch("gw-1", 2 + i, 10)) for i in range(6)]
        assert taken.count(False) >= 3
        assert counters["tap_shed"] == 10 * taken.count(False)
    finally:
        tap.close()


def test_a_child_that_dies_is_started_again_and_counted(tmp_path):
    out = tmp_path / "got.jsonl"
    counters = Counters()
    tap = ProcessTap(recorder, (str(out),), counters)
    tap.RESTART_S = 0.0
    try:
        first = tap._proc.pid
        tap.offer(batch("gw-1", 1, 1, crash=True))
        wait_for(lambda: not tap.alive(), 20, what="the child to die")
        assert tap.offer(batch("gw-1", 2, 1))
        assert tap.drain()
        assert counters["tap_restarts"] == 1
        got = lines(out)
        assert [row[1] for row in got] == [2]
        assert got[0][2] != first
    finally:
        tap.close()


def test_the_child_ends_when_its_parent_is_gone(tmp_path):
    """The child polls its parent: a relay killed with SIGKILL leaves no orphan behind."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    out = tmp_path / "got.jsonl"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[3])!r})\n"
        "from saltext.tributary.relay.counters import Counters\n"
        "from saltext.tributary.relay.tap import ProcessTap\n"
        "from tests.unit.relay.test_tap import recorder\n"
        "if __name__ == '__main__':\n"
        f"    tap = ProcessTap(recorder, ({str(out)!r},), Counters(), idle_s=0.2)\n"
        "    print(tap._proc.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # a zombie is gone too (its parent, now init, reaps it)
            with open(f"/proc/{child}/stat") as fh:
                return fh.read().split(") ")[1].startswith("Z")

        wait_for(gone, 20, what="the orphaned child to end")
    finally:
        if parent.poll() is None:
            parent.kill()
