"""document_basic: CRUD, revisions and timestamps, revision preconditions, input rules."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import grpc
from prism.interfaces.document.v1 import document_basic_pb2 as pb
from prism.interfaces.document.v1.document_basic_pb2_grpc import DocumentBasicServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_error, expect_invalid

if TYPE_CHECKING:
    from prism.interfaces.document.v1.document_basic_pb2_grpc import (
        DocumentBasicServiceAsyncStub,
    )

NOT_FOUND = grpc.StatusCode.NOT_FOUND
ABORTED = grpc.StatusCode.ABORTED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS


def stub(t: Target) -> DocumentBasicServiceAsyncStub:
    return DocumentBasicServiceStub(t.channel)


def body(document: pb.Document) -> Any:
    return json.loads(document.json)


async def insert(t: Target, collection: str, doc_id: str, data: dict[str, Any]) -> pb.Document:
    """Insert `data` as JSON (the helper every Document case writes its fixtures with)."""
    response: pb.InsertResponse = await stub(t).Insert(
        pb.InsertRequest(collection=collection, id=doc_id, json=json.dumps(data))
    )
    return response.document


async def insert_all(t: Target, collection: str, docs: dict[str, dict[str, Any]]) -> None:
    for doc_id, data in docs.items():
        await insert(t, collection, doc_id, data)


async def read(t: Target, collection: str, doc_id: str) -> pb.Document:
    response: pb.GetResponse = await stub(t).Get(pb.GetRequest(collection=collection, id=doc_id))
    return response.document


async def update(
    t: Target, collection: str, doc_id: str, data: dict[str, Any], expected: int = 0
) -> pb.UpdateResponse:
    response: pb.UpdateResponse = await stub(t).Update(
        pb.UpdateRequest(
            collection=collection, id=doc_id, json=json.dumps(data), expected_revision=expected
        )
    )
    return response


@case("document_basic")
async def crud_round_trip(t: Target) -> None:
    """Insert, Get, Update and Delete one document; bodies come back equal as JSON values."""
    coll = t.name("crud")
    data = {
        "name": "Ada",
        "n": 9007199254740991,
        "neg": -42,
        "pi": 3.141592653589793,
        "ok": True,
        "none": None,
        "nested": {"list": [1, "two", {"three": 3.5}], "empty": {}},
        "unicode": "naïve — 日本 🎉",
        "id": "body member, not the id",
    }
    created = await insert(t, coll, "doc-1", data)
    equal(created.id, "doc-1", "inserted id")
    equal(body(created), data, "body returned by Insert")
    equal(created.revision, 1, "revision after Insert")
    equal(created.update_time, created.create_time, "update_time vs create_time after Insert")
    got = await read(t, coll, "doc-1")
    equal(body(got), data, "body read by Get")
    equal(got.revision, 1, "revision read by Get")
    changed = {"name": "Ada Lovelace"}
    updated = (await update(t, coll, "doc-1", changed)).document
    equal(body(updated), changed, "body after Update (whole replacement, no merge)")
    equal(updated.revision, 2, "revision after one Update")
    equal(updated.create_time, created.create_time, "create_time after Update")
    check(
        updated.update_time.ToNanoseconds() >= created.update_time.ToNanoseconds(),
        "update_time went backwards on Update",
    )
    equal(body(await read(t, coll, "doc-1")), changed, "body read after Update")
    deleted: pb.DeleteResponse = await stub(t).Delete(pb.DeleteRequest(collection=coll, id="doc-1"))
    equal(deleted.deleted, True, "Delete of a present document: deleted")
    info = await expect_error(
        stub(t).Get(pb.GetRequest(collection=coll, id="doc-1")),
        NOT_FOUND,
        "Get after Delete",
        reason="DOCUMENT_NOT_FOUND",
    )
    equal(
        (info.metadata.get("collection"), info.metadata.get("id")),
        (coll, "doc-1"),
        "ErrorInfo metadata (collection, id)",
    )
    again: pb.DeleteResponse = await stub(t).Delete(pb.DeleteRequest(collection=coll, id="doc-1"))
    equal(again.deleted, False, "Delete of a missing document: deleted")
    reborn = await insert(t, coll, "doc-1", {"v": 1})
    equal(reborn.revision, 1, "revision after re-inserting a deleted id")


@case("document_basic")
async def ids_and_collections(t: Target) -> None:
    """Generated ids are unique and well-formed; ids are case-sensitive; collections and
    namespaces separate documents; a never-written collection reads as empty."""
    coll = t.name("ids")
    generated = {(await insert(t, coll, "", {"i": i})).id for i in range(5)}
    equal(len(generated), 5, "distinct generated ids")
    for doc_id in generated:
        check(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", doc_id), f"generated id {doc_id!r}")
    await insert(t, coll, "Key", {"case": "upper"})
    await insert(t, coll, "key", {"case": "lower"})
    equal(body(await read(t, coll, "Key")), {"case": "upper"}, "body of id 'Key'")
    equal(body(await read(t, coll, "key")), {"case": "lower"}, "body of id 'key'")
    await expect_error(
        stub(t).Get(pb.GetRequest(collection=t.name("other"), id="key")),
        NOT_FOUND,
        "Get of an id from another collection",
        reason="DOCUMENT_NOT_FOUND",
    )


@case("document_basic")
async def insert_existing_is_already_exists(t: Target) -> None:
    """Inserting an existing id is ALREADY_EXISTS (DOCUMENT_EXISTS) and leaves it untouched."""
    coll = t.name("dup")
    await insert(t, coll, "a", {"v": 1})
    await expect_error(
        stub(t).Insert(pb.InsertRequest(collection=coll, id="a", json='{"v": 2}')),
        ALREADY_EXISTS,
        "Insert of an existing id",
        reason="DOCUMENT_EXISTS",
    )
    got = await read(t, coll, "a")
    equal((body(got), got.revision), ({"v": 1}, 1), "document after a rejected Insert")


@case("document_basic")
async def revision_preconditions(t: Target) -> None:
    """expected_revision guards Update and Delete (ABORTED, REVISION_MISMATCH, current_revision);
    Update of a missing document is NOT_FOUND unless allow_missing upserts it."""
    coll = t.name("rev")
    await insert(t, coll, "a", {"v": 1})
    equal((await update(t, coll, "a", {"v": 2}, expected=1)).document.revision, 2, "revision")
    info = await expect_error(
        update(t, coll, "a", {"v": 3}, expected=1),
        ABORTED,
        "Update with a stale expected_revision",
        reason="REVISION_MISMATCH",
    )
    equal(info.metadata.get("current_revision"), "2", "ErrorInfo current_revision")
    equal(body(await read(t, coll, "a")), {"v": 2}, "body after a rejected Update")
    missing = await expect_error(
        update(t, coll, "ghost", {"v": 1}, expected=3),
        ABORTED,
        "Update of a missing document with expected_revision",
        reason="REVISION_MISMATCH",
    )
    equal(missing.metadata.get("current_revision"), "0", "current_revision of a missing document")
    await expect_error(
        update(t, coll, "ghost", {"v": 1}),
        NOT_FOUND,
        "Update of a missing document without allow_missing",
        reason="DOCUMENT_NOT_FOUND",
    )
    upsert: pb.UpdateResponse = await stub(t).Update(
        pb.UpdateRequest(collection=coll, id="ghost", json='{"v": 1}', allow_missing=True)
    )
    equal((upsert.created, upsert.document.revision), (True, 1), "upsert (created, revision)")
    again: pb.UpdateResponse = await stub(t).Update(
        pb.UpdateRequest(collection=coll, id="ghost", json='{"v": 2}', allow_missing=True)
    )
    equal((again.created, again.document.revision), (False, 2), "second upsert (created, rev)")
    await expect_error(
        stub(t).Delete(pb.DeleteRequest(collection=coll, id="a", expected_revision=1)),
        ABORTED,
        "Delete with a stale expected_revision",
        reason="REVISION_MISMATCH",
    )
    equal((await read(t, coll, "a")).revision, 2, "document after a rejected Delete")
    await expect_error(
        stub(t).Delete(pb.DeleteRequest(collection=coll, id="nobody", expected_revision=1)),
        ABORTED,
        "Delete of a missing document with expected_revision",
        reason="REVISION_MISMATCH",
    )
    ok: pb.DeleteResponse = await stub(t).Delete(
        pb.DeleteRequest(collection=coll, id="a", expected_revision=2)
    )
    equal(ok.deleted, True, "Delete at the current revision: deleted")


@case("document_basic")
async def invalid_documents(t: Target) -> None:
    """Bad collection names, ids and bodies are INVALID_ARGUMENT naming the field; nothing is
    written."""
    coll = t.name("bad")
    for name in ("", "Upper", "1abc", "a" * 64, "has space", "dot.ted", "_x"):
        await expect_invalid(
            stub(t).Insert(pb.InsertRequest(collection=name, id="x", json="{}")),
            "collection",
            f"Insert into collection {name!r}",
        )
        await expect_invalid(
            stub(t).Get(pb.GetRequest(collection=name, id="x")),
            "collection",
            f"Get from collection {name!r}",
        )
    await expect_invalid(
        stub(t).Get(pb.GetRequest(collection=coll, id="")), "id", "Get with an empty id"
    )
    await expect_invalid(
        stub(t).Insert(pb.InsertRequest(collection=coll, id="i" * 1025, json="{}")),
        "id",
        "Insert with an id over 1024 bytes",
    )
    await expect_invalid(
        stub(t).Update(pb.UpdateRequest(collection=coll, id="", json="{}")),
        "id",
        "Update with an empty id",
    )
    deep = "{" + '"a":{' * 101 + "}" * 102
    for text in (
        "[1, 2]",
        "42",
        '"s"',
        "not json",
        "",
        '{"a": NaN}',
        '{"$set": 1}',
        '{"a": {"b.c": 1}}',
        '{"": 1}',
        deep,
    ):
        await expect_invalid(
            stub(t).Insert(pb.InsertRequest(collection=coll, id="x", json=text)),
            "json",
            f"Insert with body {text[:30]!r}",
        )
    await expect_error(
        stub(t).Get(pb.GetRequest(collection=coll, id="x")),
        NOT_FOUND,
        "document after rejected Inserts",
    )


async def remove(t: Target, collection: str, doc_id: str) -> bool:
    response: pb.DeleteResponse = await stub(t).Delete(
        pb.DeleteRequest(collection=collection, id=doc_id)
    )
    return response.deleted
