"""The read side of the SQL document backends (postgres, sqlite), written once.

Both keep a document as a row and fetch rows with one SELECT builder of their own (`_select`);
what a Find / FindOne / Count / Aggregate / Search / ListIndexes request means, how rows become
a page and which errors they raise are the same, so those RPCs live here and a backend supplies
only the hooks: `_select`, `_document` (row → Document), `_aggregate_groups` and
`_index_definitions`, plus `_sort_spec` where its SQL cannot address every sort path. The two
errors their writes raise alike are here too.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.runtime import docfilter, docpages, textsearch, validation
from plugins.runtime.context import CallContext

Row = tuple[Any, ...]
Groups = list[tuple[docfilter.Group, list[str]]]


class SqlDocumentQueries(ABC):
    """document_query, document_search and ListIndexes over a backend's `_select`."""

    #: prefix of the page token kinds ("<backend>.find", ...), so a token fits one backend
    token_prefix: ClassVar[str]

    @abstractmethod
    async def _select(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        *,
        columns: str = ...,
        spec: docfilter.SortSpec | None = None,
        after: docfilter.SortKey | None = None,
        limit: int | None = None,
        terms: list[str] | None = None,
    ) -> list[Row]:
        """Rows of the collection matching `node` (and holding every one of the search
        `terms`), in `spec` order after `after`, at most `limit`; `columns` defaults to the
        ones `_document` reads (id and JSON body first)."""

    @abstractmethod
    async def _search_rows(
        self,
        collection: str,
        node: docfilter.Node,
        ctx: CallContext,
        paths: Sequence[docfilter.Path],
        terms: list[str],
    ) -> list[tuple[Row, list[Any]]]:
        """(row of the default `_select` columns, the JSON values at `paths` with None where
        missing) of the documents matching `node` and holding every term; the values are
        extracted in SQL where the backend can address the paths, so search parses only them."""

    @staticmethod
    @abstractmethod
    def _document(row: Row) -> basic_pb.Document:
        """The Document of a row of the default `_select` columns."""

    @abstractmethod
    async def _aggregate_groups(
        self,
        collection: str,
        node: docfilter.Node,
        spec: docfilter.AggregateSpec,
        ctx: CallContext,
    ) -> Groups:
        """Every group of the matching documents (docfilter.aggregate order)."""

    @abstractmethod
    async def _index_definitions(
        self, collection: str, after: str, limit: int, ctx: CallContext
    ) -> list[bytes]:
        """Serialized Index definitions of the collection named after `after`, by name, at
        most `limit`."""

    def _sort_spec(self, sort: Iterable[query_pb.SortField]) -> docfilter.SortSpec:
        return docfilter.parse_sort([(s.field, s.descending) for s in sort])

    async def find(self, request: query_pb.FindRequest, ctx: CallContext) -> query_pb.FindResponse:
        collection = validation.collection(request.collection)
        node = docfilter.parse_filter(request.filter)
        spec = self._sort_spec(request.sort)
        size = validation.page_size(request.page_size)
        kind = f"{self.token_prefix}.find"
        scope = docfilter.token_scope(collection, request.filter, spec.canonical())
        position = validation.decode_page_token(request.page_token, kind, scope)
        after = None if position is None else docfilter.key_from_position(position, spec)
        rows = await self._select(collection, node, ctx, spec=spec, after=after, limit=size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = spec.key(rows[-1][0], json.loads(rows[-1][1]))
            token = validation.encode_page_token(kind, scope, last.position())
        return query_pb.FindResponse(
            documents=[self._document(r) for r in rows], next_page_token=token
        )

    async def find_one(
        self, request: query_pb.FindOneRequest, ctx: CallContext
    ) -> query_pb.FindOneResponse:
        collection = validation.collection(request.collection)
        node = docfilter.parse_filter(request.filter)
        spec = self._sort_spec(request.sort)
        rows = await self._select(collection, node, ctx, spec=spec, limit=1)
        if not rows:
            return query_pb.FindOneResponse(found=False)
        return query_pb.FindOneResponse(found=True, document=self._document(rows[0]))

    async def count(
        self, request: query_pb.CountRequest, ctx: CallContext
    ) -> query_pb.CountResponse:
        collection = validation.collection(request.collection)
        node = docfilter.parse_filter(request.filter)
        rows = await self._select(collection, node, ctx, columns="count(*)")
        return query_pb.CountResponse(count=int(rows[0][0]))

    async def aggregate(
        self, request: query_pb.AggregateRequest, ctx: CallContext
    ) -> query_pb.AggregateResponse:
        """Filtered in SQL, grouped by the shared docfilter rules (`_aggregate_groups`) so the
        grouping and accumulator rules are the same on every backend."""
        collection = validation.collection(request.collection)
        node = docfilter.parse_filter(request.filter)
        kind = f"{self.token_prefix}.aggregate"
        paging = docpages.AggregatePaging.parse(request, collection, kind)
        return paging.page(await self._aggregate_groups(collection, node, paging.spec, ctx))

    async def search(
        self, request: search_pb.SearchRequest, ctx: CallContext
    ) -> search_pb.SearchResponse:
        """The backend's word index narrows the candidates to documents holding every term
        somewhere; the shared textsearch rules then decide per field (matching, ranking,
        snippets), so results and order are the contract's whichever backend serves them.
        Only the searched values of a candidate are parsed (textsearch.projection): the rest
        of its body (sources, sealed envelopes, statistics) is never decoded, and Documents are
        built for the page's hits alone."""
        collection = validation.collection(request.collection)
        kind = f"{self.token_prefix}.search"
        paging = docpages.SearchPaging.parse(request, collection, kind)
        paths = [f.path for f in paging.fields]
        rows = await self._search_rows(collection, paging.node, ctx, paths, paging.terms)
        candidates = [(row[0], textsearch.projection(paths, values)) for row, values in rows]
        return paging.page(candidates, lambda i: self._document(rows[i][0]))

    async def list_indexes(
        self, request: index_pb.ListIndexesRequest, ctx: CallContext
    ) -> index_pb.ListIndexesResponse:
        collection = validation.collection(request.collection)
        size = validation.page_size(request.page_size)
        kind = f"{self.token_prefix}.indexes"
        after = validation.scan_after(request.page_token, kind, collection)
        definitions = await self._index_definitions(collection, after or "", size + 1, ctx)
        indexes = [index_pb.Index.FromString(d) for d in definitions]
        token = ""
        if len(indexes) > size:
            indexes = indexes[:size]
            token = validation.encode_page_token(kind, collection, indexes[-1].name)
        return index_pb.ListIndexesResponse(indexes=indexes, next_page_token=token)
