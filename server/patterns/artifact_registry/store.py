"""The pattern's view of its slots: JSON documents in the `store` slot through DocumentBasic /
DocumentQuery (and DocumentSearch when some slot has it), nothing else. With a `Sealer`, private
artifacts are sealed on every write and opened on every read here (sealing.py), so nothing above
this module handles ciphertext and nothing below it sees a private source."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import Aborted, NotFound
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.sealing import PRIVATE, Sealer

Sort = list[tuple[str, bool]]
#: private artifacts per page of the re-sealing pass, and conditional rewrites of one of them
RESEAL_PAGE = 100
RESEAL_ATTEMPTS = 5


@dataclass(frozen=True)
class Stored:
    id: str
    doc: dict[str, Any]
    revision: int


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _raw(document: basic_pb.Document) -> Stored:
    return Stored(document.id, json.loads(document.json), document.revision)


class DocumentStore:
    """Thin, typed helpers over the document contracts of one namespace's slots."""

    def __init__(
        self, basic: Any, query: Any, search: Any | None, sealer: Sealer | None = None
    ) -> None:
        self.basic = basic
        self.query = query
        self.search_impl = search
        self.sealer = sealer

    def _opened(self, collection: str, raw: Stored) -> Stored:
        """A stored document as the service sees it (opened when sealed)."""
        if self.sealer is None or collection != ARTIFACTS:
            return raw
        return Stored(raw.id, self.sealer.open(collection, raw.id, raw.doc), raw.revision)

    def _stored(self, collection: str, document: basic_pb.Document) -> Stored:
        return self._opened(collection, _raw(document))

    def _json(self, collection: str, doc_id: str, doc: dict[str, Any]) -> str:
        """The stored form of a document (sealed when private)."""
        if self.sealer is not None and collection == ARTIFACTS:
            doc = self.sealer.seal(collection, doc_id, doc)
        return _dumps(doc)

    async def _get_raw(self, collection: str, doc_id: str, ctx: CallContext) -> Stored | None:
        try:
            response = await self.basic.get(
                basic_pb.GetRequest(collection=collection, id=doc_id), ctx
            )
        except NotFound:
            return None
        return _raw(response.document)

    async def get(self, collection: str, doc_id: str, ctx: CallContext) -> Stored | None:
        raw = await self._get_raw(collection, doc_id, ctx)
        return None if raw is None else self._opened(collection, raw)

    async def insert(
        self, collection: str, doc_id: str, doc: dict[str, Any], ctx: CallContext
    ) -> Stored:
        response = await self.basic.insert(
            basic_pb.InsertRequest(
                collection=collection, id=doc_id, json=self._json(collection, doc_id, doc)
            ),
            ctx,
        )
        return Stored(response.document.id, doc, response.document.revision)

    async def replace(
        self,
        collection: str,
        doc_id: str,
        doc: dict[str, Any],
        expected_revision: int,
        ctx: CallContext,
    ) -> Stored:
        """Write `doc` over the document iff it still has `expected_revision` (ABORTED if not)."""
        response = await self.basic.update(
            basic_pb.UpdateRequest(
                collection=collection,
                id=doc_id,
                json=self._json(collection, doc_id, doc),
                expected_revision=expected_revision,
            ),
            ctx,
        )
        return Stored(doc_id, doc, response.document.revision)

    async def delete(
        self, collection: str, doc_id: str, ctx: CallContext, expected_revision: int = 0
    ) -> bool:
        response = await self.basic.delete(
            basic_pb.DeleteRequest(
                collection=collection, id=doc_id, expected_revision=expected_revision
            ),
            ctx,
        )
        return bool(response.deleted)

    async def find(
        self,
        collection: str,
        filter_: dict[str, Any],
        ctx: CallContext,
        sort: Sort | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Stored], str]:
        response = await self.query.find(
            query_pb.FindRequest(
                collection=collection,
                filter=_dumps(filter_) if filter_ else "",
                sort=[query_pb.SortField(field=f, descending=d) for f, d in sort or []],
                page_size=page_size,
                page_token=page_token,
            ),
            ctx,
        )
        return [self._stored(collection, d) for d in response.documents], response.next_page_token

    async def find_all(
        self,
        collection: str,
        filter_: dict[str, Any],
        ctx: CallContext,
        sort: Sort | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Stored]:
        """Every matching document, page after page (up to `limit`)."""
        token, seen = "", 0
        while True:
            page, token = await self.find(collection, filter_, ctx, sort, 1000, token)
            for stored in page:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield stored
            if not token:
                return

    async def count(self, collection: str, filter_: dict[str, Any], ctx: CallContext) -> int:
        response = await self.query.count(
            query_pb.CountRequest(collection=collection, filter=_dumps(filter_) if filter_ else ""),
            ctx,
        )
        return int(response.count)

    async def aggregate(
        self,
        collection: str,
        filter_: dict[str, Any],
        group_by: str,
        ctx: CallContext,
        unwind: bool = False,
        sum_field: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[tuple[Any, int, Any]], str]:
        """[(group key, count, sum of `sum_field` or None)], next page token."""
        accumulators = (
            [query_pb.Accumulator(op=query_pb.ACCUMULATOR_OP_SUM, field=sum_field)]
            if sum_field
            else []
        )
        response = await self.query.aggregate(
            query_pb.AggregateRequest(
                collection=collection,
                filter=_dumps(filter_) if filter_ else "",
                group_by=group_by,
                unwind=unwind,
                accumulators=accumulators,
                page_size=page_size,
                page_token=page_token,
            ),
            ctx,
        )
        groups = [
            (
                json.loads(g.key_json),
                int(g.count),
                json.loads(g.values_json[0]) if g.values_json else None,
            )
            for g in response.groups
        ]
        return groups, response.next_page_token

    async def search(
        self,
        collection: str,
        query: str,
        fields: list[tuple[str, float]],
        filter_: dict[str, Any],
        ctx: CallContext,
        page_size: int,
        page_token: str,
    ) -> tuple[list[tuple[Stored, float, list[tuple[str, str]]]], str]:
        """Ranked hits with (field, snippet) highlights; needs a document_search slot."""
        assert self.search_impl is not None, "callers check search_impl first"
        response = await self.search_impl.search(
            search_pb.SearchRequest(
                collection=collection,
                query=query,
                fields=[search_pb.SearchField(path=p, weight=w) for p, w in fields],
                filter=_dumps(filter_) if filter_ else "",
                page_size=page_size,
                page_token=page_token,
                highlight=search_pb.HighlightOptions(),
            ),
            ctx,
        )
        hits = [
            (
                self._stored(collection, h.document),
                h.score,
                [(x.field, x.snippet) for x in h.highlights],
            )
            for h in response.hits
        ]
        return hits, response.next_page_token

    # ---- re-sealing ----------------------------------------------------------------------

    async def private_artifacts(self, ctx: CallContext) -> AsyncIterator[tuple[str, Stored]]:
        """(id, stored form) of every private artifact, RESEAL_PAGE per backend call."""
        token = ""
        while True:
            response = await self.query.find(
                query_pb.FindRequest(
                    collection=ARTIFACTS,
                    filter=_dumps({"visibility": PRIVATE}),
                    page_size=RESEAL_PAGE,
                    page_token=token,
                ),
                ctx,
            )
            for document in response.documents:
                yield document.id, _raw(document)
            token = response.next_page_token
            if not token:
                return

    async def reseal(self, doc_id: str, raw: Stored, ctx: CallContext) -> int:
        """Rewrite one private artifact sealed under the primary key if it is not (1 if it was
        rewritten). Conditional on the revision read: a concurrent write wins (it sealed under
        the primary key too), and the document is re-read and checked again."""
        assert self.sealer is not None, "only a sealing store re-seals"
        for _ in range(RESEAL_ATTEMPTS):
            if not self.sealer.stale(doc_id, raw.doc):
                return 0
            doc = self.sealer.open(ARTIFACTS, doc_id, raw.doc)
            try:
                await self.replace(ARTIFACTS, doc_id, doc, raw.revision, ctx)
            except Aborted:
                fresh = await self._get_raw(ARTIFACTS, doc_id, ctx)
                if fresh is None:
                    raise NotFound(f"artifact {doc_id} not found", id=doc_id) from None
                raw = fresh
                continue
            return 1
        raise Aborted(f"artifact {doc_id} kept changing; re-sealed on a later pass", id=doc_id)
