"""Document basic/query/indexing/search over dicts, evaluated with the shared docfilter and
textsearch modules. Queries scan the collection (memstore favours simplicity over index use);
unique indexes are kept as hash maps so the constraint is checked in O(1) per write."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic
from prism.interfaces.document.v1 import document_indexing_pb2 as indexing
from prism.interfaces.document.v1 import document_query_pb2 as query
from prism.interfaces.document.v1 import document_search_pb2 as search

from plugins.runtime import docfilter, docindex, docpages, validation
from plugins.runtime.context import CallContext
from plugins.runtime.docerrors import not_found, revision_mismatch, unique_violation
from plugins.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
)


@dataclass(slots=True)
class _Doc:
    body: dict[str, Any]
    text: str  # the body serialised once per write, not once per read
    revision: int
    create_ns: int
    update_ns: int

    def proto(self, doc_id: str) -> basic.Document:
        d = basic.Document(id=doc_id, json=self.text, revision=self.revision)
        d.create_time.FromNanoseconds(self.create_ns)
        d.update_time.FromNanoseconds(self.update_ns)
        return d


@dataclass(slots=True)
class _Index:
    spec: docfilter.IndexSpec
    # unique value indexes only: constrained key → id of the document holding it
    owners: dict[tuple[docfilter.SortValue, ...], str] = field(default_factory=dict)

    @property
    def enforced(self) -> bool:
        return self.spec.unique and self.spec.kind == "value"

    def proto(self) -> indexing.Index:
        return indexing.Index(
            name=self.spec.name,
            fields=[indexing.IndexField(path=p, descending=d) for p, d in self.spec.fields],
            unique=self.spec.unique,
            kind=docindex.KIND_ENUMS[self.spec.kind],
        )


@dataclass(slots=True)
class _Collection:
    docs: dict[str, _Doc] = field(default_factory=dict)
    indexes: dict[str, _Index] = field(default_factory=dict)

    def check_unique(self, doc_id: str, body: dict[str, Any], collection: str) -> None:
        for index in self.indexes.values():
            if not index.enforced:
                continue
            key = docfilter.unique_key(body, index.spec.paths)
            owner = None if key is None else index.owners.get(key)
            if owner is not None and owner != doc_id:
                raise unique_violation(collection, doc_id, index.spec.name)

    def store(self, doc_id: str, doc: _Doc) -> None:
        """Put a document whose uniqueness was already checked, keeping unique indexes current."""
        self.unindex(doc_id)
        self.docs[doc_id] = doc
        for index in self.indexes.values():
            key = docfilter.unique_key(doc.body, index.spec.paths) if index.enforced else None
            if key is not None:
                index.owners[key] = doc_id

    def unindex(self, doc_id: str) -> None:
        old = self.docs.get(doc_id)
        if old is None:
            return
        for index in self.indexes.values():
            key = docfilter.unique_key(old.body, index.spec.paths) if index.enforced else None
            if key is not None and index.owners.get(key) == doc_id:
                del index.owners[key]


def _serialise(body: dict[str, Any]) -> str:
    # ensure_ascii: a lone surrogate escape in the input stays an escape, never invalid UTF-8
    return json.dumps(body, separators=(",", ":"))


class MemstoreDocuments:
    """document_basic, _query, _indexing and _search on per-(namespace, collection) dicts."""

    def __init__(self) -> None:
        self._collections: dict[tuple[str, str], _Collection] = {}

    def _collection(self, ctx: CallContext, name: str) -> _Collection:
        key = (ctx.namespace, validation.collection(name))
        coll = self._collections.get(key)
        if coll is None:
            coll = self._collections[key] = _Collection()
        return coll

    # document_basic -----------------------------------------------------------------------
    async def insert(self, request: basic.InsertRequest, ctx: CallContext) -> basic.InsertResponse:
        coll = self._collection(ctx, request.collection)
        doc_id = validation.document_id(request.id) if request.id else ""
        body = validation.document_json(request.json)
        if not doc_id:
            doc_id = secrets.token_urlsafe(16)
            while doc_id in coll.docs:
                doc_id = secrets.token_urlsafe(16)
        elif doc_id in coll.docs:
            raise AlreadyExists(
                f"document {doc_id!r} already exists",
                reason="DOCUMENT_EXISTS",
                collection=request.collection,
                id=doc_id,
            )
        coll.check_unique(doc_id, body, request.collection)
        now = time.time_ns()
        doc = _Doc(body, _serialise(body), 1, now, now)
        coll.store(doc_id, doc)
        return basic.InsertResponse(document=doc.proto(doc_id))

    async def get(self, request: basic.GetRequest, ctx: CallContext) -> basic.GetResponse:
        coll = self._collection(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        doc = coll.docs.get(doc_id)
        if doc is None:
            raise not_found(request.collection, doc_id)
        return basic.GetResponse(document=doc.proto(doc_id))

    async def update(self, request: basic.UpdateRequest, ctx: CallContext) -> basic.UpdateResponse:
        coll = self._collection(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        body = validation.document_json(request.json)
        old = coll.docs.get(doc_id)
        current = 0 if old is None else old.revision
        if request.expected_revision and request.expected_revision != current:
            raise revision_mismatch(request.collection, doc_id, request.expected_revision, current)
        if old is None and not request.allow_missing:
            raise not_found(request.collection, doc_id)
        coll.check_unique(doc_id, body, request.collection)
        now = time.time_ns()
        doc = _Doc(
            body,
            _serialise(body),
            current + 1,
            now if old is None else old.create_ns,
            now,
        )
        coll.store(doc_id, doc)
        return basic.UpdateResponse(document=doc.proto(doc_id), created=old is None)

    async def delete(self, request: basic.DeleteRequest, ctx: CallContext) -> basic.DeleteResponse:
        coll = self._collection(ctx, request.collection)
        doc_id = validation.document_id(request.id)
        old = coll.docs.get(doc_id)
        current = 0 if old is None else old.revision
        if request.expected_revision and request.expected_revision != current:
            raise revision_mismatch(request.collection, doc_id, request.expected_revision, current)
        if old is None:
            return basic.DeleteResponse(deleted=False)
        coll.unindex(doc_id)
        del coll.docs[doc_id]
        return basic.DeleteResponse(deleted=True)

    # document_query -----------------------------------------------------------------------
    def _matching(self, coll: _Collection, node: docfilter.Node) -> Iterable[tuple[str, _Doc]]:
        return ((i, d) for i, d in coll.docs.items() if docfilter.matches(node, d.body))

    def _sorted(
        self, coll: _Collection, filter_text: str, sort: Iterable[query.SortField]
    ) -> tuple[docfilter.SortSpec, list[tuple[docfilter.SortKey, Any]]]:
        node = docfilter.parse_filter(filter_text)
        spec = docfilter.parse_sort([(s.field, s.descending) for s in sort])
        items = [(spec.key(i, d.body), (i, d)) for i, d in self._matching(coll, node)]
        return spec, spec.sort(items)

    async def find(self, request: query.FindRequest, ctx: CallContext) -> query.FindResponse:
        coll = self._collection(ctx, request.collection)
        spec, ordered = self._sorted(coll, request.filter, request.sort)
        size = validation.page_size(request.page_size)
        scope = docfilter.token_scope(request.collection, request.filter, spec.canonical())
        position = validation.decode_page_token(request.page_token, "document.find", scope)
        if position is not None:
            after = docfilter.key_from_position(position, spec)
            ordered = [item for item in ordered if spec.compare(item[0], after) > 0]
        page = ordered[:size]
        token = ""
        if len(ordered) > size:
            token = validation.encode_page_token("document.find", scope, page[-1][0].position())
        return query.FindResponse(
            documents=[d.proto(i) for _, (i, d) in page], next_page_token=token
        )

    async def find_one(
        self, request: query.FindOneRequest, ctx: CallContext
    ) -> query.FindOneResponse:
        coll = self._collection(ctx, request.collection)
        _, ordered = self._sorted(coll, request.filter, request.sort)
        if not ordered:
            return query.FindOneResponse(found=False)
        doc_id, doc = ordered[0][1]
        return query.FindOneResponse(found=True, document=doc.proto(doc_id))

    async def count(self, request: query.CountRequest, ctx: CallContext) -> query.CountResponse:
        coll = self._collection(ctx, request.collection)
        node = docfilter.parse_filter(request.filter)
        return query.CountResponse(count=sum(1 for _ in self._matching(coll, node)))

    async def aggregate(
        self, request: query.AggregateRequest, ctx: CallContext
    ) -> query.AggregateResponse:
        coll = self._collection(ctx, request.collection)
        node = docfilter.parse_filter(request.filter)
        paging = docpages.AggregatePaging.parse(request, request.collection, "document.aggregate")
        bodies = (d.body for _, d in self._matching(coll, node))
        return paging.page(docfilter.aggregate(bodies, paging.spec))

    # document_indexing --------------------------------------------------------------------
    async def create_index(
        self, request: indexing.CreateIndexRequest, ctx: CallContext
    ) -> indexing.CreateIndexResponse:
        coll = self._collection(ctx, request.collection)
        spec = docindex.requested(request)
        existing = coll.indexes.get(spec.name)
        if existing is not None:
            if existing.spec == spec:
                return indexing.CreateIndexResponse(index=existing.proto(), created=False)
            raise AlreadyExists(
                f"index {spec.name!r} exists with another definition",
                reason="INDEX_EXISTS",
                index=spec.name,
                collection=request.collection,
            )
        index = _Index(spec)
        if index.enforced:
            for doc_id, doc in coll.docs.items():
                key = docfilter.unique_key(doc.body, spec.paths)
                if key is None:
                    continue
                if key in index.owners:
                    raise FailedPrecondition(
                        f"documents {index.owners[key]!r} and {doc_id!r} share a value",
                        reason="DUPLICATE_VALUES",
                        index=spec.name,
                        collection=request.collection,
                    )
                index.owners[key] = doc_id
        coll.indexes[spec.name] = index
        return indexing.CreateIndexResponse(index=index.proto(), created=True)

    async def drop_index(
        self, request: indexing.DropIndexRequest, ctx: CallContext
    ) -> indexing.DropIndexResponse:
        coll = self._collection(ctx, request.collection)
        if coll.indexes.pop(request.name, None) is None:
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
        coll = self._collection(ctx, request.collection)
        size = validation.page_size(request.page_size)
        after = validation.scan_after(request.page_token, "document.indexes", request.collection)
        names = sorted(n for n in coll.indexes if after is None or n > after)
        page = names[:size]
        token = ""
        if len(names) > size:
            token = validation.encode_page_token("document.indexes", request.collection, page[-1])
        return indexing.ListIndexesResponse(
            indexes=[coll.indexes[n].proto() for n in page], next_page_token=token
        )

    # document_search ----------------------------------------------------------------------
    async def search(
        self, request: search.SearchRequest, ctx: CallContext
    ) -> search.SearchResponse:
        coll = self._collection(ctx, request.collection)
        paging = docpages.SearchPaging.parse(request, request.collection, "document.search")
        matching = list(self._matching(coll, paging.node))
        return paging.page(
            [(i, d.body) for i, d in matching], lambda k: matching[k][1].proto(matching[k][0])
        )
