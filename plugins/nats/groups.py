"""Stream consumer groups as JetStream durable pull consumers.

A group (stream S, group G) is the durable consumer `G` of S's JetStream stream (stream.py),
with AckPolicy EXPLICIT and ack_wait = the group's ack timeout, so JetStream itself tracks what
is pending, redelivers what is not acknowledged in time (redeliveries go out before new
records), skips records that retention removed, and reports the last delivered offset and the
pending count. Each live consumer is one JoinConsumerGroup stream pulling from that durable.

The plugin adds what JetStream cannot know: which live consumer holds which record (for the
per-consumer max_in_flight and the per-consumer pending counts) and the ack subject of each
delivery, which AckRecords needs to acknowledge by offset. Both live in this plugin instance:
after a plugin restart, records delivered before it are acknowledged by redelivery (ack timeout),
and AckRecords of them counts 0 (they are not pending *for us*).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats.js.errors
from nats.js import api
from prism.interfaces.stream.v1 import stream_consumer_groups_pb2 as groups_pb

from plugins.nats.connection import NatsConnection, namespace_token
from plugins.nats.stream import BATCH, JetStreams, record_of
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

# How often a consumer with max_in_flight records pending looks again for expired ones.
FULL_POLL = 0.2


@dataclass
class _Delivery:
    consumer: str
    reply: str
    deadline: float


@dataclass
class _Group:
    """What this plugin instance knows of one group: deliveries not yet acknowledged, by
    offset, and the names of its live consumers."""

    ack_timeout: float
    deliveries: dict[int, _Delivery] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    acked: asyncio.Event = field(default_factory=asyncio.Event)

    def pending_for(self, consumer: str, now: float) -> int:
        return sum(
            1 for d in self.deliveries.values() if d.consumer == consumer and d.deadline > now
        )


_START = {
    groups_pb.GROUP_START_POSITION_UNSPECIFIED: api.DeliverPolicy.NEW,
    groups_pb.GROUP_START_POSITION_LATEST: api.DeliverPolicy.NEW,
    groups_pb.GROUP_START_POSITION_EARLIEST: api.DeliverPolicy.ALL,
    groups_pb.GROUP_START_POSITION_OFFSET: api.DeliverPolicy.BY_START_SEQUENCE,
}


class NatsConsumerGroups:
    """stream_consumer_groups."""

    def __init__(self, conn: NatsConnection, jetstreams: JetStreams) -> None:
        self.conn = conn
        self.jetstreams = jetstreams
        self.groups: dict[tuple[str, str, str], _Group] = {}

    def _not_found(self, stream: str, group: str) -> NotFound:
        return NotFound(
            f"consumer group {group!r} of stream {stream!r} does not exist",
            reason="CONSUMER_GROUP_NOT_FOUND",
            stream=stream,
            group=group,
        )

    async def _describe(self, ctx: CallContext, name: str, group: str) -> api.ConsumerInfo:
        stream, _ = self.jetstreams.names(ctx, name)
        try:
            return await self.conn.run(ctx, lambda: self.jetstreams.js.consumer_info(stream, group))
        except nats.js.errors.NotFoundError:
            raise self._not_found(name, group) from None

    async def _group(self, ctx: CallContext, name: str, group: str) -> _Group:
        """This instance's state of an existing group (NotFound otherwise)."""
        key = (namespace_token(ctx.namespace), name, group)
        state = self.groups.get(key)
        if state is None:
            info = await self._describe(ctx, name, group)
            state = self.groups.setdefault(key, _Group(float(info.config.ack_wait or 30.0)))
        return state

    async def create_consumer_group(
        self, request: groups_pb.CreateConsumerGroupRequest, ctx: CallContext
    ) -> groups_pb.CreateConsumerGroupResponse:
        name = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        policy = _START.get(request.start)
        if policy is None:
            raise InvalidArgument("start", f"unknown start position {request.start}")
        if policy is api.DeliverPolicy.BY_START_SEQUENCE and request.start_offset <= 0:
            raise InvalidArgument("start_offset", "must be positive")
        ack_timeout = validation.ack_timeout(request.ack_timeout, request.HasField("ack_timeout"))
        stream, subject = self.jetstreams.names(ctx, name)
        by_offset = policy is api.DeliverPolicy.BY_START_SEQUENCE
        config = api.ConsumerConfig(
            durable_name=group,
            name=group,
            deliver_policy=policy,
            opt_start_seq=request.start_offset if by_offset else None,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_timeout,
            max_deliver=-1,
            max_ack_pending=-1,
        )

        async def create() -> bool:
            await self.jetstreams.create(stream, subject)
            try:
                await self.jetstreams.js.consumer_info(stream, group)
            except nats.js.errors.NotFoundError:
                await self.jetstreams.js.add_consumer(stream, config)
                return True
            return False

        if not await self.conn.run(ctx, create):
            raise AlreadyExists(
                f"consumer group {group!r} of stream {name!r} already exists",
                reason="CONSUMER_GROUP_EXISTS",
                stream=name,
                group=group,
            )
        self.groups[(namespace_token(ctx.namespace), name, group)] = _Group(ack_timeout)
        return groups_pb.CreateConsumerGroupResponse()

    def join_consumer_group(
        self, request: groups_pb.JoinConsumerGroupRequest, ctx: CallContext
    ) -> AsyncIterator[groups_pb.JoinConsumerGroupResponse]:
        name = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        consumer = validation.stream_name(request.consumer, "consumer")
        limit = validation.max_in_flight(request.max_in_flight)
        return self._join(ctx, name, group, consumer, limit)

    async def _join(
        self, ctx: CallContext, name: str, group: str, consumer: str, limit: int
    ) -> AsyncIterator[groups_pb.JoinConsumerGroupResponse]:
        state = await self._group(ctx, name, group)
        if consumer in state.live:
            raise FailedPrecondition(
                f"consumer {consumer!r} of group {group!r} already has a live stream",
                reason="CONSUMER_IN_USE",
                consumer=consumer,
            )
        stream, _ = self.jetstreams.names(ctx, name)
        state.live.add(consumer)
        try:
            sub = await self.conn.run(
                ctx, lambda: self.jetstreams.js.pull_subscribe_bind(consumer=group, stream=stream)
            )
            try:
                yield groups_pb.JoinConsumerGroupResponse(
                    joined=groups_pb.ConsumerJoined(group=group, consumer=consumer)
                )
                while True:
                    room = limit - state.pending_for(consumer, time.monotonic())
                    if room <= 0:
                        state.acked.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(state.acked.wait(), FULL_POLL)
                        continue
                    for msg in await self.jetstreams.fetch(sub, min(room, BATCH)):
                        record = record_of(msg)
                        state.deliveries[record.offset] = _Delivery(
                            consumer, msg.reply or "", time.monotonic() + state.ack_timeout
                        )
                        yield groups_pb.JoinConsumerGroupResponse(record=record)
            finally:
                await self.conn.unsubscribe(sub)
        finally:
            state.live.discard(consumer)

    async def ack_records(
        self, request: groups_pb.AckRecordsRequest, ctx: CallContext
    ) -> groups_pb.AckRecordsResponse:
        name = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        offsets = validation.ack_offsets(request.offsets)
        state = await self._group(ctx, name, group)
        acked = 0
        for offset in dict.fromkeys(offsets):
            delivery = state.deliveries.get(offset)
            if delivery is None:
                continue
            # a double ack: JetStream confirms it, so a lost ack never counts as done
            request_ack = functools.partial(
                self.conn.client.request, delivery.reply, b"+ACK", timeout=self.conn.timeout(ctx)
            )
            await self.conn.run(ctx, request_ack)
            if state.deliveries.get(offset) is delivery:
                del state.deliveries[offset]
            acked += 1
        state.acked.set()
        return groups_pb.AckRecordsResponse(acked=acked)

    async def get_consumer_group_info(
        self, request: groups_pb.GetConsumerGroupInfoRequest, ctx: CallContext
    ) -> groups_pb.GetConsumerGroupInfoResponse:
        name = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        info = await self._describe(ctx, name, group)
        state = await self._group(ctx, name, group)
        now = time.monotonic()
        response = groups_pb.GetConsumerGroupInfoResponse(
            last_delivered_offset=info.delivered.stream_seq if info.delivered else 0,
            pending_count=info.num_ack_pending or 0,
            consumers=[
                groups_pb.ConsumerInfo(consumer=c, pending_count=state.pending_for(c, now))
                for c in sorted(state.live)
            ],
        )
        response.ack_timeout.FromNanoseconds(round(float(info.config.ack_wait or 0) * 1e9))
        return response
