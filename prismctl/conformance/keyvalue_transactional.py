"""keyvalue_transactional: atomic visibility on commit, rollback, ordering, read-your-writes,
isolation from concurrent readers, expiry of idle transactions, conflicts."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as pb
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_transactional_pb2_grpc import (
    KeyValueTransactionalServiceStub,
)

from prismctl.conformance.core import (
    CaseFailure,
    Target,
    case,
    check,
    equal,
    expect_error,
    expect_invalid,
)
from prismctl.conformance.keyvalue_basic import get, put
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_transactional_pb2_grpc import (
        KeyValueTransactionalServiceAsyncStub,
    )

REQUIRES = ("keyvalue_basic",)
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def stub(t: Target) -> KeyValueTransactionalServiceAsyncStub:
    return KeyValueTransactionalServiceStub(t.channel)


class Tx:
    """A transaction handle with one method per RPC, so cases read like the scenario."""

    def __init__(self, t: Target, transaction_id: str) -> None:
        self.stub = stub(t)
        self.id = transaction_id

    @classmethod
    async def begin(cls, t: Target, idle: Duration | None = None) -> Tx:
        response: pb.BeginTransactionResponse = await stub(t).BeginTransaction(
            pb.BeginTransactionRequest(timeout=idle)
        )
        check(response.transaction_id, "BeginTransaction returned an empty transaction_id")
        return cls(t, response.transaction_id)

    async def set(self, key: str, value: bytes) -> None:
        await self.stub.SetInTransaction(
            pb.SetInTransactionRequest(transaction_id=self.id, key=key, value=value)
        )

    async def get(self, key: str) -> pb.GetInTransactionResponse:
        response: pb.GetInTransactionResponse = await self.stub.GetInTransaction(
            pb.GetInTransactionRequest(transaction_id=self.id, key=key)
        )
        return response

    async def delete(self, key: str) -> bool:
        response: pb.DeleteInTransactionResponse = await self.stub.DeleteInTransaction(
            pb.DeleteInTransactionRequest(transaction_id=self.id, key=key)
        )
        return response.deleted

    async def commit(self) -> None:
        await self.stub.Commit(pb.CommitRequest(transaction_id=self.id))

    async def rollback(self) -> None:
        await self.stub.Rollback(pb.RollbackRequest(transaction_id=self.id))


@case("keyvalue_transactional", requires=REQUIRES)
async def commit_makes_all_writes_visible(t: Target) -> None:
    """Writes in a transaction are invisible outside it until Commit, then all visible."""
    a, b, c = t.key("a"), t.key("b"), t.key("c")
    await put(t, c, b"old")
    tx = await Tx.begin(t)
    await tx.set(a, b"A")
    await tx.set(b, b"B")
    equal(await tx.delete(c), True, "DeleteInTransaction of a present key: deleted")
    equal((await get(t, a)).found, False, "uncommitted write visible outside the transaction")
    equal((await get(t, c)).found, True, "uncommitted delete visible outside the transaction")
    await tx.commit()
    equal((await get(t, a)).value, b"A", "first write after Commit")
    equal((await get(t, b)).value, b"B", "second write after Commit")
    equal((await get(t, c)).found, False, "deleted key after Commit: found")
    await expect_error(
        tx.set(a, b"again"),
        NOT_FOUND,
        "SetInTransaction after Commit",
        reason="TRANSACTION_NOT_FOUND",
    )


@case("keyvalue_transactional", requires=REQUIRES)
async def rollback_discards(t: Target) -> None:
    """Rollback discards every write; the handle is then unknown (NOT_FOUND)."""
    k, kept = t.key("k"), t.key("kept")
    await put(t, kept, b"before")
    tx = await Tx.begin(t)
    await tx.set(k, b"v")
    await tx.set(kept, b"changed")
    await tx.rollback()
    equal((await get(t, k)).found, False, "write of a rolled-back transaction: found")
    equal((await get(t, kept)).value, b"before", "key overwritten in a rolled-back transaction")
    await expect_error(
        tx.commit(), NOT_FOUND, "Commit after Rollback", reason="TRANSACTION_NOT_FOUND"
    )


@case("keyvalue_transactional", requires=REQUIRES)
async def operations_apply_in_order(t: Target) -> None:
    """Set, overwrite, delete and re-set of the same keys apply in the order sent."""
    a, b, c = t.key("a"), t.key("b"), t.key("c")
    await put(t, b, b"B0")
    tx = await Tx.begin(t)
    await tx.set(a, b"A1")
    await tx.set(a, b"A2")
    await tx.delete(b)
    await tx.set(b, b"B1")
    await tx.set(c, b"C1")
    await tx.delete(c)
    await tx.commit()
    equal((await get(t, a)).value, b"A2", "key set twice: last value")
    equal((await get(t, b)).value, b"B1", "key deleted then set: value")
    equal((await get(t, c)).found, False, "key set then deleted: found")


@case("keyvalue_transactional", requires=REQUIRES)
async def reads_see_own_writes(t: Target) -> None:
    """GetInTransaction sees the transaction's own sets and deletes, and committed data."""
    k, other = t.key("k"), t.key("other")
    await put(t, other, b"committed")
    tx = await Tx.begin(t)
    equal((await tx.get(other)).value, b"committed", "committed key read in a transaction")
    equal((await tx.get(k)).found, False, "missing key read in a transaction: found")
    await tx.set(k, b"mine")
    got = await tx.get(k)
    equal((got.found, got.value), (True, b"mine"), "own write read in the transaction")
    equal(await tx.delete(other), True, "DeleteInTransaction of a committed key: deleted")
    equal((await tx.get(other)).found, False, "own delete read in the transaction: found")
    equal(await tx.delete(t.key("never")), False, "DeleteInTransaction of a missing key")
    await tx.rollback()


@case("keyvalue_transactional", requires=REQUIRES)
async def isolated_from_concurrent_readers(t: Target) -> None:
    """A reader on another connection sees only old values while the transaction is open or
    committing, and only new values once Commit has returned."""
    keys = [t.key(f"k{i}") for i in range(5)]
    for k in keys:
        await put(t, k, b"old")
    reader = KeyValueBasicServiceStub(t.extra_channel())
    phase = "open"
    bad: list[str] = []

    async def observe() -> None:
        while True:
            issued_after_commit = phase == "committed"
            for k in keys:
                before = phase
                value = (await reader.Get(basic_pb.GetRequest(key=k))).value
                if phase == "open" and value != b"old":
                    bad.append(f"{k!r}={value!r} while the transaction was open")
                if before == "committed" and value != b"new":
                    bad.append(f"{k!r}={value!r} after Commit returned")
            if issued_after_commit:
                return

    watcher = asyncio.create_task(observe())
    tx = await Tx.begin(t)
    for k in keys:
        await tx.set(k, b"new")
        await asyncio.sleep(0.01)
    phase = "committing"
    await tx.commit()
    phase = "committed"
    await watcher
    equal(bad, [], "isolation violations")


@case("keyvalue_transactional", requires=REQUIRES)
async def unknown_and_expired_ids(t: Target) -> None:
    """An unknown id is NOT_FOUND (TRANSACTION_NOT_FOUND) on every call; a transaction idle past
    its timeout is rolled back and then unknown too."""
    bogus = Tx(t, "no-such-transaction")
    for call, label in (
        (bogus.set(t.key("k"), b"v"), "SetInTransaction"),
        (bogus.get(t.key("k")), "GetInTransaction"),
        (bogus.delete(t.key("k")), "DeleteInTransaction"),
        (bogus.commit(), "Commit"),
        (bogus.rollback(), "Rollback"),
    ):
        await expect_error(
            call, NOT_FOUND, f"{label} with an unknown id", reason="TRANSACTION_NOT_FOUND"
        )
    tx = await Tx.begin(t, Duration(seconds=1))
    await tx.set(t.key("idle"), b"v")

    async def expired() -> bool:
        try:
            await tx.get(t.key("idle"))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == NOT_FOUND:
                return True
            raise
        return False

    # Polling with GetInTransaction keeps the transaction busy; poll slower than its timeout.
    await asyncio.sleep(1.0)
    await eventually(expired, timeout=10.0, interval=1.2, message="idle transaction still open")
    equal((await get(t, t.key("idle"))).found, False, "write of an expired transaction: found")


@case("keyvalue_transactional", requires=REQUIRES)
async def conflict_never_loses_an_update(t: Target) -> None:
    """A transaction that read a key another client then overwrote either fails Commit with
    ABORTED (TRANSACTION_CONFLICT) or is ordered before that write; it never silently wins."""
    k = t.key("k")
    await put(t, k, b"0")
    tx = await Tx.begin(t)
    read = await tx.get(k)
    equal(read.value, b"0", "value read in the transaction")
    outside = asyncio.create_task(put(t, k, b"outside"))
    done, _ = await asyncio.wait({outside}, timeout=0.5)
    outside_first = bool(done)
    await tx.set(k, str(int(read.value) + 1).encode())
    try:
        await tx.commit()
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ABORTED:
            raise CaseFailure(f"Commit after a conflicting write: {exc.code().name}") from exc
        await outside
        equal((await get(t, k)).value, b"outside", "value after an aborted transaction")
        return
    await outside
    if outside_first:
        raise CaseFailure("Commit succeeded over a write made after the transaction read the key")
    equal((await get(t, k)).value, b"outside", "value when the outside write ran after Commit")


@case("keyvalue_transactional", requires=REQUIRES)
async def invalid_transaction_input(t: Target) -> None:
    """A timeout over 5 minutes or negative, and an empty key inside a transaction, are
    INVALID_ARGUMENT naming the field."""
    await expect_invalid(
        stub(t).BeginTransaction(pb.BeginTransactionRequest(timeout=Duration(seconds=301))),
        "timeout",
        "BeginTransaction with a 301s timeout",
    )
    await expect_invalid(
        stub(t).BeginTransaction(pb.BeginTransactionRequest(timeout=Duration(seconds=-1))),
        "timeout",
        "BeginTransaction with a negative timeout",
    )
    tx = await Tx.begin(t)
    await expect_invalid(tx.set("", b"v"), "key", "SetInTransaction with an empty key")
    await expect_invalid(tx.get(""), "key", "GetInTransaction with an empty key")
    await tx.rollback()
