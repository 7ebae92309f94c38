"""Document basic and indexing on the `docs` table (bodies as JSON text, read with JSON1).

Value indexes are real SQLite expression indexes over json_extract, partial to one namespace and
collection, so a unique index is enforced by SQLite itself inside the writing transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from plugins.sqlite.db import Database

INDEX_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_INDEX_FIELDS = 16
SCALAR_TYPES = "('integer', 'real', 'text', 'true', 'false')"
_SQL_INDEX_RE = re.compile(r"index '([^']+)'")

DOC_COLUMNS = "id, body, revision, create_time, update_time"


def check_path(path: str, field: str) -> str:
    """A field path: dot-joined member names, each non-empty and not starting with `$`.

    SQLite's JSON paths cannot name a member containing a double quote, so such names are
    refused here rather than silently matching nothing."""
    names = path.split(".")
    for name in names:
        if not name:
            raise InvalidArgument(field, f"bad path {path!r}: empty member name")
        if name.startswith("$"):
            raise InvalidArgument(field, f"bad path {path!r}: member names cannot start with '$'")
        if '"' in name:
            raise InvalidArgument(field, f"bad path {path!r}: '\"' is not supported by sqlite")
    return path


def json_path(path: str) -> str:
    """Field path → SQLite JSON path; every name quoted so digits never index arrays."""
    return "$" + "".join(f'."{name}"' for name in path.split("."))


def sql_literal(text: str) -> str:
    """A SQL string literal, for the few places SQLite takes no bound parameter (index DDL)."""
    return "'" + text.replace("'", "''") + "'"


def to_document(row: sqlite3.Row | tuple[Any, ...]) -> basic_pb.Document:
    doc = basic_pb.Document(id=row[0], json=row[1], revision=row[2])
    doc.create_time.FromNanoseconds(row[3])
    doc.update_time.FromNanoseconds(row[4])
    return doc


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _not_found(collection: str, doc_id: str) -> NotFound:
    return NotFound(
        f"document {doc_id!r} not found in {collection!r}",
        reason="DOCUMENT_NOT_FOUND",
        collection=collection,
        id=doc_id,
    )


def _mismatch(collection: str, doc_id: str, expected: int, current: int) -> Aborted:
    return Aborted(
        f"revision of document {doc_id!r} is {current}, not {expected}",
        reason="REVISION_MISMATCH",
        collection=collection,
        id=doc_id,
        current_revision=current,
    )


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
    return AlreadyExists(
        f"document {doc_id!r} duplicates another document under unique index {row[0]!r}",
        reason="UNIQUE_VIOLATION",
        collection=collection,
        id=doc_id,
        index=row[0],
    )


def _current(
    conn: sqlite3.Connection, ns: str, collection: str, doc_id: str
) -> tuple[int, int] | None:
    """(revision, create_time) of a stored document."""
    row = conn.execute(
        "SELECT revision, create_time FROM docs WHERE ns = ? AND collection = ? AND id = ?",
        (ns, collection, doc_id),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _write(
    conn: sqlite3.Connection,
    ns: str,
    collection: str,
    doc_id: str,
    body: str,
    revision: int,
    create_time: int,
) -> basic_pb.Document:
    """Insert or replace one document; unique-index duplicates become UNIQUE_VIOLATION."""
    now = time.time_ns() if revision > 1 else create_time
    try:
        conn.execute(
            "INSERT INTO docs (ns, collection, id, body, revision, create_time, update_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ns, collection, id) DO UPDATE SET "
            "body = excluded.body, revision = excluded.revision, "
            "update_time = excluded.update_time",
            (ns, collection, doc_id, body, revision, create_time, now),
        )
    except sqlite3.IntegrityError as exc:
        raise _unique_violation(conn, exc, ns, collection, doc_id) from exc
    return to_document((doc_id, body, revision, create_time, now))


class SqliteDocuments:
    """document_basic and document_indexing (document_query / _search build on it)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- basic -------------------------------------------------------------------------------

    async def insert(
        self, request: basic_pb.InsertRequest, ctx: CallContext
    ) -> basic_pb.InsertResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id) if request.id else ""
        body = canonical(validation.document_json(request.json))
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
            raise _not_found(collection, doc_id)
        return basic_pb.GetResponse(document=to_document(row))

    async def update(
        self, request: basic_pb.UpdateRequest, ctx: CallContext
    ) -> basic_pb.UpdateResponse:
        collection = validation.collection(request.collection)
        doc_id = validation.document_id(request.id)
        body = canonical(validation.document_json(request.json))
        expected = request.expected_revision
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> basic_pb.UpdateResponse:
            current = _current(conn, ns, collection, doc_id)
            if expected and (current is None or current[0] != expected):
                raise _mismatch(collection, doc_id, expected, 0 if current is None else current[0])
            if current is None:
                if not request.allow_missing:
                    raise _not_found(collection, doc_id)
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
                raise _mismatch(collection, doc_id, expected, 0 if current is None else current[0])
            if current is None:
                return False
            conn.execute(
                "DELETE FROM docs WHERE ns = ? AND collection = ? AND id = ?",
                (ns, collection, doc_id),
            )
            return True

        return basic_pb.DeleteResponse(deleted=await self.db.write(job))

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
            if index.kind == index_pb.INDEX_KIND_VALUE:
                try:
                    conn.execute(_index_ddl(sql_name, ns, collection, index))
                except sqlite3.IntegrityError as exc:
                    raise FailedPrecondition(
                        f"documents of {collection!r} already hold duplicate values for "
                        f"unique index {index.name!r}",
                        reason="DUPLICATE_VALUES",
                        collection=collection,
                        index=index.name,
                    ) from exc
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

    async def list_indexes(
        self, request: index_pb.ListIndexesRequest, ctx: CallContext
    ) -> index_pb.ListIndexesResponse:
        collection = validation.collection(request.collection)
        size = validation.page_size(request.page_size)
        after = validation.decode_page_token(request.page_token, "sqlite.indexes", collection)
        if after is not None and not isinstance(after, str):
            raise InvalidArgument("page_token", "malformed page token")

        def job(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT definition FROM doc_indexes WHERE ns = ? AND collection = ? "
                "AND name > ? ORDER BY name LIMIT ?",
                (ctx.namespace, collection, after or "", size + 1),
            )
            return [bytes(r[0]) for r in rows]

        indexes = [index_pb.Index.FromString(d) for d in await self.db.read(job)]
        token = ""
        if len(indexes) > size:
            indexes = indexes[:size]
            token = validation.encode_page_token("sqlite.indexes", collection, indexes[-1].name)
        return index_pb.ListIndexesResponse(indexes=indexes, next_page_token=token)


def _checked_index(requested: index_pb.Index) -> index_pb.Index:
    """The index as it will be stored (kind set), or INVALID_ARGUMENT naming the bad field."""
    if not INDEX_NAME_RE.fullmatch(requested.name):
        raise InvalidArgument("index.name", "must match ^[a-z][a-z0-9_]{0,62}$")
    if not 1 <= len(requested.fields) <= MAX_INDEX_FIELDS:
        raise InvalidArgument("index.fields", f"must list 1 to {MAX_INDEX_FIELDS} fields")
    index = index_pb.Index()
    index.CopyFrom(requested)
    if index.kind == index_pb.INDEX_KIND_UNSPECIFIED:
        index.kind = index_pb.INDEX_KIND_VALUE
    seen: set[str] = set()
    for i, f in enumerate(index.fields):
        check_path(f.path, f"index.fields[{i}].path")
        if f.path in seen:
            raise InvalidArgument(f"index.fields[{i}].path", f"repeats {f.path!r}")
        seen.add(f.path)
        if index.kind == index_pb.INDEX_KIND_TEXT and f.descending:
            raise InvalidArgument(f"fields[{i}].descending", "text index fields have no order")
    if index.kind == index_pb.INDEX_KIND_TEXT and index.unique:
        raise InvalidArgument("unique", "a text index cannot be unique")
    return index


def _index_ddl(sql_name: str, ns: str, collection: str, index: index_pb.Index) -> str:
    """CREATE INDEX for a value index. DDL takes no bound parameters, so the namespace,
    collection and JSON paths are quoted literals and the name is a generated identifier.

    Each field contributes (kind, value): kind keeps `true` apart from 1 and "1" from 1 while
    1 and 1.0 stay equal. A unique index is partial to documents whose indexed values are all
    scalars, the ones the contract constrains."""
    columns = ["ns", "collection"]
    scalar_checks = []
    for f in index.fields:
        path = sql_literal(json_path(f.path))
        order = " DESC" if f.descending else ""
        columns.append(
            f"(CASE json_type(body, {path}) WHEN 'integer' THEN 'number' "
            f"WHEN 'real' THEN 'number' ELSE json_type(body, {path}) END){order}"
        )
        columns.append(f"json_extract(body, {path}){order}")
        scalar_checks.append(f"json_type(body, {path}) IN {SCALAR_TYPES}")
    where = f"ns = {sql_literal(ns)} AND collection = {sql_literal(collection)}"
    if index.unique:
        where += " AND " + " AND ".join(scalar_checks)
    unique = "UNIQUE " if index.unique else ""
    return f'CREATE {unique}INDEX "{sql_name}" ON docs ({", ".join(columns)}) WHERE {where}'
