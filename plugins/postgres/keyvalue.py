"""All six KeyValue interfaces on the `prism_kv` table.

Every statement filters out expired rows against the database clock
(`expires_at > statement_timestamp()`), so expiry is exact to the call even though the sweeper
reclaims rows later, and several Prism servers sharing one database agree on it. Every write
draws a fresh revision from the `prism_revision` sequence, so a key's revision changes on every
write and is never reused. Keys are stored as their UTF-8 bytes (bytea): ORDER BY and prefix
ranges are then the byte order the scan contract promises, with no LIKE and no wildcards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import LiteralString, TypeVar

import psycopg
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb
from psycopg import sql

from plugins.postgres.db import Conn, Database, translate
from plugins.runtime import transactions, validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    InvalidArgument,
)
from plugins.runtime.keyvalue import key_exists, revision_mismatch

T = TypeVar("T")

LIVE = "(expires_at IS NULL OR expires_at > statement_timestamp())"
#: isolation of KeyValueTransactional; a concurrent write to a row the transaction also writes
#: is a serialization failure (first updater wins), reported as TRANSACTION_CONFLICT
TX_ISOLATION: LiteralString = "REPEATABLE READ"

PUT = (
    "INSERT INTO prism_kv AS kv (ns, key, value, revision, expires_at) "
    "VALUES (%s, %s, %s, nextval('prism_revision'), "
    "statement_timestamp() + make_interval(secs => %s::float8)) "
    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
    "revision = excluded.revision, expires_at = excluded.expires_at "
    "RETURNING revision"
)
REMOVE = f"DELETE FROM prism_kv WHERE ns = %s AND key = %s RETURNING {LIVE}"
LOOKUP = f"SELECT value, revision FROM prism_kv WHERE ns = %s AND key = %s AND {LIVE}"


def encode(key: str) -> bytes:
    return key.encode("utf-8")


async def put(conn: Conn, ns: str, key: str, value: bytes, ttl: float | None) -> int:
    cur = await conn.execute(PUT, (ns, encode(key), value, ttl))
    row = await cur.fetchone()
    assert row is not None  # an upsert always returns its row
    return int(row[0])


async def remove(conn: Conn, ns: str, key: str) -> bool:
    """Delete a key; True only if it was live (an expired row goes too, but did not count)."""
    cur = await conn.execute(REMOVE, (ns, encode(key)))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def lookup(conn: Conn, ns: str, key: str) -> tuple[bytes, int] | None:
    """(value, revision) of a live key."""
    cur = await conn.execute(LOOKUP, (ns, encode(key)))
    row = await cur.fetchone()
    return None if row is None else (bytes(row[0]), int(row[1]))


async def current_revision(conn: Conn, ns: str, key: str) -> int:
    found = await lookup(conn, ns, key)
    return 0 if found is None else found[1]


def prefix_upper_bound(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string starting with `prefix` (None: no bound)."""
    upper = bytearray(prefix)
    while upper and upper[-1] == 0xFF:
        upper.pop()
    if not upper:
        return None
    upper[-1] += 1
    return bytes(upper)


@dataclass(kw_only=True)
class HeldTransaction(transactions.HeldTransaction):
    """A PostgreSQL transaction open on a connection taken out of the pool for its lifetime."""

    conn: Conn


class PostgresKeyValue:
    """keyvalue_basic, _batch, _cas, _scan, _ttl and _transactional."""

    def __init__(self, db: Database, *, max_transactions: int) -> None:
        self.db = db
        self.transactions = transactions.HeldTransactions[HeldTransaction](
            self._release, self._guard, max_open=max_transactions, backend="postgres"
        )

    async def _run(self, ctx: CallContext, job: Callable[[Conn], Awaitable[T]]) -> T:
        async with self.db.connection(ctx) as conn:
            return await job(conn)

    # -- basic -------------------------------------------------------------------------------

    async def set(self, request: basic_pb.SetRequest, ctx: CallContext) -> basic_pb.SetResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        revision = await self._run(ctx, lambda c: put(c, ctx.namespace, key, value, None))
        return basic_pb.SetResponse(revision=revision)

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        key = validation.key(request.key)
        found = await self._run(ctx, lambda c: lookup(c, ctx.namespace, key))
        if found is None:
            return basic_pb.GetResponse(found=False)
        return basic_pb.GetResponse(found=True, value=found[0], revision=found[1])

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        key = validation.key(request.key)
        deleted = await self._run(ctx, lambda c: remove(c, ctx.namespace, key))
        return basic_pb.DeleteResponse(deleted=deleted)

    async def exists(
        self, request: basic_pb.ExistsRequest, ctx: CallContext
    ) -> basic_pb.ExistsResponse:
        key = validation.key(request.key)
        found = await self._run(ctx, lambda c: lookup(c, ctx.namespace, key))
        return basic_pb.ExistsResponse(exists=found is not None)

    # -- batch -------------------------------------------------------------------------------

    async def _pipelined(
        self, ctx: CallContext, query: LiteralString, params: list[tuple[object, ...]]
    ) -> list[tuple[object, ...] | None]:
        """Run `query` once per parameter tuple, in order, in one transaction and one round
        trip; the first row each run returned (None: no row)."""

        async def job(conn: Conn) -> list[tuple[object, ...] | None]:
            async with conn.transaction():
                cur = conn.cursor()
                await cur.executemany(query, params, returning=True)
                rows: list[tuple[object, ...] | None] = []
                async for result in cur.results():
                    rows.append(await result.fetchone())
                return rows

        return await self._run(ctx, job)

    async def batch_set(
        self, request: batch_pb.BatchSetRequest, ctx: CallContext
    ) -> batch_pb.BatchSetResponse:
        entries = validation.batch_entries(request.entries)
        rows = await self._pipelined(
            ctx, PUT, [(ctx.namespace, encode(k), v, None) for k, v in entries]
        )
        results = [
            batch_pb.BatchSetResult(key=k, revision=int(row[0]))  # type: ignore[call-overload]
            for (k, _), row in zip(entries, rows, strict=True)
            if row is not None
        ]
        return batch_pb.BatchSetResponse(results=results)

    async def batch_get(
        self, request: batch_pb.BatchGetRequest, ctx: CallContext
    ) -> batch_pb.BatchGetResponse:
        keys = validation.keys(request.keys)

        async def job(conn: Conn) -> dict[bytes, tuple[bytes, int]]:
            cur = await conn.execute(
                f"SELECT key, value, revision FROM prism_kv "
                f"WHERE ns = %s AND key = ANY(%s) AND {LIVE}",
                (ctx.namespace, sorted({encode(k) for k in keys})),
            )
            return {bytes(k): (bytes(v), int(r)) async for k, v, r in cur}

        found = await self._run(ctx, job)
        results = []
        for k in keys:
            hit = found.get(encode(k))
            if hit is None:
                results.append(batch_pb.BatchGetResult(key=k, found=False))
            else:
                results.append(
                    batch_pb.BatchGetResult(key=k, found=True, value=hit[0], revision=hit[1])
                )
        return batch_pb.BatchGetResponse(results=results)

    async def batch_delete(
        self, request: batch_pb.BatchDeleteRequest, ctx: CallContext
    ) -> batch_pb.BatchDeleteResponse:
        keys = validation.keys(request.keys)
        rows = await self._pipelined(ctx, REMOVE, [(ctx.namespace, encode(k)) for k in keys])
        results = [
            batch_pb.BatchDeleteResult(key=k, deleted=row is not None and bool(row[0]))
            for k, row in zip(keys, rows, strict=True)
        ]
        return batch_pb.BatchDeleteResponse(results=results)

    # -- cas ---------------------------------------------------------------------------------

    async def compare_and_swap(
        self, request: cas_pb.CompareAndSwapRequest, ctx: CallContext
    ) -> cas_pb.CompareAndSwapResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        expected = request.expected_revision

        async def job(conn: Conn) -> int | None:
            if expected == 0:
                # insert-only: an expired leftover row may be replaced, a live one may not
                cur = await conn.execute(
                    "INSERT INTO prism_kv AS kv (ns, key, value, revision) "
                    "VALUES (%s, %s, %s, nextval('prism_revision')) "
                    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
                    "revision = excluded.revision, expires_at = NULL "
                    "WHERE kv.expires_at <= statement_timestamp() RETURNING revision",
                    (ctx.namespace, encode(key), value),
                )
            else:
                cur = await conn.execute(
                    "UPDATE prism_kv SET value = %s, revision = nextval('prism_revision'), "
                    f"expires_at = NULL WHERE ns = %s AND key = %s AND revision = %s AND {LIVE} "
                    "RETURNING revision",
                    (value, ctx.namespace, encode(key), expected),
                )
            row = await cur.fetchone()
            return None if row is None else int(row[0])

        revision = await self._run(ctx, job)
        if revision is None:
            if expected == 0:
                raise key_exists(key)
            current = await self._run(ctx, lambda c: current_revision(c, ctx.namespace, key))
            raise revision_mismatch(key, expected, current)
        return cas_pb.CompareAndSwapResponse(revision=revision)

    async def compare_and_delete(
        self, request: cas_pb.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas_pb.CompareAndDeleteResponse:
        key = validation.key(request.key)
        expected = request.expected_revision
        if expected == 0:
            raise InvalidArgument("expected_revision", "must be positive")

        async def job(conn: Conn) -> bool:
            cur = await conn.execute(
                f"DELETE FROM prism_kv WHERE ns = %s AND key = %s AND revision = %s AND {LIVE}",
                (ctx.namespace, encode(key), expected),
            )
            return cur.rowcount > 0

        if not await self._run(ctx, job):
            current = await self._run(ctx, lambda c: current_revision(c, ctx.namespace, key))
            raise revision_mismatch(key, expected, current)
        return cas_pb.CompareAndDeleteResponse()

    # -- scan --------------------------------------------------------------------------------

    @staticmethod
    def _prefix_where(ns: str, prefix: str) -> tuple[list[sql.Composable], list[object]]:
        where: list[sql.Composable] = [sql.SQL("ns = %s"), sql.SQL(LIVE)]
        params: list[object] = [ns]
        if prefix:
            raw = encode(prefix)
            where.append(sql.SQL("key >= %s"))
            params.append(raw)
            upper = prefix_upper_bound(raw)
            if upper is not None:
                where.append(sql.SQL("key < %s"))
                params.append(upper)
        return where, params

    async def _page(
        self,
        kind: str,
        prefix: str,
        page_size: int,
        page_token: str,
        ctx: CallContext,
        *,
        with_values: bool,
    ) -> tuple[list[tuple[str, bytes, int]], str]:
        """One keyset page of live entries with `prefix`, and the token for the next one."""
        size = validation.page_size(page_size)
        after = validation.scan_after(page_token, kind, prefix)
        where, params = self._prefix_where(ctx.namespace, prefix)
        if after is not None:
            where.append(sql.SQL("key > %s"))
            params.append(encode(after))
        columns = sql.SQL("key, value, revision" if with_values else "key, ''::bytea, revision")
        query = sql.SQL("SELECT {} FROM prism_kv WHERE {} ORDER BY key LIMIT %s").format(
            columns, sql.SQL(" AND ").join(where)
        )
        params.append(size + 1)

        async def job(conn: Conn) -> list[tuple[str, bytes, int]]:
            cur = await conn.execute(query, params)
            return [(bytes(k).decode("utf-8"), bytes(v), int(r)) async for k, v, r in cur]

        rows = await self._run(ctx, job)
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, validation.encode_page_token(kind, prefix, rows[-1][0])

    async def scan(self, request: scan_pb.ScanRequest, ctx: CallContext) -> scan_pb.ScanResponse:
        rows, token = await self._page(
            "postgres.scan",
            request.prefix,
            request.page_size,
            request.page_token,
            ctx,
            with_values=True,
        )
        entries = [scan_pb.KeyValue(key=k, value=v, revision=r) for k, v, r in rows]
        return scan_pb.ScanResponse(entries=entries, next_page_token=token)

    async def scan_keys(
        self, request: scan_pb.ScanKeysRequest, ctx: CallContext
    ) -> scan_pb.ScanKeysResponse:
        rows, token = await self._page(
            "postgres.scan_keys",
            request.prefix,
            request.page_size,
            request.page_token,
            ctx,
            with_values=False,
        )
        return scan_pb.ScanKeysResponse(keys=[k for k, _, _ in rows], next_page_token=token)

    async def count(self, request: scan_pb.CountRequest, ctx: CallContext) -> scan_pb.CountResponse:
        where, params = self._prefix_where(ctx.namespace, request.prefix)
        query = sql.SQL("SELECT count(*) FROM prism_kv WHERE {}").format(
            sql.SQL(" AND ").join(where)
        )

        async def job(conn: Conn) -> int:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
            return 0 if row is None else int(row[0])

        return scan_pb.CountResponse(count=await self._run(ctx, job))

    # -- ttl ---------------------------------------------------------------------------------

    async def set_with_ttl(
        self, request: ttl_pb.SetWithTTLRequest, ctx: CallContext
    ) -> ttl_pb.SetWithTTLResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        revision = await self._run(ctx, lambda c: put(c, ctx.namespace, key, value, seconds))
        return ttl_pb.SetWithTTLResponse(revision=revision)

    async def _touch(
        self,
        ctx: CallContext,
        key: str,
        assignment: LiteralString,
        condition: LiteralString,
        params: tuple[object, ...],
    ) -> bool:
        """Change a live key's expiry under a new revision; False when no live key matches."""

        async def job(conn: Conn) -> bool:
            cur = await conn.execute(
                f"UPDATE prism_kv SET {assignment}, revision = nextval('prism_revision') "
                f"WHERE ns = %s AND key = %s AND {condition}",
                (*params, ctx.namespace, encode(key)),
            )
            return cur.rowcount > 0

        return await self._run(ctx, job)

    async def expire(
        self, request: ttl_pb.ExpireRequest, ctx: CallContext
    ) -> ttl_pb.ExpireResponse:
        key = validation.key(request.key)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        applied = await self._touch(
            ctx,
            key,
            "expires_at = statement_timestamp() + make_interval(secs => %s::float8)",
            LIVE,
            (seconds,),
        )
        return ttl_pb.ExpireResponse(applied=applied)

    async def get_ttl(
        self, request: ttl_pb.GetTTLRequest, ctx: CallContext
    ) -> ttl_pb.GetTTLResponse:
        key = validation.key(request.key)

        async def job(conn: Conn) -> tuple[bool, float | None]:
            cur = await conn.execute(
                "SELECT extract(epoch FROM expires_at - statement_timestamp())::float8 "
                f"FROM prism_kv WHERE ns = %s AND key = %s AND {LIVE}",
                (ctx.namespace, encode(key)),
            )
            row = await cur.fetchone()
            return (False, None) if row is None else (True, row[0])

        exists, remaining = await self._run(ctx, job)
        if not exists:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_KEY_MISSING)
        if remaining is None:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_PERSISTENT)
        ttl = Duration()
        ttl.FromNanoseconds(max(1, int(remaining * 1e9)))
        return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_EXPIRING, ttl=ttl)

    async def persist(
        self, request: ttl_pb.PersistRequest, ctx: CallContext
    ) -> ttl_pb.PersistResponse:
        key = validation.key(request.key)
        persisted = await self._touch(
            ctx, key, "expires_at = NULL", "expires_at > statement_timestamp()", ()
        )
        return ttl_pb.PersistResponse(persisted=persisted)

    # -- transactional -----------------------------------------------------------------------

    async def _release(self, txn: HeldTransaction) -> None:
        """Hand the connection back: the pool rolls back whatever is still open on it, or
        discards it if it is broken."""
        await self.db.release(txn.conn)

    async def purge_idle_transactions(self) -> int:
        """Roll back transactions idle past their timeout; called by the sweeper."""
        return await self.transactions.reap()

    async def close(self) -> None:
        await self.transactions.close()

    @contextlib.asynccontextmanager
    async def _guard(self, ctx: CallContext) -> AsyncIterator[None]:
        timeout = ctx.timeout(self.db.op_timeout)
        try:
            async with asyncio.timeout(timeout):
                yield
        except (psycopg.Error, TimeoutError) as exc:
            translate(exc, timeout)

    async def begin_transaction(
        self, request: tx_pb.BeginTransactionRequest, ctx: CallContext
    ) -> tx_pb.BeginTransactionResponse:
        timeout = transactions.begin_timeout(request)
        self.transactions.check_capacity()
        call_timeout = ctx.timeout(self.db.op_timeout)
        conn = await self.db.dedicated(call_timeout)
        try:
            async with asyncio.timeout(call_timeout):
                await conn.execute(f"BEGIN ISOLATION LEVEL {TX_ISOLATION}")
                # the server rolls the transaction back by itself if this process vanishes
                await conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                    (str(int((timeout + 5) * 1000)),),
                )
        except (psycopg.Error, TimeoutError) as exc:
            await self.db.release(conn)
            translate(exc, call_timeout)
        txn = HeldTransaction(ns=ctx.namespace, conn=conn, timeout=timeout)
        return tx_pb.BeginTransactionResponse(transaction_id=self.transactions.add(txn))

    async def set_in_transaction(
        self, request: tx_pb.SetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.SetInTransactionResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        await self.transactions.run(
            request.transaction_id,
            ctx,
            lambda t: put(t.conn, ctx.namespace, key, value, None),
            on_conflict=0,
        )
        return tx_pb.SetInTransactionResponse()

    async def get_in_transaction(
        self, request: tx_pb.GetInTransactionRequest, ctx: CallContext
    ) -> tx_pb.GetInTransactionResponse:
        key = validation.key(request.key)
        found = await self.transactions.run(
            request.transaction_id, ctx, lambda t: lookup(t.conn, ctx.namespace, key)
        )
        if found is None:
            return tx_pb.GetInTransactionResponse(found=False)
        return tx_pb.GetInTransactionResponse(found=True, value=found[0])

    async def delete_in_transaction(
        self, request: tx_pb.DeleteInTransactionRequest, ctx: CallContext
    ) -> tx_pb.DeleteInTransactionResponse:
        key = validation.key(request.key)
        deleted = await self.transactions.run(
            request.transaction_id,
            ctx,
            lambda t: remove(t.conn, ctx.namespace, key),
            on_conflict=False,
        )
        return tx_pb.DeleteInTransactionResponse(deleted=deleted)

    async def commit(self, request: tx_pb.CommitRequest, ctx: CallContext) -> tx_pb.CommitResponse:
        await self.transactions.run(
            request.transaction_id, ctx, lambda t: t.conn.execute("COMMIT"), finish=True
        )
        return tx_pb.CommitResponse()

    async def rollback(
        self, request: tx_pb.RollbackRequest, ctx: CallContext
    ) -> tx_pb.RollbackResponse:
        await self.transactions.rollback(request.transaction_id, ctx)
        return tx_pb.RollbackResponse()
