"""document_search: word matching, the two ranking guarantees, filters, highlights, paging."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prism.interfaces.document.v1 import document_search_pb2 as pb
from prism.interfaces.document.v1.document_search_pb2_grpc import DocumentSearchServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.document_basic import insert_all

if TYPE_CHECKING:
    from prism.interfaces.document.v1.document_search_pb2_grpc import (
        DocumentSearchServiceAsyncStub,
    )

REQUIRES = ("document_basic",)
NAME_FIRST = [pb.SearchField(path="name", weight=10), pb.SearchField(path="description")]

PRODUCTS: dict[str, dict[str, Any]] = {
    "p1": {"name": "Red Apple", "description": "a crisp fruit", "kind": "fruit"},
    "p2": {"name": "red apple pie", "description": "baked dessert", "kind": "bakery"},
    "p3": {"name": "orchard tree", "description": "grows a red apple", "kind": "plant"},
    "p4": {"name": "Apple juice", "description": "not red at all? red!", "kind": "drink"},
    "p5": {"name": "pineapple", "description": "redish", "kind": "fruit"},
    "p6": {"name": "green apple", "description": "sour", "tags": ["red", "sale"], "kind": "fruit"},
}


def stub(t: Target) -> DocumentSearchServiceAsyncStub:
    return DocumentSearchServiceStub(t.channel)


async def search(
    t: Target,
    coll: str,
    query: str,
    fields: list[pb.SearchField] | None = None,
    **extra: object,
) -> pb.SearchResponse:
    response: pb.SearchResponse = await stub(t).Search(
        pb.SearchRequest(collection=coll, query=query, fields=fields or NAME_FIRST, **extra)  # type: ignore[arg-type]
    )
    return response


def ids(response: pb.SearchResponse) -> list[str]:
    return [h.document.id for h in response.hits]


@case("document_search", requires=REQUIRES)
async def matching_rules(t: Target) -> None:
    """A document matches when every term is a whole word of some searched field: case-
    insensitive, no prefix or substring matching, terms may match in different fields."""
    coll = t.name("match")
    await insert_all(t, coll, PRODUCTS)
    equal(
        sorted(ids(await search(t, coll, "red apple"))),
        ["p1", "p2", "p3", "p4"],
        "matches of 'red apple' in name/description",
    )
    equal(sorted(ids(await search(t, coll, "APPLE Juice"))), ["p4"], "case-insensitive match")
    equal(ids(await search(t, coll, "appl")), [], "prefix of a word matches nothing")
    equal(ids(await search(t, coll, "reddish")), [], "unknown word")
    equal(
        sorted(ids(await search(t, coll, "red, apple!!"))),
        ["p1", "p2", "p3", "p4"],
        "punctuation separates words",
    )
    tagged = await search(
        t, coll, "red apple", [pb.SearchField(path="name"), pb.SearchField(path="tags")]
    )
    equal(sorted(ids(tagged)), ["p1", "p2", "p6"], "terms matched across a string and an array")
    for hit in tagged.hits:
        check(hit.score > 0, f"score {hit.score} of {hit.document.id} not positive")


@case("document_search", requires=REQUIRES)
async def ranking_guarantees(t: Target) -> None:
    """An exactly matching field ranks first; a term in a heavier field outranks the same term
    only in a lighter one; ties in score break by id; hits are in score order."""
    coll = t.name("rank")
    await insert_all(t, coll, PRODUCTS)
    ranked = await search(t, coll, "red apple")
    order = ids(ranked)
    equal(order[0], "p1", "first hit for 'red apple' (exact name match)")
    check(
        order.index("p2") < order.index("p3"),
        f"terms in the name (p2) must outrank terms only in the description (p3): {order}",
    )
    scores = [h.score for h in ranked.hits]
    equal(scores, sorted(scores, reverse=True), "scores in descending order")
    for (a, sa), (b, sb) in zip(
        zip(order, scores, strict=True), zip(order[1:], scores[1:], strict=True), strict=False
    ):
        check(sa != sb or a < b, f"equal scores not ordered by id: {a} before {b}")
    coll2 = t.name("exact")
    await insert_all(
        t,
        coll2,
        {
            "a": {"title": "blue sky", "body": "x"},
            "b": {"title": "x", "body": "blue sky"},
        },
    )
    fields = [pb.SearchField(path="title", weight=1), pb.SearchField(path="body", weight=5)]
    equal(
        ids(await search(t, coll2, "blue sky", fields)),
        ["b", "a"],
        "between two exact matches, the heavier field first",
    )
    fields = [pb.SearchField(path="title", weight=5), pb.SearchField(path="body", weight=1)]
    equal(
        ids(await search(t, coll2, "blue sky", fields)),
        ["a", "b"],
        "weights reversed, order reversed",
    )


@case("document_search", requires=REQUIRES)
async def filter_and_pagination(t: Target) -> None:
    """The filter restricts hits; pages follow the ranking without repeats or gaps."""
    coll = t.name("filt")
    await insert_all(t, coll, PRODUCTS)
    filtered = await search(t, coll, "red apple", filter='{"kind": {"$in": ["fruit", "plant"]}}')
    equal(sorted(ids(filtered)), ["p1", "p3"], "hits restricted by the filter")
    everything = ids(await search(t, coll, "apple"))
    paged: list[str] = []
    token = ""
    while True:
        page = await search(t, coll, "apple", page_size=2, page_token=token)
        check(len(page.hits) <= 2, "more hits than page_size")
        paged.extend(ids(page))
        token = page.next_page_token
        if not token:
            break
    equal(paged, everything, "hits across pages of 2 vs one page")
    first = await search(t, coll, "apple", page_size=1)
    await expect_invalid(
        search(t, coll, "red", page_size=1, page_token=first.next_page_token),
        "page_token",
        "page token reused with another query",
    )


@case("document_search", requires=REQUIRES)
async def highlights(t: Target) -> None:
    """Highlights come one per searched field containing a term, in request field order, and wrap
    every matched word (as written) in the requested tags."""
    coll = t.name("hl")
    await insert_all(t, coll, PRODUCTS)
    result = await search(
        t, coll, "red apple", highlight=pb.HighlightOptions(pre_tag="[[", post_tag="]]")
    )
    by_id = {h.document.id: h for h in result.hits}
    p1 = by_id["p1"]
    equal([h.field for h in p1.highlights], ["name"], "highlighted fields of p1")
    equal(p1.highlights[0].snippet, "[[Red]] [[Apple]]", "snippet of p1's name")
    p4 = by_id["p4"]
    equal([h.field for h in p4.highlights], ["name", "description"], "highlighted fields of p4")
    equal(p4.highlights[0].snippet, "[[Apple]] juice", "snippet of p4's name")
    equal(p4.highlights[1].snippet, "not [[red]] at all? [[red]]!", "snippet of p4's description")
    default = await search(t, coll, "juice", highlight=pb.HighlightOptions())
    equal(default.hits[0].highlights[0].snippet, "Apple <mark>juice</mark>", "default tags")
    plain = await search(t, coll, "juice")
    equal(list(plain.hits[0].highlights), [], "highlights without highlight options")
    long_text = " ".join(f"w{i}" for i in range(100)) + " needle " + "tail " * 10
    await insert_all(t, coll, {"long": {"name": "long", "description": long_text}})
    cut = await search(t, coll, "needle", highlight=pb.HighlightOptions(snippet_words=5))
    snippet = cut.hits[0].highlights[0].snippet
    check(
        snippet.startswith("…") and "<mark>needle</mark>" in snippet,
        f"cut snippet {snippet!r} should start with … and mark the term",
    )
    check(len(snippet.replace("…", " ").split()) <= 5, f"snippet {snippet!r} over 5 words")


@case("document_search", requires=REQUIRES)
async def invalid_searches(t: Target) -> None:
    """Empty or wordless queries, missing fields, bad weights and bad filters are
    INVALID_ARGUMENT naming the field."""
    coll = t.name("badsearch")
    await insert_all(t, coll, PRODUCTS)
    await expect_invalid(search(t, coll, ""), "query", "empty query")
    await expect_invalid(search(t, coll, "  ?! "), "query", "query without words")
    await expect_invalid(
        stub(t).Search(pb.SearchRequest(collection=coll, query="red")), "fields", "no fields"
    )
    for weight in (-1.0, 1001.0, float("nan"), float("inf")):
        await expect_invalid(
            search(t, coll, "red", [pb.SearchField(path="name", weight=weight)]),
            "fields[0].weight",
            f"weight {weight}",
        )
    await expect_invalid(search(t, coll, "red", filter='{"$bad": 1}'), "filter", "bad filter")
    await expect_invalid(search(t, coll, "red", page_size=-1), "page_size", "page_size -1")


@case("document_search", requires=REQUIRES)
async def nested_field_paths(t: Target) -> None:
    """Paths address object members only: a path below another searched path finds its words
    as well, a path into an array or a non-string value has none, a digit names a member (never
    an array item); hits carry the whole stored document, not only the searched values."""
    coll = t.name("nested")
    docs: dict[str, dict[str, Any]] = {
        "n1": {"meta": {"title": "red apple", "n": 7}, "items": [{"name": "red"}], "other": "x"},
        "n2": {"meta": {"0": "red apple"}, "list": ["red", "apple"]},
        "n3": {"meta": "red apple", "items": {"name": "red apple"}},
    }
    await insert_all(t, coll, docs)
    fields = [
        pb.SearchField(path="meta"),
        pb.SearchField(path="meta.title", weight=5),
        pb.SearchField(path="items.name", weight=2),
        pb.SearchField(path="meta.0", weight=3),
        pb.SearchField(path="list.0", weight=4),
    ]
    result = await search(
        t, coll, "red apple", fields, highlight=pb.HighlightOptions(pre_tag="[", post_tag="]")
    )
    equal(ids(result), ["n1", "n2", "n3"], "hits ranked by the weight of the exact field")
    by_id = {h.document.id: h for h in result.hits}
    equal(
        [(h.field, h.snippet) for h in by_id["n1"].highlights],
        [("meta.title", "[red] [apple]")],
        "highlights of a nested member (an array of objects has no words)",
    )
    equal([h.field for h in by_id["n2"].highlights], ["meta.0"], "a digit names a member")
    equal(
        [h.field for h in by_id["n3"].highlights], ["meta", "items.name"], "outer and inner paths"
    )
    equal(json.loads(by_id["n1"].document.json), docs["n1"], "the whole document of a hit")
    equal(ids(await search(t, coll, "7", fields)), [], "numbers have no words")
