"""Words, query terms, snippets and in-memory ranking of DocumentSearchService.

Shared so every backend splits words, validates queries and builds highlights the same way: a
backend with its own full-text engine (FTS5, tsvector) may rank natively but must still respect
the proto's two ranking guarantees; `score` is the reference ranking used in memory.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from plugins.runtime.docfilter import MISSING, Path, parse_path, resolve
from plugins.runtime.errors import InvalidArgument

MAX_QUERY_BYTES = 1024
MAX_TERMS = 32
MAX_FIELDS = 16
MAX_WEIGHT = 1000.0
DEFAULT_SNIPPET_WORDS = 30
MAX_SNIPPET_WORDS = 200
DEFAULT_PRE_TAG = "<mark>"
DEFAULT_POST_TAG = "</mark>"
ELLIPSIS = "…"

# letters and digits of any script: \w without the underscore
_WORD: Final = re.compile(r"[^\W_]+")

# Score tiers, far enough apart that no lower tier can overturn a higher one: an exact field
# match (guarantee 1), then its best weight, then the summed best weight per term (guarantee 2,
# at most MAX_TERMS * MAX_WEIGHT), then a BM25-like term-frequency score squashed into [0, 1).
_EXACT_TIER = 1e12
_EXACT_WEIGHT_TIER = 1e8
_BM25_K1 = 1.2
_BM25_B = 0.75


def words(text: str) -> list[re.Match[str]]:
    """Word matches of `text` (their spans locate them for highlighting)."""
    return list(_WORD.finditer(text))


def normalized(text: str) -> list[str]:
    """The lower-cased words of `text`, in order."""
    return list(map(str.lower, _WORD.findall(text)))


def query_terms(query: str, field: str = "query") -> list[str]:
    """Distinct lower-cased words of a query, in order of first occurrence."""
    if len(query.encode("utf-8")) > MAX_QUERY_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_QUERY_BYTES} bytes")
    terms = list(dict.fromkeys(normalized(query)))
    if not terms:
        raise InvalidArgument(field, "must contain at least one word")
    if len(terms) > MAX_TERMS:
        raise InvalidArgument(field, f"more than {MAX_TERMS} distinct words")
    return terms


@dataclass(frozen=True, slots=True)
class SearchField:
    path: Path
    name: str
    weight: float


def search_fields(fields: Sequence[tuple[str, float]], field: str = "fields") -> list[SearchField]:
    """Validate (path, weight) pairs: 1 to 16 distinct paths, weight 0 → 1.0, else (0, 1000]."""
    if not fields:
        raise InvalidArgument(field, "at least one field is required")
    if len(fields) > MAX_FIELDS:
        raise InvalidArgument(field, f"at most {MAX_FIELDS} fields")
    result: list[SearchField] = []
    seen: set[str] = set()
    for i, (path, weight) in enumerate(fields):
        parsed = parse_path(path, f"{field}[{i}].path")
        if path in seen:
            raise InvalidArgument(f"{field}[{i}].path", f"duplicate path {path!r}")
        seen.add(path)
        if weight == 0:
            weight = 1.0
        elif not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
            raise InvalidArgument(f"{field}[{i}].weight", "must be > 0 and at most 1000")
        result.append(SearchField(parsed, path, weight))
    return result


def field_texts(body: Any, path: Path) -> list[str]:
    """The strings a field contributes words from: its string value, or its string elements."""
    value = resolve(body, path)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


@dataclass(frozen=True, slots=True)
class FieldWords:
    """The normalized words of one field of one document (one list per string); all of them
    in one list too, for the counts scoring asks for again and again."""

    field: SearchField
    texts: list[list[str]]
    _all: list[str] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        joined = self.texts[0] if len(self.texts) == 1 else [w for t in self.texts for w in t]
        object.__setattr__(self, "_all", joined)

    @property
    def length(self) -> int:
        return len(self._all)

    def count(self, term: str) -> int:
        return self._all.count(term)

    def exact(self, query_words: list[str]) -> bool:
        return any(t == query_words for t in self.texts)


def document_words(
    body: Any, fields: Sequence[SearchField], split: Callable[[str], list[str]] = normalized
) -> list[FieldWords]:
    """The words of each searched field; `split` is `normalized` or a memo of it."""
    return [FieldWords(f, [split(t) for t in field_texts(body, f.path)]) for f in fields]


def memo_split() -> Callable[[str], list[str]]:
    """`normalized` remembering the strings it split, for one ranking: tags, types and
    descriptions repeat across candidates and splitting is most of a ranking's work. Scoped to
    one call, so nothing outlives the data it was computed from (the lists are never mutated)."""
    seen: dict[str, list[str]] = {}

    def split(text: str) -> list[str]:
        found = seen.get(text)
        if found is None:
            found = seen[text] = normalized(text)
        return found

    return split


def projection(paths: Sequence[Path], values: Sequence[Any]) -> dict[str, Any]:
    """A body holding only `values` at `paths` (None or MISSING: absent), which every searched
    field resolves in exactly as in the whole body: a backend can then fetch and parse just the
    searched values instead of whole documents. A path below another one finds its value again
    inside the outer value (both came from the same body), so the order of `paths` is free."""
    body: dict[str, Any] = {}
    for path, value in zip(paths, values, strict=True):
        if value is None or value is MISSING:
            continue
        node = body
        for name in path[:-1]:
            inner = node.get(name)
            if not isinstance(inner, dict):
                inner = node[name] = {}
            node = inner
        node[path[-1]] = value
    return body


def score(
    doc: Sequence[FieldWords],
    terms: Sequence[str],
    query_words: list[str],
    average_lengths: Sequence[float],
) -> float | None:
    """The document's score, or None when some term is in none of its fields.

    `query_words` is the query's full word sequence (for the exact-match rule); `average_lengths`
    gives each field's mean word count over the candidate documents (BM25 length norm)."""
    best_weight_sum = 0.0
    tf_score = 0.0
    for term in terms:
        best = 0.0
        for fw, avg in zip(doc, average_lengths, strict=True):
            tf = fw.count(term)
            if tf:
                best = max(best, fw.field.weight)
                norm = 1 - _BM25_B + _BM25_B * (fw.length / avg if avg else 1.0)
                tf_score += fw.field.weight * tf * (_BM25_K1 + 1) / (tf + _BM25_K1 * norm)
        if not best:
            return None
        best_weight_sum += best
    exact_weight = max((fw.field.weight for fw in doc if fw.exact(query_words)), default=0.0)
    result = best_weight_sum + tf_score / (1 + tf_score)
    if exact_weight:
        result += _EXACT_TIER + exact_weight * _EXACT_WEIGHT_TIER
    return result


def snippet(
    text: str,
    terms: Sequence[str],
    pre_tag: str = DEFAULT_PRE_TAG,
    post_tag: str = DEFAULT_POST_TAG,
    max_words: int = DEFAULT_SNIPPET_WORDS,
) -> str:
    """At most `max_words` consecutive words of `text`, starting at the first term unless the
    text fits whole; text between words kept as written; "…" on each side that was cut; every
    word equal to a term wrapped in the tags."""
    found = words(text)
    wanted = set(terms)
    first = 0
    if len(found) > max_words:
        first = next((i for i, m in enumerate(found) if m.group().lower() in wanted), 0)
    last = min(len(found), first + max_words) - 1
    start = 0 if first == 0 else found[first].start()
    end = len(text) if last == len(found) - 1 else found[last].end()
    parts = [ELLIPSIS] if first > 0 else []
    cursor = start
    for m in found[first : last + 1]:
        if m.group().lower() in wanted:
            parts += [text[cursor : m.start()], pre_tag, m.group(), post_tag]
            cursor = m.end()
    parts.append(text[cursor:end])
    if end < len(text):
        parts.append(ELLIPSIS)
    return "".join(parts)


def highlight_text(body: Any, path: Path, terms: Sequence[str]) -> str | None:
    """The text to snippet for a field: the first string that contains a term, or None."""
    wanted = set(terms)
    for text in field_texts(body, path):
        if any(w in wanted for w in normalized(text)):
            return text
    return None


def highlight_options(
    pre_tag: str, post_tag: str, snippet_words: int, field: str = "highlight"
) -> tuple[str, str, int]:
    """Defaults and limits of HighlightOptions."""
    if snippet_words < 0 or snippet_words > MAX_SNIPPET_WORDS:
        raise InvalidArgument(f"{field}.snippet_words", f"must be 0 to {MAX_SNIPPET_WORDS}")
    return (
        pre_tag or DEFAULT_PRE_TAG,
        post_tag or DEFAULT_POST_TAG,
        snippet_words or DEFAULT_SNIPPET_WORDS,
    )


# Whole-listing helpers for backends that prefilter candidates natively -----------------------
def search_position(position: Any, field: str = "page_token") -> tuple[float, str] | None:
    """The (score, id) keyset position a search page token carries; None for the first page."""
    if position is None:
        return None
    if not (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], int | float)
        and not isinstance(position[0], bool)
        and isinstance(position[1], str)
    ):
        raise InvalidArgument(field, "malformed page token")
    return float(position[0]), position[1]


def rank(
    candidates: Sequence[tuple[str, Any]],
    fields: Sequence[SearchField],
    terms: Sequence[str],
    query: str,
    after: tuple[float, str] | None,
    limit: int,
) -> list[tuple[float, int]]:
    """(score, index into `candidates`) of the candidates (id, body) that match, best first
    (score descending, id ascending), keeping only those after the keyset position `after`,
    at most `limit` (the first ones of the full order: a partial sort, not a full one).
    Candidates may be a superset of the matches (e.g. "has every term somewhere")."""
    split = memo_split()
    per_doc = [document_words(body, fields, split) for _, body in candidates]
    averages = [
        sum(doc[k].length for doc in per_doc) / len(per_doc) if per_doc else 0.0
        for k in range(len(fields))
    ]
    query_words = normalized(query)
    scored: list[tuple[float, int]] = []
    for i, doc in enumerate(per_doc):
        value = score(doc, terms, query_words, averages)
        if value is None:
            continue
        if after is None or (-value, candidates[i][0]) > (-after[0], after[1]):
            scored.append((value, i))
    return heapq.nsmallest(limit, scored, key=lambda hit: (-hit[0], candidates[hit[1]][0]))


def highlights(
    body: Any, fields: Sequence[SearchField], terms: Sequence[str], tags: tuple[str, str, int]
) -> list[tuple[str, str]]:
    """(field name, snippet) for every searched field containing a term, in field order."""
    result = []
    for f in fields:
        text = highlight_text(body, f.path, terms)
        if text is not None:
            result.append((f.name, snippet(text, terms, *tags)))
    return result
