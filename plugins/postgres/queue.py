"""Queue basic, visibility, dead-letter, delayed and priority on a messages table.

The table is `prism_queue_messages` unless the slot's config names another (`table`), so
several slots or deployments can keep their queues apart in one database; such a table is
created on start as a copy of `prism_queue_messages` (columns, defaults and indexes), and the
name only ever reaches SQL as a quoted identifier. Dead-letter configurations stay in the
shared `prism_queue_dead_letter`, keyed by messages table as well as namespace and queue, so
slots on different tables never see each other's; dead-lettering and redrive move messages
within the slot's table. A plain Dequeue leases for the slot's `visibility_timeout`
(30 s unless the config sets another).

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
import re
import secrets
import time
from datetime import datetime
from typing import Any, LiteralString

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed_pb
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility_pb
from psycopg import sql

from plugins.postgres.db import Conn, Database
from plugins.postgres.schema import MIGRATION_LOCK_ID
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, InvalidArgument
from plugins.runtime.queues import receipt_not_found

DEFAULT_TABLE = "prism_queue_messages"
#: a table name the slot's config may give: one unquoted lower-case PostgreSQL identifier
TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
DEFAULT_VISIBILITY = 30.0
POLL_SECONDS = 0.5
MESSAGE_COLUMNS = (
    "message_id, payload, attributes::text, enqueue_time, delivery_count, priority, position"
)

# The statements below name the slot's table as {messages} and the database clock as {now};
# QueueStatements composes them with the table as an sql.Identifier (and as an sql.Literal for
# {table}, the key of the slot's dead-letter configurations).

# Messages of queue %(q)s whose lease ended after their last allowed delivery go to the back of
# the dead-letter queue, in their order; returns the DLQ once per moved message.
DEAD_LETTER_EXPIRED = """
WITH cfg AS (
    SELECT dead_letter_queue, max_deliveries FROM prism_queue_dead_letter
    WHERE messages_table = {table} AND ns = %(ns)s AND queue = %(q)s
), moving AS (
    SELECT m.message_id FROM {messages} m, cfg
    WHERE m.ns = %(ns)s AND m.queue = %(q)s AND m.receipt IS NOT NULL
      AND m.visible_at <= {now} AND m.delivery_count >= cfg.max_deliveries
    ORDER BY m.position FOR UPDATE OF m SKIP LOCKED
), numbered AS (
    SELECT message_id, nextval('prism_queue_position') AS pos FROM moving
)
UPDATE {messages} m SET queue = cfg.dead_letter_queue, source_queue = m.queue,
    position = numbered.pos, delivery_count = 0, receipt = NULL, visible_at = '-infinity'
FROM numbered, cfg
WHERE m.ns = %(ns)s AND m.message_id = numbered.message_id
RETURNING cfg.dead_letter_queue
"""

LEASE = """
WITH picked AS (
    SELECT message_id FROM {messages}
    WHERE ns = %(ns)s AND queue = %(q)s AND visible_at <= {now}
    ORDER BY priority DESC, position LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {messages} m SET receipt = gen_random_uuid()::text,
    visible_at = {now} + make_interval(secs => %(lease)s::float8),
    delivery_count = m.delivery_count + 1
FROM picked WHERE m.ns = %(ns)s AND m.message_id = picked.message_id
RETURNING m.message_id, m.payload, m.attributes::text, m.enqueue_time, m.delivery_count,
    m.priority, m.position, m.receipt
"""

UPCOMING = """
SELECT extract(epoch FROM min(visible_at) - {now})::float8 FROM {messages}
WHERE ns = %(ns)s AND queue = %(q)s AND visible_at > {now}
"""

ENQUEUE = (
    "INSERT INTO {messages} (ns, message_id, queue, payload, attributes, priority, "
    "enqueue_time, visible_at, position) VALUES (%s, %s, %s, %s, %s, %s, {now}, "
    "{now} + make_interval(secs => %s::float8), nextval('prism_queue_position'))"
)

PEEK = (
    "SELECT " + MESSAGE_COLUMNS + " FROM {messages} WHERE ns = %s AND queue = %s "
    "AND visible_at <= {now} ORDER BY priority DESC, position LIMIT %s"
)

ACK = "DELETE FROM {messages} WHERE receipt = %s AND ns = %s AND queue = %s AND visible_at > {now}"

EXTEND = (
    "UPDATE {messages} SET visible_at = {now} + make_interval(secs => %s::float8) "
    "WHERE receipt = %s AND ns = %s AND queue = %s AND visible_at > {now} RETURNING visible_at"
)

# The leased message of a receipt, its DLQ and whether its deliveries are exhausted
RELEASE_LOOKUP = (
    "SELECT m.message_id, c.dead_letter_queue, m.delivery_count >= c.max_deliveries "
    "FROM {messages} m LEFT JOIN prism_queue_dead_letter c "
    "ON c.messages_table = {table} AND c.ns = m.ns AND c.queue = m.queue "
    "WHERE m.receipt = %s AND m.ns = %s AND m.queue = %s AND m.visible_at > {now} "
    "FOR UPDATE OF m"
)

RELEASE_TO_DEAD_LETTER = (
    "UPDATE {messages} SET queue = %s, source_queue = queue, "
    "position = nextval('prism_queue_position'), delivery_count = 0, receipt = NULL, "
    "visible_at = '-infinity' WHERE ns = %s AND message_id = %s"
)

RELEASE = (
    "UPDATE {messages} SET receipt = NULL, visible_at = '-infinity' "
    "WHERE ns = %s AND message_id = %s"
)

REDRIVE = """
WITH moving AS (
    SELECT message_id FROM {messages}
    WHERE ns = %(ns)s AND queue = %(dlq)s AND source_queue = %(q)s AND visible_at <= {now}
    ORDER BY position LIMIT %(n)s FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT message_id, nextval('prism_queue_position') AS pos FROM moving
)
UPDATE {messages} m SET queue = %(q)s, source_queue = NULL, position = numbered.pos,
    delivery_count = 0, receipt = NULL, visible_at = '-infinity'
FROM numbered WHERE m.ns = %(ns)s AND m.message_id = numbered.message_id
"""

DEAD_LETTER_CONFIG = (
    "SELECT dead_letter_queue, max_deliveries FROM prism_queue_dead_letter "
    "WHERE messages_table = {table} AND ns = %s AND queue = %s"
)

UNSET_DEAD_LETTER = (
    "DELETE FROM prism_queue_dead_letter WHERE messages_table = {table} AND ns = %s AND queue = %s"
)

SET_DEAD_LETTER = (
    "INSERT INTO prism_queue_dead_letter (messages_table, ns, queue, dead_letter_queue, "
    "max_deliveries) VALUES ({table}, %s, %s, %s, %s) "
    "ON CONFLICT (messages_table, ns, queue) DO UPDATE "
    "SET dead_letter_queue = excluded.dead_letter_queue, max_deliveries = excluded.max_deliveries"
)

SCHEDULED = (
    "SELECT count(*) FROM {messages} WHERE ns = %s AND queue = %s AND receipt IS NULL "
    "AND visible_at > {now}"
)

CREATE_TABLE = "CREATE TABLE IF NOT EXISTS {messages} (LIKE " + DEFAULT_TABLE + " INCLUDING ALL)"

# Columns (name, type, collation, nullability) in which a table differs from
# prism_queue_messages, in either direction: 0 for a table of the same shape.
SHAPE_DIFFERENCES = """
WITH cols AS (
    SELECT attrelid, attname, atttypid, attcollation, attnotnull FROM pg_attribute
    WHERE attnum > 0 AND NOT attisdropped
), want AS (
    SELECT attname, atttypid, attcollation, attnotnull FROM cols
    WHERE attrelid = 'prism_queue_messages'::regclass
), have AS (
    SELECT attname, atttypid, attcollation, attnotnull FROM cols
    WHERE attrelid = quote_ident(%(t)s)::regclass
)
SELECT count(*) FROM ((TABLE want EXCEPT TABLE have) UNION ALL (TABLE have EXCEPT TABLE want)) d
"""


def table_name(value: object) -> str:
    """The `table` config key, checked here as well as by the registry schema because the name
    becomes an SQL identifier."""
    if value is None:
        return DEFAULT_TABLE
    if not isinstance(value, str) or not TABLE_NAME.fullmatch(value):
        raise InvalidArgument("table", f"must match ^{TABLE_NAME.pattern}$")
    return value


def default_visibility(value: object) -> float:
    """The `visibility_timeout` config key: a plain Dequeue's lease, in seconds."""
    if value is None:
        return DEFAULT_VISIBILITY
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument("visibility_timeout", "must be a number of seconds")
    if not 0 < value <= validation.MAX_VISIBILITY_SECONDS:
        raise InvalidArgument("visibility_timeout", "must be above 0 and at most 12 hours")
    return float(value)


class QueueStatements:
    """The queue statements composed for one table."""

    def __init__(self, table: str) -> None:
        def compose(template: LiteralString) -> sql.Composed:
            return sql.SQL(template).format(
                messages=sql.Identifier(table),
                table=sql.Literal(table),
                now=sql.SQL("statement_timestamp()"),
            )

        self.dead_letter_expired = compose(DEAD_LETTER_EXPIRED)
        self.lease = compose(LEASE)
        self.upcoming = compose(UPCOMING)
        self.enqueue = compose(ENQUEUE)
        self.peek = compose(PEEK)
        self.ack = compose(ACK)
        self.extend = compose(EXTEND)
        self.release_lookup = compose(RELEASE_LOOKUP)
        self.release_to_dead_letter = compose(RELEASE_TO_DEAD_LETTER)
        self.release = compose(RELEASE)
        self.redrive = compose(REDRIVE)
        self.dead_letter_config = compose(DEAD_LETTER_CONFIG)
        self.unset_dead_letter = compose(UNSET_DEAD_LETTER)
        self.set_dead_letter = compose(SET_DEAD_LETTER)
        self.scheduled = compose(SCHEDULED)
        self.create_table = compose(CREATE_TABLE)


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


class PostgresQueue:
    """queue_basic, _visibility, _dead_letter, _delayed and _priority."""

    def __init__(
        self,
        db: Database,
        *,
        table: str = DEFAULT_TABLE,
        visibility: float = DEFAULT_VISIBILITY,
    ) -> None:
        self.db = db
        self.table = table
        self.visibility = visibility
        self.sql = QueueStatements(table)
        self._changed: dict[tuple[str, str], asyncio.Event] = {}

    async def prepare(self, ctx: CallContext) -> None:
        """Create the slot's table (under the migration lock, so servers starting together do
        not race) and refuse one that exists with another shape: every call would fail."""
        if self.table == DEFAULT_TABLE:
            return
        async with self.db.connection(ctx) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            await conn.execute(self.sql.create_table)
            cur = await conn.execute(SHAPE_DIFFERENCES, {"t": self.table})
            row = await cur.fetchone()
        if row is None or row[0]:
            raise InvalidArgument(
                "table", f"{self.table!r} exists and is not a queue messages table"
            )

    async def _dead_letter_expired(self, conn: Conn, ns: str, queue: str) -> str | None:
        """Apply the dead-letter rule to expired leases; the DLQ when it received any."""
        cur = await conn.execute(self.sql.dead_letter_expired, {"ns": ns, "q": queue})
        row = await cur.fetchone()
        return None if row is None else str(row[0])

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
                self.sql.enqueue,
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
                dlq = await self._dead_letter_expired(conn, ns, queue)
                cur = await conn.execute(self.sql.lease, params)
                rows = await cur.fetchall()
                upcoming = None
                if not rows and deadline > time.monotonic():
                    cur = await conn.execute(self.sql.upcoming, params)
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
        queue, count, wait = validation.dequeue(request)
        messages = await self._lease(queue, count, wait, self.visibility, ctx)
        return basic_pb.DequeueResponse(messages=messages)

    async def peek(self, request: basic_pb.PeekRequest, ctx: CallContext) -> basic_pb.PeekResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        ns = ctx.namespace
        async with self.db.connection(ctx) as conn, conn.transaction():
            dlq = await self._dead_letter_expired(conn, ns, queue)
            cur = await conn.execute(self.sql.peek, (ns, queue, count))
            rows = await cur.fetchall()
        if dlq is not None:
            self._notify(ns, dlq)
        return basic_pb.PeekResponse(messages=[_to_message(r) for r in rows])

    async def ack(self, request: basic_pb.AckRequest, ctx: CallContext) -> basic_pb.AckResponse:
        queue = validation.queue_name(request.queue)
        receipt = validation.receipt_handle(request.receipt_handle)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(self.sql.ack, (receipt, ctx.namespace, queue))
            if cur.rowcount == 0:
                raise receipt_not_found(queue)
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
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(self.sql.extend, (lease, receipt, ctx.namespace, queue))
            row = await cur.fetchone()
        if row is None:
            raise receipt_not_found(queue)
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
            cur = await conn.execute(self.sql.release_lookup, (receipt, ns, queue))
            row = await cur.fetchone()
            if row is None:
                raise receipt_not_found(queue)
            message_id, dlq, exhausted = row
            if exhausted:
                await conn.execute(self.sql.release_to_dead_letter, (dlq, ns, message_id))
            else:
                await conn.execute(self.sql.release, (ns, message_id))
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
                await conn.execute(self.sql.unset_dead_letter, (ctx.namespace, queue))
            else:
                await conn.execute(self.sql.set_dead_letter, (ctx.namespace, queue, *config))
        return dlq_pb.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dlq_pb.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dlq_pb.GetDeadLetterConfigResponse:
        queue = validation.queue_name(request.queue)
        async with self.db.connection(ctx) as conn:
            cur = await conn.execute(self.sql.dead_letter_config, (ctx.namespace, queue))
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
            await self._dead_letter_expired(conn, ns, queue)
            cur = await conn.execute(self.sql.dead_letter_config, (ns, queue))
            config = await cur.fetchone()
            if config is None:
                raise FailedPrecondition(
                    f"queue {queue!r} has no dead-letter configuration",
                    reason="DEAD_LETTER_NOT_CONFIGURED",
                    queue=queue,
                )
            cur = await conn.execute(
                self.sql.redrive, {"ns": ns, "q": queue, "dlq": config[0], "n": limit}
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
            cur = await conn.execute(self.sql.scheduled, (ctx.namespace, queue))
            row = await cur.fetchone()
        return delayed_pb.GetScheduledCountResponse(count=0 if row is None else int(row[0]))

    async def enqueue_with_priority(
        self, request: priority_pb.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority_pb.EnqueueWithPriorityResponse:
        priority = validation.priority(request.priority)
        message_id = await self._enqueue(request, ctx, priority=priority)
        return priority_pb.EnqueueWithPriorityResponse(message_id=message_id)
