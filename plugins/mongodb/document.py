"""Document basic, query, indexing and search on MongoDB.

Layout: the documents of one (namespace, collection) live in their own MongoDB collection
`<prefix>doc.n<ns>.<collection>` (the namespace encoded so that any string maps to a distinct,
legal name), as `{_id: id, b: body, r: revision, ct, ut, u}` (times in ns since the epoch).
Index definitions live in `<prefix>doc_indexes`. A non-unique VALUE index is a MongoDB index on
`b.<path>...` (speed only). A unique VALUE index cannot be one: MongoDB would index the elements
of arrays and walk paths through arrays, which the contract leaves unconstrained. So every write
stores, under `u.<index>`, the index's values when the contract constrains the document (no
field missing, null, an object or an array; docfilter.unique_key decides) and nothing otherwise,
and a MongoDB unique index on those values (partial: only documents that have them) enforces the
constraint atomically with the write; MongoDB's index equality is the contract's (1 equals 1.0,
true differs from 1). Filters, sorts and keyset pages run on the server (docquery.py); Aggregate
and search scoring run here over the matching documents, fetched with only the fields they
need, with the shared docfilter/textsearch code.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic
from prism.interfaces.document.v1 import document_indexing_pb2 as indexing
from prism.interfaces.document.v1 import document_query_pb2 as query
from prism.interfaces.document.v1 import document_search_pb2 as search
from pymongo import ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, OperationFailure

from plugins.mongodb import docquery
from plugins.mongodb.connection import Doc, Mongo
from plugins.runtime import docfilter, docindex, docpages, textsearch, validation
from plugins.runtime.context import CallContext
from plugins.runtime.docerrors import not_found, revision_mismatch, unique_violation
from plugins.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

_SAFE_NS = re.compile(r"[a-z0-9-]")
_DUP_INDEX = re.compile(r"index: (\S+)")
#: IndexNotFound, NamespaceNotFound: nothing to drop
_NO_INDEX = frozenset({27, 26})
#: a generated id colliding twice in a row means something is wrong, not bad luck
_ID_ATTEMPTS = 3


def encode_namespace(ns: str) -> str:
    """`[a-z0-9-]` kept, every other character as `_` + hex of its UTF-8 bytes: injective and
    always a legal collection-name part."""
    return "".join(
        ch if _SAFE_NS.fullmatch(ch) else "".join(f"_{b:02x}" for b in ch.encode("utf-8"))
        for ch in ns
    )


def to_bson(body: Any, where: str = "json") -> Any:
    """A parsed JSON body as BSON can store it: integers beyond int64 become doubles (the proto
    allows rounding them); a NUL in a member name or a lone surrogate cannot be stored at all."""
    if isinstance(body, dict):
        out: dict[str, Any] = {}
        for name, value in body.items():
            if "\x00" in name:
                raise InvalidArgument(where, "member names containing NUL cannot be stored")
            out[_checked_text(name, where)] = to_bson(value, where)
        return out
    if isinstance(body, list):
        return [to_bson(v, where) for v in body]
    if isinstance(body, str):
        return _checked_text(body, where)
    return docquery.operand(body)


def _checked_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(where, "strings must not contain lone surrogates") from exc
    return text


def to_document(doc: Doc) -> basic.Document:
    d = basic.Document(
        id=doc["_id"],
        json=json.dumps(doc.get("b", {}), separators=(",", ":")),
        revision=int(doc["r"]),
    )
    d.create_time.FromNanoseconds(int(doc["ct"]))
    d.update_time.FromNanoseconds(int(doc["ut"]))
    return d


def _duplicate_index(exc: DuplicateKeyError) -> str:
    found = _DUP_INDEX.search(str((exc.details or {}).get("errmsg", exc)))
    return found.group(1) if found else ""


def _unique_violation(exc: DuplicateKeyError, collection: str, doc_id: str) -> AlreadyExists:
    return unique_violation(collection, doc_id, _duplicate_index(exc))


def _index_proto(spec: Doc) -> indexing.Index:
    return indexing.Index(
        name=spec["name"],
        fields=[indexing.IndexField(path=p, descending=d) for p, d in spec["fields"]],
        unique=spec["unique"],
        kind=docindex.KIND_ENUMS[spec["kind"]],
    )


def _body(doc: Doc) -> Any:
    return doc.get("b", {})


UniqueIndexes = list[tuple[str, tuple[docfilter.Path, ...]]]


def unique_values(body: Any, indexes: UniqueIndexes) -> Doc:
    """`u` of a document: for each unique index that constrains it, its values by position."""
    values: Doc = {}
    for name, paths in indexes:
        if docfilter.unique_key(body, paths) is not None:
            values[name] = {f"f{i}": docfilter.resolve(body, p) for i, p in enumerate(paths)}
    return values


def _paths(stored: Doc) -> tuple[docfilter.Path, ...]:
    return tuple(tuple(p.split(".")) for p, _ in stored["fields"])


class MongoDocuments:
    """document_basic, _query, _indexing and _search."""

    def __init__(self, mongo: Mongo) -> None:
        self.mongo = mongo
        self.indexes: AsyncCollection[Doc] = mongo.db[mongo.name("doc_indexes")]

    async def prepare(self) -> None:
        await self.indexes.create_index([("ns", 1), ("c", 1), ("name", 1)], name="prism_list")

    def _coll(self, ctx: CallContext, name: str) -> AsyncCollection[Doc]:
        validation.collection(name)
        return self.mongo.db[self.mongo.name(f"doc.n{encode_namespace(ctx.namespace)}.{name}")]

    async def _unique_indexes(self, ctx: CallContext, collection: str) -> UniqueIndexes:
        """The collection's unique value indexes, read on every write so that an index created
        by any Prism instance constrains it."""
        selector = {"ns": ctx.namespace, "c": collection, "unique": True, "kind": "value"}
        async with self.mongo.call(ctx):
            specs = await self.indexes.find(selector, {"name": 1, "fields": 1}).to_list()
        return [(spec["name"], _paths(spec)) for spec in specs]

    # document_basic -----------------------------------------------------------------------
    async def insert(self, request: basic.InsertRequest, ctx: CallContext) -> basic.InsertResponse:
        coll = self._coll(ctx, request.collection)
        doc_id = validation.document_id(request.id) if request.id else ""
        body = to_bson(validation.document_json(request.json))
        unique = unique_values(body, await self._unique_indexes(ctx, request.collection))
        now = time.time_ns()
        for _ in range(_ID_ATTEMPTS):
            doc_fields = {"b": body, "r": 1, "ct": now, "ut": now, "u": unique}
            doc = {"_id": doc_id or secrets.token_urlsafe(16), **doc_fields}
            try:
                async with self.mongo.call(ctx):
                    await coll.insert_one(doc)
            except DuplicateKeyError as exc:
                if _duplicate_index(exc) != "_id_":
                    raise _unique_violation(exc, request.collection, doc["_id"]) from exc
                if doc_id:
                    raise AlreadyExists(
                        f"document {doc_id!r} already exists",
                        reason="DOCUMENT_EXISTS",
                        collection=request.collection,
                        id=doc_id,
                    ) from exc
                continue
            return basic.InsertResponse(document=to_document(doc))
        raise RuntimeError("generated document ids collided repeatedly")

    async def get(self, request: basic.GetRequest, ctx: CallContext) -> basic.GetResponse:
        coll = self._coll(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        async with self.mongo.call(ctx):
            doc = await coll.find_one({"_id": doc_id})
        if doc is None:
            raise not_found(request.collection, doc_id)
        return basic.GetResponse(document=to_document(doc))

    async def _revision(self, coll: AsyncCollection[Doc], ctx: CallContext, doc_id: str) -> int:
        async with self.mongo.call(ctx):
            doc = await coll.find_one({"_id": doc_id}, {"r": 1})
        return 0 if doc is None else int(doc["r"])

    async def update(self, request: basic.UpdateRequest, ctx: CallContext) -> basic.UpdateResponse:
        coll = self._coll(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        body = to_bson(validation.document_json(request.json))
        unique = unique_values(body, await self._unique_indexes(ctx, request.collection))
        now = time.time_ns()
        selector: Doc = {"_id": doc_id}
        if request.expected_revision:
            selector["r"] = request.expected_revision
        change: Doc = {"$set": {"b": body, "ut": now, "u": unique}, "$inc": {"r": 1}}
        upsert = request.allow_missing and not request.expected_revision
        if upsert:
            change["$setOnInsert"] = {"ct": now}
        doc = None
        for attempt in range(2):
            try:
                async with self.mongo.call(ctx):
                    doc = await coll.find_one_and_update(
                        selector, change, upsert=upsert, return_document=ReturnDocument.AFTER
                    )
                break
            except DuplicateKeyError as exc:
                # an upsert racing a concurrent insert of the id: the id exists now, update it
                if _duplicate_index(exc) == "_id_" and upsert and attempt == 0:
                    continue
                raise _unique_violation(exc, request.collection, doc_id) from exc
        if doc is None:
            if request.expected_revision:
                raise revision_mismatch(
                    request.collection,
                    doc_id,
                    request.expected_revision,
                    await self._revision(coll, ctx, doc_id),
                )
            raise not_found(request.collection, doc_id)
        # revision 1 exists only right after creation, so r == 1 means this write created it
        return basic.UpdateResponse(document=to_document(doc), created=upsert and doc["r"] == 1)

    async def delete(self, request: basic.DeleteRequest, ctx: CallContext) -> basic.DeleteResponse:
        coll = self._coll(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        selector: Doc = {"_id": doc_id}
        if request.expected_revision:
            selector["r"] = request.expected_revision
        async with self.mongo.call(ctx):
            result = await coll.delete_one(selector)
        if result.deleted_count == 0 and request.expected_revision:
            raise revision_mismatch(
                request.collection,
                doc_id,
                request.expected_revision,
                await self._revision(coll, ctx, doc_id),
            )
        return basic.DeleteResponse(deleted=result.deleted_count > 0)

    # document_query -----------------------------------------------------------------------
    async def _fetch(
        self,
        coll: AsyncCollection[Doc],
        ctx: CallContext,
        selector: Doc,
        paths: Iterable[docfilter.Path] | None,
    ) -> list[Doc]:
        """Matching documents, with only `paths` of their bodies (None: everything)."""
        proj = None if paths is None else docquery.projection(paths)
        async with self.mongo.call(ctx):
            return await coll.find(selector, proj).to_list()

    async def _by_ids(
        self, coll: AsyncCollection[Doc], ctx: CallContext, ids: list[str]
    ) -> list[Doc]:
        """Whole documents for `ids`, in that order (ids deleted meanwhile are left out)."""
        if not ids:
            return []
        found = {d["_id"]: d for d in await self._fetch(coll, ctx, {"_id": {"$in": ids}}, None)}
        return [found[i] for i in ids if i in found]

    async def _sorted_page(
        self,
        coll: AsyncCollection[Doc],
        ctx: CallContext,
        selector: Doc,
        spec: docfilter.SortSpec,
        after: docfilter.SortKey | None,
        size: int,
    ) -> tuple[list[Doc], docfilter.SortKey | None]:
        """Up to `size` documents after `after` in sort order, and the key of the last one when
        more follow."""
        if spec.fields:
            pipeline = [{"$match": selector}, *docquery.sort_stages(spec, after)]
            pipeline += [{"$limit": size + 1}, docquery.sort_cleanup(spec)]
            async with self.mongo.call(ctx):
                docs = await (await coll.aggregate(pipeline)).to_list()
        else:  # id order: a keyset range on the _id index
            if after is not None:
                selector = {"$and": [selector, {"_id": {"$gt": after.doc_id}}]}
            async with self.mongo.call(ctx):
                docs = await coll.find(selector).sort("_id", 1).limit(size + 1).to_list()
        more = len(docs) > size
        docs = docs[:size]
        return docs, spec.key(docs[-1]["_id"], _body(docs[-1])) if more else None

    async def find(self, request: query.FindRequest, ctx: CallContext) -> query.FindResponse:
        coll = self._coll(ctx, request.collection)
        node = docfilter.parse_filter(request.filter)
        spec = docfilter.parse_sort([(s.field, s.descending) for s in request.sort])
        size = validation.page_size(request.page_size)
        scope = docfilter.token_scope(request.collection, request.filter, spec.canonical())
        position = validation.decode_page_token(request.page_token, "mongodb.find", scope)
        after = None if position is None else docfilter.key_from_position(position, spec)
        docs, last = await self._sorted_page(coll, ctx, docquery.translate(node), spec, after, size)
        token = (
            ""
            if last is None
            else validation.encode_page_token("mongodb.find", scope, last.position())
        )
        return query.FindResponse(documents=[to_document(d) for d in docs], next_page_token=token)

    async def find_one(
        self, request: query.FindOneRequest, ctx: CallContext
    ) -> query.FindOneResponse:
        coll = self._coll(ctx, request.collection)
        node = docfilter.parse_filter(request.filter)
        spec = docfilter.parse_sort([(s.field, s.descending) for s in request.sort])
        docs, _ = await self._sorted_page(coll, ctx, docquery.translate(node), spec, None, 1)
        if not docs:
            return query.FindOneResponse(found=False)
        return query.FindOneResponse(found=True, document=to_document(docs[0]))

    async def count(self, request: query.CountRequest, ctx: CallContext) -> query.CountResponse:
        coll = self._coll(ctx, request.collection)
        selector = docquery.translate(docfilter.parse_filter(request.filter))
        async with self.mongo.call(ctx):
            total = await coll.count_documents(selector)
        return query.CountResponse(count=total)

    async def aggregate(
        self, request: query.AggregateRequest, ctx: CallContext
    ) -> query.AggregateResponse:
        coll = self._coll(ctx, request.collection)
        node = docfilter.parse_filter(request.filter)
        paging = docpages.AggregatePaging.parse(request, request.collection, "mongodb.aggregate")
        spec = paging.spec
        paths = [p for _, p in spec.accumulators]
        if spec.group_by is not None:
            paths.append(spec.group_by)
        rows = await self._fetch(coll, ctx, docquery.translate(node), paths)
        return paging.page(docfilter.aggregate((_body(d) for d in rows), spec))

    # document_indexing --------------------------------------------------------------------
    def _index_id(self, ctx: CallContext, collection: str, name: str) -> str:
        return f"{len(ctx.namespace)}:{ctx.namespace}/{collection}/{name}"

    async def create_index(
        self, request: indexing.CreateIndexRequest, ctx: CallContext
    ) -> indexing.CreateIndexResponse:
        coll = self._coll(ctx, request.collection)
        spec = docindex.requested(request)
        stored: Doc = {
            "_id": self._index_id(ctx, request.collection, spec.name),
            "ns": ctx.namespace,
            "c": request.collection,
            "name": spec.name,
            "fields": [[p, d] for p, d in spec.fields],
            "unique": spec.unique,
            "kind": spec.kind,
        }
        # the definition first, so that writes from now on store the unique values
        try:
            async with self.mongo.call(ctx):
                await self.indexes.insert_one(stored)
            created = True
        except DuplicateKeyError:
            created = False
            async with self.mongo.call(ctx):
                existing = await self.indexes.find_one({"_id": stored["_id"]})
            if existing is None or any(existing[k] != stored[k] for k in stored):
                raise AlreadyExists(
                    f"index {spec.name!r} exists with another definition",
                    reason="INDEX_EXISTS",
                    index=spec.name,
                    collection=request.collection,
                ) from None
        if spec.kind == "value" and (
            created or not await self._has_mongo_index(coll, ctx, spec.name)
        ):
            # a repeated create finishes a build that an unreachable server interrupted
            await self._build_value_index(coll, ctx, spec, request.collection, stored["_id"])
        return indexing.CreateIndexResponse(index=_index_proto(stored), created=created)

    async def _backfill(
        self,
        coll: AsyncCollection[Doc],
        ctx: CallContext,
        spec: docfilter.IndexSpec,
        only_new: bool,
    ) -> None:
        """Store the unique values of documents (`only_new`: those without them yet). Each
        update is conditional on the revision read, so a concurrent write is never undone."""
        selector: Doc = {f"u.{spec.name}": {"$exists": False}} if only_new else {}
        projection = {**docquery.projection(spec.paths), "r": 1}
        async with self.mongo.call(ctx):
            rows = await coll.find(selector, projection).to_list()
        writes = []
        for row in rows:
            values = unique_values(_body(row), [(spec.name, spec.paths)])
            if spec.name in values:
                change = {"$set": {f"u.{spec.name}": values[spec.name]}}
                writes.append(UpdateOne({"_id": row["_id"], "r": row["r"]}, change))
        if writes:
            async with self.mongo.call(ctx):
                await coll.bulk_write(writes, ordered=False)

    async def _forget_unique_values(
        self, coll: AsyncCollection[Doc], ctx: CallContext, name: str
    ) -> None:
        async with self.mongo.call(ctx):
            await coll.update_many({f"u.{name}": {"$exists": True}}, {"$unset": {f"u.{name}": ""}})

    async def _build_value_index(
        self,
        coll: AsyncCollection[Doc],
        ctx: CallContext,
        spec: docfilter.IndexSpec,
        collection: str,
        stored_id: str,
    ) -> None:
        """The MongoDB index behind a VALUE index. For a unique one: store the unique values of
        the existing documents, build the unique index over them, then catch documents written
        meanwhile by writers that had not seen the definition yet. Duplicates undo it all."""
        if not spec.unique:
            keys = [
                (docquery.field(path), -1 if descending else 1)
                for path, (_, descending) in zip(spec.paths, spec.fields, strict=True)
            ]
            async with self.mongo.call(ctx):
                await coll.create_index(keys, name=spec.name)
            return
        try:
            await self._backfill(coll, ctx, spec, only_new=False)
            async with self.mongo.call(ctx):
                await coll.create_index(
                    [(f"u.{spec.name}.f{i}", 1) for i in range(len(spec.paths))],
                    name=spec.name,
                    unique=True,
                    partialFilterExpression={f"u.{spec.name}": {"$exists": True}},
                )
            await self._backfill(coll, ctx, spec, only_new=True)
        except DuplicateKeyError as exc:
            async with self.mongo.call(ctx):
                await self.indexes.delete_one({"_id": stored_id})
            await self._drop_mongo_index(coll, ctx, spec.name)
            await self._forget_unique_values(coll, ctx, spec.name)
            raise FailedPrecondition(
                f"existing documents share a value of unique index {spec.name!r}",
                reason="DUPLICATE_VALUES",
                index=spec.name,
                collection=collection,
            ) from exc

    async def _has_mongo_index(
        self, coll: AsyncCollection[Doc], ctx: CallContext, name: str
    ) -> bool:
        async with self.mongo.call(ctx):
            return name in await coll.index_information()

    async def _drop_mongo_index(
        self, coll: AsyncCollection[Doc], ctx: CallContext, name: str
    ) -> None:
        try:
            async with self.mongo.call(ctx):
                await coll.drop_index(name)
        except OperationFailure as exc:
            if exc.code not in _NO_INDEX:
                raise

    async def drop_index(
        self, request: indexing.DropIndexRequest, ctx: CallContext
    ) -> indexing.DropIndexResponse:
        coll = self._coll(ctx, request.collection)
        async with self.mongo.call(ctx):
            spec = await self.indexes.find_one_and_delete(
                {"_id": self._index_id(ctx, request.collection, request.name)}
            )
        if spec is not None and spec["kind"] == "value":
            await self._drop_mongo_index(coll, ctx, spec["name"])
            if spec["unique"]:
                await self._forget_unique_values(coll, ctx, spec["name"])
        if spec is None:
            raise NotFound(
                f"index {request.name!r} not found",
                reason="INDEX_NOT_FOUND",
                index=request.name,
                collection=request.collection,
            )
        return indexing.DropIndexResponse()

    async def list_indexes(
        self, request: indexing.ListIndexesRequest, ctx: CallContext
    ) -> indexing.ListIndexesResponse:
        validation.collection(request.collection)
        size = validation.page_size(request.page_size)
        after = validation.scan_after(request.page_token, "mongodb.indexes", request.collection)
        selector: Doc = {"ns": ctx.namespace, "c": request.collection}
        if after is not None:
            selector["name"] = {"$gt": after}
        async with self.mongo.call(ctx):
            specs = await self.indexes.find(selector).sort("name", 1).limit(size + 1).to_list()
        token = ""
        if len(specs) > size:
            specs = specs[:size]
            token = validation.encode_page_token(
                "mongodb.indexes", request.collection, specs[-1]["name"]
            )
        return indexing.ListIndexesResponse(
            indexes=[_index_proto(s) for s in specs], next_page_token=token
        )

    # document_search ----------------------------------------------------------------------
    async def search(
        self, request: search.SearchRequest, ctx: CallContext
    ) -> search.SearchResponse:
        coll = self._coll(ctx, request.collection)
        paging = docpages.SearchPaging.parse(request, request.collection, "mongodb.search")
        fields, after = paging.fields, paging.after
        paths = [f.path for f in fields]
        rows = await self._fetch(coll, ctx, docquery.translate(paging.node), paths)
        candidates = [(d["_id"], textsearch.document_words(_body(d), fields)) for d in rows]
        averages = [
            sum(words[k].length for _, words in candidates) / len(candidates) if candidates else 0.0
            for k in range(len(fields))
        ]
        query_words = textsearch.normalized(request.query)
        scored: list[tuple[float, str]] = []
        for doc_id, words in candidates:
            s = textsearch.score(words, paging.terms, query_words, averages)
            if s is not None and (
                after is None or s < after[0] or (s == after[0] and doc_id > after[1])
            ):
                scored.append((s, doc_id))
        scored.sort(key=lambda hit: (-hit[0], hit[1]))
        page = scored[: paging.size]
        token = paging.token(*page[-1]) if len(scored) > paging.size else ""
        docs = {d["_id"]: d for d in await self._by_ids(coll, ctx, [i for _, i in page])}
        hits = []
        for s, doc_id in page:
            doc = docs.get(doc_id)
            if doc is None:  # deleted between scoring and fetching
                continue
            hit = search.SearchHit(document=to_document(doc), score=s)
            if paging.tags is not None:
                for name, snippet in textsearch.highlights(
                    _body(doc), fields, paging.terms, paging.tags
                ):
                    hit.highlights.add(field=name, snippet=snippet)
            hits.append(hit)
        return search.SearchResponse(hits=hits, next_page_token=token)
