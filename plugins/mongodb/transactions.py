"""keyvalue_transactional on MongoDB multi-document transactions held across RPCs.

A transaction is a client session with a transaction open on it (snapshot read concern): its
reads come from one snapshot taken at its first operation plus its own writes, nothing is
visible to others before commit, and a write to a key changed by someone else since the snapshot
is a write conflict, which the server turns into an aborted transaction; the contract reports it
at Commit (ABORTED, TRANSACTION_CONFLICT). Only deployments with transactions (replica sets,
SecantusDB) can serve this; the plugin probes at start and refuses the calls otherwise. Note
MongoDB's own rule that a plain write to a key an open transaction has written waits for that
transaction to end: such a write can run into its deadline (UNAVAILABLE) while the transaction
stays open. Idle transactions are aborted by `reap()` (and are unknown afterwards).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

from plugins.mongodb.connection import translate
from plugins.mongodb.keyvalue import MongoKeyValue, is_live, now
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PrismError,
    ResourceExhausted,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0
#: WriteConflict, NoSuchTransaction (the server aborted it), TransactionExceededLifetimeLimit
_CONFLICT_CODES = frozenset({112, 251, 290})


@dataclass
class HeldTransaction:
    ns: str
    session: AsyncClientSession
    timeout: float
    deadline: float = 0.0
    #: one RPC at a time on the session, and no reaping while one runs
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: set once an operation failed: the server transaction is dead, Commit must fail
    failure: PrismError | None = None

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.timeout


def _conflict(exc: PyMongoError) -> bool:
    if exc.has_error_label("TransientTransactionError"):
        return True
    return isinstance(exc, OperationFailure) and exc.code in _CONFLICT_CODES


class MongoTransactions:
    """keyvalue_transactional, on the same entries as MongoKeyValue."""

    def __init__(self, keyvalue: MongoKeyValue, *, max_transactions: int) -> None:
        self.keyvalue = keyvalue
        self.mongo = keyvalue.mongo
        self.max_transactions = max_transactions
        self.transactions: dict[str, HeldTransaction] = {}

    def _transaction(self, transaction_id: str, ctx: CallContext) -> HeldTransaction:
        txn = self.transactions.get(transaction_id)
        if txn is None or txn.ns != ctx.namespace:
            raise NotFound(
                f"transaction {transaction_id!r} not found (unknown, finished or timed out)",
                reason="TRANSACTION_NOT_FOUND",
                transaction_id=transaction_id,
            )
        return txn

    async def _finish(self, transaction_id: str, txn: HeldTransaction) -> None:
        """Forget a transaction; ending its session aborts whatever is still open on it."""
        if self.transactions.get(transaction_id) is txn:
            del self.transactions[transaction_id]
        try:
            async with self.mongo.call(None):
                await txn.session.end_session()
        except (PrismError, PyMongoError):
            pass  # the server is gone or already dropped it; nothing is left to abort

    async def reap(self) -> int:
        """Abort transactions idle past their timeout; returns how many."""
        at = time.monotonic()
        idle = [
            (tid, txn)
            for tid, txn in self.transactions.items()
            if txn.deadline <= at and not txn.lock.locked()
        ]
        for tid, txn in idle:
            await self._finish(tid, txn)
        return len(idle)

    async def close(self) -> None:
        for tid, txn in list(self.transactions.items()):
            await self._finish(tid, txn)

    async def _in_transaction(
        self,
        transaction_id: str,
        ctx: CallContext,
        job: Callable[[AsyncClientSession], Awaitable[T]],
        *,
        finish: bool = False,
        on_conflict: T | None = None,
    ) -> T:
        """Run `job` in the transaction, one call at a time. A failed operation kills the
        server transaction, so the failure is remembered and every later call, Commit included,
        reports it; a write given `on_conflict` answers that instead of TRANSACTION_CONFLICT
        (the contract reports conflicts at Commit). `finish` ends the transaction afterwards."""
        txn = self._transaction(transaction_id, ctx)
        async with txn.lock:
            self._transaction(transaction_id, ctx)  # not reaped while we waited for the lock
            try:
                if txn.failure is not None:
                    raise txn.failure
                try:
                    async with self.mongo.call(ctx):
                        try:
                            result = await job(txn.session)
                        except PyMongoError as exc:
                            if not _conflict(exc):
                                raise
                            txn.failure = Aborted(
                                f"conflicting concurrent write ({exc}); retry the whole "
                                "transaction",
                                reason="TRANSACTION_CONFLICT",
                            )
                            if on_conflict is not None:
                                return on_conflict
                            raise txn.failure from exc
                except PrismError as err:
                    txn.failure = txn.failure or err
                    raise
                txn.touch()
                return result
            finally:
                if finish:
                    await self._finish(transaction_id, txn)

    async def begin_transaction(
        self, request: tx_pb.BeginTransactionRequest, ctx: CallContext
    ) -> tx_pb.BeginTransactionResponse:
        timeout = DEFAULT_TIMEOUT
        if request.HasField("timeout"):
            seconds = request.timeout.seconds + request.timeout.nanos / 1e9
            if seconds < 0:
                raise InvalidArgument("timeout", "must not be negative")
            if seconds > MAX_TIMEOUT:
                raise InvalidArgument("timeout", "must be at most 5 minutes")
            if seconds > 0:
                timeout = seconds
        if not self.keyvalue.transactions:
            raise FailedPrecondition(
                "this MongoDB deployment does not support transactions", backend="mongodb"
            )
        if len(self.transactions) >= self.max_transactions:
            raise ResourceExhausted(
                f"{self.max_transactions} transactions are already open (max_transactions)",
                backend="mongodb",
            )
        session = self.mongo.client.start_session()
        try:
            await session.start_transaction(read_concern=ReadConcern("snapshot"))
        except PyMongoError as exc:
            await session.end_session()
            translate(exc, ctx.timeout(self.mongo.settings.timeout))
        transaction_id = secrets.token_urlsafe(18)
        txn = HeldTransaction(ns=ctx.namespace, session=session, timeout=timeout)
        txn.touch()
        self.transactions[transaction_id] = txn
        return tx_pb.BeginTransactionResponse(transaction_id=transaction_id)

    async def set_in_transaction(
        self, request: tx_pb.SetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.SetInTransactionResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        kv = self.keyvalue

        async def job(session: AsyncClientSession) -> bool:
            entry = kv.entry(key, value, await kv.revisions(1), None)
            await kv.kv.replace_one(
                {"_id": kv.entry_id(ctx, key)}, entry, upsert=True, session=session
            )
            return True

        await self._in_transaction(request.transaction_id, ctx, job, on_conflict=False)
        return tx_pb.SetInTransactionResponse()

    async def get_in_transaction(
        self, request: tx_pb.GetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.GetInTransactionResponse:
        key = validation.key(request.key)
        kv = self.keyvalue

        async def job(session: AsyncClientSession) -> bytes | None:
            doc = await kv.kv.find_one({"_id": kv.entry_id(ctx, key)}, session=session)
            return None if doc is None or not is_live(doc, now()) else bytes(doc["v"])

        value = await self._in_transaction(request.transaction_id, ctx, job)
        if value is None:
            return tx_pb.GetInTransactionResponse(found=False)
        return tx_pb.GetInTransactionResponse(found=True, value=value)

    async def delete_in_transaction(
        self, request: tx_pb.DeleteInTransactionRequest, ctx: CallContext
    ) -> tx_pb.DeleteInTransactionResponse:
        key = validation.key(request.key)
        kv = self.keyvalue

        async def job(session: AsyncClientSession) -> bool:
            old = await kv.kv.find_one_and_delete(
                {"_id": kv.entry_id(ctx, key)}, {"x": 1}, session=session
            )
            return old is not None and is_live(old, now())

        deleted = await self._in_transaction(request.transaction_id, ctx, job, on_conflict=False)
        return tx_pb.DeleteInTransactionResponse(deleted=deleted)

    async def commit(self, request: tx_pb.CommitRequest, ctx: CallContext) -> tx_pb.CommitResponse:
        async def job(session: AsyncClientSession) -> None:
            await session.commit_transaction()

        await self._in_transaction(request.transaction_id, ctx, job, finish=True)
        return tx_pb.CommitResponse()

    async def rollback(
        self, request: tx_pb.RollbackRequest, ctx: CallContext
    ) -> tx_pb.RollbackResponse:
        txn = self._transaction(request.transaction_id, ctx)
        async with txn.lock:
            await self._finish(request.transaction_id, txn)
        return tx_pb.RollbackResponse()
