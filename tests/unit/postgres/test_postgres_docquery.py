"""The JSONB translation of the shared filter AST and sort order must agree with the reference
evaluator (plugins.runtime.docfilter) on every document, page by page; checked on random data
and filters (the generators are the SQLite differential test's, so both backends face the same
kinds of input)."""

from __future__ import annotations

import json
import random
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.postgres import PostgresPlugin
from plugins.postgres.document import search_words
from plugins.runtime import docfilter
from plugins.runtime.context import CallContext
from plugins.runtime.docpages import ACCUMULATOR_NAMES
from tests.unit.sqlite.test_sqlite_docquery import PATHS, random_body, random_filter


async def test_filters_and_sort_agree_with_reference(
    plugin: PostgresPlugin, namespace: str
) -> None:
    rng = random.Random(4321)
    ctx = CallContext(namespace=namespace)
    bodies: dict[str, dict[str, Any]] = {}
    for i in range(60):
        body = random_body(rng)
        doc_id = f"d{i:02d}"
        req = basic_pb.InsertRequest(collection="c", id=doc_id, json=json.dumps(body))
        await plugin.documents.insert(req, ctx)
        bodies[doc_id] = body

    for _ in range(150):
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
        got: list[str] = []
        token = ""
        while True:
            resp = await plugin.documents.find(
                query_pb.FindRequest(
                    collection="c",
                    filter=json.dumps(flt),
                    sort=[query_pb.SortField(field=p, descending=d) for p, d in sort_fields],
                    page_size=7,
                    page_token=token,
                ),
                ctx,
            )
            got += [d.id for d in resp.documents]
            token = resp.next_page_token
            if not token:
                break
        assert got == expected, (flt, sort_fields)
        count = await plugin.documents.count(
            query_pb.CountRequest(collection="c", filter=json.dumps(flt)), ctx
        )
        assert count.count == len(expected), flt


def test_search_words_are_the_contract_words() -> None:
    """Words the PostgreSQL parser would keep whole ("3.14", e-mail addresses) split as the
    contract says, case folded, from nested members and string array elements only."""
    body = {"a": "Pi is 3.14, mail bob@example.com", "n": {"t": ["Café", 7]}, "x": 12}
    assert search_words(body) == sorted(
        {"pi", "is", "3", "14", "mail", "bob", "example", "com", "café"}
    )


async def test_search_matches_words_the_postgres_parser_would_merge(
    plugin: PostgresPlugin, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    for doc_id, text in (("pi", "pi is 3.14"), ("mail", "write to bob@example.com")):
        body = json.dumps({"text": text})
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="s", id=doc_id, json=body), ctx
        )
    fields = [search_pb.SearchField(path="text")]
    for query, expected in (("14", ["pi"]), ("example", ["mail"]), ("3.14", ["pi"])):
        resp = await plugin.documents.search(
            search_pb.SearchRequest(collection="s", query=query, fields=fields), ctx
        )
        assert [h.document.id for h in resp.hits] == expected, query


async def test_aggregate_agrees_with_reference(plugin: PostgresPlugin, namespace: str) -> None:
    """Aggregation reads only the grouped and accumulated values from JSONB; the groups must be
    the ones the reference computes from whole bodies."""
    rng = random.Random(99)
    ctx = CallContext(namespace=namespace)
    bodies = [random_body(rng) for _ in range(50)]
    for i, body in enumerate(bodies):
        req = basic_pb.InsertRequest(collection="g", id=f"d{i}", json=json.dumps(body))
        await plugin.documents.insert(req, ctx)
    ops = list(ACCUMULATOR_NAMES.items())
    for group_by, unwind in (("", False), ("a", False), ("a", True), ("n.x", True)):
        accumulators = [(op, rng.choice(PATHS)) for op, _ in ops]
        spec = docfilter.parse_aggregate(
            group_by, unwind, [(ACCUMULATOR_NAMES[op], path) for op, path in accumulators]
        )
        expected = [(g.key_json, g.count, v) for g, v in docfilter.aggregate(bodies, spec)]
        reply = await plugin.documents.aggregate(
            query_pb.AggregateRequest(
                collection="g",
                group_by=group_by,
                unwind=unwind,
                accumulators=[query_pb.Accumulator(op=op, field=p) for op, p in accumulators],
                page_size=1000,
            ),
            ctx,
        )
        got = [(g.key_json, g.count, list(g.values_json)) for g in reply.groups]
        assert got == expected, (group_by, unwind, accumulators)
