"""keyvalue_cas: revisions, CompareAndSwap / CompareAndDelete outcomes, insert-only, and no lost
update under concurrent read-modify-write loops."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as pb
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_cas_pb2_grpc import KeyValueCASServiceStub

from prismctl.conformance import keyvalue_batch, keyvalue_transactional, keyvalue_ttl
from prismctl.conformance.core import Target, case, check, equal, expect_error, expect_invalid
from prismctl.conformance.keyvalue_basic import get, put

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_cas_pb2_grpc import KeyValueCASServiceAsyncStub

REQUIRES = ("keyvalue_basic",)
CLIENTS = 8
INCREMENTS = 10


def stub(t: Target) -> KeyValueCASServiceAsyncStub:
    return KeyValueCASServiceStub(t.channel)


async def swap(t: Target, key: str, value: bytes, expected: int) -> int:
    response: pb.CompareAndSwapResponse = await stub(t).CompareAndSwap(
        pb.CompareAndSwapRequest(key=key, value=value, expected_revision=expected)
    )
    return response.revision


@case("keyvalue_cas", requires=REQUIRES)
async def swap_success(t: Target) -> None:
    """CompareAndSwap with the current revision writes and returns a new, non-zero revision."""
    k = t.key("k")
    r1 = await put(t, k, b"one")
    check(r1 != 0, "Set returned revision 0 on a backend implementing keyvalue_cas")
    equal((await get(t, k)).revision, r1, "Get revision vs Set revision")
    r2 = await swap(t, k, b"two", r1)
    check(r2 not in (0, r1), f"CompareAndSwap revision {r2} (previous {r1})")
    got = await get(t, k)
    equal((got.value, got.revision), (b"two", r2), "Get after CompareAndSwap (value, revision)")


@case("keyvalue_cas", requires=REQUIRES)
async def swap_mismatch(t: Target) -> None:
    """A stale revision is ABORTED with REVISION_MISMATCH and current_revision, writing nothing;
    CompareAndSwap of a missing key with a positive revision is ABORTED too."""
    k = t.key("k")
    r1 = await put(t, k, b"one")
    r2 = await put(t, k, b"two")
    info = await expect_error(
        stub(t).CompareAndSwap(pb.CompareAndSwapRequest(key=k, value=b"x", expected_revision=r1)),
        grpc.StatusCode.ABORTED,
        "CompareAndSwap with a stale revision",
        reason="REVISION_MISMATCH",
    )
    equal(info.metadata.get("current_revision"), str(r2), "ErrorInfo current_revision")
    equal((await get(t, k)).value, b"two", "value after a failed CompareAndSwap")
    await expect_error(
        stub(t).CompareAndSwap(
            pb.CompareAndSwapRequest(key=t.key("none"), value=b"x", expected_revision=r2)
        ),
        grpc.StatusCode.ABORTED,
        "CompareAndSwap of a missing key with a positive revision",
        reason="REVISION_MISMATCH",
    )
    equal((await get(t, t.key("none"))).found, False, "missing key after a failed swap: found")


@case("keyvalue_cas", requires=REQUIRES)
async def insert_only(t: Target) -> None:
    """expected_revision=0 creates a missing key and is ALREADY_EXISTS (KEY_EXISTS) when the key
    is present, leaving it unchanged."""
    k = t.key("k")
    r = await swap(t, k, b"first", 0)
    check(r != 0, "insert-only CompareAndSwap returned revision 0")
    await expect_error(
        stub(t).CompareAndSwap(pb.CompareAndSwapRequest(key=k, value=b"x", expected_revision=0)),
        grpc.StatusCode.ALREADY_EXISTS,
        "insert-only CompareAndSwap of a present key",
        reason="KEY_EXISTS",
    )
    got = await get(t, k)
    equal((got.value, got.revision), (b"first", r), "key after a failed insert-only write")


@case("keyvalue_cas", requires=REQUIRES)
async def compare_and_delete(t: Target) -> None:
    """CompareAndDelete removes only at the current revision; a stale revision or a missing key
    is ABORTED; expected_revision 0 is INVALID_ARGUMENT."""
    k = t.key("k")
    r1 = await put(t, k, b"one")
    r2 = await put(t, k, b"two")
    await expect_error(
        stub(t).CompareAndDelete(pb.CompareAndDeleteRequest(key=k, expected_revision=r1)),
        grpc.StatusCode.ABORTED,
        "CompareAndDelete with a stale revision",
        reason="REVISION_MISMATCH",
    )
    equal((await get(t, k)).found, True, "key after a failed CompareAndDelete: found")
    await expect_invalid(
        stub(t).CompareAndDelete(pb.CompareAndDeleteRequest(key=k, expected_revision=0)),
        "expected_revision",
        "CompareAndDelete with expected_revision=0",
    )
    await stub(t).CompareAndDelete(pb.CompareAndDeleteRequest(key=k, expected_revision=r2))
    equal((await get(t, k)).found, False, "key after CompareAndDelete: found")
    await expect_error(
        stub(t).CompareAndDelete(pb.CompareAndDeleteRequest(key=k, expected_revision=r2)),
        grpc.StatusCode.ABORTED,
        "CompareAndDelete of a missing key",
    )
    await expect_invalid(
        stub(t).CompareAndSwap(pb.CompareAndSwapRequest(key="", value=b"v")),
        "key",
        "CompareAndSwap with an empty key",
    )


@case("keyvalue_cas", requires=REQUIRES)
async def revision_changes_on_every_write(t: Target) -> None:
    """Every write of a key, through any KeyValue interface the target serves, gives it a new
    revision — also after delete and re-create (no ABA)."""
    k = t.key("k")
    seen: list[int] = []

    async def record() -> None:
        seen.append((await get(t, k)).revision)

    await put(t, k, b"1")
    await record()
    await put(t, k, b"1")  # same value: still a write
    await record()
    await swap(t, k, b"2", seen[-1])
    await record()
    await KeyValueBasicServiceStub(t.channel).Delete(basic_pb.DeleteRequest(key=k))
    await put(t, k, b"3")
    await record()
    if "keyvalue_batch" in t.interfaces:
        await keyvalue_batch.stub(t).BatchSet(
            batch_pb.BatchSetRequest(entries=[batch_pb.BatchSetEntry(key=k, value=b"4")])
        )
        await record()
    if "keyvalue_ttl" in t.interfaces:
        await keyvalue_ttl.stub(t).SetWithTTL(
            ttl_pb.SetWithTTLRequest(key=k, value=b"5", ttl=Duration(seconds=3600))
        )
        await record()
    if "keyvalue_transactional" in t.interfaces:
        tx = keyvalue_transactional.stub(t)
        begun: tx_pb.BeginTransactionResponse = await tx.BeginTransaction(
            tx_pb.BeginTransactionRequest()
        )
        tid = begun.transaction_id
        await tx.SetInTransaction(
            tx_pb.SetInTransactionRequest(transaction_id=tid, key=k, value=b"6")
        )
        await tx.Commit(tx_pb.CommitRequest(transaction_id=tid))
        await record()
    check(0 not in seen, f"a revision of 0 after a write: {seen}")
    equal(len(set(seen)), len(seen), f"distinct revisions after {len(seen)} writes ({seen})")


@case("keyvalue_cas", requires=REQUIRES)
async def concurrent_cas_no_lost_update(t: Target) -> None:
    """Eight clients on separate connections each increment one counter ten times with
    read/CompareAndSwap retry loops: the final count is exactly 80."""
    k = t.key("counter")
    await put(t, k, b"0")

    async def client() -> None:
        channel = t.extra_channel()
        basic = KeyValueBasicServiceStub(channel)
        cas = KeyValueCASServiceStub(channel)
        for _ in range(INCREMENTS):
            while True:
                got: basic_pb.GetResponse = await basic.Get(basic_pb.GetRequest(key=k))
                try:
                    await cas.CompareAndSwap(
                        pb.CompareAndSwapRequest(
                            key=k,
                            value=str(int(got.value) + 1).encode(),
                            expected_revision=got.revision,
                        )
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED:
                        raise

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    equal(int((await get(t, k)).value), CLIENTS * INCREMENTS, "counter after concurrent CAS loops")
