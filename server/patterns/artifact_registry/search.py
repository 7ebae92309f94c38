"""SearchArtifacts: the same relevance rules on every backend combination.

Ranking is the DocumentSearch contract's (exact field match first, higher-weight fields first)
over these fields. With a document_search slot the backend ranks; without one, the pattern
scores the filtered candidates itself with the shared plugins.runtime.textsearch rules.

Private sources are stored sealed (sealing.py), so a backend never matches them; the fallback
scores and highlights private versions without their source too, so both paths agree."""

from __future__ import annotations

from typing import Any

from plugins.runtime import textsearch, validation
from plugins.runtime.context import CallContext
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.sealing import searchable
from server.patterns.artifact_registry.store import DocumentStore, Stored

FIELDS: list[tuple[str, float]] = [
    ("name", 10.0),
    ("slug", 8.0),
    ("metadata.keywords", 4.0),
    ("metadata.tags", 4.0),
    ("metadata.skills", 4.0),
    ("metadata.description", 2.0),
    ("source", 1.0),
]
#: how many candidates the pattern scores itself when no slot offers document_search
FALLBACK_CANDIDATES = 5000

Hit = tuple[Stored, float, list[tuple[str, str]]]


class ArtifactSearch:
    def __init__(self, store: DocumentStore) -> None:
        self.store = store

    async def search(
        self, query: str, filter_: dict[str, Any], ctx: CallContext, size: int, token: str
    ) -> tuple[list[Hit], str]:
        if self.store.search_impl is not None:
            return await self.store.search(ARTIFACTS, query, FIELDS, filter_, ctx, size, token)
        return await self._fallback(query, filter_, ctx, size, token)

    async def _fallback(
        self, query: str, filter_: dict[str, Any], ctx: CallContext, size: int, token: str
    ) -> tuple[list[Hit], str]:
        terms = textsearch.query_terms(query)
        query_words = textsearch.normalized(query)
        fields = textsearch.search_fields(FIELDS)
        scope = f"{query}\0{filter_}"
        offset = validation.decode_page_token(token, "artifact-search", scope) or 0
        # (version, what search may see of it, its words per field)
        candidates = [
            (stored, seen, textsearch.document_words(seen, fields))
            async for stored in self.store.find_all(
                ARTIFACTS, filter_, ctx, limit=FALLBACK_CANDIDATES
            )
            for seen in (searchable(stored.doc),)
        ]
        averages = [
            sum(words[i].length for _, _, words in candidates) / len(candidates)
            if candidates
            else 0.0
            for i in range(len(fields))
        ]
        scored: list[tuple[float, str, Stored, dict[str, Any]]] = []
        for stored, seen, words in candidates:
            value = textsearch.score(words, terms, query_words, averages)
            if value is not None:
                scored.append((value, stored.id, stored, seen))
        scored.sort(key=lambda t: (-t[0], t[1]))
        page = scored[offset : offset + size]
        hits: list[Hit] = []
        for value, _, stored, seen in page:
            highlights = []
            for f in fields:
                text = textsearch.highlight_text(seen, f.path, terms)
                if text is not None:
                    highlights.append((f.name, textsearch.snippet(text, terms)))
            hits.append((stored, value, highlights))
        more = offset + size < len(scored)
        next_token = (
            validation.encode_page_token("artifact-search", scope, offset + size) if more else ""
        )
        return hits, next_token
