"""All six KeyValue interfaces on Redis hashes, a per-namespace sorted-set key index and Lua.

Reads are one round trip (HMGET / EXISTS / PTTL, or one script); every write is one Lua script
that updates the entry, its revision (INCR of a shared counter, so revisions never repeat) and the
key and expiry indexes atomically. Expiry is Redis's own (PEXPIRE), so an expired entry is
invisible at once; the key index forgets expired keys lazily, before each Scan/Count.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb

from plugins.redis.connection import RedisConnection
from plugins.redis.keys import Keyspace, lex_range
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument
from plugins.runtime.keyvalue import key_exists, revision_mismatch
from plugins.runtime.transactions import (
    BufferedTransaction,
    OptimisticTransactions,
    TransactionTable,
    conflict,
)

ISOLATION = (
    "serializable (optimistic): writes are buffered in the plugin and reads go to Redis and see "
    "committed data plus the transaction's own writes (each read is read-committed; two reads "
    "are not one snapshot). Commit is one Lua script that re-checks the revision of every key "
    "the transaction read (absent keys included) and aborts with TRANSACTION_CONFLICT if any "
    "changed, else applies every write in order; Redis runs the script atomically, so a "
    "committed transaction behaves as if it ran alone at its commit. Keys only written (never "
    "read) are not checked: last writer wins for blind writes. Open transactions live in the "
    "plugin process and are lost if it restarts."
)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisKeyValue(OptimisticTransactions):
    """keyvalue_basic, _batch, _cas, _scan, _ttl and _transactional."""

    def __init__(self, conn: RedisConnection, key_prefix: bytes, default_ttl: float | None) -> None:
        self.conn = conn
        self.key_prefix = key_prefix
        #: expiry (ms) of writes that carry no TTL of their own; 0 = none (slot `ttl_seconds`)
        self.default_ttl_ms = 0 if default_ttl is None else _ms(default_ttl)
        self.transactions = TransactionTable[BufferedTransaction]()

    def space(self, ctx: CallContext) -> Keyspace:
        return Keyspace(self.key_prefix, ctx.namespace)

    async def _put(self, ctx: CallContext, key: str, value: bytes, ttl_ms: int) -> int:
        ks = self.space(ctx)
        return int(
            await self.conn.eval(
                ctx,
                self.conn.scripts.set,
                [ks.counter, ks.index, ks.expiring, ks.data(key)],
                [key, value, ttl_ms],
            )
        )

    async def _lookup(self, ctx: CallContext, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of a live key, in one HMGET."""
        data = self.space(ctx).data(key)
        reply: list[Any] = await self.conn.run(ctx, lambda r: r.hmget(data, ["v", "r"]))
        value, revision = reply
        return None if value is None else (bytes(value), int(revision))

    # -- basic -------------------------------------------------------------------------------

    async def set(self, request: basic_pb.SetRequest, ctx: CallContext) -> basic_pb.SetResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        return basic_pb.SetResponse(revision=await self._put(ctx, key, value, self.default_ttl_ms))

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        found = await self._lookup(ctx, validation.key(request.key))
        if found is None:
            return basic_pb.GetResponse(found=False)
        return basic_pb.GetResponse(found=True, value=found[0], revision=found[1])

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        key = validation.key(request.key)
        ks = self.space(ctx)
        deleted = await self.conn.eval(
            ctx, self.conn.scripts.delete, [ks.index, ks.expiring, ks.data(key)], [key]
        )
        return basic_pb.DeleteResponse(deleted=bool(deleted))

    async def exists(
        self, request: basic_pb.ExistsRequest, ctx: CallContext
    ) -> basic_pb.ExistsResponse:
        data = self.space(ctx).data(validation.key(request.key))
        count = await self.conn.run(ctx, lambda r: r.exists(data))
        return basic_pb.ExistsResponse(exists=bool(count))

    # -- batch -------------------------------------------------------------------------------

    async def batch_set(
        self, request: batch_pb.BatchSetRequest, ctx: CallContext
    ) -> batch_pb.BatchSetResponse:
        entries = validation.batch_entries(request.entries)
        ks = self.space(ctx)
        args: list[bytes | str | int] = [self.default_ttl_ms]
        for k, v in entries:
            args += [k, v]
        revisions = await self.conn.eval(
            ctx,
            self.conn.scripts.batch_set,
            [ks.counter, ks.index, ks.expiring, *(ks.data(k) for k, _ in entries)],
            args,
        )
        return batch_pb.BatchSetResponse(
            results=[
                batch_pb.BatchSetResult(key=k, revision=int(r))
                for (k, _), r in zip(entries, revisions, strict=True)
            ]
        )

    async def batch_get(
        self, request: batch_pb.BatchGetRequest, ctx: CallContext
    ) -> batch_pb.BatchGetResponse:
        keys = validation.keys(request.keys)
        ks = self.space(ctx)

        async def fetch(r: Any) -> list[list[bytes | None]]:
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(ks.data(k), ["v", "r"])
            return list(await pipe.execute())

        rows = await self.conn.run(ctx, fetch)
        results = []
        for k, (value, revision) in zip(keys, rows, strict=True):
            if value is None:
                results.append(batch_pb.BatchGetResult(key=k, found=False))
            else:
                results.append(
                    batch_pb.BatchGetResult(
                        key=k, found=True, value=bytes(value), revision=int(revision or 0)
                    )
                )
        return batch_pb.BatchGetResponse(results=results)

    async def batch_delete(
        self, request: batch_pb.BatchDeleteRequest, ctx: CallContext
    ) -> batch_pb.BatchDeleteResponse:
        keys = validation.keys(request.keys)
        ks = self.space(ctx)
        deleted = await self.conn.eval(
            ctx,
            self.conn.scripts.batch_delete,
            [ks.index, ks.expiring, *(ks.data(k) for k in keys)],
            list(keys),
        )
        return batch_pb.BatchDeleteResponse(
            results=[
                batch_pb.BatchDeleteResult(key=k, deleted=bool(d))
                for k, d in zip(keys, deleted, strict=True)
            ]
        )

    # -- cas ---------------------------------------------------------------------------------

    async def compare_and_swap(
        self, request: cas_pb.CompareAndSwapRequest, ctx: CallContext
    ) -> cas_pb.CompareAndSwapResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        expected = request.expected_revision
        ks = self.space(ctx)
        applied, revision = await self.conn.eval(
            ctx,
            self.conn.scripts.compare_and_swap,
            [ks.counter, ks.index, ks.expiring, ks.data(key)],
            [key, value, expected, self.default_ttl_ms],
        )
        if not applied:
            if expected == 0:
                raise key_exists(key)
            raise revision_mismatch(key, expected, int(revision))
        return cas_pb.CompareAndSwapResponse(revision=int(revision))

    async def compare_and_delete(
        self, request: cas_pb.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas_pb.CompareAndDeleteResponse:
        key = validation.key(request.key)
        expected = request.expected_revision
        if expected == 0:
            raise InvalidArgument("expected_revision", "must be positive")
        ks = self.space(ctx)
        applied, current = await self.conn.eval(
            ctx,
            self.conn.scripts.compare_and_delete,
            [ks.index, ks.expiring, ks.data(key)],
            [key, expected],
        )
        if not applied:
            raise revision_mismatch(key, expected, int(current))
        return cas_pb.CompareAndDeleteResponse()

    # -- scan --------------------------------------------------------------------------------

    async def _page(
        self,
        kind: str,
        prefix: str,
        page_size: int,
        page_token: str,
        with_values: bool,
        ctx: CallContext,
    ) -> tuple[list[Any], str]:
        """One keyset page (flat script reply: key[, value, revision]...) and the next token."""
        size = validation.page_size(page_size)
        after = validation.scan_after(page_token, kind, prefix)
        if after is not None and not after.startswith(prefix):
            raise InvalidArgument("page_token", "malformed page token")
        low, high = lex_range(prefix, after)
        ks = self.space(ctx)
        reply = await self.conn.eval(
            ctx,
            self.conn.scripts.scan,
            [ks.index, ks.expiring],
            [ks.data_prefix, low, high, size, "1" if with_values else "0"],
        )
        more, last, rows = reply[0], reply[1], reply[2:]
        token = validation.encode_page_token(kind, prefix, last.decode("utf-8")) if more else ""
        return rows, token

    async def scan(self, request: scan_pb.ScanRequest, ctx: CallContext) -> scan_pb.ScanResponse:
        rows, token = await self._page(
            "redis.scan", request.prefix, request.page_size, request.page_token, True, ctx
        )
        entries = [
            scan_pb.KeyValue(
                key=rows[i].decode("utf-8"), value=rows[i + 1], revision=int(rows[i + 2])
            )
            for i in range(0, len(rows), 3)
        ]
        return scan_pb.ScanResponse(entries=entries, next_page_token=token)

    async def scan_keys(
        self, request: scan_pb.ScanKeysRequest, ctx: CallContext
    ) -> scan_pb.ScanKeysResponse:
        rows, token = await self._page(
            "redis.scan_keys", request.prefix, request.page_size, request.page_token, False, ctx
        )
        return scan_pb.ScanKeysResponse(
            keys=[k.decode("utf-8") for k in rows], next_page_token=token
        )

    async def count(self, request: scan_pb.CountRequest, ctx: CallContext) -> scan_pb.CountResponse:
        low, high = lex_range(request.prefix, None)
        ks = self.space(ctx)
        total = await self.conn.eval(
            ctx, self.conn.scripts.count, [ks.index, ks.expiring], [ks.data_prefix, low, high]
        )
        return scan_pb.CountResponse(count=int(total))

    # -- ttl ---------------------------------------------------------------------------------

    async def set_with_ttl(
        self, request: ttl_pb.SetWithTTLRequest, ctx: CallContext
    ) -> ttl_pb.SetWithTTLResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        return ttl_pb.SetWithTTLResponse(revision=await self._put(ctx, key, value, _ms(seconds)))

    async def expire(
        self, request: ttl_pb.ExpireRequest, ctx: CallContext
    ) -> ttl_pb.ExpireResponse:
        key = validation.key(request.key)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        ks = self.space(ctx)
        applied = await self.conn.eval(
            ctx,
            self.conn.scripts.expire,
            [ks.counter, ks.expiring, ks.data(key)],
            [key, _ms(seconds)],
        )
        return ttl_pb.ExpireResponse(applied=bool(applied))

    async def get_ttl(
        self, request: ttl_pb.GetTTLRequest, ctx: CallContext
    ) -> ttl_pb.GetTTLResponse:
        data = self.space(ctx).data(validation.key(request.key))
        remaining_ms = int(await self.conn.run(ctx, lambda r: r.pttl(data)))
        if remaining_ms == -2:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_KEY_MISSING)
        if remaining_ms == -1:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_PERSISTENT)
        remaining = Duration()
        remaining.FromMilliseconds(max(1, remaining_ms))
        return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_EXPIRING, ttl=remaining)

    async def persist(
        self, request: ttl_pb.PersistRequest, ctx: CallContext
    ) -> ttl_pb.PersistResponse:
        key = validation.key(request.key)
        ks = self.space(ctx)
        persisted = await self.conn.eval(
            ctx, self.conn.scripts.persist, [ks.counter, ks.expiring, ks.data(key)], [key]
        )
        return ttl_pb.PersistResponse(persisted=bool(persisted))

    # -- transactional -----------------------------------------------------------------------

    async def _committed(self, ctx: CallContext, key: str) -> tuple[bytes, int] | None:
        return await self._lookup(ctx, key)

    async def _apply(self, txn: BufferedTransaction, ctx: CallContext) -> None:
        """One Lua script: Redis runs it atomically, so the check and the writes are one step."""
        if not txn.ops and not txn.reads:
            return
        ks = self.space(ctx)
        args: list[bytes | str | int] = [ks.data_prefix, self.default_ttl_ms, len(txn.reads)]
        for key, seen in txn.reads.items():
            args += [key, seen]
        for key, value in txn.ops:
            args += ["d", key, b""] if value is None else ["s", key, value]
        reply = await self.conn.eval(
            ctx, self.conn.scripts.commit, [ks.counter, ks.index, ks.expiring], args
        )
        if not reply[0]:
            raise conflict(reply[1].decode("utf-8"))
