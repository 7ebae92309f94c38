"""PubSub basic, wildcards, filtering and ordering on core NATS subscriptions.

A message is the serialized `Message` proto published on `<root>.ps.<topic>` (root: subject
prefix + namespace token, see connection.py). Topic tokens are [A-Za-z0-9_-], so a validated
topic is a literal NATS subject tail and a validated pattern is a NATS wildcard subject tail
(`*` and a final `>` mean exactly what the contract says). `started` is sent only after the SUB
has been flushed to the server (PING/PONG), so a publish that starts after it is delivered.

Filtering is done here, on each delivered message's attributes. Ordering: every publish of a
plugin instance goes out on its one connection, and NATS delivers one connection's messages to
every subscriber in the order they were sent, so all subscribers see one order per key (a
namespace's slot is served by one plugin instance). A subscriber never misses messages
silently: if the NATS client has to drop some for it (slow consumer), its stream ends with
RESOURCE_EXHAUSTED (SLOW_SUBSCRIBER); if the connection drops, with UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_filtering_pb2 as filtering_pb
from prism.interfaces.pubsub.v1 import pubsub_ordering_pb2 as ordering_pb
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards_pb

from plugins.nats.connection import Names, NatsConnection
from plugins.nats.subscriptions import MAX_BACKLOG, Subscription, Subscriptions
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted
from plugins.runtime.pubsub import new_message

LIVE = "ps"
Event = TypeVar(
    "Event",
    basic_pb.SubscribeResponse,
    wildcards_pb.SubscribePatternResponse,
    filtering_pb.SubscribeFilteredResponse,
)
Wanted = Callable[[basic_pb.Message], bool]


class NatsPubSub:
    """pubsub_basic, pubsub_wildcards, pubsub_filtering and pubsub_ordering."""

    def __init__(self, conn: NatsConnection, subscriptions: Subscriptions) -> None:
        self.conn = conn
        self.subscriptions = subscriptions
        self.by_nats: dict[NatsSubscription, Subscription] = {}
        conn.on_error.append(self._on_client_error)

    def _on_client_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and exc.sub in self.by_nats:
            self.by_nats[exc.sub].end(
                ResourceExhausted(
                    "messages piled up in the NATS client for this subscriber",
                    reason="SLOW_SUBSCRIBER",
                )
            )

    async def publish_live(self, ctx: CallContext, message: basic_pb.Message) -> None:
        """Hand `message` to the live subscribers of its topic (core NATS, at most once)."""
        subject = Names.of(self.conn.settings, ctx).subject(LIVE, message.topic)
        body = message.SerializeToString()
        await self.conn.run(ctx, lambda: self.conn.client.publish(subject, body))

    async def publish(
        self, request: basic_pb.PublishRequest, ctx: CallContext
    ) -> basic_pb.PublishResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        await self.publish_live(ctx, message)
        return basic_pb.PublishResponse(message_id=message.message_id)

    async def publish_ordered(
        self, request: ordering_pb.PublishOrderedRequest, ctx: CallContext
    ) -> ordering_pb.PublishOrderedResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        message.ordering_key = validation.ordering_key(request.ordering_key)
        await self.publish_live(ctx, message)
        return ordering_pb.PublishOrderedResponse(message_id=message.message_id)

    def subscribe(
        self, request: basic_pb.SubscribeRequest, ctx: CallContext
    ) -> AsyncIterator[basic_pb.SubscribeResponse]:
        topic = validation.topic(request.topic)
        return self._stream(ctx, topic, basic_pb.SubscribeResponse)

    def subscribe_pattern(
        self, request: wildcards_pb.SubscribePatternRequest, ctx: CallContext
    ) -> AsyncIterator[wildcards_pb.SubscribePatternResponse]:
        pattern = validation.topic_pattern(request.pattern)
        return self._stream(ctx, ".".join(pattern), wildcards_pb.SubscribePatternResponse)

    def subscribe_filtered(
        self, request: filtering_pb.SubscribeFilteredRequest, ctx: CallContext
    ) -> AsyncIterator[filtering_pb.SubscribeFilteredResponse]:
        topic = validation.topic(request.topic)
        wanted = validation.attributes(request.attribute_filter, "attribute_filter")

        def matches(message: basic_pb.Message) -> bool:
            return all(message.attributes.get(k) == v for k, v in wanted.items())

        return self._stream(ctx, topic, filtering_pb.SubscribeFilteredResponse, matches)

    async def unsubscribe(
        self, request: basic_pb.UnsubscribeRequest, ctx: CallContext
    ) -> basic_pb.UnsubscribeResponse:
        self.subscriptions.unsubscribe(request.subscription_id, ctx.namespace)
        return basic_pb.UnsubscribeResponse()

    async def _stream(
        self, ctx: CallContext, tail: str, event: type[Event], wanted: Wanted | None = None
    ) -> AsyncIterator[Event]:
        subject = Names.of(self.conn.settings, ctx).subject(LIVE, tail)
        sub = self.subscriptions.open(ctx.namespace)
        nats_sub: NatsSubscription | None = None
        callback = _offer_to(sub, wanted)
        try:
            nats_sub = await self.conn.run(ctx, lambda: self._subscribe(subject, callback))
            self.by_nats[nats_sub] = sub
            async for item in Subscriptions.relay(
                sub, lambda s: event(started=s), lambda m: event(message=m)
            ):
                yield item
        finally:
            self.subscriptions.discard(sub)
            if nats_sub is not None:
                self.by_nats.pop(nats_sub, None)
                await self.conn.unsubscribe(nats_sub)

    async def _subscribe(self, subject: str, callback: Callable[[Msg], object]) -> NatsSubscription:
        """SUB, then PING/PONG: once flushed, the server routes every later publish to us."""
        nats_sub = await self.conn.client.subscribe(
            subject,
            cb=callback,  # type: ignore[arg-type]
            pending_msgs_limit=MAX_BACKLOG * 2,
        )
        try:
            await self.conn.client.flush(self.conn.settings.request_timeout)  # type: ignore[arg-type]
        except BaseException:
            await self.conn.unsubscribe(nats_sub)
            raise
        return nats_sub


def _offer_to(sub: Subscription, wanted: Wanted | None) -> Callable[[Msg], object]:
    async def on_message(msg: Msg) -> None:
        try:
            message = basic_pb.Message.FromString(msg.data)
        except DecodeError:  # not published by Prism: not a message of ours
            return
        if wanted is None or wanted(message):
            sub.offer(message)

    return on_message
