"""Unique VALUE indexes constrain exactly the documents the contract says (not arrays, not
values reached through arrays, not missing/null/objects; 1 equals 1.0, true differs from 1),
whichever of create-then-write or write-then-create happened, and a failed or dropped index
leaves nothing behind."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb

from plugins.mongodb import MongodbPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import AlreadyExists, FailedPrecondition
from tests.support.servers import ThrowawayServer

CTX = CallContext("ns")


@pytest.fixture
async def plugin(mongo_server: ThrowawayServer, tmp_path: Path) -> AsyncIterator[MongodbPlugin]:
    p = MongodbPlugin(
        {"connection": mongo_server.url, "database": f"u{uuid.uuid4().hex[:8]}"},
        data_dir=tmp_path,
    )
    await p.start()
    yield p
    await p.close()


async def insert(p: MongodbPlugin, doc_id: str, body: dict[str, Any]) -> None:
    await p.documents.insert(
        basic_pb.InsertRequest(collection="c", id=doc_id, json=json.dumps(body)), CTX
    )


async def create(p: MongodbPlugin, *paths: str) -> index_pb.CreateIndexResponse:
    index = index_pb.Index(
        name="ux", unique=True, fields=[index_pb.IndexField(path=path) for path in paths]
    )
    return await p.documents.create_index(
        index_pb.CreateIndexRequest(collection="c", index=index), CTX
    )


UNCONSTRAINED: list[dict[str, Any]] = [
    {"a": [1, 2]},
    {"a": [1, 2]},
    {"a": None},
    {"a": None},
    {},
    {},
    {"a": {"x": 1}},
    {"a": {"x": 1}},
]


async def test_only_scalars_are_constrained(plugin: MongodbPlugin) -> None:
    await create(plugin, "a")
    for i, body in enumerate(UNCONSTRAINED):
        await insert(plugin, f"free{i}", body)
    await insert(plugin, "one", {"a": 1})
    await insert(plugin, "true", {"a": True})
    await insert(plugin, "text", {"a": "1"})
    with pytest.raises(AlreadyExists) as info:
        await insert(plugin, "one-again", {"a": 1.0})
    assert (info.value.reason, info.value.metadata["index"]) == ("UNIQUE_VIOLATION", "ux")
    # an update that would collide is refused too, and one that frees the value is not
    with pytest.raises(AlreadyExists):
        await plugin.documents.update(
            basic_pb.UpdateRequest(collection="c", id="true", json='{"a": 1}'), CTX
        )
    await plugin.documents.update(
        basic_pb.UpdateRequest(collection="c", id="one", json='{"a": [1]}'), CTX
    )
    await insert(plugin, "one-now", {"a": 1})


async def test_paths_through_arrays_are_not_constrained(plugin: MongodbPlugin) -> None:
    await insert(plugin, "x1", {"n": [{"v": 1}]})
    await insert(plugin, "x2", {"n": [{"v": 1}]})
    await create(plugin, "n.v", "k")
    await insert(plugin, "y1", {"n": {"v": 1}, "k": "a"})
    await insert(plugin, "y2", {"n": {"v": 1}, "k": "b"})
    with pytest.raises(AlreadyExists):
        await insert(plugin, "y3", {"n": {"v": 1.0}, "k": "a"})


async def test_duplicates_fail_creation_and_leave_nothing(plugin: MongodbPlugin) -> None:
    await insert(plugin, "d1", {"a": 5})
    await insert(plugin, "d2", {"a": 5.0})
    with pytest.raises(FailedPrecondition) as info:
        await create(plugin, "a")
    assert info.value.reason == "DUPLICATE_VALUES"
    listed = await plugin.documents.list_indexes(index_pb.ListIndexesRequest(collection="c"), CTX)
    assert list(listed.indexes) == []
    coll = plugin.documents._coll(CTX, "c")
    assert await coll.count_documents({"u.ux": {"$exists": True}}) == 0
    await insert(plugin, "d3", {"a": 5})  # no leftover constraint


async def test_drop_removes_the_constraint(plugin: MongodbPlugin) -> None:
    await create(plugin, "a")
    again = await create(plugin, "a")
    assert again.created is False
    await insert(plugin, "e1", {"a": "v"})
    await plugin.documents.drop_index(index_pb.DropIndexRequest(collection="c", name="ux"), CTX)
    await insert(plugin, "e2", {"a": "v"})
    coll = plugin.documents._coll(CTX, "c")
    assert await coll.count_documents({"u.ux": {"$exists": True}}) == 0
