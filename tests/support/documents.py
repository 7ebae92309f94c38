"""Random documents and filters, and the reference checks, for the document backends' differential
tests: every backend faces the same kinds of input and is held to plugins.runtime.docfilter."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.runtime import docfilter
from plugins.runtime.context import CallContext

SCALARS: list[Any] = [None, True, False, 0, 1, 1.0, 2.5, -3, 10**20, "", "a", "b", "1", "é", "ab"]
PATHS = ["a", "b", "n.x", "n.y"]
#: accumulator names of docfilter → request enum
OPS = {
    "count": query_pb.ACCUMULATOR_OP_COUNT,
    "sum": query_pb.ACCUMULATOR_OP_SUM,
    "min": query_pb.ACCUMULATOR_OP_MIN,
    "max": query_pb.ACCUMULATOR_OP_MAX,
    "avg": query_pb.ACCUMULATOR_OP_AVG,
}

Body = dict[str, Any]
Group = tuple[str, int, list[str]]


class Queryable(Protocol):
    """The document calls the checks make (any backend's document class)."""

    async def insert(
        self, request: basic_pb.InsertRequest, ctx: CallContext
    ) -> basic_pb.InsertResponse: ...

    async def find(
        self, request: query_pb.FindRequest, ctx: CallContext
    ) -> query_pb.FindResponse: ...

    async def count(
        self, request: query_pb.CountRequest, ctx: CallContext
    ) -> query_pb.CountResponse: ...

    async def aggregate(
        self, request: query_pb.AggregateRequest, ctx: CallContext
    ) -> query_pb.AggregateResponse: ...


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.6 or depth > 1:
        return rng.choice(SCALARS)
    if roll < 0.85:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"x": random_value(rng, depth + 1)}


def random_body(rng: random.Random) -> Body:
    body: Body = {}
    for name in ("a", "b"):
        if rng.random() < 0.8:
            body[name] = random_value(rng)
    if rng.random() < 0.7:
        body["n"] = rng.choice([{"x": random_value(rng), "y": rng.choice(SCALARS)}, [1], 3])
    return body


def random_filter(rng: random.Random, paths: Sequence[str] = PATHS, depth: int = 0) -> Body:
    roll = rng.random()
    if depth < 2 and roll < 0.2:
        combinator = rng.choice(["$and", "$or"])
        return {
            combinator: [random_filter(rng, paths, depth + 1) for _ in range(rng.randint(1, 3))]
        }
    if depth < 2 and roll < 0.3:
        return {"$not": random_filter(rng, paths, depth + 1)}
    path = rng.choice(paths)
    op = rng.choice(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$all", "$exists"])
    operand: Any
    if op in ("$gt", "$gte", "$lt", "$lte"):
        operand = rng.choice([v for v in SCALARS if docfilter.kind(v) in ("number", "string")])
    elif op in ("$in", "$nin", "$all"):
        operand = rng.sample(SCALARS, rng.randint(0, 3))
    elif op == "$exists":
        operand = rng.random() < 0.5
    else:
        operand = rng.choice(SCALARS)
    return {path: {op: operand}}


async def insert_random(
    documents: Queryable, rng: random.Random, ctx: CallContext, count: int, collection: str = "c"
) -> dict[str, Body]:
    """`count` random documents (ids d00, d01, ...), inserted; their bodies by id."""
    bodies: dict[str, Body] = {}
    for i in range(count):
        body = random_body(rng)
        doc_id = f"d{i:02d}"
        req = basic_pb.InsertRequest(collection=collection, id=doc_id, json=json.dumps(body))
        await documents.insert(req, ctx)
        bodies[doc_id] = body
    return bodies


async def find_ids(
    documents: Queryable,
    ctx: CallContext,
    filter_text: str,
    sort_fields: Sequence[tuple[str, bool]],
    page_size: int,
    collection: str = "c",
) -> list[str]:
    """Ids of every matching document, in the order Find's pages give them."""
    ids: list[str] = []
    token = ""
    while True:
        resp = await documents.find(
            query_pb.FindRequest(
                collection=collection,
                filter=filter_text,
                sort=[query_pb.SortField(field=p, descending=d) for p, d in sort_fields],
                page_size=page_size,
                page_token=token,
            ),
            ctx,
        )
        ids += [d.id for d in resp.documents]
        token = resp.next_page_token
        if not token:
            return ids


async def aggregate_groups(
    documents: Queryable, ctx: CallContext, request: query_pb.AggregateRequest
) -> list[Group]:
    """Every group Aggregate returns for `request`, following its pages."""
    groups: list[Group] = []
    while True:
        resp = await documents.aggregate(request, ctx)
        groups += [(g.key_json, g.count, list(g.values_json)) for g in resp.groups]
        if not resp.next_page_token:
            return groups
        request.page_token = resp.next_page_token


def reference_groups(bodies: Sequence[Body], spec: docfilter.AggregateSpec) -> list[Group]:
    return [(g.key_json, g.count, v) for g, v in docfilter.aggregate(bodies, spec)]


async def check_random_aggregate(
    documents: Queryable,
    rng: random.Random,
    flt: Body,
    matching: Sequence[Body],
    ctx: CallContext,
) -> None:
    """A random Aggregate over `flt` agrees with the reference grouping of the matching bodies,
    page by page."""
    group_by = rng.choice(["", *PATHS])
    unwind = bool(group_by) and rng.random() < 0.5
    accumulators = [(rng.choice(list(OPS)), rng.choice(PATHS)) for _ in range(rng.randint(0, 2))]
    spec = docfilter.parse_aggregate(group_by, unwind, accumulators)
    request = query_pb.AggregateRequest(
        collection="c",
        filter=json.dumps(flt),
        group_by=group_by,
        unwind=unwind,
        accumulators=[query_pb.Accumulator(op=OPS[op], field=path) for op, path in accumulators],
        page_size=5,
    )
    got = await aggregate_groups(documents, ctx, request)
    assert got == reference_groups(matching, spec), (flt, group_by, unwind, accumulators)


async def check_filters_and_sort(
    documents: Queryable,
    bodies: dict[str, Body],
    rng: random.Random,
    ctx: CallContext,
    *,
    rounds: int = 150,
    also: Callable[[Body, list[str]], Awaitable[None]] | None = None,
) -> None:
    """Random filters and sorts: Find (7 per page) returns the reference's documents in the
    reference order and Count agrees; `also(filter, expected ids)` checks more per filter."""
    for _ in range(rounds):
        flt = random_filter(rng)
        node = docfilter.parse_filter(json.dumps(flt))
        sort_fields = [(rng.choice(PATHS), rng.random() < 0.5) for _ in range(rng.randint(0, 2))]
        spec = docfilter.parse_sort(sort_fields)
        expected = [
            doc_id
            for _, doc_id in spec.sort(
                (spec.key(i, b), i) for i, b in bodies.items() if docfilter.matches(node, b)
            )
        ]
        got = await find_ids(documents, ctx, json.dumps(flt), sort_fields, 7)
        assert got == expected, (flt, sort_fields)
        count = await documents.count(
            query_pb.CountRequest(collection="c", filter=json.dumps(flt)), ctx
        )
        assert count.count == len(expected), flt
        if also is not None:
            await also(flt, expected)
