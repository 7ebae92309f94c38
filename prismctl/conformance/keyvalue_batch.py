"""keyvalue_batch: one result per requested key in request order, all-or-nothing validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as pb
from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceStub

from prismctl.conformance.core import Target, case, equal, expect_invalid
from prismctl.conformance.keyvalue_basic import get, put

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceAsyncStub

REQUIRES = ("keyvalue_basic",)
MAX_BATCH = 1000


def stub(t: Target) -> KeyValueBatchServiceAsyncStub:
    return KeyValueBatchServiceStub(t.channel)


async def batch_get(t: Target, keys: list[str]) -> list[pb.BatchGetResult]:
    response: pb.BatchGetResponse = await stub(t).BatchGet(pb.BatchGetRequest(keys=keys))
    return list(response.results)


@case("keyvalue_batch", requires=REQUIRES)
async def batch_get_every_key_in_order(t: Target) -> None:
    """BatchGet answers every requested key, in request order, missing ones with found=false."""
    a = await put(t, t.key("a"), b"A")
    c = await put(t, t.key("c"), b"C")
    keys = [t.key("c"), t.key("missing"), t.key("a"), t.key("c")]
    results = await batch_get(t, keys)
    equal([r.key for r in results], keys, "BatchGet result keys (request order, duplicates too)")
    equal(
        [(r.found, r.value) for r in results],
        [(True, b"C"), (False, b""), (True, b"A"), (True, b"C")],
        "BatchGet (found, value) per key",
    )
    equal([results[0].revision, results[2].revision], [c, a], "BatchGet revisions vs Set revisions")


@case("keyvalue_batch", requires=REQUIRES)
async def batch_set_results_per_key(t: Target) -> None:
    """BatchSet writes every entry and reports one result per entry, in order, with the revision
    a later Get sees."""
    entries = [pb.BatchSetEntry(key=t.key(f"{i}"), value=f"v{i}".encode()) for i in range(5)]
    await put(t, t.key("2"), b"old")
    response: pb.BatchSetResponse = await stub(t).BatchSet(pb.BatchSetRequest(entries=entries))
    equal([r.key for r in response.results], [e.key for e in entries], "BatchSet result keys")
    for entry, result in zip(entries, response.results, strict=True):
        got = await get(t, entry.key)
        equal((got.found, got.value), (True, entry.value), f"Get {entry.key!r} after BatchSet")
        equal(got.revision, result.revision, f"revision of {entry.key!r} (Get vs BatchSet)")


@case("keyvalue_batch", requires=REQUIRES)
async def batch_delete_results_per_key(t: Target) -> None:
    """BatchDelete removes every key and says per key whether it existed."""
    await put(t, t.key("x"))
    await put(t, t.key("z"))
    keys = [t.key("x"), t.key("y"), t.key("z")]
    response: pb.BatchDeleteResponse = await stub(t).BatchDelete(pb.BatchDeleteRequest(keys=keys))
    equal(
        [(r.key, r.deleted) for r in response.results],
        [(keys[0], True), (keys[1], False), (keys[2], True)],
        "BatchDelete (key, deleted) per key",
    )
    equal([r.found for r in await batch_get(t, keys)], [False] * 3, "found after BatchDelete")


@case("keyvalue_batch", requires=REQUIRES)
async def batch_invalid_input_writes_nothing(t: Target) -> None:
    """One bad key rejects the whole batch (INVALID_ARGUMENT naming it) before anything is
    written; empty and over-1000 batches are INVALID_ARGUMENT too."""
    good = t.key("good")
    bad_entries = [pb.BatchSetEntry(key=good, value=b"v"), pb.BatchSetEntry(key="", value=b"v")]
    await expect_invalid(
        stub(t).BatchSet(pb.BatchSetRequest(entries=bad_entries)),
        ("entries[1].key", "entries[1]"),
        "BatchSet with an empty second key",
    )
    equal((await get(t, good)).found, False, "valid entry of a rejected BatchSet: found")
    await put(t, good)
    await expect_invalid(
        stub(t).BatchDelete(pb.BatchDeleteRequest(keys=[good, ""])),
        "keys[1]",
        "BatchDelete with an empty second key",
    )
    equal((await get(t, good)).found, True, "key named in a rejected BatchDelete: found")
    await expect_invalid(
        stub(t).BatchGet(pb.BatchGetRequest(keys=[good, ""])), "keys[1]", "BatchGet"
    )
    await expect_invalid(stub(t).BatchGet(pb.BatchGetRequest(keys=[])), "keys", "empty BatchGet")
    await expect_invalid(
        stub(t).BatchSet(pb.BatchSetRequest(entries=[])), "entries", "empty BatchSet"
    )
    too_many = [t.key(f"m{i}") for i in range(MAX_BATCH + 1)]
    await expect_invalid(
        stub(t).BatchGet(pb.BatchGetRequest(keys=too_many)), "keys", "BatchGet of 1001 keys"
    )
    await expect_invalid(
        stub(t).BatchSet(
            pb.BatchSetRequest(entries=[pb.BatchSetEntry(key=k, value=b"v") for k in too_many])
        ),
        "entries",
        "BatchSet of 1001 entries",
    )
    equal((await get(t, too_many[0])).found, False, "entry of a rejected 1001-entry BatchSet")
