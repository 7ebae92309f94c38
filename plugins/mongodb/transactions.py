"""keyvalue_transactional on MongoDB multi-document transactions held across RPCs.

A transaction is a client session with a transaction open on it (snapshot read concern): its
reads come from one snapshot taken at its first operation plus its own writes, nothing is
visible to others before commit, and a write to a key changed by someone else since the snapshot
is a write conflict, which the server turns into an aborted transaction; the contract reports it
at Commit (ABORTED, TRANSACTION_CONFLICT). Only deployments with transactions (replica sets,
SecantusDB) can serve this; the plugin probes at start and refuses the calls otherwise. Note
MongoDB's own rule that a plain write to a key an open transaction has written waits for that
transaction to end: such a write can run into its deadline (UNAVAILABLE) while the transaction
stays open. A transaction idle past its timeout is unknown (NOT_FOUND) and `reap()` aborts it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

from plugins.mongodb.connection import translate
from plugins.mongodb.keyvalue import MongoKeyValue, is_live, now
from plugins.runtime import transactions, validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    FailedPrecondition,
    PrismError,
)

#: WriteConflict, NoSuchTransaction (the server aborted it), TransactionExceededLifetimeLimit
_CONFLICT_CODES = frozenset({112, 251, 290})


@dataclass(kw_only=True)
class HeldTransaction(transactions.HeldTransaction):
    session: AsyncClientSession


def _conflict(exc: PyMongoError) -> bool:
    if exc.has_error_label("TransientTransactionError"):
        return True
    return isinstance(exc, OperationFailure) and exc.code in _CONFLICT_CODES


class MongoTransactions:
    """keyvalue_transactional, on the same entries as MongoKeyValue."""

    def __init__(self, keyvalue: MongoKeyValue, *, max_transactions: int) -> None:
        self.keyvalue = keyvalue
        self.mongo = keyvalue.mongo
        self.transactions = transactions.HeldTransactions[HeldTransaction](
            self._release, self._guard, max_open=max_transactions, backend="mongodb"
        )

    async def _release(self, txn: HeldTransaction) -> None:
        """End the session, which aborts whatever is still open on it."""
        try:
            async with self.mongo.call(None):
                await txn.session.end_session()
        except (PrismError, PyMongoError):
            pass  # the server is gone or already dropped it; nothing is left to abort

    async def reap(self) -> int:
        """Abort transactions idle past their timeout; returns how many."""
        return await self.transactions.reap()

    async def close(self) -> None:
        await self.transactions.close()

    @contextlib.asynccontextmanager
    async def _guard(self, ctx: CallContext) -> AsyncIterator[None]:
        """Driver failures → PrismError; a write conflict is TRANSACTION_CONFLICT (reported at
        Commit)."""
        async with self.mongo.call(ctx):
            try:
                yield
            except PyMongoError as exc:
                if not _conflict(exc):
                    raise
                raise Aborted(
                    f"conflicting concurrent write ({exc}); retry the whole transaction",
                    reason="TRANSACTION_CONFLICT",
                ) from exc

    async def begin_transaction(
        self, request: tx_pb.BeginTransactionRequest, ctx: CallContext
    ) -> tx_pb.BeginTransactionResponse:
        timeout = transactions.begin_timeout(request)
        if not self.keyvalue.transactions:
            raise FailedPrecondition(
                "this MongoDB deployment does not support transactions", backend="mongodb"
            )
        self.transactions.check_capacity()
        session = self.mongo.client.start_session()
        try:
            await session.start_transaction(read_concern=ReadConcern("snapshot"))
        except PyMongoError as exc:
            await session.end_session()
            translate(exc, ctx.timeout(self.mongo.settings.timeout))
        txn = HeldTransaction(ns=ctx.namespace, session=session, timeout=timeout)
        return tx_pb.BeginTransactionResponse(transaction_id=self.transactions.add(txn))

    async def set_in_transaction(
        self, request: tx_pb.SetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.SetInTransactionResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        kv = self.keyvalue

        async def job(txn: HeldTransaction) -> bool:
            entry = kv.entry(key, value, await kv.revisions(1), None)
            await kv.kv.replace_one(
                {"_id": kv.entry_id(ctx, key)}, entry, upsert=True, session=txn.session
            )
            return True

        await self.transactions.run(request.transaction_id, ctx, job, on_conflict=False)
        return tx_pb.SetInTransactionResponse()

    async def get_in_transaction(
        self, request: tx_pb.GetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.GetInTransactionResponse:
        key = validation.key(request.key)
        kv = self.keyvalue

        async def job(txn: HeldTransaction) -> bytes | None:
            doc = await kv.kv.find_one({"_id": kv.entry_id(ctx, key)}, session=txn.session)
            return None if doc is None or not is_live(doc, now()) else bytes(doc["v"])

        value = await self.transactions.run(request.transaction_id, ctx, job)
        if value is None:
            return tx_pb.GetInTransactionResponse(found=False)
        return tx_pb.GetInTransactionResponse(found=True, value=value)

    async def delete_in_transaction(
        self, request: tx_pb.DeleteInTransactionRequest, ctx: CallContext
    ) -> tx_pb.DeleteInTransactionResponse:
        key = validation.key(request.key)
        kv = self.keyvalue

        async def job(txn: HeldTransaction) -> bool:
            old = await kv.kv.find_one_and_delete(
                {"_id": kv.entry_id(ctx, key)}, {"x": 1}, session=txn.session
            )
            return old is not None and is_live(old, now())

        deleted = await self.transactions.run(request.transaction_id, ctx, job, on_conflict=False)
        return tx_pb.DeleteInTransactionResponse(deleted=deleted)

    async def commit(self, request: tx_pb.CommitRequest, ctx: CallContext) -> tx_pb.CommitResponse:
        async def job(txn: HeldTransaction) -> None:
            await txn.session.commit_transaction()

        await self.transactions.run(request.transaction_id, ctx, job, finish=True)
        return tx_pb.CommitResponse()

    async def rollback(
        self, request: tx_pb.RollbackRequest, ctx: CallContext
    ) -> tx_pb.RollbackResponse:
        await self.transactions.rollback(request.transaction_id, ctx)
        return tx_pb.RollbackResponse()
