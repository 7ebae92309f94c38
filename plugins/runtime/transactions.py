"""Bookkeeping of keyvalue_transactional transactions held open across RPCs.

Every backend answers the same way for the same situation: the same timeout rules at Begin, the
same NOT_FOUND (TRANSACTION_NOT_FOUND) for an unknown, finished, foreign-namespace or idle
transaction, the same ABORTED (TRANSACTION_CONFLICT) at Commit. Two shapes share that table:

- `OptimisticTransactions`: writes buffered in the plugin, reads remembered with the revision they
  saw, everything re-checked and applied atomically at Commit (Redis, SQLite);
- `HeldTransactions`: a database transaction open on a connection or session owned by the Prism
  transaction, one call at a time, the first failure remembered (PostgreSQL, MongoDB).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
    PrismError,
    ResourceExhausted,
)

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0

T = TypeVar("T")


def begin_timeout(request: tx_pb.BeginTransactionRequest) -> float:
    """The idle timeout a Begin asks for: unset or zero is the default, at most 5 minutes."""
    if not request.HasField("timeout"):
        return DEFAULT_TIMEOUT
    seconds = request.timeout.seconds + request.timeout.nanos / 1e9
    if seconds < 0:
        raise InvalidArgument("timeout", "must not be negative")
    if seconds > MAX_TIMEOUT:
        raise InvalidArgument("timeout", "must be at most 5 minutes")
    return seconds or DEFAULT_TIMEOUT


def conflict(key: str) -> Aborted:
    """Commit found `key` changed since the transaction read it."""
    return Aborted(
        f"key {key!r} changed since the transaction read it; retry the whole transaction",
        reason="TRANSACTION_CONFLICT",
        key=key,
    )


@dataclass(kw_only=True)
class OpenTransaction:
    """What every open transaction has: its namespace and when it goes idle."""

    ns: str
    timeout: float
    deadline: float = 0.0

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def idle(self, now: float) -> bool:
        return self.deadline <= now


TxnT = TypeVar("TxnT", bound=OpenTransaction)


class TransactionTable(Generic[TxnT]):
    """Open transactions by id; a transaction is only visible from the namespace that began it."""

    def __init__(self) -> None:
        self._open: dict[str, TxnT] = {}

    def __contains__(self, transaction_id: object) -> bool:
        return transaction_id in self._open

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._open))

    def add(self, txn: TxnT) -> str:
        """Register a new transaction (its idle clock starts now); returns its id."""
        txn.touch()
        transaction_id = secrets.token_urlsafe(18)
        self._open[transaction_id] = txn
        return transaction_id

    def find(self, transaction_id: str, ctx: CallContext, *, forget_idle: bool = True) -> TxnT:
        """The open transaction, or NOT_FOUND. An idle one is refused; with `forget_idle` it is
        dropped at once (nothing to release), otherwise it stays for `idle()` to collect."""
        txn = self._open.get(transaction_id)
        if txn is not None and txn.idle(time.monotonic()):
            if forget_idle:
                del self._open[transaction_id]
            txn = None
        if txn is None or txn.ns != ctx.namespace:
            raise NotFound(
                f"transaction {transaction_id!r} not found (unknown, finished or timed out)",
                reason="TRANSACTION_NOT_FOUND",
                transaction_id=transaction_id,
            )
        return txn

    def discard(self, transaction_id: str, txn: TxnT) -> None:
        """Forget `txn` if it is still the one registered under `transaction_id`."""
        if self._open.get(transaction_id) is txn:
            del self._open[transaction_id]

    def idle(self) -> list[tuple[str, TxnT]]:
        now = time.monotonic()
        return [(tid, txn) for tid, txn in self._open.items() if txn.idle(now)]

    def items(self) -> list[tuple[str, TxnT]]:
        return list(self._open.items())

    def purge(self) -> None:
        """Forget (roll back) transactions idle past their timeout."""
        for tid, txn in self.idle():
            self.discard(tid, txn)


# -- buffered, checked at Commit -------------------------------------------------------------


@dataclass(kw_only=True)
class BufferedTransaction(OpenTransaction):
    #: operations in the order sent: (key, value) or (key, None) for a delete
    ops: list[tuple[str, bytes | None]] = field(default_factory=list)
    #: the transaction's own view of keys it wrote (None: deleted)
    writes: dict[str, bytes | None] = field(default_factory=dict)
    #: revision (0: absent) of every key whose committed state the transaction looked at
    reads: dict[str, int] = field(default_factory=dict)

    def write(self, key: str, value: bytes | None) -> None:
        self.ops.append((key, value))
        self.writes[key] = value


class OptimisticTransactions(ABC):
    """keyvalue_transactional with buffered writes and a revision check at Commit.

    Reads see committed data plus the transaction's own writes; Commit re-checks the revision of
    every key the transaction read (absent keys included) and applies the writes in order, both in
    one atomic step of the backend (`_apply`). Keys only written are not checked: last writer wins
    for blind writes. Open transactions live in the plugin process."""

    transactions: TransactionTable[BufferedTransaction]

    @abstractmethod
    async def _committed(self, ctx: CallContext, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of a live key as committed."""

    @abstractmethod
    async def _apply(self, txn: BufferedTransaction, ctx: CallContext) -> None:
        """Atomically: raise `conflict(key)` if a read key's revision changed, else apply ops."""

    def _transaction(self, transaction_id: str, ctx: CallContext) -> BufferedTransaction:
        txn = self.transactions.find(transaction_id, ctx)
        txn.touch()
        return txn

    def purge_idle_transactions(self) -> None:
        """Roll back (forget) transactions idle past their timeout."""
        self.transactions.purge()

    async def _view(self, txn: BufferedTransaction, key: str, ctx: CallContext) -> bytes | None:
        """The transaction's view of `key`: its own write if any, else the committed value,
        whose revision is remembered for the conflict check at Commit."""
        if key in txn.writes:
            return txn.writes[key]
        found = await self._committed(ctx, key)
        txn.reads.setdefault(key, 0 if found is None else found[1])
        return None if found is None else found[0]

    async def begin_transaction(
        self, request: tx_pb.BeginTransactionRequest, ctx: CallContext
    ) -> tx_pb.BeginTransactionResponse:
        timeout = begin_timeout(request)
        self.transactions.purge()
        txn = BufferedTransaction(ns=ctx.namespace, timeout=timeout)
        return tx_pb.BeginTransactionResponse(transaction_id=self.transactions.add(txn))

    async def set_in_transaction(
        self, request: tx_pb.SetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.SetInTransactionResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        self._transaction(request.transaction_id, ctx).write(key, value)
        return tx_pb.SetInTransactionResponse()

    async def get_in_transaction(
        self, request: tx_pb.GetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.GetInTransactionResponse:
        key = validation.key(request.key)
        txn = self._transaction(request.transaction_id, ctx)
        value = await self._view(txn, key, ctx)
        if value is None:
            return tx_pb.GetInTransactionResponse(found=False)
        return tx_pb.GetInTransactionResponse(found=True, value=value)

    async def delete_in_transaction(
        self, request: tx_pb.DeleteInTransactionRequest, ctx: CallContext
    ) -> tx_pb.DeleteInTransactionResponse:
        key = validation.key(request.key)
        txn = self._transaction(request.transaction_id, ctx)
        existed = await self._view(txn, key, ctx) is not None
        txn.write(key, None)
        return tx_pb.DeleteInTransactionResponse(deleted=existed)

    async def commit(self, request: tx_pb.CommitRequest, ctx: CallContext) -> tx_pb.CommitResponse:
        txn = self._transaction(request.transaction_id, ctx)
        self.transactions.discard(request.transaction_id, txn)
        await self._apply(txn, ctx)
        return tx_pb.CommitResponse()

    async def rollback(
        self, request: tx_pb.RollbackRequest, ctx: CallContext
    ) -> tx_pb.RollbackResponse:
        txn = self._transaction(request.transaction_id, ctx)
        self.transactions.discard(request.transaction_id, txn)
        return tx_pb.RollbackResponse()


# -- held open in the database ---------------------------------------------------------------


@dataclass(kw_only=True)
class HeldTransaction(OpenTransaction):
    #: one RPC at a time on the connection, and no reaping while one runs
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: set once an operation failed: the database transaction is dead, Commit must fail
    failure: PrismError | None = None


HeldT = TypeVar("HeldT", bound=HeldTransaction)


class HeldTransactions(TransactionTable[HeldT]):
    """Transactions that own a database connection or session until they end."""

    def __init__(
        self,
        release: Callable[[HeldT], Awaitable[None]],
        guard: Callable[[CallContext], AbstractAsyncContextManager[object]],
        *,
        max_open: int,
        backend: str,
    ) -> None:
        """`release` gives back what a finished transaction holds (rolling back what is open);
        `guard(ctx)` bounds an operation by the call's deadline and turns driver failures into
        PrismError (a write conflict into TRANSACTION_CONFLICT)."""
        super().__init__()
        self._release = release
        self._guard = guard
        self.max_open = max_open
        self.backend = backend

    def check_capacity(self) -> None:
        """Refuse a Begin beyond `max_open`: each one pins a database connection."""
        if len(self) >= self.max_open:
            raise ResourceExhausted(
                f"{self.max_open} transactions are already open (max_transactions)",
                backend=self.backend,
            )

    def get(self, transaction_id: str, ctx: CallContext) -> HeldT:
        return self.find(transaction_id, ctx, forget_idle=False)

    async def finish(self, transaction_id: str, txn: HeldT) -> None:
        """Forget a transaction and release what it holds (which rolls back what is open)."""
        self.discard(transaction_id, txn)
        await self._release(txn)

    async def reap(self) -> int:
        """Roll back transactions idle past their timeout and not in a call; returns how many."""
        idle = [(tid, txn) for tid, txn in self.idle() if not txn.lock.locked()]
        for tid, txn in idle:
            await self.finish(tid, txn)
        return len(idle)

    async def close(self) -> None:
        for tid, txn in self.items():
            await self.finish(tid, txn)

    async def run(
        self,
        transaction_id: str,
        ctx: CallContext,
        job: Callable[[HeldT], Awaitable[T]],
        *,
        finish: bool = False,
        on_conflict: T | None = None,
    ) -> T:
        """Run `job` in the transaction under `guard`, one call at a time. A failure kills the
        database transaction, so it is remembered and every later call, Commit included,
        reports it. A write given `on_conflict` answers that instead of
        TRANSACTION_CONFLICT: the contract reports conflicts at Commit, which will fail.
        `finish` ends the transaction afterwards, whatever happened."""
        txn = self.get(transaction_id, ctx)
        async with txn.lock:
            self.get(transaction_id, ctx)  # not reaped while we waited for the lock
            try:
                if txn.failure is not None:
                    raise txn.failure
                try:
                    async with self._guard(ctx):
                        result = await job(txn)
                except PrismError as err:
                    txn.failure = err
                    if on_conflict is not None and err.reason == "TRANSACTION_CONFLICT":
                        return on_conflict
                    raise
                txn.touch()
                return result
            finally:
                if finish:
                    await self.finish(transaction_id, txn)

    async def rollback(self, transaction_id: str, ctx: CallContext) -> None:
        txn = self.get(transaction_id, ctx)
        async with txn.lock:
            self.get(transaction_id, ctx)
            await self.finish(transaction_id, txn)
