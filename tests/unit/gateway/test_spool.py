"""The gateway spool: crash safety (SIGKILL mid-write), retention, corruption, full disk."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from saltext.tributary.gateway.spool import GatewaySpool, SpoolError, SpoolFull
from saltext.tributary.protocol.reading import make_reading
from saltext.tributary.protocol.wire import decode_batch, packed_size

T0 = 1_700_000_000_000


def readings(n, start=0, sensor="t1"):
    return [
        make_reading(sensor, "temperature", (start + i) / 10, T0 + start + i, "C") for i in range(n)
    ]


@pytest.fixture
def spool(tmp_path):
    s = GatewaySpool(str(tmp_path / "spool.db"))
    yield s
    s.close()


def test_append_numbers_and_emits_in_order(spool):
    assert spool.append(readings(5)) == (1, 5)
    assert spool.append(readings(3, 5)) == (6, 8)
    batches = spool.next_batches()
    assert [(b["first"], b["last"]) for b in batches] == [(1, 8)]
    assert [r["value"] for r in decode_batch(batches[0]).readings] == [i / 10 for i in range(8)]
    assert spool.next_batches() == []
    st = spool.status()
    assert st["last_seq"] == 8 and st["cursor"] == 8 and st["unsent"] == 0
    assert st["counters"]["spooled"] == 8 and st["counters"]["emitted"] == 8


def test_byte_cap_splits_batches(spool):
    spool.append(readings(3000))
    batches = spool.next_batches(max_batch_bytes=2048, max_run_bytes=8192)
    assert all(len(__import__("msgpack").packb(b)) <= 2048 for b in batches)
    assert batches[0]["first"] == 1
    assert all(b2["first"] == b1["last"] + 1 for b1, b2 in itertools.pairwise(batches))


def test_a_backlog_is_read_and_encoded_about_once_per_reading(spool, monkeypatch):
    """Draining a backlog, each run reads the rows it needs in one go and sizes each batch
    from the last one's bytes per reading: about one row read and one encoded per reading
    emitted (it was 3.5 and 4.5), full batches, and no crumbs after the run's last batch."""
    import saltext.tributary.gateway.spool as spool_mod

    work = {"read": 0, "encoded": 0}
    rows, encode = GatewaySpool._rows, spool_mod.encode_batch

    def counted_rows(self, lo, hi, limit):
        out = rows(self, lo, hi, limit)
        work["read"] += len(out)
        return out

    def counted_encode(epoch, batch_rows, **kw):
        work["encoded"] += len(batch_rows)
        return encode(epoch, batch_rows, **kw)

    monkeypatch.setattr(GatewaySpool, "_rows", counted_rows)
    monkeypatch.setattr(spool_mod, "encode_batch", counted_encode)
    spool.append(
        [
            make_reading("s", "t", round(20 + i % 997 / 100, 2), T0 + i // 12, "C")
            for i in range(60_000)
        ]
    )
    runs = [spool.next_batches(max_batch_bytes=32_768, max_run_bytes=98_304) for _ in range(4)]
    emitted = sum(b["last"] - b["first"] + 1 for run in runs for b in run)
    assert emitted > 50_000
    assert work["read"] < 1.15 * emitted and work["encoded"] < 1.2 * emitted
    for run in runs:
        sizes = [packed_size(b) for b in run]
        assert sum(sizes) <= 98_304 and all(s > 28_000 for s in sizes[:-1]) and len(run) <= 4


def test_a_reading_over_the_batch_cap_goes_alone_and_never_stops_emission(spool):
    big = make_reading("s" * 60, "m" * 60, 1.5, T0, "u" * 30)  # alone, over a 64-byte cap
    spool.append([*readings(2), big, *readings(2, start=10)])
    batches = spool.next_batches(max_batch_bytes=64, max_run_bytes=10_000)
    assert [(b["first"], b["last"]) for b in batches] == [(n, n) for n in range(1, 6)]
    assert spool.status()["unsent"] == 0


def test_epoch_survives_reopen(tmp_path):
    path = str(tmp_path / "s.db")
    a = GatewaySpool(path)
    a.append(readings(2))
    epoch = a.epoch
    a.close()
    b = GatewaySpool(path)
    assert b.epoch == epoch and b.append(readings(1)) == (3, 3)
    b.close()


CHILD = textwrap.dedent(
    """
    import sys
    from saltext.tributary.protocol.reading import make_reading
    from saltext.tributary.gateway.spool import GatewaySpool
    s = GatewaySpool(sys.argv[1])
    i = 0
    while True:
        batch = [make_reading("k", "v", i * 100 + j, 1_700_000_000_000, None)
                 for j in range(100)]
        first, last = s.append(batch)
        print(last, flush=True)   # committed: must survive the kill
        i += 1
    """
)


def test_sigkill_mid_write_loses_no_committed_reading(tmp_path):
    path = str(tmp_path / "crash.db")
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True
        )
        committed = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            committed = int(line)
            if committed >= (_round + 1) * 5000:
                break
        proc.send_signal(signal.SIGKILL)  # mid-write: the child is inside its append loop
        rest = proc.stdout.read()
        proc.wait()
        for line in rest.split():
            committed = max(committed, int(line))
        s = GatewaySpool(path)
        try:
            st = s.status()
            n, lo, hi = s.db.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM readings").fetchone()
            assert hi >= committed, f"committed seq {committed} lost (max held {hi})"
            assert (n, lo) == (hi, 1), "holes in the sequence"
            assert st["last_seq"] == hi  # meta and data agree
            assert st["counters"]["spooled"] == hi  # counters commit with the data
            assert hi % 100 == 0  # no half transaction
        finally:
            s.close()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_corrupt_file_moved_aside_new_epoch(tmp_path):
    path = str(tmp_path / "c.db")
    s = GatewaySpool(path)
    s.append(readings(10))
    old_epoch = s.epoch
    s.close()
    with open(path, "r+b") as fh:
        fh.seek(0)
        fh.write(b"this is not an sqlite file at all" * 200)
    cap = _Capture()
    logger = logging.getLogger("saltext.tributary.gateway.spool")
    logger.addHandler(cap)
    try:
        s2 = GatewaySpool(path)
    finally:
        logger.removeHandler(cap)
    try:
        assert s2.epoch != old_epoch
        assert s2.append(readings(1)) == (1, 1)
        aside = [f for f in os.listdir(tmp_path) if ".corrupt-" in f]
        assert aside, os.listdir(tmp_path)
        assert any("corrupt" in m and "new epoch" in m for m in cap.messages), cap.messages
    finally:
        s2.close()


def test_retention_by_bytes_counts_drops_and_reports(tmp_path):
    s = GatewaySpool(str(tmp_path / "r.db"))
    try:
        s.append(readings(5000))
        per_row = s._bytes_per_row(5000)
        s.max_bytes = int(per_row * 3000)  # room for ~3000 of the 5000 readings
        s.mark_emitted({"last": 1000}, 1000)  # the first 1000 went out
        dropped = s.trim()
        st = s.status()
        first = st["held"]["first"]
        assert st["held"]["last"] == 5000 and st["held"]["count"] == 5001 - first
        assert 2800 <= st["held"]["count"] <= 3000  # the oldest went first
        assert dropped == first - 1 - 1000 > 0  # only never-sent readings count as dropped
        assert st["dropped"] == dropped and st["counters"]["trimmed"] == first - 1
        assert st["dropped_not_yet_reported"] == dropped
        (batch, *_) = s.next_batches()
        assert batch["first"] == first and batch["dropped"] == dropped
        assert s.status()["dropped_not_yet_reported"] == 0
        while s.next_batches():
            pass
        assert s.status()["unsent"] == 0
        # everything was sent: a later trim may still free space but drops nothing unsent
        assert s.trim() == 0 and s.status()["dropped"] == dropped
    finally:
        s.close()


def test_retention_by_age_sent_readings_not_counted_as_dropped(tmp_path):
    s = GatewaySpool(str(tmp_path / "a.db"), max_age_s=60)
    try:
        s.append(readings(10))
        s.next_batches()
        added = s.db.execute("SELECT MAX(added) FROM readings").fetchone()[0]
        assert s.trim(now_ms=added + 61_000) == 0
        st = s.status()
        assert st["held"]["count"] == 0 and st["dropped"] == 0 and st["counters"]["trimmed"] == 10
    finally:
        s.close()


def test_replay_errors_say_what_is_held(spool):
    spool.append(readings(20))
    with pytest.raises(SpoolError, match=rf"holds epoch {spool.epoch}, sequences 1\.\.20"):
        spool.replay("nope", 1, 2)
    with pytest.raises(SpoolError, match=r"sequences 1\.\.20"):
        spool.replay(spool.epoch, 21, 25)
    (b,) = spool.replay(spool.epoch, 3, 7)
    assert (b["first"], b["last"]) == (3, 7)
    # partly held (the rest trimmed, or not numbered yet): the held part is replayed
    (b,) = spool.replay(spool.epoch, 15, 25)
    assert (b["first"], b["last"]) == (15, 20)


def test_aside_tail_latest_reset(spool):
    rs = readings(3)
    spool.append(rs[:2], {"rejected:implausible": 1}, [(rs[2], "implausible:above_max 9 > 1")])
    assert spool.set_aside() == [
        {
            "key": "t1/temperature",
            "ts_ms": rs[2].ts_ms,
            "value": rs[2].value,
            "reason": "implausible:above_max 9 > 1",
        }
    ]
    assert [t["seq"] for t in spool.tail(1)] == [2]
    assert spool.latest()["t1/temperature"]["seq"] == 2
    assert spool.sensor_keys() == ["t1/temperature"]
    before = spool.reset_counters()
    assert before["rejected:implausible"] == 1 and spool.counters() == {}


@pytest.fixture
def tiny_fs(tmp_path):
    """An 8 MiB tmpfs: the real kernel ENOSPC path (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    ret = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tributary-tiny", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if ret.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {ret.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_append_keeps_committed(tiny_fs):
    path = str(tiny_fs / "spool.db")
    s = GatewaySpool(path)
    s.append(readings(200))
    s.next_batches()
    # fill the filesystem
    filler = tiny_fs / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(os.urandom(4096))
        except OSError:
            pass
    committed = s.status()["last_seq"]
    with pytest.raises(SpoolFull):
        for i in range(200):  # the WAL may have some slack left: keep going until refused
            s.append(readings(500, 1000 + i * 500, sensor=f"s{uuid.uuid4().hex[:6]}"))
    last_ok = s.status()["last_seq"]
    assert last_ok >= committed
    # everything committed is still there and consistent
    n, hi = s.db.execute("SELECT COUNT(*), MAX(seq) FROM readings").fetchone()
    assert (n, hi) == (last_ok, last_ok)
    os.remove(filler)
    assert s.append(readings(1, 99_999)) == (last_ok + 1, last_ok + 1)
    s.close()
    s2 = GatewaySpool(path)
    assert s2.status()["last_seq"] == last_ok + 1
    s2.close()


def test_a_spool_restored_from_a_backup_starts_a_new_epoch(tmp_path):
    """Sequences never go backwards within an epoch: new readings of a restored spool would
    reuse ids already indexed for other readings."""
    import shutil

    path = str(tmp_path / "s.db")
    a = GatewaySpool(path)
    a.append(readings(10))
    a.next_batches()
    epoch = a.epoch
    a.close()
    shutil.copy(path, tmp_path / "backup.db")  # a nightly backup of the spool file
    a = GatewaySpool(path)
    a.append(readings(10, 10))
    a.next_batches()  # sequences 11..20 emitted
    a.close()
    shutil.copy(tmp_path / "backup.db", path)  # restored: the spool says 10
    b = GatewaySpool(path)
    try:
        assert b.epoch != epoch
        assert b.append(readings(1, 20)) == (1, 1)
        assert any(p.name.startswith("s.db.rewound-") for p in tmp_path.iterdir())
    finally:
        b.close()
    c = GatewaySpool(path)  # and reopening the new epoch is not taken for another rewind
    try:
        assert c.epoch == b.epoch
    finally:
        c.close()


def test_status_and_age_cut_read_the_sequence_not_the_whole_table(tmp_path):
    """held count is last - first + 1 and the age cut is a bisection of the sequence: both must
    agree with a full scan, across appends in several transactions and trims of the oldest."""
    s = GatewaySpool(str(tmp_path / "a.db"), max_age_s=60)
    try:
        for k in range(7):
            s.append(readings(300, start=300 * k))
            # spread the spool times: each append 10 s after the last, as a run of minutes
            s.db.execute("UPDATE readings SET added = ? WHERE seq > ?", (T0 + 10_000 * k, 300 * k))
        for cutoff in (T0 - 1, T0, T0 + 5_000, T0 + 30_000, T0 + 60_000, T0 + 10**9):
            scan = s.db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM readings WHERE added < ?", (cutoff,)
            ).fetchone()[0]
            assert s._last_added_before(cutoff) == scan, cutoff
        s.next_batches(max_run_bytes=10**6)
        s.trim(now_ms=T0 + 30_000 + 60_000)  # drops the rows added before T0 + 30 s
        count = s.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        assert count == 2100 - 900
        st = s.status()
        assert st["held"] == {"first": 901, "last": 2100, "count": count}
        assert st["oldest_age_s"] > 0
    finally:
        s.close()


def test_inflight_records_recognise_a_redelivery_until_settled(spool):
    """One in-flight record per commit: a message committed but not known acknowledged is
    recognised by (source, packet id, digest); packet ids are reused, so the newest commit
    holding an id decides; settling a commit's record forgets its messages."""
    first = spool.append_messages(
        readings(3), inflight=[("c", 1, b"d-one.."), ("c", 2, b"d-two.."), ("c", 3, b"d-3....")]
    )
    assert first.first == 1 and first.last == 3 and len(first.inflight_ids) == 1
    assert spool.committed_unacked("c", 2, b"d-two..")
    assert not spool.committed_unacked("c", 2, b"other..")  # same packet id, another message
    assert not spool.committed_unacked("other-client", 2, b"d-two..")
    assert not spool.committed_unacked("c", 9, b"d-two..")
    # packet id 2 reused by a newer commit: that one decides
    second = spool.append_messages(readings(1, start=10), inflight=[("c", 2, b"d-new..")])
    assert spool.committed_unacked("c", 2, b"d-new..")
    assert not spool.committed_unacked("c", 2, b"d-two..")
    assert spool.committed_unacked("c", 3, b"d-3....")  # still the first commit's
    # the first commit's acknowledgements settled: forgotten, in the next commit
    spool.append_messages([], acked=first.inflight_ids)
    assert not spool.committed_unacked("c", 3, b"d-3....")
    assert spool.committed_unacked("c", 2, b"d-new..")
    spool.append_messages([], acked=second.inflight_ids)
    assert not spool.committed_unacked("c", 2, b"d-new..")


def test_inflight_records_are_bounded_and_older_spools_still_answer(spool, monkeypatch):
    from saltext.tributary.gateway import spool as spool_mod

    monkeypatch.setattr(spool_mod, "INFLIGHT_KEEP", 3)
    for n in range(10):
        spool.append_messages([], inflight=[("c", 100 + n, b"digest..")])
    kept = spool.db.execute("SELECT COUNT(*) FROM inflight_flushes").fetchone()[0]
    assert kept == 3
    assert spool.committed_unacked("c", 109, b"digest..")
    assert not spool.committed_unacked("c", 100, b"digest..")
    # a record written by the per-message table of earlier releases is still honoured
    spool.db.execute("INSERT INTO inflight (src, mid, digest) VALUES ('c', 7, x'0102')")
    assert spool.committed_unacked("c", 7, b"\x01\x02")
    # packed ids are 16-bit: an odd byte offset never matches
    spool.append_messages([], inflight=[("c", 0x0102, b"aaaaaaaa"), ("c", 0x0300, b"bbbbbbbb")])
    assert not spool.committed_unacked("c", 0x0203, b"aaaaaaaa")
