"""Queue basic, visibility, dead-letter, delayed and priority on `prism_queue_messages`.

One row per message. `visible_at` is both the due time of a delayed message and the end of a
lease, so "visible" is `visible_at <= statement_timestamp()` and a lease is live while its
`receipt` is set and `visible_at` is ahead; times are the database's clock, so several Prism
servers sharing the database agree. `position` comes from a sequence when a message enters a
queue (enqueue, dead-lettering, redrive) and never changes otherwise, so a redelivered message
keeps its place. Consumers lease with `SELECT ... FOR UPDATE SKIP LOCKED`: concurrent Dequeues
(from any number of servers) never lease the same message and never wait for each other.

Long polling waits for a local wake-up (an Enqueue/Release/redrive through this plugin), the next
due time or lease end in the queue, or POLL_SECONDS — whichever comes first — so a message
enqueued through another server is seen within POLL_SECONDS; no connection is held while waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed_pb
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility_pb

from plugins.postgres.db import Conn, Database
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, NotFound

DEFAULT_VISIBILITY = 30.0
POLL_SECONDS = 0.5
NOW = "statement_timestamp()"
MESSAGE_COLUMNS = (
    "message_id, payload, attributes::text, enqueue_time, delivery_count, priority, position"
)

# Messages of queue %(q)s whose lease ended after their last allowed delivery go to the back of
# the dead-letter queue, in their order; returns the DLQ once per moved message.
DEAD_LETTER_EXPIRED = f"""
WITH cfg AS (
    SELECT dead_letter_queue, max_deliveries FROM prism_queue_dead_letter
    WHERE ns = %(ns)s AND queue = %(q)s
), moving AS (
    SELECT m.message_id FROM prism_queue_messages m, cfg
    WHERE m.ns = %(ns)s AND m.queue = %(q)s AND m.receipt IS NOT NULL
      AND m.visible_at <= {NOW} AND m.delivery_count >= cfg.max_deliveries
    ORDER BY m.position FOR UPDATE OF m SKIP LOCKED
), numbered AS (
    SELECT message_id, nextval('prism_queue_position') AS pos FROM moving
)
UPDATE prism_queue_messages m SET queue = cfg.dead_letter_queue, source_queue = m.queue,
    position = numbered.pos, delivery_count = 0, receipt = NULL, visible_at = '-infinity'
FROM numbered, cfg
WHERE m.ns = %(ns)s AND m.message_id = numbered.message_id
RETURNING cfg.dead_letter_queue
"""

LEASE = f"""
WITH picked AS (
    SELECT message_id FROM prism_queue_messages
    WHERE ns = %(ns)s AND queue = %(q)s AND visible_at <= {NOW}
    ORDER BY priority DESC, position LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE prism_queue_messages m SET receipt = gen_random_uuid()::text,
    visible_at = {NOW} + make_interval(secs => %(lease)s::float8),
    delivery_count = m.delivery_count + 1
FROM picked WHERE m.ns = %(ns)s AND m.message_id = picked.message_id
RETURNING m.message_id, m.payload, m.attributes::text, m.enqueue_time, m.delivery_count,
    m.priority, m.position, m.receipt
"""

UPCOMING = f"""
SELECT extract(epoch FROM min(visible_at) - {NOW})::float8 FROM prism_queue_messages
WHERE ns = %(ns)s AND queue = %(q)s AND visible_at > {NOW}
"""


def _to_message(row: tuple[Any, ...], receipt: str = "") -> basic_pb.Message:
    enqueued: datetime = row[3]
    message = basic_pb.Message(
        message_id=row[0],
        payload=bytes(row[1]),
        attributes=json.loads(row[2]),
        delivery_count=row[4],
        priority=row[5],
        receipt_handle=receipt,
    )
    message.enqueue_time.FromDatetime(enqueued)
    return message


def _receipt_not_found(queue: str) -> NotFound:
    return NotFound(
        "receipt handle is not a live lease of this queue (acked, released, expired, "
        "redelivered or never issued)",
        reason="RECEIPT_NOT_FOUND",
        queue=queue,
    )


async def _dead_letter_expired(conn: Conn, ns: str, queue: str) -> str | None:
    """Apply the dead-letter rule to expired leases; the DLQ when it received any."""
    cur = await conn.execute(DEAD_LETTER_EXPIRED, {"ns": ns, "q": queue})
    row = await cur.fetchone()
    return None if row is None else str(row[0])


class PostgresQueue:
    """queue_basic, _visibility, _dead_letter, _delayed and _priority."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._changed: dict[tuple[str, str], asyncio.Event] = {}

    # -- wake-ups for long polling -------------------------------------------------------------

    def _notify(self, ns: str, *queues: str | None) -> None:
        for queue in queues:
            event = self._changed.pop((ns, queue or ""), None)
            if event is not None:
                event.set()

    async def _wait(self, ns: str, queue: str, seconds: float) -> None:
        event = self._changed.setdefault((ns, queue), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # -- basic ---------------------------------------------------------------------------------

    async def _enqueue(
        self, request: Any, ctx: CallContext, *, priority: int = 0, delay: float = 0.0
    ) -> str:
        """Insert the message of any Enqueue* request (they share queue/payload/attributes)."""
        queue = validation.queue_name(request.queue)
        payload = validation.value(request.payload, "payload")
        attributes = validation.attributes(request.attributes)
        message_id = secrets.token_urlsafe(16)
        async with self.db.connection(ctx) as conn:
            await conn.execute(
                "INSERT INTO prism_queue_messages (ns, message_id, queue, payload, attributes, "
                "priority, enqueue_time, visible_at, position) VALUES (%s, %s, %s, %s, %s, %s, "
                f"{NOW}, {NOW} + make_interval(secs => %s::float8), "
                "nextval('prism_queue_position'))",
                (
                    ctx.namespace,
                    message_id,
                    queue,
                    payload,
                    json.dumps(attributes),
                    priority,
                    delay,
                ),
            )
        self._notify(ctx.namespace, queue)
        return message_id

    async def enqueue(
        self, request: basic_pb.EnqueueRequest, ctx: CallContext
    ) -> basic_pb.EnqueueResponse:
        return basic_pb.EnqueueResponse(message_id=await self._enqueue(request, ctx))

    async def _lease(
        self, queue: str, count: int, wait: float, lease: float, ctx: CallContext
    ) -> list[basic_pb.Message]:
        ns = ctx.namespace
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (wait if remaining is None else min(wait, remaining))
        params = {"ns": ns, "q": queue, "n": count, "lease": lease}

        async def job(conn: Conn) -> tuple[list[tuple[Any, ...]], float | None, str | None]:
            async with conn.transaction():
                dlq = await _dead_letter_expired(conn, ns, queue)
                cur = await conn.execute(LEASE, params)
                rows = await cur.fetchall()
                upcoming = None
                if not rows and deadline > time.monotonic():
                    cur = await conn.execute(UPCOMING, params)
                    found = await cur.fetchone()
                    upcoming = None if found is None else found[0]
            return rows, upcoming, dlq

        while True:
            async with self.db.connection(ctx) as conn:
                rows, upcoming, dlq = await job(conn)
            if dlq is not None:
                self._notify(ns, dlq)
            left = deadline - time.monotonic()
            if rows or left <= 0:
                rows.sort(key=lambda r: (-r[5], r[6]))  # priority descending, then FIFO
                return [_to_message(r, r[7]) for r in rows]
            pause = min(left, POLL_SECONDS)
            if upcoming is not None:
                pause = min(pause, upcoming + 0.001)
            await self._wait(ns, queue, pause)

    async def dequeue(
        self, request: basic_pb.DequeueRequest, ctx: CallContext
    ) -> basic_pb.DequeueResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        wait = validation.wait_time(request.wait_time, request.HasField("wait_time"))
        messages = await self._lease(queue, count, wait, DEFAULT_VISIBILITY, ctx)
        return basic_pb.DequeueResponse(messages=messages)

    async def peek(self, request: basic_pb.PeekRequest, ctx: CallContext) -> basic_pb.PeekResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        ns = ctx.namespace
        async with self.db.connection(ctx) as conn, conn.transaction():
            dlq = await _dead_letter_expired(conn, ns, queue)
            cur = await conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM prism_queue_messages WHERE ns = %s "
                f"AND queue = %s AND visible_at <= {NOW} "
                "ORDER BY priority DESC, position LIMIT %s",
                (ns, queue, count),
            )
            rows = await cur.fetchall()
        if dlq is not None:
            self._notify(ns, dlq)
        return basic_pb.PeekResponse(messages=[_to_message(r) for r in rows])

    async def ack(self, request: basic_pb.AckRequest, ctx: CallContext) -> basic_pb.AckResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                "DELETE FROM prism_queue_messages WHERE receipt = %s AND ns = %s AND queue = %s "
                f"AND visible_at > {NOW}",
                (receipt, ctx.namespace, queue),
            )
            if cur.rowcount == 0:
                raise _receipt_not_found(queue)
        return basic_pb.AckResponse()

    # -- visibility ----------------------------------------------------------------------------

    async def dequeue_with_timeout(
        self, request: visibility_pb.DequeueWithTimeoutRequest, ctx: CallContext
    ) -> visibility_pb.DequeueWithTimeoutResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        wait = validation.wait_time(request.wait_time, request.HasField("wait_time"))
        lease = validation.visibility_timeout(
            request.visibility_timeout, request.HasField("visibility_timeout")
        )
        messages = await self._lease(queue, count, wait, lease, ctx)
        return visibility_pb.DequeueWithTimeoutResponse(messages=messages)

    async def extend_visibility(
        self, request: visibility_pb.ExtendVisibilityRequest, ctx: CallContext
    ) -> visibility_pb.ExtendVisibilityResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        lease = validation.visibility_timeout(
            request.visibility_timeout, request.HasField("visibility_timeout")
        )
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                f"UPDATE prism_queue_messages SET visible_at = {NOW} + "
                "make_interval(secs => %s::float8) WHERE receipt = %s AND ns = %s "
                f"AND queue = %s AND visible_at > {NOW} RETURNING visible_at",
                (lease, receipt, ctx.namespace, queue),
            )
            row = await cur.fetchone()
        if row is None:
            raise _receipt_not_found(queue)
        ends = Timestamp()
        ends.FromDatetime(row[0])
        return visibility_pb.ExtendVisibilityResponse(lease_expire_time=ends)

    async def release(
        self, request: visibility_pb.ReleaseRequest, ctx: CallContext
    ) -> visibility_pb.ReleaseResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        ns = ctx.namespace
        async with self.db.connection(ctx) as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT m.message_id, c.dead_letter_queue, "
                "m.delivery_count >= c.max_deliveries FROM prism_queue_messages m "
                "LEFT JOIN prism_queue_dead_letter c ON c.ns = m.ns AND c.queue = m.queue "
                "WHERE m.receipt = %s AND m.ns = %s AND m.queue = %s "
                f"AND m.visible_at > {NOW} FOR UPDATE OF m",
                (receipt, ns, queue),
            )
            row = await cur.fetchone()
            if row is None:
                raise _receipt_not_found(queue)
            message_id, dlq, exhausted = row
            if exhausted:
                await conn.execute(
                    "UPDATE prism_queue_messages SET queue = %s, source_queue = queue, "
                    "position = nextval('prism_queue_position'), delivery_count = 0, "
                    "receipt = NULL, visible_at = '-infinity' "
                    "WHERE ns = %s AND message_id = %s",
                    (dlq, ns, message_id),
                )
            else:
                await conn.execute(
                    "UPDATE prism_queue_messages SET receipt = NULL, "
                    "visible_at = '-infinity' WHERE ns = %s AND message_id = %s",
                    (ns, message_id),
                )
        self._notify(ns, queue, dlq if exhausted else None)
        return visibility_pb.ReleaseResponse()

    # -- dead letter ---------------------------------------------------------------------------

    async def configure_dead_letter(
        self, request: dlq_pb.ConfigureDeadLetterRequest, ctx: CallContext
    ) -> dlq_pb.ConfigureDeadLetterResponse:
        queue = validation.queue_name(request.queue)
        config = validation.dead_letter(queue, request.dead_letter_queue, request.max_deliveries)
        async with self.db.connection(ctx) as conn:
            if config is None:
                await conn.execute(
                    "DELETE FROM prism_queue_dead_letter WHERE ns = %s AND queue = %s",
                    (ctx.namespace, queue),
                )
            else:
                await conn.execute(
                    "INSERT INTO prism_queue_dead_letter (ns, queue, dead_letter_queue, "
                    "max_deliveries) VALUES (%s, %s, %s, %s) ON CONFLICT (ns, queue) DO UPDATE "
                    "SET dead_letter_queue = excluded.dead_letter_queue, "
                    "max_deliveries = excluded.max_deliveries",
                    (ctx.namespace, queue, *config),
                )
        return dlq_pb.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dlq_pb.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dlq_pb.GetDeadLetterConfigResponse:
        queue = validation.queue_name(request.queue)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                "SELECT dead_letter_queue, max_deliveries FROM prism_queue_dead_letter "
                "WHERE ns = %s AND queue = %s",
                (ctx.namespace, queue),
            )
            row = await cur.fetchone()
        if row is None:
            return dlq_pb.GetDeadLetterConfigResponse(configured=False)
        return dlq_pb.GetDeadLetterConfigResponse(
            configured=True, dead_letter_queue=row[0], max_deliveries=row[1]
        )

    async def redrive_dead_letters(
        self, request: dlq_pb.RedriveDeadLettersRequest, ctx: CallContext
    ) -> dlq_pb.RedriveDeadLettersResponse:
        queue = validation.queue_name(request.queue)
        limit = validation.redrive_count(request.max_messages)
        ns = ctx.namespace
        async with self.db.connection(ctx) as conn, conn.transaction():
            await _dead_letter_expired(conn, ns, queue)
            cur = await conn.execute(
                "SELECT dead_letter_queue FROM prism_queue_dead_letter "
                "WHERE ns = %s AND queue = %s",
                (ns, queue),
            )
            config = await cur.fetchone()
            if config is None:
                raise FailedPrecondition(
                    f"queue {queue!r} has no dead-letter configuration",
                    reason="DEAD_LETTER_NOT_CONFIGURED",
                    queue=queue,
                )
            cur = await conn.execute(
                f"""
                    WITH moving AS (
                        SELECT message_id FROM prism_queue_messages
                        WHERE ns = %(ns)s AND queue = %(dlq)s AND source_queue = %(q)s
                          AND visible_at <= {NOW}
                        ORDER BY position LIMIT %(n)s FOR UPDATE SKIP LOCKED
                    ), numbered AS (
                        SELECT message_id, nextval('prism_queue_position') AS pos FROM moving
                    )
                    UPDATE prism_queue_messages m SET queue = %(q)s, source_queue = NULL,
                        position = numbered.pos, delivery_count = 0, receipt = NULL,
                        visible_at = '-infinity'
                    FROM numbered WHERE m.ns = %(ns)s AND m.message_id = numbered.message_id
                    """,
                {"ns": ns, "q": queue, "dlq": config[0], "n": limit},
            )
            moved = cur.rowcount
        self._notify(ns, queue)
        return dlq_pb.RedriveDeadLettersResponse(moved=moved)

    # -- delayed and priority ------------------------------------------------------------------

    async def enqueue_delayed(
        self, request: delayed_pb.EnqueueDelayedRequest, ctx: CallContext
    ) -> delayed_pb.EnqueueDelayedResponse:
        now = time.time()
        due = validation.deliver_at(request, now)
        message_id = await self._enqueue(request, ctx, delay=due - now)
        deliver_time = Timestamp()
        deliver_time.FromNanoseconds(int(due * 1e9))
        return delayed_pb.EnqueueDelayedResponse(message_id=message_id, deliver_time=deliver_time)

    async def get_scheduled_count(
        self, request: delayed_pb.GetScheduledCountRequest, ctx: CallContext
    ) -> delayed_pb.GetScheduledCountResponse:
        queue = validation.queue_name(request.queue)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM prism_queue_messages WHERE ns = %s AND queue = %s "
                f"AND receipt IS NULL AND visible_at > {NOW}",
                (ctx.namespace, queue),
            )
            row = await cur.fetchone()
        return delayed_pb.GetScheduledCountResponse(count=0 if row is None else int(row[0]))

    async def enqueue_with_priority(
        self, request: priority_pb.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority_pb.EnqueueWithPriorityResponse:
        priority = validation.priority(request.priority)
        message_id = await self._enqueue(request, ctx, priority=priority)
        return priority_pb.EnqueueWithPriorityResponse(message_id=message_id)
