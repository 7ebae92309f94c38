"""All six KeyValue interfaces on the `kv` table.

Every read filters out expired rows (`expires_at <= now`), so expiry is exact to the call even
though the sweeper reclaims rows later. Every write draws a fresh revision from the global
counter, so a key's revision changes on every write and is never reused.
"""

from __future__ import annotations

import sqlite3
import time

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import (
    keyvalue_basic_pb2 as basic_pb,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_batch_pb2 as batch_pb,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_cas_pb2 as cas_pb,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_scan_pb2 as scan_pb,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_ttl_pb2 as ttl_pb,
)

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
from plugins.sqlite.db import Database

LIVE = "(expires_at IS NULL OR expires_at > ?)"


def next_revision(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "UPDATE counters SET value = value + 1 WHERE name = 'revision' RETURNING value"
    ).fetchone()
    return int(row[0])


def put(conn: sqlite3.Connection, ns: str, key: str, value: bytes, expires_at: float | None) -> int:
    revision = next_revision(conn)
    conn.execute(
        "INSERT INTO kv (ns, key, value, revision, expires_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
        "revision = excluded.revision, expires_at = excluded.expires_at",
        (ns, key, value, revision, expires_at),
    )
    return revision


def remove(conn: sqlite3.Connection, ns: str, key: str) -> bool:
    """Delete a key; True only if it was live (an expired row goes too, but did not count)."""
    row = conn.execute(
        "DELETE FROM kv WHERE ns = ? AND key = ? RETURNING expires_at", (ns, key)
    ).fetchone()
    return row is not None and (row[0] is None or row[0] > time.time())


def lookup(conn: sqlite3.Connection, ns: str, key: str) -> tuple[bytes, int] | None:
    """(value, revision) of a live key."""
    row = conn.execute(
        f"SELECT value, revision FROM kv WHERE ns = ? AND key = ? AND {LIVE}",
        (ns, key, time.time()),
    ).fetchone()
    return None if row is None else (bytes(row[0]), int(row[1]))


def current_revision(conn: sqlite3.Connection, ns: str, key: str) -> int:
    found = lookup(conn, ns, key)
    return 0 if found is None else found[1]


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix` (None: no bound).

    UTF-8 byte order equals code point order, so bumping the last code point that can be bumped
    gives a TEXT bound the (ns, key) primary key index can range-scan, with no LIKE and so no
    wildcard characters.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored in UTF-8
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


class SqliteKeyValue(OptimisticTransactions):
    """keyvalue_basic, _batch, _cas, _scan, _ttl and _transactional."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.transactions = TransactionTable[BufferedTransaction]()

    # -- basic -------------------------------------------------------------------------------

    async def set(self, request: basic_pb.SetRequest, ctx: CallContext) -> basic_pb.SetResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        revision = await self.db.write(lambda c: put(c, ctx.namespace, key, value, None))
        return basic_pb.SetResponse(revision=revision)

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        key = validation.key(request.key)
        found = await self.db.read(lambda c: lookup(c, ctx.namespace, key))
        if found is None:
            return basic_pb.GetResponse(found=False)
        return basic_pb.GetResponse(found=True, value=found[0], revision=found[1])

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        key = validation.key(request.key)
        deleted = await self.db.write(lambda c: remove(c, ctx.namespace, key))
        return basic_pb.DeleteResponse(deleted=deleted)

    async def exists(
        self, request: basic_pb.ExistsRequest, ctx: CallContext
    ) -> basic_pb.ExistsResponse:
        key = validation.key(request.key)
        found = await self.db.read(lambda c: lookup(c, ctx.namespace, key))
        return basic_pb.ExistsResponse(exists=found is not None)

    # -- batch -------------------------------------------------------------------------------

    async def batch_set(
        self, request: batch_pb.BatchSetRequest, ctx: CallContext
    ) -> batch_pb.BatchSetResponse:
        entries = validation.batch_entries(request.entries)

        def job(conn: sqlite3.Connection) -> list[batch_pb.BatchSetResult]:
            return [
                batch_pb.BatchSetResult(key=k, revision=put(conn, ctx.namespace, k, v, None))
                for k, v in entries
            ]

        return batch_pb.BatchSetResponse(results=await self.db.write(job))

    async def batch_get(
        self, request: batch_pb.BatchGetRequest, ctx: CallContext
    ) -> batch_pb.BatchGetResponse:
        keys = validation.keys(request.keys)

        def job(conn: sqlite3.Connection) -> dict[str, tuple[bytes, int]]:
            unique = sorted(set(keys))
            marks = ",".join("?" * len(unique))
            rows = conn.execute(
                f"SELECT key, value, revision FROM kv WHERE ns = ? AND key IN ({marks}) AND {LIVE}",
                (ctx.namespace, *unique, time.time()),
            )
            return {k: (bytes(v), int(r)) for k, v, r in rows}

        found = await self.db.read(job)
        results = []
        for k in keys:
            hit = found.get(k)
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

        def job(conn: sqlite3.Connection) -> list[batch_pb.BatchDeleteResult]:
            return [
                batch_pb.BatchDeleteResult(key=k, deleted=remove(conn, ctx.namespace, k))
                for k in keys
            ]

        return batch_pb.BatchDeleteResponse(results=await self.db.write(job))

    # -- cas ---------------------------------------------------------------------------------

    async def compare_and_swap(
        self, request: cas_pb.CompareAndSwapRequest, ctx: CallContext
    ) -> cas_pb.CompareAndSwapResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        expected = request.expected_revision

        def job(conn: sqlite3.Connection) -> int:
            current = current_revision(conn, ctx.namespace, key)
            if current != expected:
                if expected == 0:
                    raise key_exists(key)
                raise revision_mismatch(key, expected, current)
            return put(conn, ctx.namespace, key, value, None)

        return cas_pb.CompareAndSwapResponse(revision=await self.db.write(job))

    async def compare_and_delete(
        self, request: cas_pb.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas_pb.CompareAndDeleteResponse:
        key = validation.key(request.key)
        expected = request.expected_revision
        if expected == 0:
            raise InvalidArgument("expected_revision", "must be positive")

        def job(conn: sqlite3.Connection) -> None:
            current = current_revision(conn, ctx.namespace, key)
            if current != expected:
                raise revision_mismatch(key, expected, current)
            remove(conn, ctx.namespace, key)

        await self.db.write(job)
        return cas_pb.CompareAndDeleteResponse()

    # -- scan --------------------------------------------------------------------------------

    async def _page(
        self, kind: str, prefix: str, page_size: int, page_token: str, ctx: CallContext
    ) -> tuple[list[tuple[str, bytes, int]], str]:
        """One keyset page of live entries with `prefix`, and the token for the next one."""
        size = validation.page_size(page_size)
        after = validation.scan_after(page_token, kind, prefix)

        def job(conn: sqlite3.Connection) -> list[tuple[str, bytes, int]]:
            where, params = _prefix_range(ctx.namespace, prefix)
            if after is not None:
                where += " AND key > ?"
                params.append(after)
            rows = conn.execute(
                f"SELECT key, value, revision FROM kv WHERE {where} AND {LIVE} "
                "ORDER BY key LIMIT ?",
                (*params, time.time(), size + 1),
            )
            return [(k, bytes(v), int(r)) for k, v, r in rows]

        rows = await self.db.read(job)
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, validation.encode_page_token(kind, prefix, rows[-1][0])

    async def scan(self, request: scan_pb.ScanRequest, ctx: CallContext) -> scan_pb.ScanResponse:
        rows, token = await self._page(
            "sqlite.scan", request.prefix, request.page_size, request.page_token, ctx
        )
        entries = [scan_pb.KeyValue(key=k, value=v, revision=r) for k, v, r in rows]
        return scan_pb.ScanResponse(entries=entries, next_page_token=token)

    async def scan_keys(
        self, request: scan_pb.ScanKeysRequest, ctx: CallContext
    ) -> scan_pb.ScanKeysResponse:
        rows, token = await self._page(
            "sqlite.scan_keys", request.prefix, request.page_size, request.page_token, ctx
        )
        return scan_pb.ScanKeysResponse(keys=[k for k, _, _ in rows], next_page_token=token)

    async def count(self, request: scan_pb.CountRequest, ctx: CallContext) -> scan_pb.CountResponse:
        def job(conn: sqlite3.Connection) -> int:
            where, params = _prefix_range(ctx.namespace, request.prefix)
            row = conn.execute(
                f"SELECT count(*) FROM kv WHERE {where} AND {LIVE}", (*params, time.time())
            ).fetchone()
            return int(row[0])

        return scan_pb.CountResponse(count=await self.db.read(job))

    # -- ttl ---------------------------------------------------------------------------------

    async def set_with_ttl(
        self, request: ttl_pb.SetWithTTLRequest, ctx: CallContext
    ) -> ttl_pb.SetWithTTLResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        revision = await self.db.write(
            lambda c: put(c, ctx.namespace, key, value, time.time() + seconds)
        )
        return ttl_pb.SetWithTTLResponse(revision=revision)

    async def expire(
        self, request: ttl_pb.ExpireRequest, ctx: CallContext
    ) -> ttl_pb.ExpireResponse:
        key = validation.key(request.key)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))

        def job(conn: sqlite3.Connection) -> bool:
            return _touch(conn, ctx.namespace, key, "expires_at = ?", time.time() + seconds)

        return ttl_pb.ExpireResponse(applied=await self.db.write(job))

    async def get_ttl(
        self, request: ttl_pb.GetTTLRequest, ctx: CallContext
    ) -> ttl_pb.GetTTLResponse:
        key = validation.key(request.key)

        def job(conn: sqlite3.Connection) -> tuple[bool, float | None, float]:
            now = time.time()
            row = conn.execute(
                f"SELECT expires_at FROM kv WHERE ns = ? AND key = ? AND {LIVE}",
                (ctx.namespace, key, now),
            ).fetchone()
            return (row is not None, None if row is None else row[0], now)

        exists, expires_at, now = await self.db.read(job)
        if not exists:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_KEY_MISSING)
        if expires_at is None:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_PERSISTENT)
        remaining = Duration()
        remaining.FromNanoseconds(max(1, int((expires_at - now) * 1e9)))
        return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_EXPIRING, ttl=remaining)

    async def persist(
        self, request: ttl_pb.PersistRequest, ctx: CallContext
    ) -> ttl_pb.PersistResponse:
        key = validation.key(request.key)

        def job(conn: sqlite3.Connection) -> bool:
            return _touch(
                conn, ctx.namespace, key, "expires_at = NULL", None, "expires_at IS NOT NULL"
            )

        return ttl_pb.PersistResponse(persisted=await self.db.write(job))

    # -- transactional -----------------------------------------------------------------------

    async def _committed(self, ctx: CallContext, key: str) -> tuple[bytes, int] | None:
        return await self.db.read(lambda c: lookup(c, ctx.namespace, key))

    async def _apply(self, txn: BufferedTransaction, ctx: CallContext) -> None:
        """One write transaction on the single writer connection: check, then apply."""

        def job(conn: sqlite3.Connection) -> None:
            for key, seen in txn.reads.items():
                if current_revision(conn, txn.ns, key) != seen:
                    raise conflict(key)
            for key, value in txn.ops:
                if value is None:
                    remove(conn, txn.ns, key)
                else:
                    put(conn, txn.ns, key, value, None)

        await self.db.write(job)


def _prefix_range(ns: str, prefix: str) -> tuple[str, list[object]]:
    where = "ns = ? AND key >= ?"
    params: list[object] = [ns, prefix]
    upper = prefix_upper_bound(prefix)
    if upper is not None:
        where += " AND key < ?"
        params.append(upper)
    return where, params


def _touch(
    conn: sqlite3.Connection,
    ns: str,
    key: str,
    assignment: str,
    arg: float | None,
    extra: str = "1",
) -> bool:
    """Change a live key's expiry (`assignment` is one of two fixed SQL fragments) under a new
    revision; False when the key is missing or `extra` does not hold."""
    params: tuple[object, ...] = (arg,) if arg is not None else ()
    revision = next_revision(conn)
    cursor = conn.execute(
        f"UPDATE kv SET {assignment}, revision = ? WHERE ns = ? AND key = ? AND {LIVE} AND {extra}",
        (*params, revision, ns, key, time.time()),
    )
    return cursor.rowcount > 0
