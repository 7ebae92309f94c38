"""PubSub basic and wildcards on Redis PUBLISH / SUBSCRIBE / PSUBSCRIBE.

Each subscription owns one connection of the dedicated pool (RedisConnection.dedicated), so
subscribers never starve the request pool. A message is the serialized `Message` proto,
published on the channel `<key prefix><namespace segment>ps:<topic>`. Topic tokens are
[A-Za-z0-9_-] only, so the only glob metacharacters a pattern subscription can meet are in the
key prefix and namespace, which are escaped; NATS `*` and a final `>` both become the glob `*`,
which also crosses dots, so every delivered topic is matched again with NATS rules before it is
passed on.

A reader task moves messages from the connection into a bounded buffer; a subscriber that lets
more than MAX_BACKLOG messages pile up ends with RESOURCE_EXHAUSTED (SLOW_SUBSCRIBER), and a lost
connection ends the stream with UNAVAILABLE (messages published meanwhile would be lost, so the
stream does not pretend to continue).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards_pb
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from plugins.redis.connection import RedisConnection
from plugins.redis.keys import Keyspace
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted, Unavailable
from plugins.runtime.pubsub import new_message, subscription_not_found

MAX_BACKLOG = 10_000
EventT = TypeVar("EventT", basic_pb.SubscribeResponse, wildcards_pb.SubscribePatternResponse)
_GLOB_SPECIAL = re.compile(rb"([\\*?\[\]^])")


def glob_escape(raw: bytes) -> bytes:
    """`raw` as a literal in a Redis glob pattern."""
    return _GLOB_SPECIAL.sub(rb"\\\1", raw)


def channel_glob(channel_prefix: bytes, pattern: list[str]) -> bytes:
    """A PSUBSCRIBE pattern matching at least every channel the NATS pattern matches."""
    tokens = [b"*" if t in ("*", ">") else t.encode("ascii") for t in pattern]
    return glob_escape(channel_prefix) + b".".join(tokens)


@dataclass
class _Subscription:
    namespace: str
    buffer: asyncio.Queue[basic_pb.Message | Exception | None] = field(
        default_factory=lambda: asyncio.Queue(MAX_BACKLOG + 1)
    )

    def end(self, outcome: Exception | None) -> None:
        """Finish the stream: None ends it with OK, an error ends it with that status. The
        buffer has room for this one last item beyond MAX_BACKLOG."""
        with contextlib.suppress(asyncio.QueueFull):
            self.buffer.put_nowait(outcome)


class RedisPubSub:
    """pubsub_basic and pubsub_wildcards."""

    def __init__(self, conn: RedisConnection, key_prefix: bytes) -> None:
        self.conn = conn
        self.key_prefix = key_prefix
        self.subscriptions: dict[str, _Subscription] = {}

    def _channel_prefix(self, ctx: CallContext) -> bytes:
        return Keyspace(self.key_prefix, ctx.namespace).channel_prefix

    async def close(self) -> None:
        for sub in self.subscriptions.values():
            sub.end(Unavailable("the redis plugin is shutting down"))

    async def publish(
        self, request: basic_pb.PublishRequest, ctx: CallContext
    ) -> basic_pb.PublishResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        channel = self._channel_prefix(ctx) + message.topic.encode("ascii")
        body = message.SerializeToString()
        await self.conn.run(ctx, lambda r: r.publish(channel, body))
        return basic_pb.PublishResponse(message_id=message.message_id)

    def subscribe(
        self, request: basic_pb.SubscribeRequest, ctx: CallContext
    ) -> AsyncIterator[basic_pb.SubscribeResponse]:
        topic = validation.topic(request.topic)
        channel = self._channel_prefix(ctx) + topic.encode("ascii")
        return self._stream(ctx, basic_pb.SubscribeResponse, channel, None)

    def subscribe_pattern(
        self, request: wildcards_pb.SubscribePatternRequest, ctx: CallContext
    ) -> AsyncIterator[wildcards_pb.SubscribePatternResponse]:
        pattern = validation.topic_pattern(request.pattern)
        glob = channel_glob(self._channel_prefix(ctx), pattern)

        def matches(topic: str) -> bool:
            return validation.topic_matches(pattern, topic.split("."))

        return self._stream(ctx, wildcards_pb.SubscribePatternResponse, glob, matches)

    async def unsubscribe(
        self, request: basic_pb.UnsubscribeRequest, ctx: CallContext
    ) -> basic_pb.UnsubscribeResponse:
        sub = self.subscriptions.get(request.subscription_id)
        if sub is None or sub.namespace != ctx.namespace:
            raise subscription_not_found(request.subscription_id)
        del self.subscriptions[request.subscription_id]
        sub.end(None)
        return basic_pb.UnsubscribeResponse()

    async def _stream(
        self,
        ctx: CallContext,
        event: type[EventT],
        target: bytes,
        matches: Callable[[str], bool] | None,
    ) -> AsyncIterator[EventT]:
        """Subscribe (PSUBSCRIBE when `matches` is given), send `started` once Redis confirmed,
        then relay messages until Unsubscribe, cancellation or a failure."""
        pubsub = self.conn.dedicated.pubsub()
        sub = _Subscription(ctx.namespace)
        subscription_id = secrets.token_urlsafe(16)
        reader: asyncio.Task[None] | None = None
        try:
            await self._confirm(ctx, pubsub, target, pattern=matches is not None)
            self.subscriptions[subscription_id] = sub
            reader = asyncio.create_task(self._read(pubsub, sub, matches))
            yield event(started=basic_pb.SubscriptionStarted(subscription_id=subscription_id))
            while True:
                item = await sub.buffer.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield event(message=item)
        finally:
            self.subscriptions.pop(subscription_id, None)
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _confirm(
        self, ctx: CallContext, pubsub: PubSub, target: bytes, pattern: bool
    ) -> None:
        """Send (P)SUBSCRIBE and wait for Redis's confirmation."""
        kind = "psubscribe" if pattern else "subscribe"

        async def handshake(_: Any) -> None:
            await (pubsub.psubscribe(target) if pattern else pubsub.subscribe(target))
            while True:
                reply = await pubsub.get_message(timeout=None)
                if reply is not None and reply["type"] == kind:
                    return

        await self.conn.run(ctx, handshake)

    async def _read(
        self, pubsub: PubSub, sub: _Subscription, matches: Callable[[str], bool] | None
    ) -> None:
        try:
            while True:
                reply = await pubsub.get_message(timeout=None)
                if reply is None or reply["type"] not in ("message", "pmessage"):
                    continue
                try:
                    message = basic_pb.Message.FromString(reply["data"])
                except DecodeError:  # not published by Prism: not a message of ours
                    continue
                if matches is not None and not matches(message.topic):
                    continue
                if sub.buffer.qsize() >= MAX_BACKLOG:
                    sub.end(
                        ResourceExhausted(
                            f"more than {MAX_BACKLOG} messages waiting for this subscriber",
                            reason="SLOW_SUBSCRIBER",
                        )
                    )
                    return
                sub.buffer.put_nowait(message)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # the connection is gone, and with it whatever was published meanwhile
            sub.end(Unavailable(f"redis subscription connection lost: {exc}"))
        except Exception as exc:  # a bug: the stream reports it (INTERNAL) instead of hanging
            sub.end(exc)
