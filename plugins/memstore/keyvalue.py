"""The six KeyValue interfaces over plain dicts and a sorted key list per namespace.

Every method is a synchronous run of dict/list manipulation inside an `async def` with no await in
between, so each call is atomic on the event loop without locks.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import (
    keyvalue_basic_pb2 as basic,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_batch_pb2 as batch,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_cas_pb2 as cas,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_scan_pb2 as kvscan,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_transactional_pb2 as txn,
)
from prism.interfaces.keyvalue.v1 import (
    keyvalue_ttl_pb2 as ttl,
)

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument
from plugins.runtime.keyvalue import key_exists, revision_mismatch
from plugins.runtime.transactions import OpenTransaction, TransactionTable, begin_timeout, conflict

_SCAN_TOKEN_KIND = "memstore.kv.scan"


@dataclass(slots=True)
class _Entry:
    value: bytes
    revision: int
    expires_at: float | None = None  # time.monotonic() instant

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(slots=True)
class _Space:
    """One namespace: entries by key plus the same keys kept sorted for prefix scans."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    sorted_keys: list[str] = field(default_factory=list)

    def put(self, key: str, entry: _Entry) -> None:
        if key not in self.entries:
            bisect.insort(self.sorted_keys, key)
        self.entries[key] = entry

    def remove(self, key: str) -> bool:
        if self.entries.pop(key, None) is None:
            return False
        i = bisect.bisect_left(self.sorted_keys, key)
        del self.sorted_keys[i]
        return True

    def prefixed(self, prefix: str, after: str | None) -> Iterator[str]:
        """Keys starting with `prefix`, ascending, strictly after `after` when given.

        Python compares str by code point, which is the byte order of their UTF-8 encoding."""
        start = (
            bisect.bisect_left(self.sorted_keys, prefix)
            if after is None or after < prefix
            else bisect.bisect_right(self.sorted_keys, after)
        )
        for i in range(start, len(self.sorted_keys)):
            k = self.sorted_keys[i]
            if not k.startswith(prefix):
                return
            yield k


@dataclass(kw_only=True)
class _Transaction(OpenTransaction):
    # key → revision first observed (0 = missing); checked again at commit
    observed: dict[str, int] = field(default_factory=dict)
    # key → last buffered value, None for a delete (keys are independent, so applying only the
    # last write per key is the same as applying every write in order)
    writes: dict[str, bytes | None] = field(default_factory=dict)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(max(0, round(seconds * 1e9)))
    return d


class KeyValueStore:
    """State and the primitive operations every KeyValue interface is built from."""

    def __init__(self) -> None:
        self._spaces: dict[str, _Space] = {}
        self._revision = 0
        # (expires_at, namespace, key): lazily invalidated; the sweeper pops due items
        self._expiry_heap: list[tuple[float, str, str]] = []
        self.transactions = TransactionTable[_Transaction]()

    # primitives ---------------------------------------------------------------------------
    def space(self, namespace: str) -> _Space:
        sp = self._spaces.get(namespace)
        if sp is None:
            sp = self._spaces[namespace] = _Space()
        return sp

    def next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def live(self, namespace: str, key: str) -> _Entry | None:
        sp = self._spaces.get(namespace)
        entry = None if sp is None else sp.entries.get(key)
        if entry is None or not entry.live(time.monotonic()):
            return None
        return entry

    def current_revision(self, namespace: str, key: str) -> int:
        entry = self.live(namespace, key)
        return 0 if entry is None else entry.revision

    def write(self, namespace: str, key: str, value: bytes, ttl: float | None = None) -> int:
        """Set a value with a fresh revision; `ttl` None clears any expiry (Redis SET)."""
        revision = self.next_revision()
        expires_at = None if ttl is None else time.monotonic() + ttl
        self.space(namespace).put(key, _Entry(value, revision, expires_at))
        if expires_at is not None:
            heapq.heappush(self._expiry_heap, (expires_at, namespace, key))
        return revision

    def remove(self, namespace: str, key: str) -> bool:
        """Delete a key; True only when a live (unexpired) entry was removed."""
        existed = self.live(namespace, key) is not None
        sp = self._spaces.get(namespace)
        if sp is not None:
            sp.remove(key)
        return existed

    def set_expiry(self, namespace: str, key: str, ttl: float | None) -> bool:
        """Replace the expiry of a live key (None = persist); a new revision, as for any write,
        so a CAS or transaction that read the key notices."""
        entry = self.live(namespace, key)
        if entry is None:
            return False
        entry.revision = self.next_revision()
        entry.expires_at = None if ttl is None else time.monotonic() + ttl
        if entry.expires_at is not None:
            heapq.heappush(self._expiry_heap, (entry.expires_at, namespace, key))
        return True

    def sweep(self) -> int:
        """Reclaim expired entries and idle transactions; returns how many entries were freed."""
        now = time.monotonic()
        freed = 0
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _, namespace, key = heapq.heappop(self._expiry_heap)
            sp = self._spaces.get(namespace)
            entry = None if sp is None else sp.entries.get(key)
            if sp is not None and entry is not None and not entry.live(now):
                sp.remove(key)
                freed += 1
        self.transactions.purge()
        return freed

    def entry_count(self, namespace: str) -> int:
        """Entries held in memory, expired or not (what the sweeper frees)."""
        sp = self._spaces.get(namespace)
        return 0 if sp is None else len(sp.entries)


class MemstoreKeyValue:
    """keyvalue_basic, _scan, _ttl, _batch, _cas and _transactional on one KeyValueStore."""

    def __init__(self, store: KeyValueStore) -> None:
        self._s = store

    # keyvalue_basic -----------------------------------------------------------------------
    async def set(self, request: basic.SetRequest, ctx: CallContext) -> basic.SetResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        return basic.SetResponse(revision=self._s.write(ctx.namespace, key, value))

    async def get(self, request: basic.GetRequest, ctx: CallContext) -> basic.GetResponse:
        entry = self._s.live(ctx.namespace, validation.key(request.key))
        if entry is None:
            return basic.GetResponse(found=False)
        return basic.GetResponse(found=True, value=entry.value, revision=entry.revision)

    async def delete(self, request: basic.DeleteRequest, ctx: CallContext) -> basic.DeleteResponse:
        key = validation.key(request.key)
        return basic.DeleteResponse(deleted=self._s.remove(ctx.namespace, key))

    async def exists(self, request: basic.ExistsRequest, ctx: CallContext) -> basic.ExistsResponse:
        key = validation.key(request.key)
        return basic.ExistsResponse(exists=self._s.live(ctx.namespace, key) is not None)

    # keyvalue_scan ------------------------------------------------------------------------
    def _page(
        self, ctx: CallContext, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[tuple[str, _Entry]], str]:
        size = validation.page_size(page_size)
        after = validation.scan_after(page_token, _SCAN_TOKEN_KIND, prefix)
        sp = self._s.space(ctx.namespace)
        now = time.monotonic()
        page: list[tuple[str, _Entry]] = []
        for k in sp.prefixed(prefix, after):
            entry = sp.entries[k]
            if not entry.live(now):
                continue
            if len(page) == size:
                last = page[-1][0]
                return page, validation.encode_page_token(_SCAN_TOKEN_KIND, prefix, last)
            page.append((k, entry))
        return page, ""

    async def scan(self, request: kvscan.ScanRequest, ctx: CallContext) -> kvscan.ScanResponse:
        page, token = self._page(ctx, request.prefix, request.page_size, request.page_token)
        return kvscan.ScanResponse(
            entries=[kvscan.KeyValue(key=k, value=e.value, revision=e.revision) for k, e in page],
            next_page_token=token,
        )

    async def scan_keys(
        self, request: kvscan.ScanKeysRequest, ctx: CallContext
    ) -> kvscan.ScanKeysResponse:
        page, token = self._page(ctx, request.prefix, request.page_size, request.page_token)
        return kvscan.ScanKeysResponse(keys=[k for k, _ in page], next_page_token=token)

    async def count(self, request: kvscan.CountRequest, ctx: CallContext) -> kvscan.CountResponse:
        sp = self._s.space(ctx.namespace)
        now = time.monotonic()
        n = sum(1 for k in sp.prefixed(request.prefix, None) if sp.entries[k].live(now))
        return kvscan.CountResponse(count=n)

    # keyvalue_ttl -------------------------------------------------------------------------
    async def set_with_ttl(
        self, request: ttl.SetWithTTLRequest, ctx: CallContext
    ) -> ttl.SetWithTTLResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        return ttl.SetWithTTLResponse(revision=self._s.write(ctx.namespace, key, value, seconds))

    async def expire(self, request: ttl.ExpireRequest, ctx: CallContext) -> ttl.ExpireResponse:
        key = validation.key(request.key)
        seconds = validation.ttl_seconds(request.ttl, request.HasField("ttl"))
        return ttl.ExpireResponse(applied=self._s.set_expiry(ctx.namespace, key, seconds))

    async def get_ttl(self, request: ttl.GetTTLRequest, ctx: CallContext) -> ttl.GetTTLResponse:
        entry = self._s.live(ctx.namespace, validation.key(request.key))
        if entry is None:
            return ttl.GetTTLResponse(state=ttl.TTL_STATE_KEY_MISSING)
        if entry.expires_at is None:
            return ttl.GetTTLResponse(state=ttl.TTL_STATE_PERSISTENT)
        remaining = entry.expires_at - time.monotonic()
        return ttl.GetTTLResponse(state=ttl.TTL_STATE_EXPIRING, ttl=_duration(remaining))

    async def persist(self, request: ttl.PersistRequest, ctx: CallContext) -> ttl.PersistResponse:
        key = validation.key(request.key)
        entry = self._s.live(ctx.namespace, key)
        if entry is None or entry.expires_at is None:
            return ttl.PersistResponse(persisted=False)
        return ttl.PersistResponse(persisted=self._s.set_expiry(ctx.namespace, key, None))

    # keyvalue_batch -----------------------------------------------------------------------
    async def batch_set(
        self, request: batch.BatchSetRequest, ctx: CallContext
    ) -> batch.BatchSetResponse:
        entries = validation.batch_entries(request.entries)
        return batch.BatchSetResponse(
            results=[
                batch.BatchSetResult(key=k, revision=self._s.write(ctx.namespace, k, v))
                for k, v in entries
            ]
        )

    async def batch_get(
        self, request: batch.BatchGetRequest, ctx: CallContext
    ) -> batch.BatchGetResponse:
        results = []
        for k in validation.keys(request.keys):
            entry = self._s.live(ctx.namespace, k)
            results.append(
                batch.BatchGetResult(key=k, found=False)
                if entry is None
                else batch.BatchGetResult(
                    key=k, found=True, value=entry.value, revision=entry.revision
                )
            )
        return batch.BatchGetResponse(results=results)

    async def batch_delete(
        self, request: batch.BatchDeleteRequest, ctx: CallContext
    ) -> batch.BatchDeleteResponse:
        return batch.BatchDeleteResponse(
            results=[
                batch.BatchDeleteResult(key=k, deleted=self._s.remove(ctx.namespace, k))
                for k in validation.keys(request.keys)
            ]
        )

    # keyvalue_cas -------------------------------------------------------------------------
    async def compare_and_swap(
        self, request: cas.CompareAndSwapRequest, ctx: CallContext
    ) -> cas.CompareAndSwapResponse:
        key = validation.key(request.key)
        value = validation.value(request.value)
        current = self._s.current_revision(ctx.namespace, key)
        if current != request.expected_revision:
            if request.expected_revision == 0:
                raise key_exists(key)
            raise revision_mismatch(key, request.expected_revision, current)
        return cas.CompareAndSwapResponse(revision=self._s.write(ctx.namespace, key, value))

    async def compare_and_delete(
        self, request: cas.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas.CompareAndDeleteResponse:
        key = validation.key(request.key)
        if request.expected_revision == 0:
            raise InvalidArgument("expected_revision", "must be positive")
        current = self._s.current_revision(ctx.namespace, key)
        if current != request.expected_revision:
            raise revision_mismatch(key, request.expected_revision, current)
        self._s.remove(ctx.namespace, key)
        return cas.CompareAndDeleteResponse()

    # keyvalue_transactional ---------------------------------------------------------------
    def _txn(self, transaction_id: str, ctx: CallContext) -> _Transaction:
        if not transaction_id:
            raise InvalidArgument("transaction_id", "must not be empty")
        tx = self._s.transactions.find(transaction_id, ctx)
        tx.touch()
        return tx

    def _observe(self, tx: _Transaction, key: str) -> None:
        if key not in tx.observed:
            tx.observed[key] = self._s.current_revision(tx.ns, key)

    def _txn_read(self, tx: _Transaction, key: str) -> bytes | None:
        """The key's value as the transaction sees it: its own writes first, then the store."""
        self._observe(tx, key)
        if key in tx.writes:
            return tx.writes[key]
        entry = self._s.live(tx.ns, key)
        return None if entry is None else entry.value

    async def begin_transaction(
        self, request: txn.BeginTransactionRequest, ctx: CallContext
    ) -> txn.BeginTransactionResponse:
        tx = _Transaction(ns=ctx.namespace, timeout=begin_timeout(request))
        tid = self._s.transactions.add(tx)
        return txn.BeginTransactionResponse(transaction_id=tid)

    async def set_in_transaction(
        self, request: txn.SetInTransactionRequest, ctx: CallContext
    ) -> txn.SetInTransactionResponse:
        tx = self._txn(request.transaction_id, ctx)
        key = validation.key(request.key)
        value = validation.value(request.value)
        self._observe(tx, key)
        tx.writes[key] = value
        return txn.SetInTransactionResponse()

    async def get_in_transaction(
        self, request: txn.GetInTransactionRequest, ctx: CallContext
    ) -> txn.GetInTransactionResponse:
        tx = self._txn(request.transaction_id, ctx)
        value = self._txn_read(tx, validation.key(request.key))
        if value is None:
            return txn.GetInTransactionResponse(found=False)
        return txn.GetInTransactionResponse(found=True, value=value)

    async def delete_in_transaction(
        self, request: txn.DeleteInTransactionRequest, ctx: CallContext
    ) -> txn.DeleteInTransactionResponse:
        tx = self._txn(request.transaction_id, ctx)
        key = validation.key(request.key)
        existed = self._txn_read(tx, key) is not None
        tx.writes[key] = None
        return txn.DeleteInTransactionResponse(deleted=existed)

    async def commit(self, request: txn.CommitRequest, ctx: CallContext) -> txn.CommitResponse:
        tx = self._txn(request.transaction_id, ctx)
        self._s.transactions.discard(request.transaction_id, tx)
        changed = [k for k, rev in tx.observed.items() if self._s.current_revision(tx.ns, k) != rev]
        if changed:
            raise conflict(changed[0])
        for key, value in tx.writes.items():
            if value is None:
                self._s.remove(tx.ns, key)
            else:
                self._s.write(tx.ns, key, value)
        return txn.CommitResponse()

    async def rollback(
        self, request: txn.RollbackRequest, ctx: CallContext
    ) -> txn.RollbackResponse:
        tx = self._txn(request.transaction_id, ctx)
        self._s.transactions.discard(request.transaction_id, tx)
        return txn.RollbackResponse()
