"""document_query Aggregate requests and pages, read and cut the same way on every backend.

A backend only decides how to fetch the grouped values; what the request means (accumulator
names, page size, which listing a token belongs to) and how the sorted groups become a page
(keyset position after the token, next token) are one rule here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.runtime import docfilter, validation

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
