"""Document basic, query, indexing and search on the `prism_docs` table (bodies as JSONB).

Value indexes are real PostgreSQL expression indexes over the JSONB members, partial to one
namespace and collection, so a unique index is enforced by PostgreSQL itself (JSONB equality:
1 equals 1.0, values of different types never equal). Search narrows candidates with a GIN
index over each document's words (the contract's words of every string it holds, computed
with the shared textsearch rules on write); PostgreSQL's own tsvector parser is not used
because it splits text differently from the contract ("3.14", e-mail addresses and URLs are
single tokens there, and letter classes depend on the database locale), which would make the
exact-match rule and matching itself differ from every other backend. Matching, ranking and
snippets are then the shared textsearch rules.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb
from psycopg import errors, sql

from plugins.postgres.db import Conn, Database
from plugins.postgres.docquery import Sql
from plugins.runtime import docfilter, docindex, sqldocuments, textsearch, validation
from plugins.runtime.context import CallContext
from plugins.runtime.docerrors import not_found, revision_mismatch, unique_violation
from plugins.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from plugins.runtime.sqldocuments import Groups, Row

DOC_COLUMNS = "id, body::text, revision, create_time, update_time"


def to_document(row: Row) -> basic_pb.Document:
    doc = basic_pb.Document(id=row[0], json=row[1], revision=row[2])
    created: datetime = row[3]
    updated: datetime = row[4]
    doc.create_time.FromDatetime(created)
    doc.update_time.FromDatetime(updated)
    return doc


def search_words(body: dict[str, Any]) -> list[str]:
    """The distinct words of every string a search field path can reach (member values and
    string elements of member arrays): a superset of what any search can match."""
    found: set[str] = set()
    stack = [body]
    while stack:
        for value in stack.pop().values():
            if isinstance(value, str):
                found.update(textsearch.normalized(value))
            elif isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, str):
                        found.update(textsearch.normalized(item))
    return sorted(found)


def _document_id(value: str) -> str:
    doc_id = validation.document_id(value)
    if "\x00" in doc_id:
        raise InvalidArgument("id", "must not contain U+0000 (PostgreSQL text cannot hold it)")
    return doc_id


def _body(text: str) -> tuple[str, list[str]]:
    """(canonical JSON text, search words) of a valid request body."""
    body = validation.document_json(text)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")), search_words(body)


def _sql_name(ns: str, collection: str, name: str) -> str:
    return "pdx_" + hashlib.sha256(f"{ns}\0{collection}\0{name}".encode()).hexdigest()[:40]


class PostgresDocuments(sqldocuments.SqlDocumentQueries):
    """document_basic, document_query, document_indexing and document_search."""

    token_prefix = "postgres"
    _document = staticmethod(to_document)

    def __init__(self, db: Database) -> None:
        self.db = db

    async def _write(self, ctx: CallContext, collection: str, doc_id: str, job: Any) -> Any:
        """Run a writing job; unique-index duplicates become UNIQUE_VIOLATION and bodies
        PostgreSQL cannot store (U+0000 in a string) INVALID_ARGUMENT."""
        try:
            async with self.db.connection(ctx) as conn:
                return await job(conn)
        except errors.UniqueViolation as exc:
            name = exc.diag.constraint_name or ""
            async with self.db.connection(ctx) as conn:
                cur = await conn.execute(
                    "SELECT name FROM prism_doc_indexes WHERE sql_name = %s", (name,)
                )
                row = await cur.fetchone()
            if row is None:
                raise  # not one of our unique indexes: a bug, reported as INTERNAL
            raise unique_violation(collection, doc_id, row[0]) from exc
        except errors.UntranslatableCharacter as exc:
            raise InvalidArgument("json", "U+0000 cannot be stored by postgres") from exc

    async def _revision(self, ctx: CallContext, collection: str, doc_id: str) -> int:
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                "SELECT revision FROM prism_docs WHERE ns = %s AND collection = %s AND id = %s",
                (ctx.namespace, collection, doc_id),
            )
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    # -- basic -------------------------------------------------------------------------------

    async def insert(
        self, request: basic_pb.InsertRequest, ctx: CallContext
    ) -> basic_pb.InsertResponse:
        collection = validation.collection(request.collection)
        doc_id = _document_id(request.id) if request.id else ""
        text, words = _body(request.json)

        async def job(conn: Conn) -> Row | None:
            cur = await conn.execute(
                "INSERT INTO prism_docs (ns, collection, id, body, words, revision, "
                "create_time, update_time) VALUES (%s, %s, %s, %s::jsonb, %s, 1, "
                "statement_timestamp(), statement_timestamp()) "
                f"ON CONFLICT (ns, collection, id) DO NOTHING RETURNING {DOC_COLUMNS}",
                (ctx.namespace, collection, doc_id or secrets.token_urlsafe(16), text, words),
            )
            return await cur.fetchone()

        while True:
            row = await self._write(ctx, collection, doc_id, job)
            if row is not None:
                return basic_pb.InsertResponse(document=to_document(row))
            if doc_id:
                raise AlreadyExists(
                    f"document {doc_id!r} already exists in {collection!r}",
                    reason="DOCUMENT_EXISTS",
                    collection=collection,
                    id=doc_id,
                )
            # a generated id collided (astronomically unlikely): draw another

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        collection = validation.collection(request.collection)
        doc_id = _document_id(request.id)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                f"SELECT {DOC_COLUMNS} FROM prism_docs "
                "WHERE ns = %s AND collection = %s AND id = %s",
                (ctx.namespace, collection, doc_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise not_found(collection, doc_id)
        return basic_pb.GetResponse(document=to_document(row))

    async def update(
        self, request: basic_pb.UpdateRequest, ctx: CallContext
    ) -> basic_pb.UpdateResponse:
        collection = validation.collection(request.collection)
        doc_id = _document_id(request.id)
        text, words = _body(request.json)
        expected = request.expected_revision
        key = (ctx.namespace, collection, doc_id)

        async def replace(conn: Conn) -> Row | None:
            condition = " AND revision = %s" if expected else ""
            cur = await conn.execute(
                "UPDATE prism_docs SET body = %s::jsonb, words = %s, revision = revision + 1, "
                "update_time = statement_timestamp() "
                f"WHERE ns = %s AND collection = %s AND id = %s{condition} "
                f"RETURNING {DOC_COLUMNS}",
                (text, words, *key, *([expected] if expected else [])),
            )
            return await cur.fetchone()

        async def create(conn: Conn) -> Row | None:
            cur = await conn.execute(
                "INSERT INTO prism_docs (ns, collection, id, body, words, revision, "
                "create_time, update_time) VALUES (%s, %s, %s, %s::jsonb, %s, 1, "
                "statement_timestamp(), statement_timestamp()) "
                f"ON CONFLICT (ns, collection, id) DO NOTHING RETURNING {DOC_COLUMNS}",
                (*key, text, words),
            )
            return await cur.fetchone()

        while True:
            row = await self._write(ctx, collection, doc_id, replace)
            if row is not None:
                return basic_pb.UpdateResponse(document=to_document(row), created=False)
            if expected:
                current = await self._revision(ctx, collection, doc_id)
                raise revision_mismatch(collection, doc_id, expected, current)
            if not request.allow_missing:
                raise not_found(collection, doc_id)
            row = await self._write(ctx, collection, doc_id, create)
            if row is not None:
                return basic_pb.UpdateResponse(document=to_document(row), created=True)
            # created concurrently between the two statements: update that one instead

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        collection = validation.collection(request.collection)
        doc_id = _document_id(request.id)
        expected = request.expected_revision
        condition = " AND revision = %s" if expected else ""
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                f"DELETE FROM prism_docs WHERE ns = %s AND collection = %s AND id = %s{condition}",
                (ctx.namespace, collection, doc_id, *([expected] if expected else [])),
            )
            deleted = cur.rowcount > 0
        if expected and not deleted:
            current = await self._revision(ctx, collection, doc_id)
            raise revision_mismatch(collection, doc_id, expected, current)
        return basic_pb.DeleteResponse(deleted=deleted)

    # -- query -------------------------------------------------------------------------------

    async def _select(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        *,
        columns: str | Callable[[Sql], str] = DOC_COLUMNS,
        spec: docfilter.SortSpec | None = None,
        after: docfilter.SortKey | None = None,
        limit: int | None = None,
        terms: list[str] | None = None,
    ) -> list[Row]:
        """See SqlDocumentQueries._select; `columns` may also be built with the statement's
        own Sql (for values it reads)."""
        builder = Sql()
        selected = columns if isinstance(columns, str) else columns(builder)
        where = builder.where(node)
        if spec is not None and after is not None:
            where += " AND " + builder.after(spec, after)
        if terms:
            where += " AND words @> " + builder.p(terms, '::text[] COLLATE "C"')
        order = f" ORDER BY {builder.order_by(spec)}" if spec is not None else ""
        bound = f" LIMIT {builder.p(limit, '::bigint')}" if limit is not None else ""
        statement = (
            f"SELECT {selected} FROM prism_docs WHERE ns = %(ns)s AND collection = %(coll)s "
            f"AND {where}{order}{bound}"
        )
        params = {**builder.params, "ns": ctx.namespace, "coll": collection}
        try:
            async with self.db.connection(ctx) as conn:
                cur = await conn.execute(statement, params)
                return await cur.fetchall()
        except errors.UntranslatableCharacter as exc:
            raise InvalidArgument("filter", "U+0000 cannot be compared by postgres") from exc

    async def _search_rows(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        paths: Sequence[docfilter.Path],
        terms: list[str],
    ) -> list[tuple[Row, list[Any]]]:
        """See SqlDocumentQueries._search_rows: the searched values as one JSONB array."""

        def columns(builder: Sql) -> str:
            values = ", ".join(builder.value(p) for p in paths)
            return f"{DOC_COLUMNS}, jsonb_build_array({values})::text"

        rows = await self._select(collection, node, ctx, columns=columns, terms=terms)
        return [(r, json.loads(r[-1])) for r in rows]

    async def _aggregate_groups(
        self,
        collection: str,
        node: docfilter.Node,
        spec: docfilter.AggregateSpec,
        ctx: CallContext,
    ) -> Groups:
        paths = [p for p in [spec.group_by] if p is not None]
        paths += [path for _, path in spec.accumulators]

        def values(builder: Sql) -> str:
            """Only the values aggregation reads (missing ones come back as null)."""
            return f"jsonb_build_array({', '.join(builder.value(p) for p in paths)})::text"

        rows = await self._select(collection, node, ctx, columns=values)
        first = 0 if spec.group_by is None else 1
        return docfilter.aggregate_values(
            ((v[0] if first else None, v[first:]) for v in (json.loads(r[0]) for r in rows)),
            spec,
        )

    # -- indexing ----------------------------------------------------------------------------

    async def create_index(
        self, request: index_pb.CreateIndexRequest, ctx: CallContext
    ) -> index_pb.CreateIndexResponse:
        collection = validation.collection(request.collection)
        spec = docindex.requested(request)
        index = index_pb.Index()
        index.CopyFrom(request.index)
        index.kind = docindex.KIND_ENUMS[spec.kind]
        ns = ctx.namespace
        sql_name = _sql_name(ns, collection, spec.name)

        async def job(conn: Conn) -> bool:
            async with conn.transaction():
                # one creator at a time per index name, so the check below is not racy
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sql_name,))
                cur = await conn.execute(
                    "SELECT definition FROM prism_doc_indexes "
                    "WHERE ns = %s AND collection = %s AND name = %s",
                    (ns, collection, spec.name),
                )
                row = await cur.fetchone()
                if row is not None:
                    if index_pb.Index.FromString(bytes(row[0])) == index:
                        return False
                    raise AlreadyExists(
                        f"index {spec.name!r} exists with another definition",
                        reason="INDEX_EXISTS",
                        collection=collection,
                        index=spec.name,
                    )
                await conn.execute(
                    "INSERT INTO prism_doc_indexes (ns, collection, name, definition, sql_name) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (ns, collection, spec.name, index.SerializeToString(), sql_name),
                )
                if spec.kind == "value":
                    await conn.execute(_index_ddl(sql_name, ns, collection, spec))
            return True

        try:
            created = await self._run(ctx, job)
        except errors.UniqueViolation as exc:
            raise FailedPrecondition(
                f"documents of {collection!r} already hold duplicate values for unique index "
                f"{spec.name!r}",
                reason="DUPLICATE_VALUES",
                collection=collection,
                index=spec.name,
            ) from exc
        return index_pb.CreateIndexResponse(index=index, created=created)

    async def _run(self, ctx: CallContext, job: Any) -> Any:
        async with self.db.connection(ctx) as conn:
            return await job(conn)

    async def drop_index(
        self, request: index_pb.DropIndexRequest, ctx: CallContext
    ) -> index_pb.DropIndexResponse:
        collection = validation.collection(request.collection)
        name = request.name

        async def job(conn: Conn) -> None:
            async with conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM prism_doc_indexes WHERE ns = %s AND collection = %s "
                    "AND name = %s RETURNING sql_name",
                    (ctx.namespace, collection, name),
                )
                row = await cur.fetchone()
                if row is None:
                    raise NotFound(
                        f"index {name!r} not found in {collection!r}",
                        reason="INDEX_NOT_FOUND",
                        collection=collection,
                        index=name,
                    )
                await conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(row[0]))
                )

        await self._run(ctx, job)
        return index_pb.DropIndexResponse()

    async def _index_definitions(
        self, collection: str, after: str, limit: int, ctx: CallContext
    ) -> list[bytes]:
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                "SELECT definition FROM prism_doc_indexes WHERE ns = %s AND collection = %s "
                "AND name > %s ORDER BY name LIMIT %s",
                (ctx.namespace, collection, after, limit),
            )
            return [bytes(r[0]) for r in await cur.fetchall()]


def _index_ddl(sql_name: str, ns: str, collection: str, spec: docfilter.IndexSpec) -> sql.Composed:
    """CREATE INDEX for a value index. DDL takes no bound parameters, so the namespace,
    collection and member names are quoted literals (psycopg.sql.Literal) and the index name a
    generated identifier. Each field is its JSONB value: JSONB equality is the contract's (1
    equals 1.0; true, 1 and "1" differ). A unique index is partial to documents whose indexed
    values are all scalars, the ones the contract constrains."""
    columns: list[sql.Composable] = [sql.SQL("ns"), sql.SQL("collection")]
    scalar_checks: list[sql.Composable] = []
    for path, (_, descending) in zip(spec.paths, spec.fields, strict=True):
        value = sql.SQL("(body{})").format(
            sql.SQL("").join(sql.SQL("->{}").format(sql.Literal(name)) for name in path)
        )
        columns.append(sql.SQL("({}){}").format(value, sql.SQL(" DESC" if descending else "")))
        scalar_checks.append(
            sql.SQL("jsonb_typeof({}) IN ('number', 'string', 'boolean')").format(value)
        )
    where: list[sql.Composable] = [
        sql.SQL("ns = {}").format(sql.Literal(ns)),
        sql.SQL("collection = {}").format(sql.Literal(collection)),
    ]
    if spec.unique:
        where += scalar_checks
    return sql.SQL("CREATE {}INDEX {} ON prism_docs ({}) WHERE {}").format(
        sql.SQL("UNIQUE " if spec.unique else ""),
        sql.Identifier(sql_name),
        sql.SQL(", ").join(columns),
        sql.SQL(" AND ").join(where),
    )
