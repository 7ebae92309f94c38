"""Queue basic, visibility, dead-letter, delayed and priority on the `queue_messages` table.

One row per message. `visible_at` (unix seconds) is both the due time of a delayed message and
the end of a lease, so "visible" is simply `visible_at <= now`; a lease is live while its
`receipt` is set and `visible_at > now`. `position` is drawn from a global counter when a message
enters a queue (enqueue, dead-lettering, redrive) and never changes otherwise, so redelivered
messages keep their place. Every lease change is one write job, so two consumers can never lease
the same message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed_pb
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility_pb

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition
from plugins.runtime.queues import receipt_not_found
from plugins.sqlite.db import Database

DEFAULT_VISIBILITY = 30.0
MESSAGE_COLUMNS = "message_id, payload, attributes, enqueue_time, delivery_count, priority"


@dataclass(frozen=True)
class Incoming:
    """A validated message about to be enqueued."""

    payload: bytes
    attributes: dict[str, str]
    priority: int = 0
    due: float = 0.0


def _incoming(request: Any, priority: int = 0) -> tuple[str, Incoming]:
    """The queue and message of any Enqueue* request (they share these fields)."""
    queue = validation.queue_name(request.queue)
    payload = validation.value(request.payload, "payload")
    attributes = validation.attributes(request.attributes)
    return queue, Incoming(payload, attributes, priority)


def _next_position(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "UPDATE counters SET value = value + 1 WHERE name = 'queue_position' RETURNING value"
    ).fetchone()
    return int(row[0])


def _to_message(row: tuple[Any, ...], receipt: str = "") -> basic_pb.Message:
    message = basic_pb.Message(
        message_id=row[0],
        payload=bytes(row[1]),
        attributes=json.loads(row[2]),
        delivery_count=row[4],
        priority=row[5],
        receipt_handle=receipt,
    )
    message.enqueue_time.FromNanoseconds(row[3])
    return message


def _move(conn: sqlite3.Connection, rowid: int, queue: str, source: str | None) -> None:
    """Put a message at the back of `queue`, undelivered and unleased."""
    conn.execute(
        "UPDATE queue_messages SET queue = ?, source_queue = ?, position = ?, "
        "delivery_count = 0, receipt = NULL, visible_at = 0 WHERE rowid = ?",
        (queue, source, _next_position(conn), rowid),
    )


def _dead_letter_config(conn: sqlite3.Connection, ns: str, queue: str) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT dead_letter_queue, max_deliveries FROM queue_dead_letter "
        "WHERE ns = ? AND queue = ?",
        (ns, queue),
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def _dead_letter_expired(conn: sqlite3.Connection, ns: str, queue: str, now: float) -> str | None:
    """Move messages of `queue` whose last lease expired after their final allowed delivery to
    its DLQ; returns the DLQ when it received any."""
    config = _dead_letter_config(conn, ns, queue)
    if config is None:
        return None
    rows = conn.execute(
        "SELECT rowid FROM queue_messages WHERE ns = ? AND queue = ? AND receipt IS NOT NULL "
        "AND visible_at <= ? AND delivery_count >= ? ORDER BY position",
        (ns, queue, now, config[1]),
    ).fetchall()
    for (rowid,) in rows:
        _move(conn, rowid, config[0], queue)
    return config[0] if rows else None


class SqliteQueue:
    """queue_basic, _visibility, _dead_letter, _delayed and _priority."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}

    # -- wake-ups for long polling -------------------------------------------------------------

    def _notify(self, ns: str, *queues: str | None) -> None:
        for queue in queues:
            for waiter in self._waiters.pop((ns, queue or ""), set()):
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self, ns: str, queue: str, seconds: float) -> None:
        """Until something is enqueued or released in the queue, or `seconds` pass."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((ns, queue), set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, seconds)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get((ns, queue))
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[(ns, queue)]

    # -- basic ---------------------------------------------------------------------------------

    async def _enqueue(self, queue: str, message: Incoming, ctx: CallContext) -> str:
        message_id = secrets.token_urlsafe(16)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO queue_messages (ns, queue, message_id, payload, attributes, "
                "priority, enqueue_time, visible_at, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ns,
                    queue,
                    message_id,
                    message.payload,
                    json.dumps(message.attributes),
                    message.priority,
                    time.time_ns(),
                    message.due,
                    _next_position(conn),
                ),
            )

        await self.db.write(job)
        self._notify(ns, queue)
        return message_id

    async def enqueue(
        self, request: basic_pb.EnqueueRequest, ctx: CallContext
    ) -> basic_pb.EnqueueResponse:
        queue, message = _incoming(request)
        return basic_pb.EnqueueResponse(message_id=await self._enqueue(queue, message, ctx))

    async def _lease(
        self, queue: str, count: int, wait: float, lease: float, ctx: CallContext
    ) -> list[basic_pb.Message]:
        ns = ctx.namespace
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (wait if remaining is None else min(wait, remaining))

        def job(
            conn: sqlite3.Connection,
        ) -> tuple[list[basic_pb.Message], float | None, str | None]:
            now = time.time()
            dlq = _dead_letter_expired(conn, ns, queue, now)
            rows = conn.execute(
                f"SELECT rowid, {MESSAGE_COLUMNS} FROM queue_messages WHERE ns = ? AND queue = ? "
                "AND visible_at <= ? ORDER BY priority DESC, position LIMIT ?",
                (ns, queue, now, count),
            ).fetchall()
            messages = []
            for rowid, *fields in rows:
                receipt = secrets.token_urlsafe(24)
                conn.execute(
                    "UPDATE queue_messages SET receipt = ?, visible_at = ?, "
                    "delivery_count = delivery_count + 1 WHERE rowid = ?",
                    (receipt, now + lease, rowid),
                )
                fields[4] += 1  # delivery_count, this delivery included
                messages.append(_to_message(tuple(fields), receipt))
            upcoming = conn.execute(
                "SELECT min(visible_at) FROM queue_messages WHERE ns = ? AND queue = ? "
                "AND visible_at > ?",
                (ns, queue, now),
            ).fetchone()[0]
            return messages, upcoming, dlq  # upcoming: the next lease end or due time, or None

        while True:
            messages, upcoming, dlq = await self.db.write(job)
            if dlq is not None:
                self._notify(ns, dlq)
            left = deadline - time.monotonic()
            if messages or left <= 0:
                return messages
            if upcoming is not None:
                left = min(left, max(0.0, upcoming - time.time()) + 0.001)
            await self._wait(ns, queue, left)

    async def dequeue(
        self, request: basic_pb.DequeueRequest, ctx: CallContext
    ) -> basic_pb.DequeueResponse:
        queue, count, wait = validation.dequeue(request)
        messages = await self._lease(queue, count, wait, DEFAULT_VISIBILITY, ctx)
        return basic_pb.DequeueResponse(messages=messages)

    async def peek(self, request: basic_pb.PeekRequest, ctx: CallContext) -> basic_pb.PeekResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> tuple[list[basic_pb.Message], str | None]:
            now = time.time()
            dlq = _dead_letter_expired(conn, ns, queue, now)
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM queue_messages WHERE ns = ? AND queue = ? "
                "AND visible_at <= ? ORDER BY priority DESC, position LIMIT ?",
                (ns, queue, now, count),
            ).fetchall()
            return [_to_message(r) for r in rows], dlq

        messages, dlq = await self.db.write(job)
        if dlq is not None:
            self._notify(ns, dlq)
        return basic_pb.PeekResponse(messages=messages)

    async def ack(self, request: basic_pb.AckRequest, ctx: CallContext) -> basic_pb.AckResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "DELETE FROM queue_messages WHERE receipt = ? AND ns = ? AND queue = ? "
                "AND visible_at > ?",
                (receipt, ns, queue, time.time()),
            )
            if cursor.rowcount == 0:
                raise receipt_not_found(queue)

        await self.db.write(job)
        return basic_pb.AckResponse()

    # -- visibility ----------------------------------------------------------------------------

    async def dequeue_with_timeout(
        self, request: visibility_pb.DequeueWithTimeoutRequest, ctx: CallContext
    ) -> visibility_pb.DequeueWithTimeoutResponse:
        queue, count, wait = validation.dequeue(request)
        lease = validation.lease(request)
        messages = await self._lease(queue, count, wait, lease, ctx)
        return visibility_pb.DequeueWithTimeoutResponse(messages=messages)

    async def extend_visibility(
        self, request: visibility_pb.ExtendVisibilityRequest, ctx: CallContext
    ) -> visibility_pb.ExtendVisibilityResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        lease = validation.lease(request)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> float:
            now = time.time()
            cursor = conn.execute(
                "UPDATE queue_messages SET visible_at = ? WHERE receipt = ? AND ns = ? "
                "AND queue = ? AND visible_at > ?",
                (now + lease, receipt, ns, queue, now),
            )
            if cursor.rowcount == 0:
                raise receipt_not_found(queue)
            return now + lease

        ends = Timestamp()
        ends.FromNanoseconds(int(await self.db.write(job) * 1e9))
        return visibility_pb.ExtendVisibilityResponse(lease_expire_time=ends)

    async def release(
        self, request: visibility_pb.ReleaseRequest, ctx: CallContext
    ) -> visibility_pb.ReleaseResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT rowid, delivery_count FROM queue_messages WHERE receipt = ? AND ns = ? "
                "AND queue = ? AND visible_at > ?",
                (receipt, ns, queue, time.time()),
            ).fetchone()
            if row is None:
                raise receipt_not_found(queue)
            config = _dead_letter_config(conn, ns, queue)
            if config is not None and row[1] >= config[1]:
                _move(conn, row[0], config[0], queue)
                return config[0]
            conn.execute(
                "UPDATE queue_messages SET receipt = NULL, visible_at = 0 WHERE rowid = ?",
                (row[0],),
            )
            return None

        dlq = await self.db.write(job)
        self._notify(ns, queue, dlq)
        return visibility_pb.ReleaseResponse()

    # -- dead letter ---------------------------------------------------------------------------

    async def configure_dead_letter(
        self, request: dlq_pb.ConfigureDeadLetterRequest, ctx: CallContext
    ) -> dlq_pb.ConfigureDeadLetterResponse:
        queue = validation.queue_name(request.queue)
        ns = ctx.namespace
        config = validation.dead_letter(queue, request.dead_letter_queue, request.max_deliveries)
        if config is None:
            statement = "DELETE FROM queue_dead_letter WHERE ns = ? AND queue = ?"
            params: tuple[Any, ...] = (ns, queue)
        else:
            statement = (
                "INSERT INTO queue_dead_letter (ns, queue, dead_letter_queue, max_deliveries) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (ns, queue) DO UPDATE SET "
                "dead_letter_queue = excluded.dead_letter_queue, "
                "max_deliveries = excluded.max_deliveries"
            )
            params = (ns, queue, *config)
        await self.db.write(lambda c: c.execute(statement, params).rowcount)
        return dlq_pb.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dlq_pb.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dlq_pb.GetDeadLetterConfigResponse:
        queue = validation.queue_name(request.queue)
        config = await self.db.read(lambda c: _dead_letter_config(c, ctx.namespace, queue))
        if config is None:
            return dlq_pb.GetDeadLetterConfigResponse(configured=False)
        return dlq_pb.GetDeadLetterConfigResponse(
            configured=True, dead_letter_queue=config[0], max_deliveries=config[1]
        )

    async def redrive_dead_letters(
        self, request: dlq_pb.RedriveDeadLettersRequest, ctx: CallContext
    ) -> dlq_pb.RedriveDeadLettersResponse:
        queue = validation.queue_name(request.queue)
        limit = validation.redrive_count(request.max_messages)
        ns = ctx.namespace

        def job(conn: sqlite3.Connection) -> tuple[int, str]:
            now = time.time()
            _dead_letter_expired(conn, ns, queue, now)
            config = _dead_letter_config(conn, ns, queue)
            if config is None:
                raise FailedPrecondition(
                    f"queue {queue!r} has no dead-letter configuration",
                    reason="DEAD_LETTER_NOT_CONFIGURED",
                    queue=queue,
                )
            rows = conn.execute(
                "SELECT rowid FROM queue_messages WHERE ns = ? AND queue = ? "
                "AND source_queue = ? AND visible_at <= ? ORDER BY position LIMIT ?",
                (ns, config[0], queue, now, limit),
            ).fetchall()
            for (rowid,) in rows:
                _move(conn, rowid, queue, None)
            return len(rows), config[0]

        moved, dlq = await self.db.write(job)
        self._notify(ns, queue, dlq)
        return dlq_pb.RedriveDeadLettersResponse(moved=moved)

    # -- delayed and priority ------------------------------------------------------------------

    async def enqueue_delayed(
        self, request: delayed_pb.EnqueueDelayedRequest, ctx: CallContext
    ) -> delayed_pb.EnqueueDelayedResponse:
        queue, message = _incoming(request)
        due = validation.deliver_at(request, time.time())
        message_id = await self._enqueue(queue, replace(message, due=due), ctx)
        deliver_time = Timestamp()
        deliver_time.FromNanoseconds(int(due * 1e9))
        return delayed_pb.EnqueueDelayedResponse(message_id=message_id, deliver_time=deliver_time)

    async def get_scheduled_count(
        self, request: delayed_pb.GetScheduledCountRequest, ctx: CallContext
    ) -> delayed_pb.GetScheduledCountResponse:
        queue = validation.queue_name(request.queue)
        row = await self.db.read(
            lambda c: c.execute(
                "SELECT count(*) FROM queue_messages WHERE ns = ? AND queue = ? "
                "AND receipt IS NULL AND visible_at > ?",
                (ctx.namespace, queue, time.time()),
            ).fetchone()
        )
        return delayed_pb.GetScheduledCountResponse(count=int(row[0]))

    async def enqueue_with_priority(
        self, request: priority_pb.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority_pb.EnqueueWithPriorityResponse:
        queue, message = _incoming(request, priority=validation.priority(request.priority))
        message_id = await self._enqueue(queue, message, ctx)
        return priority_pb.EnqueueWithPriorityResponse(message_id=message_id)
