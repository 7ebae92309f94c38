"""The MongoDB translation of the shared filter AST must agree with the reference evaluator
(plugins.runtime.docfilter) on every document, including the places where MongoDB's own
semantics differ (paths through arrays, numeric path names, `$ne`/`$nin` on missing fields,
`$all` with null); sorted, paged Find must give the reference order. Random data and filters,
against a real MongoDB-wire server."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.mongodb import MongodbPlugin
from plugins.mongodb.document import encode_namespace
from plugins.mongodb.keyvalue import string_upper_bound
from plugins.runtime import docfilter
from plugins.runtime.context import CallContext
from tests.support.documents import SCALARS, find_ids, random_filter
from tests.support.servers import ThrowawayServer

PATHS = ["a", "b", "n.x", "n.y", "n.0", "n.x.z"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.55 or depth > 1:
        return rng.choice(SCALARS)
    if roll < 0.85:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"x": random_value(rng, depth + 1), "z": rng.choice(SCALARS)}


def random_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("a", "b"):
        if rng.random() < 0.8:
            body[name] = random_value(rng)
    if rng.random() < 0.8:
        body["n"] = rng.choice(
            [
                {"x": random_value(rng), "y": rng.choice(SCALARS)},
                {"0": rng.choice(SCALARS)},
                [{"x": rng.choice(SCALARS)}, {"y": 1}],  # MongoDB paths would walk into these
                [rng.choice(SCALARS)],
                {"x": {"z": rng.choice(SCALARS)}},
                {"x": [{"z": rng.choice(SCALARS)}]},
                3,
            ]
        )
    return body


@pytest.fixture(scope="module")
async def loaded(
    mongo_server: ThrowawayServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[MongodbPlugin, dict[str, dict[str, Any]]]]:
    """A plugin with one collection of random documents, and those bodies by id."""
    plugin = MongodbPlugin(
        {"connection": mongo_server.url, "database": "docquery"},
        data_dir=tmp_path_factory.mktemp("mongodb"),
    )
    await plugin.start()
    rng = random.Random(20261123)
    bodies = {f"d{i:03d}": random_body(rng) for i in range(150)}
    ctx = CallContext.with_timeout("ns", 30.0)
    for doc_id, body in bodies.items():
        await plugin.documents.insert(
            basic_pb.InsertRequest(collection="c", id=doc_id, json=json.dumps(body)), ctx
        )
    yield plugin, bodies
    await plugin.close()


async def _ids(plugin: MongodbPlugin, text: str, sort: list[tuple[str, bool]]) -> list[str]:
    return await find_ids(plugin.documents, CallContext.with_timeout("ns", 30.0), text, sort, 40)


async def test_random_filters_agree_with_the_reference(
    loaded: tuple[MongodbPlugin, dict[str, dict[str, Any]]],
) -> None:
    plugin, bodies = loaded
    rng = random.Random(7)
    for _ in range(120):
        text = json.dumps(random_filter(rng, PATHS))
        node = docfilter.parse_filter(text)
        expected = sorted(i for i, b in bodies.items() if docfilter.matches(node, b))
        assert await _ids(plugin, text, []) == expected, text
        count = await plugin.documents.count(
            query_pb.CountRequest(collection="c", filter=text), CallContext("ns")
        )
        assert count.count == len(expected), text


async def test_sorted_pages_follow_the_reference_order(
    loaded: tuple[MongodbPlugin, dict[str, dict[str, Any]]],
) -> None:
    plugin, bodies = loaded
    rng = random.Random(11)
    for fields in (
        [("a", False)],
        [("b", True), ("a", False)],
        [("n.x", False)],
        [("n.0", True), ("n.x.z", False), ("b", True)],
    ):
        spec = docfilter.parse_sort(fields)
        for text in ("", *(json.dumps(random_filter(rng, PATHS)) for _ in range(5))):
            node = docfilter.parse_filter(text)
            matching = (
                (spec.key(i, b), i) for i, b in bodies.items() if docfilter.matches(node, b)
            )
            expected = [i for _, i in spec.sort(matching)]
            assert await _ids(plugin, text, fields) == expected, (fields, text)


def test_namespace_encoding_is_injective_and_legal() -> None:
    names = ["", "a", "A", "a_b", "a_5f", "a.b", "a$b", "é", "a b", "-"]
    encoded = [encode_namespace(n) for n in names]
    assert len(set(encoded)) == len(names)
    assert all(set(e) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_") for e in encoded)


def test_string_upper_bound_in_code_point_order() -> None:
    assert string_upper_bound("ab") == "ac"
    assert string_upper_bound("a\U0010ffff") == "b"
    assert string_upper_bound("\U0010ffff") is None
    assert string_upper_bound("a\ud7ff") == "a\ue000"
