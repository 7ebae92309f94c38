"""KeyValue basic, scan, ttl, batch and cas on one `<prefix>kv` collection.

Each entry is `{_id, k, v, r, x?}`: `_id` is `"<len(ns)>:<ns><key>"`, so one namespace's ids
share a prefix and the `_id` index orders them by key — MongoDB compares strings byte by byte
(no collation), which is the UTF-8 byte order the scan contract promises; scans are `_id`
ranges, never regexes, so prefixes are literal. `r` is the revision, drawn from blocks reserved
on one counter document (`$inc`), so a key never sees a revision twice, even across delete and
re-create. `x` is the expiry: a TTL index reclaims expired entries eventually, and every read
filters them out against the plugin's clock, so expiry is exact to the call however far the
reaper lags. Batch writes run in one multi-document transaction when the deployment supports
them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from bson import Binary
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb
from pymongo import DeleteOne, ReplaceOne, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from plugins.mongodb.connection import Doc, Mongo
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument
from plugins.runtime.keyvalue import key_exists, revision_mismatch

REVISION_COUNTER = "kv_revision"
REVISION_BLOCK = 1000
MAX_CODE_POINT = 0x10FFFF


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def live(at: dt.datetime) -> Doc:
    """Entries not expired at `at` (`x` is absent or a date; this form keeps index use where an
    `$or` would not)."""
    return {"x": {"$not": {"$lte": at}}}


def is_live(doc: Doc, at: dt.datetime) -> bool:
    expiry = doc.get("x")
    return expiry is None or expiry > at


def scope(ns: str) -> str:
    """The `_id` prefix of a namespace; the length makes it unambiguous whatever `ns` holds."""
    return f"{len(ns)}:{ns}"


def string_upper_bound(text: str) -> str | None:
    """The smallest string above every string starting with `text` (code point order, which is
    MongoDB's UTF-8 byte order); None when there is none."""
    chars = list(text)
    while chars and ord(chars[-1]) == MAX_CODE_POINT:
        chars.pop()
    if not chars:
        return None
    following = ord(chars[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters of a UTF-8 string
        following = 0xE000
    chars[-1] = chr(following)
    return "".join(chars)


def prefix_range(ns: str, prefix: str) -> Doc:
    start = scope(ns) + prefix
    bounds: Doc = {"$gte": start}
    upper = string_upper_bound(start)
    if upper is not None:
        bounds["$lt"] = upper
    return bounds


def _ttl_duration(remaining: dt.timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(max(remaining, dt.timedelta(0)))
    return d


class MongoKeyValue:
    """keyvalue_basic, _batch, _cas, _scan and _ttl."""

    def __init__(self, mongo: Mongo) -> None:
        self.mongo = mongo
        self.kv: AsyncCollection[Doc] = mongo.db[mongo.name("kv")]
        self.meta: AsyncCollection[Doc] = mongo.db[mongo.name("meta")]
        #: set by the plugin's start() after probing the deployment
        self.transactions = False
        self._block_lock = asyncio.Lock()
        self._next = self._end = 0  # revisions [_next, _end) are reserved for this instance

    async def prepare(self) -> None:
        """Indexes the collection needs (idempotent)."""
        await self.kv.create_index("x", expireAfterSeconds=0, name="prism_expiry")

    def entry_id(self, ctx: CallContext, key: str) -> str:
        return scope(ctx.namespace) + key

    async def revisions(self, count: int) -> int:
        """Take `count` fresh revisions; returns the last (the first is last - count + 1).

        Revisions are reserved from the shared counter a block at a time, so most writes need no
        extra round trip; blocks of different plugin instances never overlap, so a revision is
        never handed out twice (a block lost in a crash is simply skipped)."""
        async with self._block_lock:
            if self._next + count > self._end:
                reserve = max(count, REVISION_BLOCK)
                doc = await self.meta.find_one_and_update(
                    {"_id": REVISION_COUNTER},
                    {"$inc": {"n": reserve}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                assert doc is not None  # an upsert returning the document after always has one
                self._end = int(doc["n"]) + 1
                self._next = self._end - reserve
            self._next += count
            return self._next - 1

    @staticmethod
    def entry(key: str, value: bytes, revision: int, expiry: dt.datetime | None) -> Doc:
        doc: Doc = {"k": key, "v": Binary(value), "r": revision}
        if expiry is not None:
            doc["x"] = expiry
        return doc

    async def _put(
        self, ctx: CallContext, key: str, value: bytes, expiry: dt.datetime | None
    ) -> int:
        async with self.mongo.call(ctx):
            revision = await self.revisions(1)
            entry = self.entry(key, value, revision, expiry)
            try:
                await self.kv.replace_one({"_id": self.entry_id(ctx, key)}, entry, upsert=True)
            except DuplicateKeyError:  # a concurrent upsert of the same new key won the insert
                await self.kv.replace_one({"_id": self.entry_id(ctx, key)}, entry, upsert=True)
        return revision

    async def _find_live(
        self, ctx: CallContext, key: str, projection: Doc | None = None
    ) -> Doc | None:
        async with self.mongo.call(ctx):
            return await self.kv.find_one(
                {"_id": self.entry_id(ctx, key), **live(now())}, projection
            )

    async def _current_revision(self, ctx: CallContext, key: str) -> int:
        doc = await self._find_live(ctx, key, {"r": 1})
        return 0 if doc is None else int(doc["r"])

    # -- basic -------------------------------------------------------------------------------

    async def set(self, request: basic_pb.SetRequest, ctx: CallContext) -> basic_pb.SetResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        return basic_pb.SetResponse(revision=await self._put(ctx, key, value, None))

    async def get(self, request: basic_pb.GetRequest, ctx: CallContext) -> basic_pb.GetResponse:
        doc = await self._find_live(ctx, validation.key(request.key))
        if doc is None:
            return basic_pb.GetResponse(found=False)
        return basic_pb.GetResponse(found=True, value=bytes(doc["v"]), revision=int(doc["r"]))

    async def delete(
        self, request: basic_pb.DeleteRequest, ctx: CallContext
    ) -> basic_pb.DeleteResponse:
        key = validation.key(request.key)
        async with self.mongo.call(ctx):
            old = await self.kv.find_one_and_delete({"_id": self.entry_id(ctx, key)}, {"x": 1})
        return basic_pb.DeleteResponse(deleted=old is not None and is_live(old, now()))

    async def exists(
        self, request: basic_pb.ExistsRequest, ctx: CallContext
    ) -> basic_pb.ExistsResponse:
        doc = await self._find_live(ctx, validation.key(request.key), {"_id": 1})
        return basic_pb.ExistsResponse(exists=doc is not None)

    # -- batch -------------------------------------------------------------------------------

    async def _atomically(self, ctx: CallContext, job: Any) -> Any:
        """Run `job(session)` in a transaction when the deployment has them, else without one
        (details() reports that batch writes are then not atomic)."""
        async with self.mongo.call(ctx):
            if not self.transactions:
                return await job(None)
            async with self.mongo.client.start_session() as session:
                return await session.with_transaction(job)

    async def batch_set(
        self, request: batch_pb.BatchSetRequest, ctx: CallContext
    ) -> batch_pb.BatchSetResponse:
        entries = validation.batch_entries(request.entries)
        async with self.mongo.call(ctx):
            first = await self.revisions(len(entries)) - len(entries) + 1
        writes = [
            ReplaceOne(
                {"_id": self.entry_id(ctx, k)}, self.entry(k, v, first + i, None), upsert=True
            )
            for i, (k, v) in enumerate(entries)
        ]

        async def job(session: AsyncClientSession | None) -> None:
            await self.kv.bulk_write(writes, ordered=True, session=session)

        await self._atomically(ctx, job)
        return batch_pb.BatchSetResponse(
            results=[
                batch_pb.BatchSetResult(key=k, revision=first + i)
                for i, (k, _) in enumerate(entries)
            ]
        )

    async def batch_get(
        self, request: batch_pb.BatchGetRequest, ctx: CallContext
    ) -> batch_pb.BatchGetResponse:
        keys = validation.keys(request.keys)
        ids = sorted({self.entry_id(ctx, k) for k in keys})
        async with self.mongo.call(ctx):
            found = {
                doc["k"]: doc async for doc in self.kv.find({"_id": {"$in": ids}, **live(now())})
            }
        results = []
        for k in keys:
            doc = found.get(k)
            if doc is None:
                results.append(batch_pb.BatchGetResult(key=k, found=False))
            else:
                results.append(
                    batch_pb.BatchGetResult(
                        key=k, found=True, value=bytes(doc["v"]), revision=int(doc["r"])
                    )
                )
        return batch_pb.BatchGetResponse(results=results)

    async def batch_delete(
        self, request: batch_pb.BatchDeleteRequest, ctx: CallContext
    ) -> batch_pb.BatchDeleteResponse:
        keys = validation.keys(request.keys)
        ids = sorted({self.entry_id(ctx, k) for k in keys})

        async def job(session: AsyncClientSession | None) -> set[str]:
            present = {
                doc["k"]
                async for doc in self.kv.find(
                    {"_id": {"$in": ids}, **live(now())}, {"k": 1}, session=session
                )
            }
            await self.kv.bulk_write(
                [DeleteOne({"_id": i}) for i in ids], ordered=False, session=session
            )
            return present

        present: set[str] = await self._atomically(ctx, job)
        results = []
        for k in keys:  # a key listed twice is deleted by its first mention
            results.append(batch_pb.BatchDeleteResult(key=k, deleted=k in present))
            present.discard(k)
        return batch_pb.BatchDeleteResponse(results=results)

    # -- cas ---------------------------------------------------------------------------------

    async def compare_and_swap(
        self, request: cas_pb.CompareAndSwapRequest, ctx: CallContext
    ) -> cas_pb.CompareAndSwapResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        expected = request.expected_revision
        at = now()
        async with self.mongo.call(ctx):
            revision = await self.revisions(1)
            entry = self.entry(key, value, revision, None)
            if expected == 0:
                # insert-only: an expired leftover may be replaced, a live entry may not
                try:
                    await self.kv.replace_one(
                        {"_id": self.entry_id(ctx, key), "x": {"$lte": at}}, entry, upsert=True
                    )
                except DuplicateKeyError as exc:
                    raise key_exists(key) from exc
                return cas_pb.CompareAndSwapResponse(revision=revision)
            result = await self.kv.replace_one(
                {"_id": self.entry_id(ctx, key), "r": expected, **live(at)}, entry
            )
        if result.matched_count == 0:
            raise revision_mismatch(key, expected, await self._current_revision(ctx, key))
        return cas_pb.CompareAndSwapResponse(revision=revision)

    async def compare_and_delete(
        self, request: cas_pb.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas_pb.CompareAndDeleteResponse:
        key = validation.key(request.key)
        expected = request.expected_revision
        if expected == 0:
            raise InvalidArgument("expected_revision", "must be positive")
        async with self.mongo.call(ctx):
            result = await self.kv.delete_one(
                {"_id": self.entry_id(ctx, key), "r": expected, **live(now())}
            )
        if result.deleted_count == 0:
            raise revision_mismatch(key, expected, await self._current_revision(ctx, key))
        return cas_pb.CompareAndDeleteResponse()

    # -- scan --------------------------------------------------------------------------------

    async def _page(
        self,
        kind: str,
        prefix: str,
        page_size: int,
        page_token: str,
        ctx: CallContext,
        *,
        with_values: bool,
    ) -> tuple[list[Doc], str]:
        """One keyset page of live entries with `prefix`, and the token for the next one."""
        size = validation.page_size(page_size)
        after = validation.scan_after(page_token, kind, prefix)
        bounds = prefix_range(ctx.namespace, prefix)
        if after is not None:  # the token's key has the prefix (its scope is the prefix)
            del bounds["$gte"]
            bounds["$gt"] = self.entry_id(ctx, after)
        projection = None if with_values else {"k": 1}
        async with self.mongo.call(ctx):
            cursor = self.kv.find({"_id": bounds, **live(now())}, projection)
            rows = await cursor.sort("_id", 1).limit(size + 1).to_list()
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, validation.encode_page_token(kind, prefix, rows[-1]["k"])

    async def scan(self, request: scan_pb.ScanRequest, ctx: CallContext) -> scan_pb.ScanResponse:
        rows, token = await self._page(
            "mongodb.scan",
            request.prefix,
            request.page_size,
            request.page_token,
            ctx,
            with_values=True,
        )
        entries = [
            scan_pb.KeyValue(key=d["k"], value=bytes(d["v"]), revision=int(d["r"])) for d in rows
        ]
        return scan_pb.ScanResponse(entries=entries, next_page_token=token)

    async def scan_keys(
        self, request: scan_pb.ScanKeysRequest, ctx: CallContext
    ) -> scan_pb.ScanKeysResponse:
        rows, token = await self._page(
            "mongodb.scan_keys",
            request.prefix,
            request.page_size,
            request.page_token,
            ctx,
            with_values=False,
        )
        return scan_pb.ScanKeysResponse(keys=[d["k"] for d in rows], next_page_token=token)

    async def count(self, request: scan_pb.CountRequest, ctx: CallContext) -> scan_pb.CountResponse:
        query = {"_id": prefix_range(ctx.namespace, request.prefix), **live(now())}
        async with self.mongo.call(ctx):
            total = await self.kv.count_documents(query)
        return scan_pb.CountResponse(count=total)

    # -- ttl ---------------------------------------------------------------------------------

    async def set_with_ttl(
        self, request: ttl_pb.SetWithTTLRequest, ctx: CallContext
    ) -> ttl_pb.SetWithTTLResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        expiry = now() + dt.timedelta(seconds=seconds)
        return ttl_pb.SetWithTTLResponse(revision=await self._put(ctx, key, value, expiry))

    async def _touch(self, ctx: CallContext, key: str, expiry: Doc, change: Doc) -> bool:
        """Apply `change` under a new revision to the key if its expiry matches `expiry`."""
        async with self.mongo.call(ctx):
            revision = await self.revisions(1)
            change.setdefault("$set", {})["r"] = revision
            result = await self.kv.update_one({"_id": self.entry_id(ctx, key), **expiry}, change)
        return result.matched_count > 0

    async def expire(
        self, request: ttl_pb.ExpireRequest, ctx: CallContext
    ) -> ttl_pb.ExpireResponse:
        key = validation.key(request.key)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        expiry = now() + dt.timedelta(seconds=seconds)
        applied = await self._touch(ctx, key, live(now()), {"$set": {"x": expiry}})
        return ttl_pb.ExpireResponse(applied=applied)

    async def get_ttl(
        self, request: ttl_pb.GetTTLRequest, ctx: CallContext
    ) -> ttl_pb.GetTTLResponse:
        doc = await self._find_live(ctx, validation.key(request.key), {"x": 1})
        if doc is None:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_KEY_MISSING)
        expiry = doc.get("x")
        if expiry is None:
            return ttl_pb.GetTTLResponse(state=ttl_pb.TTL_STATE_PERSISTENT)
        return ttl_pb.GetTTLResponse(
            state=ttl_pb.TTL_STATE_EXPIRING, ttl=_ttl_duration(expiry - now())
        )

    async def persist(
        self, request: ttl_pb.PersistRequest, ctx: CallContext
    ) -> ttl_pb.PersistResponse:
        key = validation.key(request.key)
        persisted = await self._touch(ctx, key, {"x": {"$gt": now()}}, {"$unset": {"x": ""}})
        return ttl_pb.PersistResponse(persisted=persisted)
