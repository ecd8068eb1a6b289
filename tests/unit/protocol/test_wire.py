"""The v1 batch wire format: round trip, validation, bytes per reading."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from saltext.tributary.protocol.wire import (
    MAX_ROWS,
    SpooledReading,
    WireError,
    bytes_per_reading,
    decode_batch,
    encode_batch,
    packed_size,
)

T0 = 1_790_000_000_000


def rows(n: int, first: int = 1, keys=("t1/temperature", "h1/humidity"), step_ms: int = 1000):
    rng = random.Random(7)
    return [
        SpooledReading(
            first + i, keys[i % len(keys)], "C", T0 + i * step_ms, round(rng.uniform(-20, 40), 2)
        )
        for i in range(n)
    ]


def test_round_trip_keeps_every_field():
    src = rows(50, first=101)
    batch = encode_batch("ep1", src, site="brisbane", dropped=3)
    # The event travels as msgpack inside Salt: decode what msgpack gives back.
    wire = msgpack.unpackb(msgpack.packb(batch, use_bin_type=True), raw=False)
    out = decode_batch(wire)
    assert (out.epoch, out.first, out.last, out.site, out.dropped) == (
        "ep1",
        101,
        150,
        "brisbane",
        3,
    )
    assert out.rejected == []
    got = [
        (r["seq"], f"{r['sensor']}/{r['metric']}", r["unit"], r["ts_ms"], r["value"])
        for r in out.readings
    ]
    assert got == [(r.seq, r.key, r.unit, r.ts_ms, r.value) for r in src]


def test_values_that_need_full_precision_stay_floats():
    src = [
        SpooledReading(1, "a/x", "", T0, 1 / 3),
        SpooledReading(2, "a/x", "", T0, 2.5),
        SpooledReading(3, "b/y", "", T0, -0.0),
        SpooledReading(4, "b/y", "", T0, 1e-9),
    ]
    batch = encode_batch("e", src)
    assert batch["d"][0] is None  # 1/3 has no short decimal form
    out = decode_batch(batch)
    assert [r["value"] for r in out.readings] == [1 / 3, 2.5, 0.0, 1e-9]


def test_contiguity_is_required():
    with pytest.raises(ValueError):
        encode_batch(
            "e", [SpooledReading(1, "a/x", "", T0, 1.0), SpooledReading(3, "a/x", "", T0, 2.0)]
        )


def test_raw_batches_are_small_on_the_wire():
    # 2 decimals, one reading per second per sensor, 8 sensors: a typical gateway batch
    keys = tuple(f"s{i}/temperature" for i in range(8))
    batch = encode_batch("0123456789ab", rows(2000, keys=keys, step_ms=125))
    per = bytes_per_reading([batch])
    assert per <= 12, per
    assert packed_size(batch) == len(msgpack.packb(batch, use_bin_type=True))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.update(v=2), "bad_version"),
        (lambda b: b.pop("epoch"), "missing_field"),
        (lambda b: b.update(epoch=""), "bad_field"),
        (lambda b: b.update(first="1"), "bad_field"),
        (lambda b: b.update(last=b["last"] + 1), "bad_range"),
        (
            lambda b: b.update(r=[[0, 0, 1]] * (MAX_ROWS + 1), last=b["first"] + MAX_ROWS),
            "oversized",
        ),
        (lambda b: b.update(t0="x"), "bad_field"),
        (lambda b: b.update(units=["C"]), "bad_field"),
    ],
)
def test_structural_faults_are_rejected_with_a_reason(mutate, reason):
    batch = encode_batch("e", rows(4))
    mutate(batch)
    with pytest.raises(WireError) as exc:
        decode_batch(batch)
    assert exc.value.reason == reason


def test_not_a_mapping():
    with pytest.raises(WireError) as exc:
        decode_batch(["v", 1])  # type: ignore[arg-type]
    assert exc.value.reason == "not_a_batch"


def test_bad_rows_are_set_aside_and_the_rest_kept():
    batch = encode_batch("e", rows(6))
    batch["r"][1] = [0, 0, "hot"]
    batch["r"][2] = [9, 0, 1]
    batch["r"][3] = [0, 10**15, 1]
    batch["r"][4] = "junk"
    out = decode_batch(batch)
    assert [r["seq"] for r in out.readings] == [1, 6]
    assert [(r["seq"], r["reason"]) for r in out.rejected] == [
        (2, "not_numeric"),
        (3, "bad_row"),
        (4, "bad_timestamp"),
        (5, "bad_row"),
    ]


def test_non_finite_row_value_is_rejected():
    batch = encode_batch("e", rows(2))
    batch["d"] = [None, None]
    batch["r"][0][2] = math.inf
    out = decode_batch(batch)
    assert [r["reason"] for r in out.rejected] == ["not_finite"]


def test_a_sensors_decimals_hold_every_value_exactly_in_any_order():
    """A sensor's decimals are the fewest at which every one of its values is an exact integer
    mantissa below 2**53 (None past MAX_DECIMALS or past 2**53: floats), whatever the order of
    its values; every value decodes exactly and the batch always packs. (A sensor reporting
    1e-06 and 2.5e15 in one batch once gave a mantissa msgpack could not pack, which stopped
    the gateway's emission.)"""
    from saltext.tributary.protocol import wire

    def fits(v: float, d: int) -> bool:
        m = round(v * 10**d)
        return abs(m) < 2**53 and m / 10**d == v

    rng = random.Random(11)
    pool = [0.0, -0.0, 1.0, 20.5, 23.47, 0.1, 0.3, 1e-6, 123456.789, 1 / 3, 2.5e15, 7.125]
    for trial in range(400):
        values = [
            rng.choice(pool)
            if rng.random() < 0.5
            else round(rng.uniform(-50, 50), rng.randint(0, 7))
            for _ in range(rng.randint(1, 12))
        ]
        own = [wire._decimals(v) for v in values]
        expected = None
        if None not in own:
            lo = max(d for d in own if d is not None)
            expected = next((d for d in range(lo, 7) if all(fits(v, d) for v in values)), None)
        for order in (values, values[::-1]):
            batch = encode_batch(
                "ep", [SpooledReading(1 + i, "s/m", "", T0 + i, v) for i, v in enumerate(order)]
            )
            assert batch["d"][0] == expected, (trial, order)
            packed_size(batch)  # packs
            assert [r["value"] for r in decode_batch(batch).readings] == order


def test_an_aggregate_of_a_sensor_with_a_wide_range_still_packs():
    """Aggregates carry one decimal more than the readings: a sensor with 0.001 and 1e15 in
    one window keeps floats instead of a mantissa past 2**53 (which msgpack cannot pack)."""
    from saltext.tributary.protocol.wire import encode_agg_batch

    rows_ = [
        SpooledReading(1, "s/m", "", T0, 0.001),
        SpooledReading(2, "s/m", "", T0 + 1, 1e15),
        SpooledReading(3, "t/m", "", T0 + 2, 20.5),
    ]
    batch = encode_agg_batch("ep", rows_, 60)
    assert batch["d"] == [None, 2]
    packed_size(batch)
    assert decode_batch(batch).readings


def test_packed_rows_decode_as_the_rows_do():
    from saltext.tributary.protocol.wire import pack_rows, row_count

    for n in (1, 15, 16, 4000):
        batch = encode_batch("ep1", rows(n, first=11), site="brisbane")
        packed = pack_rows(batch)
        assert "r" not in packed and isinstance(packed["rb"], bytes)
        assert row_count(packed) == row_count(batch) == n
        assert decode_batch(packed) == decode_batch(batch)
        # the rows cost what they cost as a list on the wire, give or take the prefix
        assert abs(packed_size(packed) - packed_size(batch)) <= 8


def test_row_count_reads_every_msgpack_array_header():
    from saltext.tributary.protocol.wire import PACKED_PREFIX, row_count

    for n in (0, 15, 16, 65_535, 65_536):
        blob = PACKED_PREFIX + msgpack.packb([[0, 0, 1]] * n)
        assert row_count({"rb": blob}) == n
    assert row_count({"rb": PACKED_PREFIX + b"\xc0"}) == 0  # not an array
    assert row_count({"rb": "text"}) == row_count(None) == row_count({}) == 0


def test_packed_rows_stay_bytes_through_salts_transport():
    """Salt's transport turns every bytes value that decodes as UTF-8 into text and walks every
    list on each hop; the prefix (0xFF, never in UTF-8) keeps the blob one bytes value."""
    import salt.payload

    from saltext.tributary.protocol.wire import pack_rows

    batch = encode_batch("ep1", rows(100), site="brisbane")
    packed = pack_rows(batch)
    for pack in (
        lambda d: salt.payload.dumps(d),
        lambda d: salt.payload.dumps(d, use_bin_type=True),
    ):
        wire = salt.payload.loads(pack({"data": packed}))["data"]
        assert wire["rb"] == packed["rb"]
        assert decode_batch(wire) == decode_batch(batch)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (lambda b: b.__setitem__("rb", b["rb"][2:]), "not packed rows"),
        (lambda b: b.__setitem__("rb", "text"), "not packed rows"),
        (lambda b: b.__setitem__("rb", b"\xff\x01" + b"\xc1"), "do not decode"),
        (lambda b: b.__setitem__("rb", b["rb"][:-3]), "do not decode"),
        (lambda b: b.__setitem__("rb", b"\xff\x01" + msgpack.packb({"a": 1})), "not a list"),
        (lambda b: b.__setitem__("r", [[0, 0, 1]]), "both"),
    ],
)
def test_bad_packed_rows_are_refused_with_a_reason(change, detail):
    from saltext.tributary.protocol.wire import pack_rows

    packed = pack_rows(encode_batch("ep1", rows(20), site="brisbane"))
    change(packed)
    with pytest.raises(WireError) as exc:
        decode_batch(packed)
    assert exc.value.reason == "bad_field" and detail in exc.value.detail


def test_too_many_packed_rows_are_refused_from_the_header():
    """An array header claiming more than MAX_ROWS rows is refused before anything is
    unpacked (here the header claims 2**32 - 1 rows that are not even there)."""
    from saltext.tributary.protocol.wire import PACKED_PREFIX, pack_rows

    packed = pack_rows(encode_batch("ep1", rows(20), site="brisbane"))
    packed["rb"] = PACKED_PREFIX + b"\xdd\xff\xff\xff\xff"
    with pytest.raises(WireError) as exc:
        decode_batch(packed)
    assert exc.value.reason == "oversized" and str(2**32 - 1) in exc.value.detail


def test_a_packed_bad_row_is_set_aside_alone():
    from saltext.tributary.protocol.wire import pack_rows

    batch = encode_batch("ep1", rows(5), site="brisbane")
    batch["r"][2][2] = "hot"
    out = decode_batch(pack_rows(batch))
    assert [r["seq"] for r in out.readings] == [1, 2, 4, 5]
    assert [(r["seq"], r["reason"]) for r in out.rejected] == [(3, "not_numeric")]


def test_inlined_rows_decode_as_the_checked_rows_do():
    """decode_batch takes an inlined path for the usual row (a list); rows given as tuples take
    only the checked one. Random rows, good and bad of every kind, decode the same both ways."""
    rng = random.Random(11)
    t0 = T0
    values = [0, 1, -7, 2**53 - 1, 2**53, -(2**53), 2**60, 1.5, -0.0, math.inf, math.nan]
    values += [1e308, True, None, "3", [1]]
    offsets = [0, 5, -5, 2**53, -(2**53), 1.0, True, "1", 4_200_000_000_000, -t0]
    for _ in range(30):
        rows = []
        for _ in range(200):
            idx = rng.choice([0, 1, 2, 3, -1, 4, True, 1.0, "0"])
            rows.append([idx, rng.choice(offsets), rng.choice(values)])
            if rng.random() < 0.05:
                rows[-1] = rng.choice([[0, 0], [0, 0, 1, 2], "row", None])
        batch = {
            "v": 1,
            "epoch": "e1",
            "first": 1,
            "last": len(rows),
            "sensors": ["a/t", "b/h", "@command", "bad"],
            "units": ["C", "", "", ""],
            "d": [2, None, None, None],
            "t0": t0,
            "r": rows,
        }
        inlined = decode_batch(batch)
        checked = decode_batch(
            {**batch, "r": [tuple(r) if isinstance(r, list) else r for r in rows]}
        )
        assert inlined.readings == checked.readings
        assert [(r["seq"], r["reason"], r["detail"]) for r in inlined.rejected] == [
            (r["seq"], r["reason"], r["detail"]) for r in checked.rejected
        ]
        assert inlined.records == checked.records
        assert inlined.readings and inlined.rejected  # both kinds occur in every batch
