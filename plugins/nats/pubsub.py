"""PubSub basic and wildcards on core NATS subscriptions.

A message is the serialized `Message` proto published on `<root>.ps.<topic>` (root: subject
prefix + namespace token, see connection.py). Topic tokens are [A-Za-z0-9_-], so a validated
topic is a literal NATS subject tail and a validated pattern is a NATS wildcard subject tail
(`*` and a final `>` mean exactly what the contract says). `started` is sent only after the SUB
has been flushed to the server (PING/PONG), so a publish that starts after it is delivered.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards_pb

from plugins.nats.connection import Names, NatsConnection
from plugins.nats.subscriptions import MAX_BACKLOG, Subscription, Subscriptions
from plugins.runtime import validation
from plugins.runtime.context import CallContext

LIVE = "ps"
Event = TypeVar("Event", basic_pb.SubscribeResponse, wildcards_pb.SubscribePatternResponse)


def checked_message(topic: str, payload: bytes, attributes: Mapping[str, str]) -> basic_pb.Message:
    """A new message from the fields of a Publish-like request, after the shared input rules."""
    message = basic_pb.Message(
        message_id=secrets.token_urlsafe(16),
        topic=validation.topic(topic),
        payload=validation.value(payload, "payload"),
        attributes=validation.attributes(attributes),
    )
    message.publish_time.FromNanoseconds(time.time_ns())
    return message


class NatsPubSub:
    """pubsub_basic and pubsub_wildcards."""

    def __init__(self, conn: NatsConnection, subscriptions: Subscriptions) -> None:
        self.conn = conn
        self.subscriptions = subscriptions

    async def publish_live(self, ctx: CallContext, message: basic_pb.Message) -> None:
        """Hand `message` to the live subscribers of its topic (core NATS, at most once)."""
        subject = Names.of(self.conn.settings, ctx).subject(LIVE, message.topic)
        body = message.SerializeToString()
        await self.conn.run(ctx, lambda: self.conn.client.publish(subject, body))

    async def publish(
        self, request: basic_pb.PublishRequest, ctx: CallContext
    ) -> basic_pb.PublishResponse:
        message = checked_message(request.topic, request.payload, request.attributes)
        await self.publish_live(ctx, message)
        return basic_pb.PublishResponse(message_id=message.message_id)

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

    async def unsubscribe(
        self, request: basic_pb.UnsubscribeRequest, ctx: CallContext
    ) -> basic_pb.UnsubscribeResponse:
        self.subscriptions.unsubscribe(request.subscription_id, ctx.namespace)
        return basic_pb.UnsubscribeResponse()

    async def _stream(
        self, ctx: CallContext, tail: str, event: type[Event]
    ) -> AsyncIterator[Event]:
        subject = Names.of(self.conn.settings, ctx).subject(LIVE, tail)
        sub = self.subscriptions.open(ctx.namespace)
        nats_sub: NatsSubscription | None = None
        try:
            nats_sub = await self.conn.run(ctx, lambda: self._subscribe(subject, _offer_to(sub)))
            async for item in Subscriptions.relay(
                sub, lambda s: event(started=s), lambda m: event(message=m)
            ):
                yield item
        finally:
            self.subscriptions.discard(sub)
            if nats_sub is not None:
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


def _offer_to(sub: Subscription) -> Callable[[Msg], object]:
    async def on_message(msg: Msg) -> None:
        try:
            message = basic_pb.Message.FromString(msg.data)
        except DecodeError:  # not published by Prism: not a message of ours
            return
        sub.offer(message)

    return on_message
