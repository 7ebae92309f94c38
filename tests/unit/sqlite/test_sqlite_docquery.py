"""The SQL translation of the shared filter AST and sort order must agree with the reference
evaluator (plugins.runtime.docfilter) on every document; checked on random data and filters,
without indexes and with value indexes that let conditions be answered from an index. Equality
on an indexed path must be planned as an index search, not a scan."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.runtime import docfilter
from plugins.runtime.context import CallContext
from plugins.sqlite import SqlitePlugin
from plugins.sqlite.document import DOC_COLUMNS, select_statement
from tests.support.documents import check_filters_and_sort, check_random_aggregate, insert_random


@pytest.fixture
async def plugin(tmp_path: Path) -> AsyncIterator[SqlitePlugin]:
    p = SqlitePlugin({}, data_dir=tmp_path)
    await p.start()
    yield p
    await p.close()


async def create_index(plugin: SqlitePlugin, name: str, paths: list[str], ctx: CallContext) -> None:
    index = index_pb.Index(name=name, fields=[index_pb.IndexField(path=p) for p in paths])
    await plugin.documents.create_index(
        index_pb.CreateIndexRequest(collection="c", index=index), ctx
    )


@pytest.mark.parametrize("indexed", [False, True], ids=["scan", "indexed"])
async def test_filters_and_sort_agree_with_reference(plugin: SqlitePlugin, indexed: bool) -> None:
    rng = random.Random(1234)
    ctx = CallContext(namespace="ns")
    if indexed:
        # every path leads some index; "b" only behind "a" in a second, so "b" stays a scan
        await create_index(plugin, "by_a_b", ["a", "b"], ctx)
        await create_index(plugin, "by_nx", ["n.x"], ctx)
        await create_index(plugin, "by_ny", ["n.y"], ctx)
    bodies = await insert_random(plugin.documents, rng, ctx, 60)

    async def aggregate_agrees(flt: dict[str, Any], expected: list[str]) -> None:
        matching = [bodies[i] for i in expected]
        await check_random_aggregate(plugin.documents, rng, flt, matching, ctx)

    await check_filters_and_sort(plugin.documents, bodies, rng, ctx, also=aggregate_agrees)


def plan(conn: sqlite3.Connection, flt: dict[str, Any], words: str | None = None) -> list[str]:
    node = docfilter.parse_filter(json.dumps(flt))
    statement, params = select_statement(conn, "ns", "c", node, DOC_COLUMNS, words=words)
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params)]


async def test_equality_on_an_indexed_path_searches_the_index(plugin: SqlitePlugin) -> None:
    ctx = CallContext(namespace="ns")
    await create_index(plugin, "by_lineage", ["lineage"], ctx)
    for i in range(50):
        body = {"lineage": f"l{i % 10}", "deleted": i % 7 == 0, "tags": ["x", f"l{i % 10}"]}
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="c", id=f"d{i}", json=json.dumps(body)), ctx
        )
    (sql_name,) = await plugin.db.read(
        lambda c: c.execute("SELECT sql_name FROM doc_indexes").fetchone()
    )
    conn = sqlite3.connect(plugin.path)
    try:
        for flt in (
            {"lineage": "l3", "deleted": False},
            {"$and": [{"deleted": False}, {"lineage": {"$in": ["l1", "l2"]}}]},
        ):
            steps = plan(conn, flt)
            # rows are looked up by rowid from the index: one search for the scalar values (kind
            # and value columns), one for array values (kind column); nothing scans the table
            assert steps[0] == "SEARCH docs USING INTEGER PRIMARY KEY (rowid=?)", steps
            searches = [s for s in steps if s.startswith("SEARCH docs USING INDEX")]
            kind_search = f"SEARCH docs USING INDEX {sql_name} (ns=? AND collection=? AND <expr>=?"
            assert searches == [kind_search + " AND <expr>=?)", kind_search + ")"], steps
            assert not any(s.startswith("SCAN docs") for s in steps), steps
        # a path no index leads, or a long $in, is still answered, by reading the collection
        unindexed: list[dict[str, Any]] = [
            {"tags": "x"},
            {"lineage": {"$in": [f"l{i}" for i in range(1000)]}},
        ]
        for flt in unindexed:
            steps = plan(conn, flt)
            assert not any(s.startswith("SEARCH docs USING INTEGER") for s in steps), steps
        many = {"lineage": {"$in": [f"l{i}" for i in range(1000, 3000)] + ["l3"]}}
        counted = await plugin.documents.count(
            query_pb.CountRequest(collection="c", filter=json.dumps(many)), ctx
        )
        assert counted.count == 5  # a long $in nests no deeper than SQLite allows
        # search: the word index alone picks the candidates, even beside an indexed condition
        steps = plan(conn, {"lineage": "l3"}, words='"x" AND "l3"')
        assert steps[0] == "SEARCH docs USING INTEGER PRIMARY KEY (rowid=?)", steps
        assert any(s.startswith("SCAN doc_words VIRTUAL TABLE") for s in steps), steps
        assert not any(s.startswith(("SCAN docs", "SEARCH docs USING INDEX")) for s in steps)
    finally:
        conn.close()


async def test_reads_do_not_wait_for_the_writer(plugin: SqlitePlugin) -> None:
    """A query is answered while the writer thread holds an open write transaction."""
    ctx = CallContext(namespace="ns")
    await plugin.documents.insert(basic_pb.InsertRequest(collection="c", id="a", json="{}"), ctx)
    holding, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE docs SET body = '{\"x\":1}' WHERE id = 'a'")
        holding.set()
        release.wait(10)

    writing = asyncio.ensure_future(plugin.db.write(hold))
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, holding.wait, 10)
        found = await asyncio.wait_for(
            plugin.documents.find(query_pb.FindRequest(collection="c"), ctx), 5
        )
        assert [(d.id, d.json) for d in found.documents] == [("a", "{}")]  # last commit
        assert not writing.done()
    finally:
        release.set()
        await writing
    found = await plugin.documents.find(query_pb.FindRequest(collection="c"), ctx)
    assert [d.json for d in found.documents] == ['{"x":1}']
