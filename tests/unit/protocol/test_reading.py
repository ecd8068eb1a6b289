"""The reading model and the document id scheme."""

from __future__ import annotations

import pytest

from saltext.tributary.protocol.reading import RejectedReading, doc_id, make_reading, parse_doc_id

TS = 1_790_000_000_000


def test_make_reading_coerces_ints_and_keeps_metadata():
    r = make_reading("boiler-1", "temperature", 65, TS, unit="C")
    assert (r.sensor, r.metric, r.value, r.ts_ms, r.unit, r.key) == (
        "boiler-1",
        "temperature",
        65.0,
        TS,
        "C",
        "boiler-1/temperature",
    )
    assert isinstance(r.value, float)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("s", "m", "12", TS), "not_numeric"),
        (("s", "m", True, TS), "not_numeric"),
        (("s", "m", None, TS), "not_numeric"),
        (("s", "m", float("nan"), TS), "not_finite"),
        (("s", "m", float("-inf"), TS), "not_finite"),
        (("s", "m", 1.0, TS // 1000), "bad_timestamp"),  # seconds, not milliseconds
        (("s", "m", 1.0, float(TS)), "bad_timestamp"),
        (("s", "m", 1.0, 10**14), "bad_timestamp"),
        (("", "m", 1.0, TS), "bad_sensor"),
        (("a/b", "m", 1.0, TS), "bad_sensor"),
        (("s", "m e", 1.0, TS), "bad_metric"),
        (("s" * 129, "m", 1.0, TS), "bad_sensor"),
        (("s\n", "m", 1.0, TS), "bad_sensor"),  # "$" alone would let a trailing newline in
        (("s", "m\n", 1.0, TS), "bad_metric"),
    ],
)
def test_bad_readings_name_their_reason(args, reason):
    make_reading("s", "m", 1.0, TS)  # good names are remembered; a bad one never passes
    for _ in range(2):
        with pytest.raises(RejectedReading) as exc:
            make_reading(*args)
        assert exc.value.reason == reason


def test_doc_id_round_trip_with_colons_in_the_gateway_id():
    did = doc_id("site:gw-1", "0a1b2c3d4e5f", 42)
    assert did == "site:gw-1:0a1b2c3d4e5f:42"
    assert parse_doc_id(did) == ("site:gw-1", "0a1b2c3d4e5f", 42)


def test_doc_ids_are_unique_per_gateway_epoch_seq():
    ids = {doc_id(g, e, s) for g in ("gw-1", "gw-2") for e in ("e1", "e2") for s in range(100)}
    assert len(ids) == 400


def test_an_epoch_with_a_colon_is_refused_so_ids_stay_unambiguous():
    """``site1`` + epoch ``gw2:ab12`` and ``site1:gw2`` + ``ab12`` would give one id: an epoch
    may hold no ``:``, so only the second is a valid pair and ids parse back to one pair."""
    from saltext.tributary.protocol.wire import (
        SpooledReading,
        WireError,
        decode_batch,
        encode_batch,
    )

    assert doc_id("site1", "gw2:ab12", 1) == doc_id("site1:gw2", "ab12", 1)  # the trap
    rows = [SpooledReading(1, "t/temperature", "C", 1_700_000_000_000, 20.0)]
    with pytest.raises(WireError) as exc:
        decode_batch(encode_batch("gw2:ab12", rows))
    assert exc.value.reason == "bad_field"
    assert decode_batch(encode_batch("ab12", rows)).epoch == "ab12"
    assert parse_doc_id(doc_id("site1:gw2", "ab12", 1)) == ("site1:gw2", "ab12", 1)
