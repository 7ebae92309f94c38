"""The audit log: one entry per mutating or denied call, in a document slot (document_basic +
document_query), append-only.

Recording never waits for the store: `record` puts the entry on a bounded in-process queue and a
background task writes queued entries in batches. When the store falls behind so far that the
queue is full, new entries are dropped and counted rather than blocking calls: an audit store
outage must not become a full outage. The count is reported in health (service `prism.audit`
turns NOT_SERVING while any were dropped since start) and in the log, so a gap is never silent.

Entry ids are time-ordered (nanoseconds since the epoch, then a per-process counter and a random
suffix), entries are only ever inserted, and a purge task deletes those older than the
retention (default 90 days) once at start and then every `purge_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2
from prism.admin.v1 import key_admin_pb2 as pb
from prism.contracts.document import DocumentBasic, DocumentQuery
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb

from plugins.runtime.context import CallContext

log = logging.getLogger("prism.audit")

#: the namespace and collection entries live in, inside the audit store slot
NAMESPACE = "prism-audit"
COLLECTION = "audit"
STORE_TIMEOUT = 10.0
QUEUE_LIMIT = 10_000
BATCH = 200
#: how long the writer lets entries gather after the first one: sequential calls then share one
#: store transaction (one commit and fsync on SQLite) instead of paying one each
LINGER = 0.02
DAY = 86_400.0


@dataclass(frozen=True)
class AuditRecord:
    """What the interceptor knows about a call; the log adds id and time."""

    identity: str
    peer: str
    method: str
    namespace: str
    resource: str
    outcome: str
    reason: str
    request_id: str
    time_ns: int = field(default_factory=time.time_ns)


def _rpc(method: str) -> str:
    """`/pkg.Service/Method` → `Service/Method`, the short form QueryAudit also accepts."""
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{name}"


def to_proto(json_text: str) -> pb.AuditEntry:
    data = json.loads(json_text)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(data["time_ns"])
    return pb.AuditEntry(
        id=data["seq"],
        time=stamp,
        identity=data["identity"],
        peer=data["peer"],
        method=data["method"],
        namespace=data["namespace"],
        resource=data["resource"],
        outcome=data["outcome"],
        reason=data["reason"],
        request_id=data["request_id"],
    )


class AuditLog:
    def __init__(
        self,
        basic: DocumentBasic,
        query: DocumentQuery,
        retention_days: float = 90.0,
        purge_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.basic = basic
        self.query_impl = query
        self.retention = retention_days * DAY
        self.purge_interval = purge_interval
        self.clock = clock
        self.dropped = 0
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(QUEUE_LIMIT)
        self._counter = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_drop: Callable[[], object] = lambda: None

    @staticmethod
    def _ctx() -> CallContext:
        return CallContext.with_timeout(NAMESPACE, STORE_TIMEOUT)

    def start(self, on_drop: Callable[[], object] | None = None) -> None:
        """Start writing and purging; `on_drop` is called when the first entry is lost."""
        if on_drop is not None:
            self._on_drop = on_drop
        self._tasks = [
            asyncio.create_task(self._writer(), name="prism-audit-writer"),
            asyncio.create_task(self._purger(), name="prism-audit-purge"),
        ]

    def record(self, entry: AuditRecord) -> None:
        try:
            self._queue.put_nowait(entry)
            self._idle.clear()
        except asyncio.QueueFull:
            self._drop(f"audit queue full ({QUEUE_LIMIT} entries waiting for the store)")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1:
            self._on_drop()
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("audit entry dropped: %s; %d dropped since start", why, self.dropped)

    async def flush(self) -> None:
        """Wait until every entry recorded so far is stored (tests, shutdown)."""
        await self._idle.wait()

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < BATCH:
                await asyncio.sleep(LINGER)
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._store(batch)
            if self._queue.empty():
                self._idle.set()

    async def _store(self, batch: list[AuditRecord]) -> None:
        """The batch's inserts run concurrently: a backend that groups commits (SQLite WAL,
        PostgreSQL) then pays one flush for many entries."""
        await asyncio.gather(*(self._insert(entry) for entry in batch))

    async def _insert(self, entry: AuditRecord) -> None:
        seq = f"{entry.time_ns:020d}-{next(self._counter) % 10**8:08d}-{secrets.token_hex(3)}"
        doc = json.dumps({"seq": seq, **vars(entry), "rpc": _rpc(entry.method)})
        request = doc_pb.InsertRequest(collection=COLLECTION, id=seq, json=doc)
        for attempt in range(3):
            try:
                await self.basic.insert(request, self._ctx())
                return
            except Exception as exc:
                if attempt == 2:
                    self._drop(f"storing {seq} failed: {exc!r}")
                else:
                    await asyncio.sleep(0.2 * (attempt + 1))

    async def _purger(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception as exc:  # tried again next round
                log.warning("audit purge failed: %r", exc)
            await asyncio.sleep(self.purge_interval)

    async def purge(self) -> int:
        """Delete entries older than the retention; returns how many."""
        cutoff = int((self.clock() - self.retention) * 1e9)
        where = json.dumps({"time_ns": {"$lt": cutoff}})
        deleted = 0
        while True:
            page = await self.query_impl.find(
                query_pb.FindRequest(collection=COLLECTION, filter=where, page_size=500),
                self._ctx(),
            )
            for doc in page.documents:
                await self.basic.delete(
                    doc_pb.DeleteRequest(collection=COLLECTION, id=doc.id), self._ctx()
                )
                deleted += 1
            if not page.documents:
                return deleted

    async def query(self, request: pb.QueryAuditRequest) -> pb.QueryAuditResponse:
        where: dict[str, Any] = {}
        if request.identity:
            where["identity"] = request.identity
        if request.method:
            where["method" if request.method.startswith("/") else "rpc"] = request.method
        if request.outcome:
            where["outcome"] = request.outcome.upper()
        span: dict[str, int] = {}
        if request.HasField("start_time"):
            span["$gte"] = request.start_time.ToNanoseconds()
        if request.HasField("end_time"):
            span["$lt"] = request.end_time.ToNanoseconds()
        if span:
            where["time_ns"] = span
        found = await self.query_impl.find(
            query_pb.FindRequest(
                collection=COLLECTION,
                filter=json.dumps(where),
                sort=[query_pb.SortField(field="seq", descending=True)],
                page_size=request.page_size or 100,
                page_token=request.page_token,
            ),
            self._ctx(),
        )
        return pb.QueryAuditResponse(
            entries=[to_proto(d.json) for d in found.documents],
            next_page_token=found.next_page_token,
        )

    async def close(self) -> None:
        """Store what is queued (bounded by a timeout), then stop the tasks."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STORE_TIMEOUT):
                await self.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
