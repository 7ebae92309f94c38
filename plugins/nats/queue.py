"""Queue basic/visibility/dead_letter: messages in JetStream, leases in a JetStream KV.

Why not a JetStream work-queue consumer: its ack wait is one value per consumer (the contract
wants a lease length per Dequeue and ExtendVisibility that may shorten it), it cannot show
what is visible without leasing it (Peek), and it redelivers nak'ed/expired messages in the
order their leases ended, not in their original place. So the plugin does the leasing itself,
with JetStream as the only store and compare-and-set as the only lock:

- Queue Q is the JetStream stream `<stream prefix>_<ns>_q_Q`; a message of priority P is the
  serialized `Message` proto on subject `<root>.q.Q.<P>`, and its stream sequence is its place
  among the messages of its priority (FIFO). Delivery reads the priorities present (stream info
  with per-subject counts) from the highest down, each with a subject-filtered reader. Ack
  deletes a message from the stream; dead-lettering and redrive publish it to the other queue's
  stream (with header Prism-Origin naming the queue it came from) and delete it from the first.
- A delivered message has a state in the slot's KV bucket `<stream prefix>_state`, key
  `m.<ns>.Q.<seq>`: {"n": delivery count, "until": lease end (unix ns; 0 when the lease has
  ended), "h": the lease's nonce}. Every lease change is a KV update with the revision read, so
  concurrent Dequeues never lease one message twice and a stale handle can never win.
- A receipt handle is "<seq>.<nonce>": valid while the state of (this queue, seq) carries that
  nonce and its lease has not ended. Lease ends are judged by the wall clock (unix ns), so any
  plugin instance can judge them; expired leases are settled (dead-lettered when they used up
  max_deliveries) at the start of every Dequeue, Peek and Redrive of the queue.
- The dead-letter configuration is key `c.<ns>.Q` of the same bucket.
- A scheduled message (EnqueueDelayed) carries header Prism-Due (unix ns) and stays invisible
  until then; its place is where it was appended, as the contract wants. GetScheduledCount reads
  the queue's headers (headers-only consumer), so it costs one pass over the queue.

Dequeue and Peek cost a handful of requests whatever the queue's length: two stream infos at
once (the state keys of the queue's leases, the priorities present and the first sequence), a
concurrent read of the states this instance did not write itself (it trusts the live leases it
wrote; a compare-and-set still decides every change, but a lease another instance released or
shortened stays hidden from this one until the end it wrote), then a direct "next message on
this subject from sequence N" get per message read, stepping over the sequences leases hide
without asking. A Dequeue leasing a message that had no state reads it once more after winning
(an Ack that finished in between leaves no state either). Concurrent Dequeues of one instance
do not all race for the first visible message: each starts behind the reads and picks of the
others (a race with another instance is lost at the compare-and-set and the Dequeue looks
again). A long poll wakes on the queue's subject (enqueues are published there) or every
POLL_SECONDS for lease ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_delayed_pb2 as delayed_pb
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility_pb

from plugins.nats.connection import STATE_BUCKET, NatsConnection, namespace_token
from plugins.nats.stream import BATCH, JetStreams
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition
from plugins.runtime.queues import receipt_not_found

KIND = "q"
ORIGIN = "Prism-Origin"
DUE = "Prism-Due"
DEFAULT_VISIBILITY_SECONDS = 30.0
POLL_SECONDS = 0.25
# A message being acked or moved has until = -(when it was claimed). Should the plugin die
# before finishing, the claim lapses after this long and the message is visible again (at least
# once: it may then be delivered, or found in the dead-letter queue, twice).
CLAIM_GRACE_NS = 60 * 1_000_000_000
# How long a lease this instance won keeps hiding its message from this instance's later scans
# whose state snapshot may predate it (longer than any scan lasts).
PICK_MEMORY_SECONDS = 30.0


def _due(msg: Msg | api.RawStreamMsg) -> int:
    """When a scheduled message becomes visible (unix ns; 0 for ordinary ones)."""
    return int((msg.headers or {}).get(DUE, 0))


@dataclass
class _State:
    n: int
    until: int
    h: str
    revision: int

    def hides(self, now: int) -> bool:
        """Leased right now, or on its way out of the queue."""
        return self.until > now or (self.until < 0 and now + self.until < CLAIM_GRACE_NS)

    @classmethod
    def claim(cls, n: int) -> _State:
        return cls(n, -time.time_ns(), "", 0)

    def encode(self) -> bytes:
        return json.dumps({"n": self.n, "until": self.until, "h": self.h}).encode()

    @classmethod
    def decode(cls, data: bytes, revision: int) -> _State:
        raw = json.loads(data)
        return cls(int(raw["n"]), int(raw["until"]), str(raw["h"]), revision)


class _Picks:
    """The messages this plugin instance's Dequeues are leasing, or leased since a moment: its
    concurrent Dequeues step over each other's picks instead of all racing for the first
    visible message (the KV compare-and-set stays the lock; this only saves lost races)."""

    def __init__(self) -> None:
        self._at: dict[tuple[str, int], float] = {}  # inf while being leased
        self._order: collections.deque[tuple[float, tuple[str, int]]] = collections.deque()
        self._reading: set[tuple[str, str, int]] = set()

    def skip(self, stream: str, seq: int, since: float) -> bool:
        return self._at.get((stream, seq), -math.inf) >= since

    def reading(self, stream: str, subject: str, seq: int) -> bool:
        return (stream, subject, seq) in self._reading

    @contextlib.contextmanager
    def read(self, stream: str, subject: str, seq: int, announce: bool) -> Iterator[None]:
        """While a Dequeue reads the first message of `subject` from `seq` on: the others start
        behind it (whatever it finds there and can lease, it takes)."""
        if not announce:
            yield
            return
        self._reading.add((stream, subject, seq))
        try:
            yield
        finally:
            self._reading.discard((stream, subject, seq))

    def take(self, stream: str, seq: int) -> None:
        self._at[(stream, seq)] = math.inf

    def done(self, stream: str, seq: int) -> None:
        now = time.monotonic()
        self._at[(stream, seq)] = now
        self._order.append((now, (stream, seq)))
        while self._order and self._order[0][0] < now - PICK_MEMORY_SECONDS:
            at, pick = self._order.popleft()
            if self._at.get(pick) == at:
                del self._at[pick]


class _States(dict[int, _State]):
    """A queue's states by sequence, and the last sequence of the bucket's stream when they
    were listed: a state written right after that one (revision listed_at + 1) proves that no
    other state of the bucket changed since."""

    listed_at = 0


@dataclass
class _Visible:
    seq: int
    message: basic_pb.Message
    origin: str
    state: _State | None
    listed_at: int


class NatsQueue:
    """queue_basic, queue_visibility, queue_dead_letter, queue_delayed and queue_priority."""

    def __init__(self, conn: NatsConnection) -> None:
        self.conn = conn
        self.jetstreams = JetStreams(conn, KIND)
        self.picks = _Picks()
        # live leases this instance wrote, by queue (state key without its sequence) and sequence
        self._leases: dict[str, dict[int, _State]] = {}

    # keys and small helpers -------------------------------------------------------------------

    def _state_key(self, ctx: CallContext, queue: str, seq: int) -> str:
        return f"m.{namespace_token(ctx.namespace)}.{queue}.{seq}"

    def _config_key(self, ctx: CallContext, queue: str) -> str:
        return f"c.{namespace_token(ctx.namespace)}.{queue}"

    async def _kv(self) -> KeyValue:
        return await self.conn.bucket(STATE_BUCKET)

    async def _kv_stream(self) -> tuple[str, str]:
        """(JetStream stream of the bucket, its subject prefix), the bucket created if new."""
        await self._kv()
        name = f"{self.conn.settings.stream_prefix}_{STATE_BUCKET}"
        return f"KV_{name}", f"$KV.{name}."

    async def _get_state(self, ctx: CallContext, key: str) -> _State | None:
        async def get() -> _State | None:
            try:
                entry = await (await self._kv()).get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            return _State.decode(entry.value or b"{}", entry.revision or 0)

        return await self.conn.run(ctx, get)

    def _own(self, key: str) -> tuple[dict[int, _State], int]:
        """This instance's live leases of the queue of message state `key`, and its sequence."""
        queue_keys, _, seq = key.rpartition(".")
        return self._leases.setdefault(queue_keys, {}), int(seq)

    async def _put_state(
        self, ctx: CallContext, key: str, new: _State, old: _State | None
    ) -> _State | None:
        """Write `new` if the state is still `old` (None: absent); the written state, or None
        when someone else changed it first."""

        async def put() -> _State | None:
            kv = await self._kv()
            try:  # states are purged, never left as delete markers: absent is revision 0
                revision = await kv.update(key, new.encode(), last=old.revision if old else 0)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
            return _State(new.n, new.until, new.h, revision)

        written = await self.conn.run(ctx, put)
        leases, seq = self._own(key)
        if written is not None and written.h and written.until > 0:
            leases[seq] = written
        else:  # not a lease, or what we knew was stale
            leases.pop(seq, None)
        return written

    async def _drop_state(self, ctx: CallContext, key: str) -> None:
        """Remove a state entirely (no delete marker left behind)."""
        stream, prefix = await self.conn.run(ctx, self._kv_stream)
        await self.jetstreams.purge(ctx, stream, filter=prefix + key)

    async def _states(self, ctx: CallContext, queue: str) -> _States:
        """Every message state of the queue, by sequence: the bucket's stream lists the queue's
        state keys (one request); the live leases this instance wrote are taken as it knows
        them, the others are read at once (concurrent requests)."""
        stream, prefix = await self.conn.run(ctx, self._kv_stream)
        keys = self._state_key(ctx, queue, 0).rsplit(".", 1)[0]

        async def bucket() -> api.StreamState:
            info = await self.conn.js.stream_info(stream, subjects_filter=f"{prefix}{keys}.*")
            return info.state

        listing = await self.conn.run(ctx, bucket)
        listed = {int(s.rsplit(".", 1)[1]) for s in listing.subjects or {}}
        leases = self._leases.setdefault(keys, {})
        for gone in leases.keys() - listed:
            del leases[gone]
        now = time.time_ns()
        trusted = {seq: state for seq, state in leases.items() if state.until > now}
        seqs = sorted(listed - trusted.keys())
        read = [self._get_state(ctx, self._state_key(ctx, queue, seq)) for seq in seqs]
        found = zip(seqs, await asyncio.gather(*read), strict=True)
        states = _States(trusted | {seq: state for seq, state in found if state is not None})
        states.listed_at = listing.last_seq
        return states

    async def _visible(
        self, ctx: CallContext, queue: str, limit: int, take: bool = False
    ) -> list[_Visible]:
        """Up to `limit` visible messages in delivery order (priority descending, then FIFO),
        after settling expired leases; the states and the priorities present are read at once.
        With `take` (a Dequeue), the messages found are picks of this instance."""
        stream, base = self.jetstreams.names(ctx, queue)
        since = time.monotonic()
        states, (priorities, first) = await asyncio.gather(
            self._settle(ctx, queue), self._priorities(ctx, stream, base)
        )
        subjects = [f"{base}.{p}" for p in priorities]
        return await self._scan(ctx, stream, subjects, limit, states, None, since, first, take)

    async def _scan(
        self,
        ctx: CallContext,
        stream: str,
        subjects: list[str],
        limit: int,
        states: _States,
        wanted: Callable[[str], bool] | None = None,
        since: float = math.inf,
        first: int = 1,
        take: bool = False,
    ) -> list[_Visible]:
        """Up to `limit` visible messages of `subjects` (each read oldest first, in turn) whose
        Prism-Origin header passes `wanted`, from sequence `first` on. Each message read is one
        direct get of the next one on its subject; sequences whose states hide them, or that
        this instance picked since `since` or is reading for another Dequeue, are stepped over
        without a request. With `take`, what it finds are picks (released by
        `_Picks.done`) and the reads it makes are announced to the others."""
        now = time.time_ns()
        found: list[_Visible] = []
        hidden = {seq for seq, state in states.items() if state.hides(now)}

        def skip(seq: int) -> bool:
            return seq in hidden or self.picks.skip(stream, seq, since)

        try:
            for subject in subjects:
                cursor = first
                while len(found) < limit:
                    while skip(cursor) or (take and self.picks.reading(stream, subject, cursor)):
                        cursor += 1
                    with self.picks.read(stream, subject, cursor, take):
                        msg = await self._message(ctx, stream, cursor, next_on=subject)
                    if msg is None:
                        break
                    seq = cursor = msg.seq or 0
                    cursor += 1
                    origin = (msg.headers or {}).get(ORIGIN, "")
                    if skip(seq) or _due(msg) > now or (wanted and not wanted(origin)):
                        continue
                    state = states.get(seq)
                    message = basic_pb.Message.FromString(msg.data or b"")
                    message.delivery_count = state.n if state is not None else 0
                    found.append(_Visible(seq, message, origin, state, states.listed_at))
                    if take:
                        self.picks.take(stream, seq)
        except BaseException:
            for item in found if take else []:
                self.picks.done(stream, item.seq)
            raise
        return found

    async def _message(
        self, ctx: CallContext, stream: str, seq: int, next_on: str | None = None
    ) -> api.RawStreamMsg | None:
        """Message `seq` of `stream` or, with `next_on`, the first message on that subject
        (wildcards allowed) from `seq` on; None when there is none (or no stream)."""

        async def get() -> api.RawStreamMsg | None:
            try:
                return await self.conn.js.get_msg(
                    stream, seq, subject=next_on, next=next_on is not None
                )
            except nats.js.errors.NotFoundError:
                return None

        return await self.conn.run(ctx, get)

    async def _priorities(self, ctx: CallContext, stream: str, base: str) -> tuple[list[int], int]:
        """The priorities that have messages in the queue, highest first, and the sequence of
        its oldest message."""

        async def state() -> api.StreamState | None:
            try:
                info = await self.conn.js.stream_info(stream, subjects_filter=f"{base}.*")
            except nats.js.errors.NotFoundError:
                return None
            return info.state

        found = await self.conn.run(ctx, state)
        if found is None:
            return [], 1
        counts = found.subjects or {}
        present = (int(s.rsplit(".", 1)[1]) for s, n in counts.items() if n)
        return sorted(present, reverse=True), max(found.first_seq, 1)

    async def _store(
        self,
        ctx: CallContext,
        queue: str,
        message: basic_pb.Message,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Append `message` behind the queue's messages of its priority."""
        stream, base = self.jetstreams.names(ctx, queue)
        body = message.SerializeToString()
        subject = f"{base}.{message.priority}"
        capture = f"{base}.*"
        await self.jetstreams.publish(ctx, stream, subject, body, capture, headers=headers)

    # dead-letter configuration ----------------------------------------------------------------

    async def _config(self, ctx: CallContext, queue: str) -> tuple[str, int] | None:
        key = self._config_key(ctx, queue)

        async def get() -> tuple[str, int] | None:
            try:
                entry = await (await self._kv()).get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            raw = json.loads(entry.value or b"{}")
            return str(raw["dlq"]), int(raw["max"])

        return await self.conn.run(ctx, get)

    async def configure_dead_letter(
        self, request: dlq_pb.ConfigureDeadLetterRequest, ctx: CallContext
    ) -> dlq_pb.ConfigureDeadLetterResponse:
        queue = validation.queue_name(request.queue)
        config = validation.dead_letter(queue, request.dead_letter_queue, request.max_deliveries)
        key = self._config_key(ctx, queue)
        if config is None:
            await self._drop_state(ctx, key)
        else:
            body = json.dumps({"dlq": config[0], "max": config[1]}).encode()

            async def put() -> None:
                await (await self._kv()).put(key, body)

            await self.conn.run(ctx, put)
        return dlq_pb.ConfigureDeadLetterResponse()

    async def get_dead_letter_config(
        self, request: dlq_pb.GetDeadLetterConfigRequest, ctx: CallContext
    ) -> dlq_pb.GetDeadLetterConfigResponse:
        config = await self._config(ctx, validation.queue_name(request.queue))
        if config is None:
            return dlq_pb.GetDeadLetterConfigResponse()
        return dlq_pb.GetDeadLetterConfigResponse(
            configured=True, dead_letter_queue=config[0], max_deliveries=config[1]
        )

    async def _move(
        self,
        ctx: CallContext,
        source: str,
        seq: int,
        state: _State | None,
        target: str,
        origin: str,
        message: basic_pb.Message | None = None,
    ) -> bool:
        """Move message `seq` of `source` to the end of `target` (claiming it first, so it
        moves once); False when someone else claimed or removed it first."""
        key = self._state_key(ctx, source, seq)
        claimed = await self._put_state(ctx, key, _State.claim(state.n if state else 0), state)
        if claimed is None:
            return False
        stream, _ = self.jetstreams.names(ctx, source)
        if message is None or state is None:  # a claim from no state may outlive the message
            raw = await self._message(ctx, stream, seq)
            if raw is None:  # already gone: nothing to move
                await self._drop_state(ctx, key)
                return False
            message = message or basic_pb.Message.FromString(raw.data or b"")
        message.delivery_count = 0
        message.receipt_handle = ""
        await self._store(ctx, target, message, {ORIGIN: origin} if origin else None)
        await self._delete_message(ctx, stream, seq)
        await self._drop_state(ctx, key)
        return True

    async def _delete_message(self, ctx: CallContext, stream: str, seq: int) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.conn.run(ctx, lambda: self.conn.js.delete_msg(stream, seq))

    async def _settle(self, ctx: CallContext, queue: str) -> _States:
        """The queue's states, after ending the leases that expired: dead-lettered when they
        used up max_deliveries, visible again otherwise."""
        states = await self._states(ctx, queue)
        now = time.time_ns()
        expired = {seq: s for seq, s in states.items() if 0 < s.until <= now}
        if not expired:
            return states
        config = await self._config(ctx, queue)
        for seq, state in sorted(expired.items()):
            if config is not None and state.n >= config[1]:
                await self._move(ctx, queue, seq, state, config[0], queue)
                states.pop(seq)
                continue
            ended = await self._put_state(
                ctx, self._state_key(ctx, queue, seq), _State(state.n, 0, "", 0), state
            )
            if ended is not None:
                states[seq] = ended
        return states

    async def redrive_dead_letters(
        self, request: dlq_pb.RedriveDeadLettersRequest, ctx: CallContext
    ) -> dlq_pb.RedriveDeadLettersResponse:
        queue = validation.queue_name(request.queue)
        limit = validation.redrive_count(request.max_messages)
        config = await self._config(ctx, queue)
        if config is None:
            raise FailedPrecondition(
                f"queue {queue!r} has no dead-letter configuration",
                reason="DEAD_LETTER_NOT_CONFIGURED",
                queue=queue,
            )
        await self._settle(ctx, queue)
        dlq = config[0]
        states = await self._settle(ctx, dlq)
        moved = 0
        stream, base = self.jetstreams.names(ctx, dlq)
        # a redrive takes the oldest first, whatever their priority
        from_queue = await self._scan(
            ctx, stream, [f"{base}.*"], limit, states, lambda origin: origin == queue
        )
        for item in from_queue:
            if await self._move(ctx, dlq, item.seq, item.state, queue, "", item.message):
                moved += 1
        return dlq_pb.RedriveDeadLettersResponse(moved=moved)

    # queue_basic ------------------------------------------------------------------------------

    async def _append(
        self,
        ctx: CallContext,
        queue: str,
        request: (
            basic_pb.EnqueueRequest
            | delayed_pb.EnqueueDelayedRequest
            | priority_pb.EnqueueWithPriorityRequest
        ),
        due: int = 0,
        priority: int = 0,
    ) -> str:
        """Store a new message at the end of the queue (hidden until `due`, unix ns); its id."""
        message = basic_pb.Message(
            message_id=secrets.token_urlsafe(16),
            payload=validation.value(request.payload, "payload"),
            attributes=validation.attributes(request.attributes),
            priority=priority,
        )
        message.enqueue_time.FromNanoseconds(time.time_ns())
        await self._store(ctx, queue, message, {DUE: str(due)} if due > time.time_ns() else None)
        return message.message_id

    async def enqueue(
        self, request: basic_pb.EnqueueRequest, ctx: CallContext
    ) -> basic_pb.EnqueueResponse:
        queue = validation.queue_name(request.queue)
        return basic_pb.EnqueueResponse(message_id=await self._append(ctx, queue, request))

    # queue_priority ---------------------------------------------------------------------------

    async def enqueue_with_priority(
        self, request: priority_pb.EnqueueWithPriorityRequest, ctx: CallContext
    ) -> priority_pb.EnqueueWithPriorityResponse:
        queue = validation.queue_name(request.queue)
        priority = validation.priority(request.priority)
        message_id = await self._append(ctx, queue, request, priority=priority)
        return priority_pb.EnqueueWithPriorityResponse(message_id=message_id)

    # queue_delayed ----------------------------------------------------------------------------

    async def enqueue_delayed(
        self, request: delayed_pb.EnqueueDelayedRequest, ctx: CallContext
    ) -> delayed_pb.EnqueueDelayedResponse:
        queue = validation.queue_name(request.queue)
        due = int(validation.deliver_at(request, time.time()) * 1e9)
        response = delayed_pb.EnqueueDelayedResponse(
            message_id=await self._append(ctx, queue, request, due)
        )
        response.deliver_time.FromNanoseconds(due)
        return response

    async def get_scheduled_count(
        self, request: delayed_pb.GetScheduledCountRequest, ctx: CallContext
    ) -> delayed_pb.GetScheduledCountResponse:
        queue = validation.queue_name(request.queue)
        stream, _ = self.jetstreams.names(ctx, queue)
        if await self.jetstreams.info(ctx, stream) is None:
            return delayed_pb.GetScheduledCountResponse()
        now = time.time_ns()
        count = 0
        position = {"deliver_policy": api.DeliverPolicy.ALL, "headers_only": True}
        async with self.jetstreams.reader(ctx, stream, **position) as (sub, reader):
            remaining = reader.num_pending or 0
            while remaining > 0:
                msgs = await self.jetstreams.fetch(sub, min(BATCH, remaining))
                if not msgs:
                    break
                remaining -= len(msgs)
                count += sum(1 for msg in msgs if _due(msg) > now)
        return delayed_pb.GetScheduledCountResponse(count=count)

    async def dequeue(
        self, request: basic_pb.DequeueRequest, ctx: CallContext
    ) -> basic_pb.DequeueResponse:
        queue, limit, wait = validation.dequeue(request)
        leased = await self._lease(ctx, queue, limit, wait, DEFAULT_VISIBILITY_SECONDS)
        return basic_pb.DequeueResponse(messages=leased)

    async def dequeue_with_timeout(
        self, request: visibility_pb.DequeueWithTimeoutRequest, ctx: CallContext
    ) -> visibility_pb.DequeueWithTimeoutResponse:
        queue, limit, wait = validation.dequeue(request)
        lease = validation.lease(request)
        leased = await self._lease(ctx, queue, limit, wait, lease)
        return visibility_pb.DequeueWithTimeoutResponse(messages=leased)

    async def _lease(
        self, ctx: CallContext, queue: str, limit: int, wait: float, lease: float
    ) -> list[basic_pb.Message]:
        """Lease up to `limit` visible messages, long-polling up to `wait` seconds."""
        give_up = time.monotonic() + wait
        stream, _ = self.jetstreams.names(ctx, queue)
        async with self._wakeup(ctx, queue, wait) as woken:
            while True:

                async def lease_one(item: _Visible) -> basic_pb.Message | None:
                    nonce = secrets.token_urlsafe(12)
                    count = (item.state.n if item.state else 0) + 1
                    until = time.time_ns() + int(lease * 1e9)
                    key = self._state_key(ctx, queue, item.seq)
                    won = await self._put_state(
                        ctx, key, _State(count, until, nonce, 0), item.state
                    )
                    if won is None:  # a concurrent Dequeue leased it first
                        return None
                    # No state is also what an Ack leaves once it deleted the message: one that
                    # finished between our read of the message and our lease makes it a ghost.
                    # It wrote the bucket (lease, claim), so a lease written right after the
                    # states were listed needs no check.
                    changed = won.revision != item.listed_at + 1
                    if (
                        item.state is None
                        and changed
                        and await self._message(ctx, stream, item.seq) is None
                    ):
                        await self._drop_state(ctx, key)
                        return None
                    item.message.delivery_count = count
                    item.message.receipt_handle = f"{item.seq}.{nonce}"
                    return item.message

                visible = await self._visible(ctx, queue, limit, take=True)
                try:
                    leased = [m for m in await asyncio.gather(*map(lease_one, visible)) if m]
                finally:
                    for item in visible:
                        self.picks.done(stream, item.seq)
                if leased:
                    return leased
                if visible:  # lost every race to a concurrent Dequeue: look again at once
                    continue
                left = give_up - time.monotonic()
                if left <= 0:
                    return []
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(left, POLL_SECONDS))

    @contextlib.asynccontextmanager
    async def _wakeup(
        self, ctx: CallContext, queue: str, wait: float
    ) -> AsyncIterator[asyncio.Event]:
        """An event set by every enqueue to the queue while a long poll lasts."""
        woken = asyncio.Event()
        if wait <= 0:
            yield woken
            return

        async def on_enqueue(_: object) -> None:
            woken.set()

        stream, base = self.jetstreams.names(ctx, queue)
        # The stream must exist first: with only our subscriber on the subject, an Enqueue's
        # JetStream publish would reach us instead of failing over to creating the stream.
        await self.conn.run(ctx, lambda: self.jetstreams.create(stream, f"{base}.*"))
        sub = await self.conn.run(
            ctx, lambda: self.conn.client.subscribe(f"{base}.*", cb=on_enqueue)
        )
        try:
            yield woken
        finally:
            await self.conn.unsubscribe(sub)

    async def peek(self, request: basic_pb.PeekRequest, ctx: CallContext) -> basic_pb.PeekResponse:
        queue = validation.queue_name(request.queue)
        limit = validation.max_messages(request.max_messages)
        visible = await self._visible(ctx, queue, limit)
        return basic_pb.PeekResponse(messages=[item.message for item in visible])

    # leases -----------------------------------------------------------------------------------

    async def _live_lease(
        self, ctx: CallContext, queue: str, handle: str
    ) -> tuple[int, str, _State]:
        """(seq, state key, state) of the live lease `handle` names; NotFound otherwise."""
        validation.receipt_handle(handle)
        seq_text, _, nonce = handle.partition(".")
        if seq_text.isdigit() and nonce:
            key = self._state_key(ctx, queue, int(seq_text))
            leases, seq = self._own(key)
            state = leases.get(seq)
            if state is None or state.h != nonce:  # not ours as far as we know: ask
                state = await self._get_state(ctx, key)
            if state is not None and state.h == nonce and state.until > time.time_ns():
                return int(seq_text), key, state
        raise receipt_not_found(queue)

    async def ack(self, request: basic_pb.AckRequest, ctx: CallContext) -> basic_pb.AckResponse:
        queue = validation.queue_name(request.queue)
        while True:
            seq, key, state = await self._live_lease(ctx, queue, request.receipt_handle)
            if await self._put_state(ctx, key, _State.claim(state.n), state):
                break
        stream, _ = self.jetstreams.names(ctx, queue)
        await self._delete_message(ctx, stream, seq)
        await self._drop_state(ctx, key)
        return basic_pb.AckResponse()

    async def extend_visibility(
        self, request: visibility_pb.ExtendVisibilityRequest, ctx: CallContext
    ) -> visibility_pb.ExtendVisibilityResponse:
        queue = validation.queue_name(request.queue)
        handle = validation.receipt_handle(request.receipt_handle)
        lease = validation.lease(request)
        while True:
            _, key, state = await self._live_lease(ctx, queue, handle)
            until = time.time_ns() + int(lease * 1e9)
            if await self._put_state(ctx, key, _State(state.n, until, state.h, 0), state):
                break
        response = visibility_pb.ExtendVisibilityResponse()
        response.lease_expire_time.FromNanoseconds(until)
        return response

    async def release(
        self, request: visibility_pb.ReleaseRequest, ctx: CallContext
    ) -> visibility_pb.ReleaseResponse:
        queue = validation.queue_name(request.queue)
        handle = validation.receipt_handle(request.receipt_handle)
        config = await self._config(ctx, queue)
        while True:
            seq, key, state = await self._live_lease(ctx, queue, handle)
            if config is not None and state.n >= config[1]:
                if await self._move(ctx, queue, seq, state, config[0], queue):
                    break
            elif await self._put_state(ctx, key, _State(state.n, 0, "", 0), state):
                break
        return visibility_pb.ReleaseResponse()
