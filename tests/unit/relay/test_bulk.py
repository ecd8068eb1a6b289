"""Reading a bulk answer, without Elasticsearch: what each item status means for its batch."""

from __future__ import annotations

import pytest

from saltext.tributary.relay.bulk import classify_bulk_response
from saltext.tributary.relay.documents import BulkPlan, RowPlan

READING = ("gw-a", "brisbane", "ep", 0, {"seq": 1})


def plan(owners: list[int], originals: list | None = None) -> BulkPlan:
    originals = originals or [READING] * len(owners)
    p = BulkPlan(rows={o: RowPlan() for o in owners})
    for row, original in zip(owners, originals, strict=True):
        p.add(row, "{}", "{}", original)
    return p


def item(status: int, index: str = "tributary-readings-2026.11.30", error=None) -> dict:
    res = {"_index": index, "status": status}
    if error is not None:
        res["error"] = error
    return {"create": res}


def test_created_documents_are_counted_per_gateway():
    out = classify_bulk_response(
        [item(201), item(201), item(201, "tributary-health-2026.11.30")],
        plan([1, 1, 2], [READING, {"gateway": "gw-b"}, {"gateway": "gw-a"}]),
        "tributary",
    )
    assert out.counts == {
        "indexed": 2,
        ("indexed", "gw-a"): 1,
        ("indexed", "gw-b"): 1,
        "health_indexed": 1,
    }
    assert not out.retry_rows and not out.rejected


def test_409_is_already_present_and_done():
    out = classify_bulk_response([item(409), item(201)], plan([1, 1]), "tributary")
    assert out.counts["already_present"] == 1 and out.counts["indexed"] == 1
    assert not out.retry_rows and not out.rejected


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_send_the_row_back_for_a_retry(status):
    out = classify_bulk_response([item(201), item(status)], plan([1, 2]), "tributary")
    assert out.retry_rows == {2} and out.counts["retried_docs"] == 1 and not out.rejected


@pytest.mark.parametrize(
    ("error", "reason", "detail"),
    [
        (
            {"type": "document_parsing_exception", "reason": "bad unit"},
            "document_parsing_exception",
            "bad unit",
        ),
        ({}, "status_400", ""),
        ("plain text", "plain text", ""),
    ],
)
def test_other_4xx_are_dead_lettered_with_their_reason(error, reason, detail):
    out = classify_bulk_response([item(400, error=error)], plan([7]), "tributary")
    assert [(r.op, r.reason, r.detail) for r in out.rejected] == [(0, reason, detail)]
    assert not out.retry_rows


def test_a_refused_dead_letter_is_counted_not_dead_lettered_again():
    out = classify_bulk_response(
        [item(400, "tributary-deadletter-2026.11.30", {"type": "x"})], plan([1]), "tributary"
    )
    assert out.counts["deadletter_failed"] == 1 and not out.rejected


def test_a_mixed_answer_sorts_every_item():
    out = classify_bulk_response(
        [item(201), item(409), item(429), item(400, error={"type": "mapper_parsing_exception"})],
        plan([1, 1, 2, 3]),
        "tributary",
    )
    assert out.counts["indexed"] == 1 and out.counts["already_present"] == 1
    assert out.retry_rows == {2}
    assert [(r.op, r.reason) for r in out.rejected] == [(3, "mapper_parsing_exception")]


def test_an_answer_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="2 items for 3 ops"):
        classify_bulk_response([item(201), item(201)], plan([1, 1, 1]), "tributary")


@pytest.mark.parametrize(("start", "stop"), [(0, None), (1, 4), (2, 5)])
def test_an_answer_without_errors_counts_as_item_by_item(start, stop):
    """``errors: false`` (every item created) counts readings per gateway from the plan: the
    same counts as reading each item, also for a split bulk's part and for non-reading ops."""
    originals = [
        READING,
        ("gw-b", "sydney", "ep", 0, {"seq": 2}),
        {"gateway": "gw-a"},  # a heartbeat document
        READING,
        {"gateway": "gw-c", "reason": "x"},  # a dead letter
    ]
    indices = [
        "tributary-readings-2026.11.30",
        "tributary-readings-2026.11.30",
        "tributary-health-2026.11.30",
        "tributary-readings-2026.11.30",
        "tributary-deadletter-2026.11.30",
    ]
    p = plan([1, 1, 2, 2, 3], originals)
    end = len(originals) if stop is None else stop
    items = [item(201, indices[n]) for n in range(start, end)]
    fast = classify_bulk_response(items, p, "tributary", start, stop, errors=False)
    slow = classify_bulk_response(items, p, "tributary", start, stop)
    assert fast.counts == slow.counts and fast.counts["indexed"] >= 1
    assert not fast.retry_rows and not fast.rejected and not fast.present_ops


def test_an_answer_without_errors_must_still_have_one_item_per_op():
    with pytest.raises(ValueError, match="2 items for 3 ops"):
        classify_bulk_response([item(201)] * 2, plan([1, 1, 1]), "tributary", errors=False)


def test_answers_without_the_index_are_read_from_the_action_lines():
    """The relay asks for items without ``_index`` (BULK_FILTER): each operation's index is
    then the one its action line names, and every status is sorted as with the index."""
    import json

    from saltext.tributary.relay.shipper import BULK_FILTER

    assert "_index" not in BULK_FILTER and "errors" in BULK_FILTER
    ops = [
        (READING, "tributary-readings-2026.11.30", 201, None),
        ({"gateway": "gw-a"}, "tributary-health-2026.11.30", 201, None),
        ({"gateway": "gw-a", "cmd": 1}, "tributary-commands-2026.11.30", 201, None),
        (READING, "tributary-readings-2026.11.30", 409, {"type": "version_conflict"}),
        (READING, "tributary-readings-2026.11.30", 429, {"type": "es_rejected"}),
        ({"reason": "x"}, "tributary-deadletter-2026.11.30", 400, {"type": "mapper"}),
        (READING, "tributary-readings-2026.11.30", 400, {"type": "mapper", "reason": "bad"}),
    ]
    p = BulkPlan(rows={1: RowPlan(), 2: RowPlan()})
    for n, (original, index, _, _) in enumerate(ops):
        p.add(1 + n % 2, json.dumps({"create": {"_index": index}}), "{}", original)
    with_index = [item(status, index, error) for _, index, status, error in ops]
    without = [
        {"create": {k: v for k, v in i["create"].items() if k != "_index"}} for i in with_index
    ]
    a = classify_bulk_response(with_index, p, "tributary")
    b = classify_bulk_response(without, p, "tributary")
    assert a.counts == b.counts
    assert b.counts["indexed"] == 1 and b.counts["health_indexed"] == 1
    assert b.counts["deadletter_failed"] == 1 and b.counts["already_present"] == 1
    assert (a.retry_rows, a.retry_ops, a.present_ops) == (b.retry_rows, b.retry_ops, b.present_ops)
    assert [(r.op, r.reason) for r in b.rejected] == [(6, "mapper")]
