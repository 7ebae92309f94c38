"""Document basic, query, search and indexing on the `docs` table (bodies as JSON text, read
with JSON1; filters translated to SQL by docquery.py; words in the FTS5 table `doc_words`).

Value indexes are real SQLite expression indexes over json_extract, partial to one namespace and
collection, so a unique index is enforced by SQLite itself inside the writing transaction.

A query is one SELECT (`select_statement`) whose rows come from an index when one applies: the
FTS5 match for a search; else a non-unique value index led by a field the filter tests (so
Find/Count by an indexed field stay flat as the collection grows), except that a sorted page
whose best such condition is a boolean equality (or none) walks a value index over fields the
filter pins with `$eq` and then the sort fields, in order, up to the page's LIMIT; otherwise it
reads the collection. Search ranks only those candidates (BM25 averages over them, which the
contract leaves to the backend), never the whole collection.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.runtime import docfilter, docindex, sqldocuments, validation
from plugins.runtime.context import CallContext
from plugins.runtime.docerrors import not_found, revision_mismatch, unique_violation
from plugins.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from plugins.runtime.sqldocuments import Groups, Row
from plugins.sqlite.db import Database
from plugins.sqlite.docquery import (
    COMPOUND_RANK,
    SCALAR_TYPES,
    Sql,
    json_path,
    path_literal,
    rank_sql,
    scope_sql,
    sort_value_sql,
)

INDEX_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_INDEX_FIELDS = 16
_SQL_INDEX_RE = re.compile(r"index '([^']+)'")

DOC_COLUMNS = "id, body, revision, create_time, update_time"


def to_document(row: sqlite3.Row | tuple[Any, ...]) -> basic_pb.Document:
    doc = basic_pb.Document(id=row[0], json=row[1], revision=row[2])
    doc.create_time.FromNanoseconds(row[3])
    doc.update_time.FromNanoseconds(row[4])
    return doc


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _unique_violation(
    conn: sqlite3.Connection, exc: sqlite3.IntegrityError, ns: str, collection: str, doc_id: str
) -> AlreadyExists:
    match = _SQL_INDEX_RE.search(str(exc))
    row = None
    if match:
        row = conn.execute(
            "SELECT name FROM doc_indexes WHERE sql_name = ?", (match.group(1),)
        ).fetchone()
    if row is None:
        raise exc  # not one of our unique indexes: a bug, reported as INTERNAL
    return unique_violation(collection, doc_id, row[0])


def _current(
    conn: sqlite3.Connection, ns: str, collection: str, doc_id: str
) -> tuple[int, int] | None:
    """(revision, create_time) of a stored document."""
    row = conn.execute(
        "SELECT revision, create_time FROM docs WHERE ns = ? AND collection = ? AND id = ?",
        (ns, collection, doc_id),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def searchable_text(body: dict[str, Any]) -> str:
    """Every string a search field path can reach (member values and the string elements of
    member arrays), for the FTS5 prefilter; the exact per-field rules are applied afterwards."""
    texts: list[str] = []
    stack = [body]
    while stack:
        for value in stack.pop().values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, list):
                texts.extend(v for v in value if isinstance(v, str))
    return "\n".join(texts)


def _write(
    conn: sqlite3.Connection,
    ns: str,
    collection: str,
    doc_id: str,
    body: dict[str, Any],
    revision: int,
    create_time: int,
) -> basic_pb.Document:
    """Insert or replace one document and its words; unique-index duplicates become
    UNIQUE_VIOLATION."""
    now = time.time_ns() if revision > 1 else create_time
    text = canonical(body)
    try:
        (rowid,) = conn.execute(
            "INSERT INTO docs (ns, collection, id, body, revision, create_time, update_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ns, collection, id) DO UPDATE SET "
            "body = excluded.body, revision = excluded.revision, "
            "update_time = excluded.update_time RETURNING rowid",
            (ns, collection, doc_id, text, revision, create_time, now),
        ).fetchone()
    except sqlite3.IntegrityError as exc:
        raise _unique_violation(conn, exc, ns, collection, doc_id) from exc
    conn.execute("DELETE FROM doc_words WHERE rowid = ?", (rowid,))
    conn.execute(
        "INSERT INTO doc_words (rowid, text) VALUES (?, ?)", (rowid, searchable_text(body))
    )
    return to_document((doc_id, text, revision, create_time, now))


def select_statement(
    conn: sqlite3.Connection,
    ns: str,
    collection: str,
    node: docfilter.Node,
    columns: str = DOC_COLUMNS,
    spec: docfilter.SortSpec | None = None,
    after: docfilter.SortKey | None = None,
    limit: int = -1,
    words: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """One SELECT of the collection's rows matching `node` (and the FTS5 query `words`), in
    `spec` order after `after`, driven by the FTS5 match, by a value index walked in `spec`
    order (`_ordered_terms`) unless a condition other than a boolean equality can drive, or
    else by a value index when a condition allows (see Sql.index_driver); `conn` supplies the
    index definitions."""
    sql = Sql()
    scope = scope_sql(ns, collection)
    driver: str | None = None
    ordered: list[str] | None = None
    if words is not None:
        driver = f"rowid IN (SELECT rowid FROM doc_words WHERE text MATCH {sql.p(words)})"
    else:
        indexes = _value_indexes(conn, ns, collection)
        leading = {i[0] for i in indexes}
        driver = sql.index_driver(node, leading, scope, selective_only=True)
        if driver is None and spec is not None and spec.fields:
            ordered = _ordered_terms(conn, sql, scope, indexes, leading, node, spec)
        if driver is None and ordered is None:
            driver = sql.index_driver(node, leading, scope)
    # With a driver, the unary + keeps SQLite from scanning an index of the whole collection
    # instead of looking up the driver's rowids. A walk in order names the scope as the
    # indexes' partial WHERE does (SQLite needs the same terms, literally).
    head = "ns = :ns AND collection = :collection"
    if driver is not None:
        head = f"{driver} AND +ns = :ns AND +collection = :collection"
    elif ordered is not None:
        head = " AND ".join([scope, *ordered])
    where = sql.where(node)
    if spec is not None and after is not None:
        where += " AND " + sql.after(spec, after)
    order = f" ORDER BY {sql.order_by(spec)}" if spec is not None else ""
    statement = f"SELECT {columns} FROM docs WHERE {head} AND {where}{order} LIMIT :limit"
    return statement, {**sql.params, "ns": ns, "collection": collection, "limit": limit}


def _ordered_terms(
    conn: sqlite3.Connection,
    sql: Sql,
    scope: str,
    indexes: list[tuple[docfilter.Path, ...]],
    leading: set[docfilter.Path],
    node: docfilter.Node,
    spec: docfilter.SortSpec,
) -> list[str] | None:
    """Sql.ordered_terms for the first value index made of fields `node` pins with `$eq`
    followed by `spec`'s fields, or None. A pinned field must hold no array or object in the
    collection (checked in this read's snapshot, by a seek in an index it leads): an `$eq`
    also matches array elements, which the index's equality would miss."""
    sort_paths = tuple(path for path, _ in spec.fields)
    for fields in indexes:
        prefix = fields[: len(fields) - len(sort_paths)]
        if fields[len(prefix) :] != sort_paths or not leading.issuperset(prefix):
            continue
        terms = sql.ordered_terms(node, prefix)
        if terms is not None and not any(_holds_compound(conn, scope, p) for p in prefix):
            return terms
    return None


def _holds_compound(conn: sqlite3.Connection, scope: str, path: docfilter.Path) -> bool:
    """Whether some document of the scope holds an array or object at `path` (an index seek:
    `path` leads a value index)."""
    found = conn.execute(
        f"SELECT 1 FROM docs WHERE {scope} AND {rank_sql(path_literal(path))} = {COMPOUND_RANK} "
        "LIMIT 1"
    ).fetchone()
    return found is not None


class SqliteDocuments(sqldocuments.SqlDocumentQueries):
    """document_basic, _query, _search and _indexing."""

    token_prefix = "sqlite"
    _document = staticmethod(to_document)

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- basic -------------------------------------------------------------------------------

    async def insert(
        self, request: basic_pb.InsertRequest, ctx: CallContext
    ) -> basic_pb.InsertResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id) if request.id else ""
        body = validation.document_json(request.json)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> basic_pb.Document:
            chosen = doc_id
            while not chosen:
                candidate = secrets.token_urlsafe(16)
                if _current(conn, ns, collection, candidate) is None:
                    chosen = candidate
            if doc_id and _current(conn, ns, collection, doc_id) is not None:
                raise AlreadyExists(
                    f"document {doc_id!r} already exists in {collection!r}",
                    reason="DOCUMENT_EXISTS",
                    collection=collection,
                    id=doc_id,
                )
            return _write(conn, ns, collection, chosen, body, 1, time.time_ns())

        return basic_pb.InsertResponse(document=await self.db.write(job))

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id)
        row = await self.db.read(
            lambda c: c.execute(
                f"SELECT {DOC_COLUMNS} FROM docs WHERE ns = ? AND collection = ? AND id = ?",
                (ctx.namespace, collection, doc_id),
            ).fetchone()
        )
        if row is None:
            raise not_found(collection, doc_id)
        return basic_pb.GetResponse(document=to_document(row))

    async def update(
        self, request: basic_pb.UpdateRequest, ctx: CallContext
    ) -> basic_pb.UpdateResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id)
        body = validation.document_json(request.json)
        expected = request.expected_revision
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> basic_pb.UpdateResponse:
            current = _current(conn, ns, collection, doc_id)
            if expected and (current is None or current[0] != expected):
                raise revision_mismatch(
                    collection, doc_id, expected, 0 if current is None else current[0]
                )
            if current is None:
                if not request.allow_missing:
                    raise not_found(collection, doc_id)
                doc = _write(conn, ns, collection, doc_id, body, 1, time.time_ns())
                return basic_pb.UpdateResponse(document=doc, created=True)
            doc = _write(conn, ns, collection, doc_id, body, current[0] + 1, current[1])
            return basic_pb.UpdateResponse(document=doc, created=False)

        return await self.db.write(job)

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id)
        expected = request.expected_revision
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> bool:
            current = _current(conn, ns, collection, doc_id)
            if expected and (current is None or current[0] != expected):
                raise revision_mismatch(
                    collection, doc_id, expected, 0 if current is None else current[0]
                )
            if current is None:
                return False
            (rowid,) = conn.execute(
                "DELETE FROM docs WHERE ns = ? AND collection = ? AND id = ? RETURNING rowid",
                (ns, collection, doc_id),
            ).fetchone()
            conn.execute("DELETE FROM doc_words WHERE rowid = ?", (rowid,))
            return True

        return basic_pb.DeleteResponse(deleted=await self.db.write(job))

    # -- query -------------------------------------------------------------------------------

    async def _select(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        *,
        columns: str = DOC_COLUMNS,
        spec: docfilter.SortSpec | None = None,
        after: docfilter.SortKey | None = None,
        limit: int | None = None,
        terms: list[str] | None = None,
    ) -> list[Row]:
        """See SqlDocumentQueries._select; `terms` become one FTS5 query of quoted phrases, all
        required."""
        words = None if terms is None else " AND ".join(_fts_phrase(t) for t in terms)
        bound = -1 if limit is None else limit

        def job(conn: sqlite3.Connection) -> list[Row]:
            statement, params = select_statement(
                conn, ctx.namespace, collection, node, columns, spec, after, bound, words
            )
            return conn.execute(statement, params).fetchall()

        return await self.db.read(job)

    async def _search_rows(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        paths: Sequence[docfilter.Path],
        terms: list[str],
    ) -> list[tuple[Row, list[Any]]]:
        """See SqlDocumentQueries._search_rows: one json_extract of every path (the first one
        twice, so even one path yields a JSON array, not a bare SQL value). A member name no
        SQLite JSON path can spell makes it resolve the paths in whole bodies instead."""
        if any('"' in name for path in paths for name in path):
            rows = await self._select(collection, node, ctx, terms=terms)
            bodies = ((r, json.loads(r[1])) for r in rows)
            return [(r, [docfilter.resolve(b, p) for p in paths]) for r, b in bodies]
        literals = [path_literal(p) for p in paths]
        column = f"json_extract(body, {', '.join([*literals, literals[0]])})"
        rows = await self._select(
            collection, node, ctx, columns=f"{DOC_COLUMNS}, {column}", terms=terms
        )
        return [(r, json.loads(r[-1])[: len(paths)]) for r in rows]

    def _sort_spec(self, sort: Iterable[query_pb.SortField]) -> docfilter.SortSpec:
        spec = super()._sort_spec(sort)
        for i, (path, _) in enumerate(spec.fields):
            json_path(path, f"sort[{i}].field")  # a name SQLite cannot address is refused here
        return spec

    async def _aggregate_groups(
        self,
        collection: str,
        node: docfilter.Node,
        spec: docfilter.AggregateSpec,
        ctx: CallContext,
    ) -> Groups:
        paths = [*([spec.group_by] if spec.group_by else []), *(p for _, p in spec.accumulators)]
        if any('"' in name for path in paths for name in path):
            # no SQLite JSON path can spell such a name: group whole bodies
            rows = await self._select(collection, node, ctx, columns="body")
            return docfilter.aggregate((json.loads(r[0]) for r in rows), spec)
        # only the values grouping reads, as one JSON array per document (missing as null;
        # every path twice, so even one path yields an array, not a bare SQL value)
        literals = [path_literal(p) for p in paths]
        column = f"json_extract(body, {', '.join(literals * 2)})" if paths else "'[]'"
        rows = await self._select(collection, node, ctx, columns=column)
        first = 1 if spec.group_by else 0
        last = first + len(spec.accumulators)
        values = (json.loads(r[0]) for r in rows)
        return docfilter.aggregate_values(
            ((v[0] if spec.group_by else None, v[first:last]) for v in values), spec
        )

    # -- indexing ----------------------------------------------------------------------------

    async def create_index(
        self, request: index_pb.CreateIndexRequest, ctx: CallContext
    ) -> index_pb.CreateIndexResponse:
        collection = validation.collection(request.collection)
        index = _checked_index(request.index)
        ns = ctx.namespace
        sql_name = "dx_" + hashlib.sha256(f"{ns}\0{collection}\0{index.name}".encode()).hexdigest()

        def job(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT definition FROM doc_indexes WHERE ns = ? AND collection = ? AND name = ?",
                (ns, collection, index.name),
            ).fetchone()
            if row is not None:
                if index_pb.Index.FromString(row[0]) == index:
                    _build_index(conn, sql_name, ns, collection, index)  # if built differently
                    return False
                raise AlreadyExists(
                    f"index {index.name!r} exists with another definition",
                    reason="INDEX_EXISTS",
                    collection=collection,
                    index=index.name,
                )
            conn.execute(
                "INSERT INTO doc_indexes (ns, collection, name, definition, sql_name) "
                "VALUES (?, ?, ?, ?, ?)",
                (ns, collection, index.name, index.SerializeToString(), sql_name),
            )
            _build_index(conn, sql_name, ns, collection, index)
            return True

        created = await self.db.write(job)
        return index_pb.CreateIndexResponse(index=index, created=created)

    async def drop_index(
        self, request: index_pb.DropIndexRequest, ctx: CallContext
    ) -> index_pb.DropIndexResponse:
        collection = validation.collection(request.collection)
        name = request.name
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "DELETE FROM doc_indexes WHERE ns = ? AND collection = ? AND name = ? "
                "RETURNING sql_name",
                (ns, collection, name),
            ).fetchone()
            if row is None:
                raise NotFound(
                    f"index {name!r} not found in {collection!r}",
                    reason="INDEX_NOT_FOUND",
                    collection=collection,
                    index=name,
                )
            # sql_name is generated by create_index as dx_<hex>; quoted all the same.
            conn.execute(f'DROP INDEX IF EXISTS "{row[0]}"')

        await self.db.write(job)
        return index_pb.DropIndexResponse()

    async def _index_definitions(
        self, collection: str, after: str, limit: int, ctx: CallContext
    ) -> list[bytes]:
        def job(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT definition FROM doc_indexes WHERE ns = ? AND collection = ? "
                "AND name > ? ORDER BY name LIMIT ?",
                (ctx.namespace, collection, after, limit),
            )
            return [bytes(r[0]) for r in rows]

        return await self.db.read(job)


def _value_indexes(
    conn: sqlite3.Connection, ns: str, collection: str
) -> list[tuple[docfilter.Path, ...]]:
    """Field paths of the collection's non-unique value indexes, by name: a unique index leaves
    out documents whose indexed values are arrays, which an equality must still find."""
    indexes = []
    for (definition,) in conn.execute(
        "SELECT definition FROM doc_indexes WHERE ns = ? AND collection = ? ORDER BY name",
        (ns, collection),
    ):
        index = index_pb.Index.FromString(definition)
        if index.kind == index_pb.INDEX_KIND_VALUE and not index.unique:
            indexes.append(tuple(tuple(f.path.split(".")) for f in index.fields))
    return indexes


def _fts_phrase(term: str) -> str:
    """`term` as an FTS5 phrase, so its characters are never read as query syntax."""
    return '"' + term.replace('"', '""') + '"'


def _checked_index(requested: index_pb.Index) -> index_pb.Index:
    """The index as it will be stored (kind set), or INVALID_ARGUMENT naming the bad field."""
    if not INDEX_NAME_RE.fullmatch(requested.name):
        raise InvalidArgument("index.name", "must match ^[a-z][a-z0-9_]{0,62}$")
    if not 1 <= len(requested.fields) <= MAX_INDEX_FIELDS:
        raise InvalidArgument("index.fields", f"must list 1 to {MAX_INDEX_FIELDS} fields")
    index = index_pb.Index()
    index.CopyFrom(requested)
    index.kind = docindex.KIND_ENUMS[docindex.kind(requested)]
    seen: set[str] = set()
    for i, f in enumerate(index.fields):
        where = f"index.fields[{i}].path"
        json_path(docfilter.parse_path(f.path, where), where)
        if f.path in seen:
            raise InvalidArgument(where, f"repeats {f.path!r}")
        seen.add(f.path)
        if index.kind == index_pb.INDEX_KIND_TEXT and f.descending:
            raise InvalidArgument(f"fields[{i}].descending", "text index fields have no order")
    if index.kind == index_pb.INDEX_KIND_TEXT and index.unique:
        raise InvalidArgument("unique", "a text index cannot be unique")
    return index


def _build_index(
    conn: sqlite3.Connection, sql_name: str, ns: str, collection: str, index: index_pb.Index
) -> None:
    """Build a value index's SQLite index, or rebuild it when an older plugin built it with
    other columns (so an upgraded file gets the current layout when its owner, at start,
    creates its indexes again)."""
    if index.kind != index_pb.INDEX_KIND_VALUE:
        return
    ddl = _index_ddl(sql_name, ns, collection, index)
    built = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (sql_name,)
    ).fetchone()
    if built is not None and built[0] == ddl:
        return
    conn.execute(f'DROP INDEX IF EXISTS "{sql_name}"')
    try:
        conn.execute(ddl)
    except sqlite3.IntegrityError as exc:
        raise FailedPrecondition(
            f"documents of {collection!r} already hold duplicate values for "
            f"unique index {index.name!r}",
            reason="DUPLICATE_VALUES",
            collection=collection,
            index=index.name,
        ) from exc


def _index_ddl(sql_name: str, ns: str, collection: str, index: index_pb.Index) -> str:
    """CREATE INDEX for a value index. DDL takes no bound parameters, so the namespace,
    collection and JSON paths are quoted literals and the name is a generated identifier.

    Each field contributes its two sort keys (rank, value), as ORDER BY spells them: the rank
    keeps `true` apart from 1 and "1" from 1 while 1 and 1.0 stay equal. A unique index is
    partial to documents whose indexed values are all scalars, the ones the contract
    constrains."""
    columns = ["ns", "collection"]
    scalar_checks = []
    for f in index.fields:
        path = path_literal(tuple(f.path.split(".")))
        order = " DESC" if f.descending else ""
        columns += [rank_sql(path) + order, sort_value_sql(path) + order]
        scalar_checks.append(f"json_type(body, {path}) IN {SCALAR_TYPES}")
    where = scope_sql(ns, collection)
    if index.unique:
        where += " AND " + " AND ".join(scalar_checks)
    unique = "UNIQUE " if index.unique else ""
    return f'CREATE {unique}INDEX "{sql_name}" ON docs ({", ".join(columns)}) WHERE {where}'
