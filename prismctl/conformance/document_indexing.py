"""document_indexing: create/list/drop, idempotent create, unique-index enforcement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from prism.interfaces.document.v1 import document_indexing_pb2 as pb
from prism.interfaces.document.v1.document_indexing_pb2_grpc import DocumentIndexingServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_error, expect_invalid
from prismctl.conformance.document_basic import body, insert, insert_all, read, update

if TYPE_CHECKING:
    from prism.interfaces.document.v1.document_indexing_pb2_grpc import (
        DocumentIndexingServiceAsyncStub,
    )

REQUIRES = ("document_basic",)


def stub(t: Target) -> DocumentIndexingServiceAsyncStub:
    return DocumentIndexingServiceStub(t.channel)


def index(
    name: str, *paths: str, unique: bool = False, kind: int = pb.INDEX_KIND_VALUE
) -> pb.Index:
    return pb.Index(
        name=name,
        fields=[pb.IndexField(path=p.lstrip("-"), descending=p.startswith("-")) for p in paths],
        unique=unique,
        kind=kind,  # type: ignore[arg-type]
    )


async def create(t: Target, coll: str, idx: pb.Index) -> pb.CreateIndexResponse:
    response: pb.CreateIndexResponse = await stub(t).CreateIndex(
        pb.CreateIndexRequest(collection=coll, index=idx)
    )
    return response


async def names(t: Target, coll: str) -> list[str]:
    response: pb.ListIndexesResponse = await stub(t).ListIndexes(
        pb.ListIndexesRequest(collection=coll)
    )
    return [i.name for i in response.indexes]


@case("document_indexing", requires=REQUIRES)
async def create_list_drop(t: Target) -> None:
    """Indexes are listed by name; an identical CreateIndex is created=false, a different
    definition under the same name ALREADY_EXISTS (INDEX_EXISTS); DropIndex of a missing index is
    NOT_FOUND (INDEX_NOT_FOUND); dropping leaves documents alone."""
    coll = t.name("idx")
    equal(await names(t, coll), [], "indexes of a collection without any")
    await insert(t, coll, "a", {"price": 1, "name": "x"})
    made = await create(t, coll, index("by_price", "-price"))
    equal(made.created, True, "first CreateIndex: created")
    equal(made.index, index("by_price", "-price"), "stored index definition")
    unspecified = pb.Index(name="by_name", fields=[pb.IndexField(path="name")])
    equal((await create(t, coll, unspecified)).index.kind, pb.INDEX_KIND_VALUE, "default kind")
    await create(t, coll, index("a_text", "name", kind=pb.INDEX_KIND_TEXT))
    equal(await names(t, coll), ["a_text", "by_name", "by_price"], "ListIndexes (name order)")
    again = await create(t, coll, index("by_price", "-price"))
    equal(again.created, False, "identical CreateIndex: created")
    await expect_error(
        create(t, coll, index("by_price", "price")),
        grpc.StatusCode.ALREADY_EXISTS,
        "CreateIndex reusing a name with another definition",
        reason="INDEX_EXISTS",
    )
    await stub(t).DropIndex(pb.DropIndexRequest(collection=coll, name="by_price"))
    equal(await names(t, coll), ["a_text", "by_name"], "ListIndexes after DropIndex")
    await expect_error(
        stub(t).DropIndex(pb.DropIndexRequest(collection=coll, name="by_price")),
        grpc.StatusCode.NOT_FOUND,
        "DropIndex of a missing index",
        reason="INDEX_NOT_FOUND",
    )
    equal((await read(t, coll, "a")).revision, 1, "document after index changes (revision)")
    await create(t, t.name("empty"), index("early", "x"))
    equal(await names(t, t.name("empty")), ["early"], "index on a collection with no documents")


@case("document_indexing", requires=REQUIRES)
async def unique_index_violation(t: Target) -> None:
    """A unique index rejects a duplicate Insert or Update with ALREADY_EXISTS (UNIQUE_VIOLATION,
    metadata index) and writes nothing; missing and null values are not constrained; 1 equals
    1.0; after DropIndex duplicates are allowed."""
    coll = t.name("uniq")
    await insert_all(t, coll, {"a": {"email": "a@x", "n": 1}, "b": {"email": "b@x"}})
    await create(t, coll, index("by_email", "email", unique=True))
    info = await expect_error(
        insert(t, coll, "c", {"email": "a@x"}),
        grpc.StatusCode.ALREADY_EXISTS,
        "Insert duplicating a unique value",
        reason="UNIQUE_VIOLATION",
    )
    equal(info.metadata.get("index"), "by_email", "ErrorInfo metadata index")
    await expect_error(
        read(t, coll, "c"), grpc.StatusCode.NOT_FOUND, "document of a rejected Insert"
    )
    await expect_error(
        update(t, coll, "b", {"email": "a@x"}),
        grpc.StatusCode.ALREADY_EXISTS,
        "Update duplicating a unique value",
        reason="UNIQUE_VIOLATION",
    )
    b = await read(t, coll, "b")
    equal((body(b), b.revision), ({"email": "b@x"}, 1), "document after a rejected Update")
    await insert(t, coll, "n1", {"other": 1})
    await insert(t, coll, "n2", {"other": 2})
    await insert(t, coll, "z1", {"email": None})
    await insert(t, coll, "z2", {"email": None})
    await update(t, coll, "b", {"email": "b2@x"})  # changing one's own value is fine
    await create(t, coll, index("by_n", "n", unique=True))
    await expect_error(
        insert(t, coll, "d", {"n": 1.0}),
        grpc.StatusCode.ALREADY_EXISTS,
        "Insert of n=1.0 under a unique index holding n=1",
        reason="UNIQUE_VIOLATION",
    )
    await stub(t).DropIndex(pb.DropIndexRequest(collection=coll, name="by_email"))
    await insert(t, coll, "c", {"email": "a@x"})
    await expect_error(
        create(t, coll, index("by_email", "email", unique=True)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "unique CreateIndex over existing duplicates",
        reason="DUPLICATE_VALUES",
    )
    check("by_email" not in await names(t, coll), "failed unique index was created anyway")


@case("document_indexing", requires=REQUIRES)
async def invalid_indexes(t: Target) -> None:
    """Bad index definitions are INVALID_ARGUMENT naming the field."""
    coll = t.name("badidx")
    await expect_invalid(
        create(t, coll, index("t", "name", unique=True, kind=pb.INDEX_KIND_TEXT)),
        ("unique", "index.unique"),
        "unique TEXT index",
    )
    await expect_invalid(
        create(t, coll, index("t", "-name", kind=pb.INDEX_KIND_TEXT)),
        ("fields[0].descending", "index.fields[0].descending"),
        "descending TEXT index field",
    )
    await expect_invalid(
        create(t, coll, index("Bad-Name", "x")), ("name", "index.name"), "index name 'Bad-Name'"
    )
    await expect_invalid(
        create(t, coll, index("nofields")), ("fields", "index.fields"), "index without fields"
    )
    await expect_invalid(create(t, "Bad", index("x", "x")), "collection", "collection 'Bad'")
    equal(await names(t, coll), [], "indexes after rejected CreateIndex calls")


@case("document_indexing", requires=REQUIRES)
async def unknown_index_kind(t: Target) -> None:
    """An IndexKind number the contract does not define is INVALID_ARGUMENT naming exactly
    `index.kind` (the request field), on every backend alike; nothing is created."""
    coll = t.name("kind")
    await expect_invalid(create(t, coll, index("k", "x", kind=7)), "index.kind", "index kind 7")
    equal(await names(t, coll), [], "indexes after a CreateIndex with an unknown kind")
