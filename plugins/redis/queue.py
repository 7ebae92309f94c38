"""Queue basic, visibility, dead-letter, delayed and priority on sorted sets, hashes and Lua
(plugins/redis/queue_scripts.py). Times come from the Redis clock, so several plugin processes
sharing one Redis agree on due times and lease ends.

Long polling re-runs the lease script whenever this process enqueues or releases into the queue,
and at least every POLL_INTERVAL otherwise (another process may have enqueued, a delayed message
may have become due, a lease may have expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed_pb
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility_pb

from plugins.redis.connection import RedisConnection
from plugins.redis.keys import Keyspace
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition
from plugins.runtime.queues import receipt_not_found

DEFAULT_VISIBILITY = 30.0
POLL_INTERVAL = 0.1
#: values per message in a LEASE/PEEK reply: id, payload, attributes, enqueue ms, priority, count
FIELDS = 6


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _messages(reply: list[Any], tokens: list[str] | None = None) -> list[basic_pb.Message]:
    """Messages of a flat LEASE/PEEK reply; leased ones get `<id>.<token>` receipt handles."""
    out = []
    for n, i in enumerate(range(0, len(reply), FIELDS)):
        message_id, payload, attributes, enqueued, priority, count = reply[i : i + FIELDS]
        ident = message_id.decode("ascii")
        out.append(
            basic_pb.Message(
                message_id=ident,
                payload=bytes(payload),
                attributes=json.loads(attributes),
                enqueue_time=_timestamp(int(enqueued)),
                delivery_count=int(count),
                priority=int(priority),
                receipt_handle="" if tokens is None else f"{ident}.{tokens[n]}",
            )
        )
    return out


class RedisQueue:
    """queue_basic, _visibility, _dead_letter, _delayed and _priority."""

    def __init__(self, conn: RedisConnection, key_prefix: bytes) -> None:
        self.conn = conn
        self.key_prefix = key_prefix
        self._changed: dict[tuple[str, str], asyncio.Event] = {}

    def _run(self, ctx: CallContext, script: Any, queue: str, *args: bytes | str | int) -> Any:
        ks = Keyspace(self.key_prefix, ctx.namespace)
        return self.conn.eval(ctx, script, [], [ks.queue_prefix, ks.message_prefix, queue, *args])

    def _notify(self, ctx: CallContext, queue: str) -> None:
        event = self._changed.pop((ctx.namespace, queue), None)
        if event is not None:
            event.set()

    def _changes(self, ctx: CallContext, queue: str) -> asyncio.Event:
        """The event the next local enqueue/release into `queue` sets; taken before looking at
        the queue so a change in between is not missed."""
        return self._changed.setdefault((ctx.namespace, queue), asyncio.Event())

    # -- basic ---------------------------------------------------------------------------------

    async def _enqueue(
        self,
        request: Any,
        ctx: CallContext,
        priority: int = 0,
        schedule: tuple[str, int] = ("now", 0),
    ) -> tuple[str, int]:
        """Append the (validated) message of any Enqueue* request, due as `schedule` says
        (("delay", ms) or ("at", unix ms)); returns (message id, due unix ms)."""
        queue = validation.queue_name(request.queue)
        payload = validation.value(request.payload, "payload")
        attributes = json.dumps(validation.attributes(request.attributes))
        message_id = secrets.token_urlsafe(16)
        due = await self._run(
            ctx, self.conn.scripts.q_enqueue, queue, message_id, payload, attributes, priority,
            *schedule,
        )  # fmt: skip
        self._notify(ctx, queue)
        return message_id, int(due)

    async def enqueue(
        self, request: basic_pb.EnqueueRequest, ctx: CallContext
    ) -> basic_pb.EnqueueResponse:
        message_id, _ = await self._enqueue(request, ctx)
        return basic_pb.EnqueueResponse(message_id=message_id)

    async def _lease(
        self, queue: str, count: int, wait: float, lease: float, ctx: CallContext
    ) -> list[basic_pb.Message]:
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (wait if remaining is None else min(wait, remaining))
        while True:
            changed = self._changes(ctx, queue)
            tokens = [secrets.token_urlsafe(12) for _ in range(count)]
            reply = await self._run(
                ctx, self.conn.scripts.q_lease, queue, count, _ms(lease), *tokens
            )
            left = deadline - time.monotonic()
            if reply or left <= 0:
                return _messages(reply, tokens)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, POLL_INTERVAL))

    async def dequeue(
        self, request: basic_pb.DequeueRequest, ctx: CallContext
    ) -> basic_pb.DequeueResponse:
        queue, count, wait = validation.dequeue(request)
        messages = await self._lease(queue, count, wait, DEFAULT_VISIBILITY, ctx)
        return basic_pb.DequeueResponse(messages=messages)

    async def peek(self, request: basic_pb.PeekRequest, ctx: CallContext) -> basic_pb.PeekResponse:
        queue = validation.queue_name(request.queue)
        count = validation.max_messages(request.max_messages)
        reply = await self._run(ctx, self.conn.scripts.q_peek, queue, count)
        return basic_pb.PeekResponse(messages=_messages(reply))

    async def _handle_call(
        self, ctx: CallContext, script: Any, queue: str, handle: str, *args: int
    ) -> int:
        """Run a script taking a receipt handle; a malformed handle is one never issued."""
        message_id, _, token = validation.receipt_handle(handle).rpartition(".")
        if not message_id or not token:
            raise receipt_not_found(queue)
        return int(await self._run(ctx, script, queue, message_id, token, *args))

    async def ack(self, request: basic_pb.AckRequest, ctx: CallContext) -> basic_pb.AckResponse:
        queue = validation.queue_name(request.queue)
        if not await self._handle_call(ctx, self.conn.scripts.q_ack, queue, request.receipt_handle):
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
        handle = validation.receipt_handle(request.receipt_handle)
        lease = validation.lease(request)
        ends = await self._handle_call(ctx, self.conn.scripts.q_extend, queue, handle, _ms(lease))
        if ends < 0:
            raise receipt_not_found(queue)
        return visibility_pb.ExtendVisibilityResponse(lease_expire_time=_timestamp(ends))

    async def release(
        self, request: visibility_pb.ReleaseRequest, ctx: CallContext
    ) -> visibility_pb.ReleaseResponse:
        queue = validation.queue_name(request.queue)
        handle = request.receipt_handle
        if not await self._handle_call(ctx, self.conn.scripts.q_release, queue, handle):
            raise receipt_not_found(queue)
        self._notify(ctx, queue)
        return visibility_pb.ReleaseResponse()

    # -- dead letter ---------------------------------------------------------------------------

    async def configure_dead_letter(
        self, request: dlq_pb.ConfigureDeadLetterRequest, ctx: CallContext
    ) -> dlq_pb.ConfigureDeadLetterResponse:
        queue = validation.queue_name(request.queue)
        config = validation.dead_letter(queue, request.dead_letter_queue, request.max_deliveries)
        key = Keyspace(self.key_prefix, ctx.namespace).queue_key(queue, "c")
        if config is None:
            await self.conn.run(ctx, lambda r: r.delete(key))
        else:
            items: list[str | int] = ["dlq", config[0], "max", config[1]]
            await self.conn.run(ctx, lambda r: r.hset(key, items=items))
        return dlq_pb.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dlq_pb.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dlq_pb.GetDeadLetterConfigResponse:
        queue = validation.queue_name(request.queue)
        key = Keyspace(self.key_prefix, ctx.namespace).queue_key(queue, "c")
        reply: list[Any] = await self.conn.run(ctx, lambda r: r.hmget(key, ["dlq", "max"]))
        dlq, deliveries = reply
        if dlq is None:
            return dlq_pb.GetDeadLetterConfigResponse(configured=False)
        return dlq_pb.GetDeadLetterConfigResponse(
            configured=True, dead_letter_queue=dlq.decode("ascii"), max_deliveries=int(deliveries)
        )

    async def redrive_dead_letters(
        self, request: dlq_pb.RedriveDeadLettersRequest, ctx: CallContext
    ) -> dlq_pb.RedriveDeadLettersResponse:
        queue = validation.queue_name(request.queue)
        limit = validation.redrive_count(request.max_messages)
        moved = int(await self._run(ctx, self.conn.scripts.q_redrive, queue, limit))
        if moved < 0:
            raise FailedPrecondition(
                f"queue {queue!r} has no dead-letter configuration",
                reason="DEAD_LETTER_NOT_CONFIGURED",
                queue=queue,
            )
        if moved:
            self._notify(ctx, queue)
        return dlq_pb.RedriveDeadLettersResponse(moved=moved)

    # -- delayed and priority ------------------------------------------------------------------

    async def enqueue_delayed(
        self, request: delayed_pb.EnqueueDelayedRequest, ctx: CallContext
    ) -> delayed_pb.EnqueueDelayedResponse:
        validation.queue_name(request.queue)
        now = time.time()
        due = validation.deliver_at(request, now)
        if request.WhichOneof("schedule") == "delay":
            schedule = ("delay", round((due - now) * 1000))
        else:
            schedule = ("at", round(due * 1000))
        message_id, due_ms = await self._enqueue(request, ctx, schedule=schedule)
        return delayed_pb.EnqueueDelayedResponse(
            message_id=message_id, deliver_time=_timestamp(due_ms)
        )

    async def get_scheduled_count(
        self, request: delayed_pb.GetScheduledCountRequest, ctx: CallContext
    ) -> delayed_pb.GetScheduledCountResponse:
        queue = validation.queue_name(request.queue)
        count = await self._run(ctx, self.conn.scripts.q_scheduled, queue)
        return delayed_pb.GetScheduledCountResponse(count=int(count))

    async def enqueue_with_priority(
        self, request: priority_pb.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority_pb.EnqueueWithPriorityResponse:
        priority = validation.priority(request.priority)
        message_id, _ = await self._enqueue(request, ctx, priority=priority)
        return priority_pb.EnqueueWithPriorityResponse(message_id=message_id)
