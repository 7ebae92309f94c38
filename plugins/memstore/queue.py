"""Queue basic/visibility/dead_letter/delayed/priority in memory.

Per queue: a heap of visible candidates ordered by (-priority, entry sequence), a heap of
scheduled (delayed) messages by due time, and a heap of lease expiries. Heaps are invalidated
lazily: an entry is acted on only if the message still is in the state the entry describes.
`_settle` brings a queue up to date (expired leases end, due messages become visible,
dead-lettering happens); every call settles the queues it touches, and the plugin's sweeper
settles all of them so waiters and dead-letter queues progress without traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dead_letter
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition
from plugins.runtime.queues import receipt_not_found

DEFAULT_VISIBILITY = 30.0


@dataclass(slots=True)
class _Message:
    message_id: str
    payload: bytes
    attributes: dict[str, str]
    enqueue_ns: int
    priority: int
    seq: int  # order of entering this queue: FIFO among equal priorities
    due: float  # time.time() instant from which it may be delivered
    delivery_count: int = 0
    handle: str | None = None
    lease_expires: float = 0.0  # time.monotonic() instant, meaningful while handle is set
    origin: str | None = None  # for a message in a dead-letter queue: the queue it came from
    in_ready: bool = False

    def proto(self) -> basic.Message:
        m = basic.Message(
            message_id=self.message_id,
            payload=self.payload,
            attributes=self.attributes,
            delivery_count=self.delivery_count,
            priority=self.priority,
            receipt_handle=self.handle or "",
        )
        m.enqueue_time.FromNanoseconds(self.enqueue_ns)
        return m


@dataclass(slots=True)
class _Queue:
    name: str
    messages: dict[str, _Message] = field(default_factory=dict)
    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, seq, id)
    scheduled: list[tuple[float, int, str]] = field(default_factory=list)  # (due, seq, id)
    lease_expiries: list[tuple[float, str]] = field(default_factory=list)  # (expires, handle)
    leases: dict[str, str] = field(default_factory=dict)  # live receipt handle → message id
    dead_letter: tuple[str, int] | None = None  # (dead-letter queue, max deliveries)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        """Wake every long-poller waiting on this queue."""
        self.changed.set()
        self.changed = asyncio.Event()

    def make_visible(self, msg: _Message) -> None:
        if not msg.in_ready:
            msg.in_ready = True
            heapq.heappush(self.ready, (-msg.priority, msg.seq, msg.message_id))

    def visible(self, entry: tuple[int, int, str]) -> _Message | None:
        msg = self.messages.get(entry[2])
        if msg is None or not msg.in_ready or msg.seq != entry[1]:
            return None
        return msg

    def next_event_in(self) -> float | None:
        """Seconds until a scheduled message falls due or a lease expires, if any."""
        waits = []
        if self.scheduled:
            waits.append(self.scheduled[0][0] - time.time())
        if self.lease_expiries:
            waits.append(self.lease_expiries[0][0] - time.monotonic())
        return max(0.0, min(waits)) if waits else None


class MemstoreQueues:
    """All five Queue interfaces on per-(namespace, queue) in-memory structures."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._seq = 0

    def _queue(self, namespace: str, name: str, field_name: str = "queue") -> _Queue:
        key = (namespace, validation.queue_name(name, field_name))
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(name)
        return q

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # state transitions -------------------------------------------------------------------
    def _end_lease(self, namespace: str, q: _Queue, msg: _Message) -> None:
        """A lease ended without an Ack: visible again, or off to the dead-letter queue."""
        if msg.handle is not None:
            q.leases.pop(msg.handle, None)
        msg.handle = None
        if q.dead_letter is not None and msg.delivery_count >= q.dead_letter[1]:
            del q.messages[msg.message_id]
            dlq = self._queue(namespace, q.dead_letter[0])
            moved = _Message(
                msg.message_id,
                msg.payload,
                msg.attributes,
                msg.enqueue_ns,
                msg.priority,
                self._next_seq(),
                time.time(),
                origin=q.name,
            )
            dlq.messages[moved.message_id] = moved
            dlq.make_visible(moved)
            dlq.notify()
        else:
            q.make_visible(msg)
        q.notify()

    def _settle(self, namespace: str, q: _Queue) -> None:
        now = time.monotonic()
        while q.lease_expiries and q.lease_expiries[0][0] <= now:
            _, handle = heapq.heappop(q.lease_expiries)
            msg = q.messages.get(q.leases.get(handle, ""))
            if msg is not None and msg.handle == handle and msg.lease_expires <= now:
                self._end_lease(namespace, q, msg)
        wall = time.time()
        became_due = False
        while q.scheduled and q.scheduled[0][0] <= wall:
            _, _, message_id = heapq.heappop(q.scheduled)
            msg = q.messages.get(message_id)
            if msg is not None:
                q.make_visible(msg)
                became_due = True
        if became_due:
            q.notify()

    def sweep(self) -> None:
        for (namespace, _), q in list(self._queues.items()):
            self._settle(namespace, q)

    def _append(
        self,
        q: _Queue,
        payload: bytes,
        attributes: Mapping[str, str],
        prio: int = 0,
        due: float | None = None,
    ) -> str:
        validation.value(payload, "payload")
        attrs = validation.attributes(attributes)
        message_id = secrets.token_urlsafe(16)
        now = time.time()
        msg = _Message(
            message_id, payload, attrs, time.time_ns(), prio, self._next_seq(), due or now
        )
        q.messages[message_id] = msg
        if msg.due > now:
            heapq.heappush(q.scheduled, (msg.due, msg.seq, message_id))
        else:
            q.make_visible(msg)
            q.notify()
        return message_id

    def _take(self, q: _Queue, count: int, lease: float) -> list[basic.Message]:
        taken: list[basic.Message] = []
        expires = time.monotonic() + lease
        while q.ready and len(taken) < count:
            msg = q.visible(heapq.heappop(q.ready))
            if msg is None:
                continue
            msg.in_ready = False
            msg.delivery_count += 1
            msg.handle = secrets.token_urlsafe(18)
            msg.lease_expires = expires
            q.leases[msg.handle] = msg.message_id
            heapq.heappush(q.lease_expiries, (expires, msg.handle))
            taken.append(msg.proto())
        return taken

    async def _dequeue(
        self,
        ctx: CallContext,
        request: basic.DequeueRequest | visibility.DequeueWithTimeoutRequest,
        lease: float,
    ) -> list[basic.Message]:
        name, count, wait = validation.dequeue(request)
        q = self._queue(ctx.namespace, name)
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (wait if remaining is None else min(wait, remaining))
        while True:
            self._settle(ctx.namespace, q)
            taken = self._take(q, count, lease)
            left = deadline - time.monotonic()
            if taken or left <= 0:
                return taken
            changed = q.changed
            upcoming = q.next_event_in()
            timeout = left if upcoming is None else min(left, upcoming + 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    def _leased(self, ctx: CallContext, name: str, handle: str) -> tuple[_Queue, _Message]:
        q = self._queue(ctx.namespace, name)
        validation.receipt_handle(handle)
        self._settle(ctx.namespace, q)
        msg = q.messages.get(q.leases.get(handle, ""))
        if msg is None or msg.handle != handle:
            raise receipt_not_found(name)
        return q, msg

    # queue_basic -------------------------------------------------------------------------
    async def enqueue(
        self, request: basic.EnqueueRequest, ctx: CallContext
    ) -> basic.EnqueueResponse:
        q = self._queue(ctx.namespace, request.queue)
        message_id = self._append(q, request.payload, request.attributes)
        return basic.EnqueueResponse(message_id=message_id)

    async def dequeue(
        self, request: basic.DequeueRequest, ctx: CallContext
    ) -> basic.DequeueResponse:
        messages = await self._dequeue(ctx, request, DEFAULT_VISIBILITY)
        return basic.DequeueResponse(messages=messages)

    async def peek(self, request: basic.PeekRequest, ctx: CallContext) -> basic.PeekResponse:
        q = self._queue(ctx.namespace, request.queue)
        count = validation.max_messages(request.max_messages)
        self._settle(ctx.namespace, q)
        entries = heapq.nsmallest(count, (e for e in q.ready if q.visible(e) is not None))
        return basic.PeekResponse(messages=[q.messages[e[2]].proto() for e in entries])

    async def ack(self, request: basic.AckRequest, ctx: CallContext) -> basic.AckResponse:
        q, msg = self._leased(ctx, request.queue, request.receipt_handle)
        del q.leases[request.receipt_handle]
        del q.messages[msg.message_id]
        return basic.AckResponse()

    # queue_visibility --------------------------------------------------------------------
    async def dequeue_with_timeout(
        self, request: visibility.DequeueWithTimeoutRequest, ctx: CallContext
    ) -> visibility.DequeueWithTimeoutResponse:
        lease = validation.lease(request)
        messages = await self._dequeue(ctx, request, lease)
        return visibility.DequeueWithTimeoutResponse(messages=messages)

    async def extend_visibility(
        self, request: visibility.ExtendVisibilityRequest, ctx: CallContext
    ) -> visibility.ExtendVisibilityResponse:
        lease = validation.lease(request)
        q, msg = self._leased(ctx, request.queue, request.receipt_handle)
        msg.lease_expires = time.monotonic() + lease
        heapq.heappush(q.lease_expiries, (msg.lease_expires, request.receipt_handle))
        response = visibility.ExtendVisibilityResponse()
        response.lease_expire_time.FromNanoseconds(time.time_ns() + round(lease * 1e9))
        return response

    async def release(
        self, request: visibility.ReleaseRequest, ctx: CallContext
    ) -> visibility.ReleaseResponse:
        q, msg = self._leased(ctx, request.queue, request.receipt_handle)
        self._end_lease(ctx.namespace, q, msg)
        return visibility.ReleaseResponse()

    # queue_dead_letter -------------------------------------------------------------------
    async def configure_dead_letter(
        self, request: dead_letter.ConfigureDeadLetterRequest, ctx: CallContext
    ) -> dead_letter.ConfigureDeadLetterResponse:
        q = self._queue(ctx.namespace, request.queue)
        q.dead_letter = validation.dead_letter(
            request.queue, request.dead_letter_queue, request.max_deliveries
        )
        return dead_letter.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dead_letter.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dead_letter.GetDeadLetterConfigResponse:
        q = self._queue(ctx.namespace, request.queue)
        if q.dead_letter is None:
            return dead_letter.GetDeadLetterConfigResponse(configured=False)
        return dead_letter.GetDeadLetterConfigResponse(
            configured=True,
            dead_letter_queue=q.dead_letter[0],
            max_deliveries=q.dead_letter[1],
        )

    async def redrive_dead_letters(
        self, request: dead_letter.RedriveDeadLettersRequest, ctx: CallContext
    ) -> dead_letter.RedriveDeadLettersResponse:
        q = self._queue(ctx.namespace, request.queue)
        limit = validation.redrive_count(request.max_messages)
        if q.dead_letter is None:
            raise FailedPrecondition(
                f"queue {request.queue!r} has no dead-letter configuration",
                reason="DEAD_LETTER_NOT_CONFIGURED",
                queue=request.queue,
            )
        self._settle(ctx.namespace, q)
        dlq = self._queue(ctx.namespace, q.dead_letter[0])
        self._settle(ctx.namespace, dlq)
        candidates = sorted(
            (m for m in dlq.messages.values() if m.origin == q.name and m.in_ready),
            key=lambda m: m.seq,
        )[:limit]
        for m in candidates:
            del dlq.messages[m.message_id]
            m.seq = self._next_seq()
            m.delivery_count = 0
            m.origin = None
            m.in_ready = False
            q.messages[m.message_id] = m
            q.make_visible(m)
        if candidates:
            q.notify()
        return dead_letter.RedriveDeadLettersResponse(moved=len(candidates))

    # queue_delayed -----------------------------------------------------------------------
    async def enqueue_delayed(
        self, request: delayed.EnqueueDelayedRequest, ctx: CallContext
    ) -> delayed.EnqueueDelayedResponse:
        q = self._queue(ctx.namespace, request.queue)
        due = validation.deliver_at(request, time.time())
        message_id = self._append(q, request.payload, request.attributes, 0, due)
        deliver_time = Timestamp()
        deliver_time.FromNanoseconds(round(due * 1e9))
        return delayed.EnqueueDelayedResponse(message_id=message_id, deliver_time=deliver_time)

    async def get_scheduled_count(
        self, request: delayed.GetScheduledCountRequest, ctx: CallContext
    ) -> delayed.GetScheduledCountResponse:
        q = self._queue(ctx.namespace, request.queue)
        now = time.time()
        return delayed.GetScheduledCountResponse(
            count=sum(1 for m in q.messages.values() if m.due > now)
        )

    # queue_priority ----------------------------------------------------------------------
    async def enqueue_with_priority(
        self, request: priority.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority.EnqueueWithPriorityResponse:
        q = self._queue(ctx.namespace, request.queue)
        prio = validation.priority(request.priority)
        message_id = self._append(q, request.payload, request.attributes, prio)
        return priority.EnqueueWithPriorityResponse(message_id=message_id)
