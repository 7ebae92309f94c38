"""document_query Aggregate and document_search Search requests and pages, read and cut the
same way on every backend.

A backend only decides how to fetch the candidates; what the request means (accumulator names,
search fields, highlight options, page size, which listing a token belongs to) and how the
ordered results become a page (keyset position after the token, next token) are one rule here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from plugins.runtime import docfilter, textsearch, validation

#: request enum → docfilter accumulator name (an unknown op reaches parse_aggregate as None)
ACCUMULATOR_NAMES = {
    query_pb.ACCUMULATOR_OP_COUNT: "count",
    query_pb.ACCUMULATOR_OP_SUM: "sum",
    query_pb.ACCUMULATOR_OP_MIN: "min",
    query_pb.ACCUMULATOR_OP_MAX: "max",
    query_pb.ACCUMULATOR_OP_AVG: "avg",
}


@dataclass(frozen=True)
class AggregatePaging:
    """A parsed Aggregate request: its spec plus where its page starts and how big it is."""

    spec: docfilter.AggregateSpec
    size: int
    kind: str
    scope: str
    #: keyset position of the last group of the previous page (None: first page)
    position: Any

    @classmethod
    def parse(
        cls, request: query_pb.AggregateRequest, collection: str, kind: str
    ) -> AggregatePaging:
        """`kind` names the backend's token kind, so a token only fits the listing it came from."""
        spec = docfilter.parse_aggregate(
            request.group_by,
            request.unwind,
            [(ACCUMULATOR_NAMES.get(a.op), a.field) for a in request.accumulators],
        )
        size = validation.page_size(request.page_size)
        scope = docfilter.token_scope(collection, request.filter, spec.canonical())
        position = validation.decode_page_token(request.page_token, kind, scope)
        return cls(spec, size, kind, scope, position)

    def page(
        self, groups: Sequence[tuple[docfilter.Group, list[str]]]
    ) -> query_pb.AggregateResponse:
        """The response for `groups` (all of them, in Aggregate order)."""
        if self.position is not None:
            groups = [(g, v) for g, v in groups if docfilter.group_after(g, self.position)]
        token = ""
        if len(groups) > self.size:
            groups = groups[: self.size]
            token = validation.encode_page_token(
                self.kind, self.scope, docfilter.group_position(groups[-1][0])
            )
        return query_pb.AggregateResponse(
            groups=[
                query_pb.AggregateGroup(key_json=g.key_json, count=g.count, values_json=values)
                for g, values in groups
            ],
            next_page_token=token,
        )


@dataclass(frozen=True)
class SearchPaging:
    """A parsed Search request: terms, fields, filter, highlight options and page position."""

    query: str
    terms: list[str]
    fields: list[textsearch.SearchField]
    node: docfilter.Node
    size: int
    #: (pre tag, post tag, snippet words), None without highlighting
    tags: tuple[str, str, int] | None
    kind: str
    scope: str
    #: (score, id) of the last hit of the previous page (None: first page)
    after: tuple[float, str] | None

    @classmethod
    def parse(cls, request: search_pb.SearchRequest, collection: str, kind: str) -> SearchPaging:
        terms = textsearch.query_terms(request.query)
        fields = textsearch.search_fields([(f.path, f.weight) for f in request.fields])
        node = docfilter.parse_filter(request.filter)
        size = validation.page_size(request.page_size)
        tags = None
        if request.HasField("highlight"):
            h = request.highlight
            tags = textsearch.highlight_options(h.pre_tag, h.post_tag, h.snippet_words)
        scope = docfilter.token_scope(
            collection, request.query, [[f.name, f.weight] for f in fields], request.filter
        )
        after = textsearch.search_position(
            validation.decode_page_token(request.page_token, kind, scope)
        )
        return cls(request.query, terms, fields, node, size, tags, kind, scope, after)

    def token(self, score: float, doc_id: str) -> str:
        """The token of the page after the hit (score, doc_id)."""
        return validation.encode_page_token(self.kind, self.scope, [score, doc_id])

    def page(
        self,
        candidates: Sequence[tuple[str, Any]],
        document: Callable[[int], basic_pb.Document],
    ) -> search_pb.SearchResponse:
        """Rank (id, body) `candidates` by the shared rules and answer one page of hits;
        `document(i)` is the i-th candidate as returned."""
        ranked = textsearch.rank(
            candidates, self.fields, self.terms, self.query, self.after, self.size + 1
        )
        token = ""
        if len(ranked) > self.size:
            ranked = ranked[: self.size]
            score, last = ranked[-1]
            token = self.token(score, candidates[last][0])
        hits = []
        for score, i in ranked:
            hit = search_pb.SearchHit(document=document(i), score=score)
            if self.tags is not None:
                body = candidates[i][1]
                for name, snippet in textsearch.highlights(
                    body, self.fields, self.terms, self.tags
                ):
                    hit.highlights.add(field=name, snippet=snippet)
            hits.append(hit)
        return search_pb.SearchResponse(hits=hits, next_page_token=token)
