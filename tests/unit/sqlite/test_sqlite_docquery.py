"""The SQL translation of the shared filter AST and sort order must agree with the reference
evaluator (plugins.runtime.docfilter) on every document; checked on random data and filters,
without indexes and with value indexes that let conditions be answered from an index. Equality
on an indexed path must be planned as an index search, not a scan, and a sorted page as a walk of
an index in order. Search over the searched values alone must answer what ranking whole bodies
answers."""

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
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.runtime import docfilter, docpages, textsearch
from plugins.runtime.context import CallContext
from plugins.sqlite import SqlitePlugin
from plugins.sqlite.document import DOC_COLUMNS, searchable_text, select_statement
from tests.support.documents import (
    check_filters_and_sort,
    check_random_aggregate,
    find_ids,
    insert_random,
)


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


def plan(
    conn: sqlite3.Connection,
    flt: dict[str, Any],
    words: str | None = None,
    sort: list[tuple[str, bool]] | None = None,
) -> list[str]:
    node = docfilter.parse_filter(json.dumps(flt))
    spec = None if sort is None else docfilter.parse_sort(sort)
    statement, params = select_statement(
        conn, "ns", "c", node, DOC_COLUMNS, spec=spec, limit=21, words=words
    )
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
            # rows are looked up by rowid from the index: one search for the scalar values (rank
            # and value columns), one for array values (rank column); nothing scans the table
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


async def test_a_sorted_page_walks_an_index_in_order(plugin: SqlitePlugin) -> None:
    """A filter pinning `latest` by $eq, sorted by name, walks the (latest, name) index in order
    and stops at the page (no sort of every match), each page in the reference's order, both
    ways; once some `latest` is an array (which the $eq also matches), it sorts again and still
    finds that document."""
    ctx = CallContext(namespace="ns")
    await create_index(plugin, "by_latest_name", ["latest", "name"], ctx)
    rng = random.Random(7)
    names: list[Any] = ["b", "a", "B", "ä", 3, 2.5, True, None, ["x"], {"o": 1}, "a"]
    bodies: dict[str, Any] = {}
    for i in range(80):
        body: dict[str, Any] = {"latest": i % 3 != 0, "n": i}
        if i % 11:
            body["name"] = rng.choice(names)
        bodies[f"d{i:02d}"] = body
    for doc_id, body in bodies.items():
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="c", id=doc_id, json=json.dumps(body)), ctx
        )
    (sql_name,) = await plugin.db.read(
        lambda c: c.execute("SELECT sql_name FROM doc_indexes").fetchone()
    )

    async def agrees(flt: dict[str, Any], descending: bool) -> None:
        spec = docfilter.parse_sort([("name", descending)])
        node = docfilter.parse_filter(json.dumps(flt))
        matching = [(spec.key(i, b), i) for i, b in bodies.items() if docfilter.matches(node, b)]
        expected = [i for _, i in spec.sort(matching)]
        got = await find_ids(plugin.documents, ctx, json.dumps(flt), [("name", descending)], 7)
        assert got == expected, (flt, descending)

    flt = {"$and": [{"latest": True}, {"n": {"$ne": 4}}]}
    conn = sqlite3.connect(plugin.path)
    try:
        for descending in (False, True):
            steps = plan(conn, flt, sort=[("name", descending)])
            assert steps[0].startswith(f"SEARCH docs USING INDEX {sql_name} "), steps
            assert "USE TEMP B-TREE FOR ORDER BY" not in steps, steps  # ties by id alone
            await agrees(flt, descending)
        bodies["z"] = {"latest": [False, True], "name": "a"}
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="c", id="z", json=json.dumps(bodies["z"])), ctx
        )
        assert "USE TEMP B-TREE FOR ORDER BY" in plan(conn, flt, sort=[("name", False)])
        for descending in (False, True):
            await agrees(flt, descending)
    finally:
        conn.close()


async def test_an_index_built_with_older_columns_is_rebuilt(plugin: SqlitePlugin) -> None:
    """Creating an index again (as its owner does at every start) rebuilds the SQLite index of a
    file written by an older plugin with the current columns, so its plans apply there too."""
    ctx = CallContext(namespace="ns")
    await create_index(plugin, "by_name", ["name"], ctx)

    def indexes(conn: sqlite3.Connection) -> list[tuple[str, str]]:
        return conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name LIKE 'dx_%'"
        ).fetchall()

    [(sql_name, current)] = await plugin.db.read(indexes)

    def older(conn: sqlite3.Connection) -> None:
        conn.execute(f'DROP INDEX "{sql_name}"')
        conn.execute(f'CREATE INDEX "{sql_name}" ON docs (ns, collection, id)')

    await plugin.db.write(older)
    assert await plugin.db.read(indexes) != [(sql_name, current)]
    index = index_pb.Index(name="by_name", fields=[index_pb.IndexField(path="name")])
    created = await plugin.documents.create_index(
        index_pb.CreateIndexRequest(collection="c", index=index), ctx
    )
    assert not created.created
    assert await plugin.db.read(indexes) == [(sql_name, current)]


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


SEARCH_WORDS = ["red", "apple", "pie", "green", "tree", "juice"]
SEARCH_PATHS = ["a", "b", "b.c", 'b.q"t', "b.0", "n", "a.x", "b.c.d"]


def random_search_body(rng: random.Random) -> dict[str, Any]:
    def text() -> str:
        return " ".join(rng.choices(SEARCH_WORDS, k=rng.randint(1, 4))).title()

    inner: dict[str, Any] = {"c": [text() for _ in range(rng.randint(0, 3))], 'q"t': text()}
    if rng.random() < 0.5:
        inner["0"] = text()
    if rng.random() < 0.3:
        inner["c"] = text()
    return {"a": text(), "b": inner, "n": rng.randint(0, 9), "other": text()}


@pytest.mark.parametrize("seed", range(6))
async def test_search_over_searched_values_equals_whole_bodies(
    plugin: SqlitePlugin, seed: int
) -> None:
    """Search parses only the searched values (json_extract, or whole bodies when a member name
    holds '"'); the hits, scores, highlights and tokens must be those of ranking every candidate
    from its whole body, whatever the paths (nested, overlapping, into arrays, numbers)."""
    rng = random.Random(seed)
    ctx = CallContext(namespace="ns")
    for i in range(120):
        body = json.dumps(random_search_body(rng))
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="c", id=f"d{i}", json=body), ctx
        )
    stored = await plugin.documents.find(query_pb.FindRequest(collection="c", page_size=1000), ctx)
    documents = {d.id: d for d in stored.documents}
    bodies = {d.id: json.loads(d.json) for d in stored.documents}
    hits = 0
    for _ in range(8):
        paths = rng.sample(SEARCH_PATHS, rng.randint(1, 4))
        request = search_pb.SearchRequest(
            collection="c",
            query=" ".join(rng.sample(SEARCH_WORDS, rng.randint(1, 2))),
            fields=[search_pb.SearchField(path=p, weight=rng.choice([0, 2, 7])) for p in paths],
            page_size=rng.choice([3, 50]),
            highlight=search_pb.HighlightOptions(),
        )
        paging = docpages.SearchPaging.parse(request, "c", "sqlite.search")
        candidates = [
            (doc_id, body)
            for doc_id, body in bodies.items()
            if set(paging.terms) <= set(textsearch.normalized(searchable_text(body)))
        ]
        chosen = [documents[doc_id] for doc_id, _ in candidates]
        expected = paging.page(candidates, chosen.__getitem__)
        got = await plugin.documents.search(request, ctx)
        assert got == expected, (request.query, paths)
        hits += len(got.hits)
    assert hits > 0  # the comparisons saw real hits
