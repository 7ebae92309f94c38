"""document_query: every filter operator on the portable language, sort order across kinds with
the id tiebreak, keyset pagination, FindOne, Count, Aggregate, malformed filters."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prism.interfaces.document.v1 import document_query_pb2 as pb
from prism.interfaces.document.v1.document_query_pb2_grpc import DocumentQueryServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.document_basic import insert, insert_all, remove

if TYPE_CHECKING:
    from prism.interfaces.document.v1.document_query_pb2_grpc import (
        DocumentQueryServiceAsyncStub,
    )

REQUIRES = ("document_basic",)

# Ids sort d1 < d2 < ... so the id tiebreak is visible.
FIXTURE: dict[str, dict[str, Any]] = {
    "d1": {"name": "apple", "price": 1, "tags": ["red", "fruit"], "stock": {"n": 5}, "flag": True},
    "d2": {"name": "banana", "price": 2.5, "tags": ["yellow", "fruit"], "flag": False},
    "d3": {"name": "cherry", "price": 10, "tags": ["red"], "note": None},
    "d4": {"name": "Date", "price": "10", "tags": []},
    "d5": {"name": "elder", "price": 1.0, "flag": True, "stock": {"n": 0}},
    "d6": {"name": "fig", "tags": [["red"]]},
}

ALL = ["d1", "d2", "d3", "d4", "d5", "d6"]

# filter → ids it must match (the contract's semantics, one line per rule).
FILTERS: list[tuple[Any, list[str]]] = [
    ({}, ALL),
    ({"name": "apple"}, ["d1"]),
    ({"name": "date"}, []),  # strings compare exactly, case-sensitive
    ({"price": 1}, ["d1", "d5"]),  # 1 equals 1.0
    ({"price": 10}, ["d3"]),  # "10" is a string, never equal to 10
    ({"price": "10"}, ["d4"]),
    ({"flag": True}, ["d1", "d5"]),
    ({"flag": 1}, []),  # true does not equal 1
    ({"tags": "red"}, ["d1", "d3"]),  # array contains; nested arrays are not flattened
    ({"price": {"$eq": 2.5}}, ["d2"]),
    ({"price": {"$ne": 1}}, ["d2", "d3", "d4", "d6"]),  # missing matches $ne
    ({"tags": {"$ne": "red"}}, ["d2", "d4", "d5", "d6"]),
    ({"note": None}, ALL),  # null matches null and missing
    ({"note": {"$ne": None}}, []),
    ({"note": {"$exists": True}}, ["d3"]),  # present, null included
    ({"note": {"$exists": False}}, ["d1", "d2", "d4", "d5", "d6"]),
    ({"price": {"$gt": 1, "$lte": 10}}, ["d2", "d3"]),  # the string "10" never compares to numbers
    ({"price": {"$gte": "1"}}, ["d4"]),
    ({"price": {"$lt": 2}}, ["d1", "d5"]),
    ({"name": {"$gte": "b", "$lt": "d"}}, ["d2", "d3"]),  # code point order: "Date" < "b"
    ({"tags": {"$gt": "x"}}, ["d2"]),  # some element compares
    ({"tags": {"$in": ["yellow", "red"]}}, ["d1", "d2", "d3"]),
    ({"price": {"$in": [1, "10"]}}, ["d1", "d4", "d5"]),
    ({"tags": {"$in": []}}, []),
    ({"tags": {"$nin": ["red"]}}, ["d2", "d4", "d5", "d6"]),
    ({"tags": {"$all": ["red", "fruit"]}}, ["d1"]),
    ({"tags": {"$all": ["red"]}}, ["d1", "d3"]),
    ({"tags": {"$all": []}}, []),
    ({"stock.n": {"$gte": 0}}, ["d1", "d5"]),
    ({"stock.n": 0}, ["d5"]),
    ({"stock.m": {"$exists": True}}, []),
    ({"tags.0": "red"}, []),  # numeric names do not index arrays
    ({"name.first": {"$exists": True}}, []),  # through a non-object: missing
    ({"$or": [{"name": "apple"}, {"price": {"$gt": 5}}]}, ["d1", "d3"]),
    ({"$and": [{"flag": True}, {"stock.n": {"$gt": 0}}]}, ["d1"]),
    ({"$not": {"tags": "red"}}, ["d2", "d4", "d5", "d6"]),
    ({"$not": {"$or": [{"flag": True}, {"flag": False}]}}, ["d3", "d4", "d6"]),
    ({"flag": True, "stock.n": 0}, ["d5"]),  # members AND together
]

MALFORMED = [
    "not json",
    "[1]",
    '"text"',
    '{"price": {"$foo": 1}}',
    '{"$and": []}',
    '{"$or": {"a": 1}}',
    '{"$nope": [{"a": 1}]}',
    '{"price": {"$in": 5}}',
    '{"price": {"$exists": "yes"}}',
    '{"price": {"$gt": true}}',
    '{"price": {"$eq": [1]}}',
    '{"price": {"$eq": {"a": 1}}}',
    '{"price": {"$eq": 1, "plain": 2}}',
    '{"": 1}',
    '{"a..b": 1}',
    '{"a.$b": 1}',
]


def stub(t: Target) -> DocumentQueryServiceAsyncStub:
    return DocumentQueryServiceStub(t.channel)


def sort(*fields: str) -> list[pb.SortField]:
    """`"-price"` is price descending."""
    return [pb.SortField(field=f.lstrip("-"), descending=f.startswith("-")) for f in fields]


async def find_page(
    t: Target,
    coll: str,
    flt: Any = "",
    order: list[pb.SortField] | None = None,
    page_size: int = 0,
    token: str = "",
) -> pb.FindResponse:
    text = flt if isinstance(flt, str) else json.dumps(flt)
    response: pb.FindResponse = await stub(t).Find(
        pb.FindRequest(
            collection=coll, filter=text, sort=order or [], page_size=page_size, page_token=token
        )
    )
    return response


async def find_ids(
    t: Target, coll: str, flt: Any = "", order: list[pb.SortField] | None = None, page_size: int = 0
) -> list[str]:
    """Every matching id, following page tokens."""
    ids: list[str] = []
    token = ""
    while True:
        page = await find_page(t, coll, flt, order, page_size, token)
        ids.extend(d.id for d in page.documents)
        token = page.next_page_token
        if not token:
            return ids


@case("document_query", requires=REQUIRES)
async def filter_operators(t: Target) -> None:
    """Each operator of the filter language selects exactly the documents the contract says."""
    coll = t.name("ops")
    await insert_all(t, coll, FIXTURE)
    wrong = []
    for flt, expected in FILTERS:
        got = await find_ids(t, coll, flt)
        if got != expected:
            wrong.append(f"{json.dumps(flt)} → {got}, expected {expected}")
        counted: pb.CountResponse = await stub(t).Count(
            pb.CountRequest(collection=coll, filter=json.dumps(flt))
        )
        if counted.count != len(expected):
            wrong.append(f"Count {json.dumps(flt)} = {counted.count}, expected {len(expected)}")
    equal(wrong, [], "filters with wrong results")
    equal(await find_ids(t, coll, ""), ALL, "Find with an empty filter string")
    equal(await find_ids(t, t.name("never"), {}), [], "Find on a never-written collection")


@case("document_query", requires=REQUIRES)
async def sort_order(t: Target) -> None:
    """Sorting orders missing/null < numbers < strings < booleans < objects/arrays, descending
    reverses a field, and ties break by id ascending."""
    coll = t.name("sort")
    await insert_all(t, coll, FIXTURE)
    equal(
        await find_ids(t, coll, {}, sort("price")),
        ["d6", "d1", "d5", "d2", "d3", "d4"],
        "sort by price (missing, 1 = 1.0 tied by id, 2.5, 10, then the string)",
    )
    equal(
        await find_ids(t, coll, {}, sort("-price")),
        ["d4", "d3", "d2", "d1", "d5", "d6"],
        "sort by price descending (ties still by id ascending, missing last)",
    )
    equal(
        await find_ids(t, coll, {}, sort("flag")),
        ["d3", "d4", "d6", "d2", "d1", "d5"],
        "sort by flag (missing < false < true)",
    )
    equal(
        await find_ids(t, coll, {}, sort("flag", "-name")),
        ["d6", "d3", "d4", "d2", "d5", "d1"],
        "sort by flag then name descending",
    )
    equal(
        await find_ids(t, coll, {}, sort("tags")),
        ["d5", "d1", "d2", "d3", "d4", "d6"],
        "sort by tags (missing first; every array equal, tied by id)",
    )
    equal(
        await find_ids(t, coll, {"flag": True}, sort("-stock.n")),
        ["d1", "d5"],
        "filtered sort by a nested path",
    )


@case("document_query", requires=REQUIRES)
async def find_one_and_count(t: Target) -> None:
    """FindOne returns the first match in sort order, found=false for none; Count counts."""
    coll = t.name("one")
    await insert_all(t, coll, FIXTURE)
    first: pb.FindOneResponse = await stub(t).FindOne(
        pb.FindOneRequest(collection=coll, filter='{"tags": "red"}', sort=sort("-name"))
    )
    equal((first.found, first.document.id), (True, "d3"), "FindOne by name descending")
    equal(json.loads(first.document.json), FIXTURE["d3"], "FindOne body")
    none: pb.FindOneResponse = await stub(t).FindOne(
        pb.FindOneRequest(collection=coll, filter='{"name": "zzz"}')
    )
    equal(none.found, False, "FindOne with no match: found")
    total: pb.CountResponse = await stub(t).Count(pb.CountRequest(collection=coll))
    equal(total.count, 6, "Count with an empty filter")


@case("document_query", requires=REQUIRES)
async def keyset_pagination(t: Target) -> None:
    """Pages of a sorted Find survive inserts and deletes between pages: nothing that was
    present throughout is skipped or repeated; page_size rules and token binding hold."""
    coll = t.name("page")
    stable = {f"s{i:02d}": {"rank": i % 7, "kind": "stable"} for i in range(25)}
    doomed = {f"x{i:02d}": {"rank": i % 7, "kind": "doomed"} for i in range(6)}
    await insert_all(t, coll, {**stable, **doomed})
    order = sort("rank")
    seen: list[str] = []
    token = ""
    round_ = 0
    while True:
        page = await find_page(t, coll, {}, order, page_size=4, token=token)
        check(len(page.documents) <= 4, f"{len(page.documents)} documents with page_size=4")
        seen.extend(d.id for d in page.documents)
        token = page.next_page_token
        if not token:
            break
        round_ += 1
        check(round_ < 100, "pagination did not terminate")
        await insert(t, coll, f"n{round_:02d}", {"rank": round_ % 7, "kind": "new"})
        gone = next((d for d in doomed if d not in seen), None)
        if gone:
            await remove(t, coll, gone)
            doomed.pop(gone)
    equal(sorted({i for i in seen if seen.count(i) > 1}), [], "documents returned twice")
    equal([i for i in stable if i not in seen], [], "stable documents never returned")
    first = await find_page(t, coll, {}, page_size=0)
    check(len(first.documents) == min(100, await count(t, coll)), "page_size 0 means 100")
    await expect_invalid(
        stub(t).Find(pb.FindRequest(collection=coll, page_size=-1)), "page_size", "page_size -1"
    )
    two = await find_page(t, coll, {"kind": "stable"}, order, page_size=2)
    check(two.next_page_token, "no next_page_token with more documents left")
    for other, label in (
        (pb.FindRequest(collection=coll, filter='{"kind": "new"}', sort=order), "another filter"),
        (
            pb.FindRequest(collection=coll, filter='{"kind": "stable"}', sort=sort("-rank")),
            "another sort",
        ),
        (
            pb.FindRequest(collection=t.name("elsewhere"), filter='{"kind": "stable"}', sort=order),
            "another collection",
        ),
    ):
        other.page_token = two.next_page_token
        await expect_invalid(stub(t).Find(other), "page_token", f"page token reused with {label}")
    await expect_invalid(
        stub(t).Find(pb.FindRequest(collection=coll, page_token="garbage!")),
        "page_token",
        "Find with a garbage page token",
    )


async def count(t: Target, coll: str, flt: str = "") -> int:
    response: pb.CountResponse = await stub(t).Count(pb.CountRequest(collection=coll, filter=flt))
    return response.count


@case("document_query", requires=REQUIRES)
async def aggregate_groups(t: Target) -> None:
    """Aggregate groups by a field (unwinding arrays when asked), orders groups by count
    descending then key, and computes the accumulators."""
    coll = t.name("agg")
    await insert_all(t, coll, FIXTURE)
    by_tag: pb.AggregateResponse = await stub(t).Aggregate(
        pb.AggregateRequest(collection=coll, group_by="tags", unwind=True)
    )
    equal(
        [(json.loads(g.key_json), g.count) for g in by_tag.groups],
        [("fruit", 2), ("red", 2), (None, 1), ("yellow", 1)],
        "groups of unwound tags (count desc, then key with null first; [] and nested arrays"
        " contribute none, a missing value is the null group)",
    )
    ops = [
        pb.Accumulator(op=pb.ACCUMULATOR_OP_SUM, field="price"),
        pb.Accumulator(op=pb.ACCUMULATOR_OP_COUNT, field="stock"),
        pb.Accumulator(op=pb.ACCUMULATOR_OP_MIN, field="name"),
        pb.Accumulator(op=pb.ACCUMULATOR_OP_MAX, field="price"),
    ]
    by_flag: pb.AggregateResponse = await stub(t).Aggregate(
        pb.AggregateRequest(collection=coll, group_by="flag", accumulators=ops)
    )
    got = [
        (json.loads(g.key_json), g.count, [json.loads(v) for v in g.values_json])
        for g in by_flag.groups
    ]
    equal(
        got,
        [
            (None, 3, [10, 0, "Date", "10"]),
            (True, 2, [2, 2, "apple", 1]),
            (False, 1, [2.5, 0, "banana", 2.5]),
        ],
        "groups by flag (key, count, [sum price, count stock, min name, max price])",
    )
    whole: pb.AggregateResponse = await stub(t).Aggregate(
        pb.AggregateRequest(
            collection=coll,
            filter='{"name": "none"}',
            accumulators=[pb.Accumulator(op=pb.ACCUMULATOR_OP_AVG, field="price")],
        )
    )
    equal(
        [(g.key_json, g.count, list(g.values_json)) for g in whole.groups],
        [("null", 0, ["null"])],
        "ungrouped Aggregate over no documents (one group, key null, AVG null)",
    )
    await expect_invalid(
        stub(t).Aggregate(pb.AggregateRequest(collection=coll, unwind=True)),
        "unwind",
        "Aggregate with unwind but no group_by",
    )


@case("document_query", requires=REQUIRES)
async def malformed_filters(t: Target) -> None:
    """Every malformed filter is INVALID_ARGUMENT naming "filter", on Find, FindOne and Count;
    a malformed sort path names sort[i].field."""
    coll = t.name("bad")
    await insert(t, coll, "a", {"price": 1})
    for text in MALFORMED:
        await expect_invalid(
            stub(t).Find(pb.FindRequest(collection=coll, filter=text)),
            "filter",
            f"Find with filter {text!r}",
        )
        await expect_invalid(
            stub(t).FindOne(pb.FindOneRequest(collection=coll, filter=text)),
            "filter",
            f"FindOne with filter {text!r}",
        )
        await expect_invalid(
            stub(t).Count(pb.CountRequest(collection=coll, filter=text)),
            "filter",
            f"Count with filter {text!r}",
        )
    deep = '{"$not": ' * 40 + "{}" + "}" * 40
    await expect_invalid(
        stub(t).Find(pb.FindRequest(collection=coll, filter=deep)),
        "filter",
        "Find with a filter nested 40 levels",
    )
    await expect_invalid(
        stub(t).Find(pb.FindRequest(collection=coll, sort=sort("price", "$bad"))),
        "sort[1].field",
        "Find sorted by '$bad'",
    )
    await expect_invalid(
        stub(t).Find(pb.FindRequest(collection="Bad Name")), "collection", "Find in 'Bad Name'"
    )
