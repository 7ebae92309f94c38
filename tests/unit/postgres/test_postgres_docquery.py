"""The JSONB translation of the shared filter AST and sort order must agree with the reference
evaluator (plugins.runtime.docfilter) on every document, page by page; checked on random data
and filters (tests/support/documents.py, so every document backend faces the same kinds of
input)."""

from __future__ import annotations

import json
import random

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.postgres import PostgresPlugin
from plugins.postgres.document import search_words
from plugins.runtime import docfilter
from plugins.runtime.context import CallContext
from plugins.runtime.docpages import ACCUMULATOR_NAMES
from tests.support.documents import (
    PATHS,
    aggregate_groups,
    check_filters_and_sort,
    insert_random,
    reference_groups,
)


async def test_filters_and_sort_agree_with_reference(
    plugin: PostgresPlugin, namespace: str
) -> None:
    rng = random.Random(4321)
    ctx = CallContext(namespace=namespace)
    bodies = await insert_random(plugin.documents, rng, ctx, 60)
    await check_filters_and_sort(plugin.documents, bodies, rng, ctx)


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
    bodies = list((await insert_random(plugin.documents, rng, ctx, 50, "g")).values())
    ops = list(ACCUMULATOR_NAMES.items())
    for group_by, unwind in (("", False), ("a", False), ("a", True), ("n.x", True)):
        accumulators = [(op, rng.choice(PATHS)) for op, _ in ops]
        spec = docfilter.parse_aggregate(
            group_by, unwind, [(ACCUMULATOR_NAMES[op], path) for op, path in accumulators]
        )
        request = query_pb.AggregateRequest(
            collection="g",
            group_by=group_by,
            unwind=unwind,
            accumulators=[query_pb.Accumulator(op=op, field=p) for op, p in accumulators],
            page_size=1000,
        )
        got = await aggregate_groups(plugin.documents, ctx, request)
        assert got == reference_groups(bodies, spec), (group_by, unwind, accumulators)
