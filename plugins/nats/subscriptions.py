"""Live subscription streams of every PubSub kind: ids for Unsubscribe, bounded backlogs.

A NATS callback (or a JetStream reader) offers messages to a subscription's buffer; the gRPC
stream drains it. More than MAX_BACKLOG unread messages end the stream with RESOURCE_EXHAUSTED
(SLOW_SUBSCRIBER): messages are never dropped silently. A lost NATS connection ends every live
stream with UNAVAILABLE, since core NATS would silently lose what is published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb

from plugins.runtime.errors import ResourceExhausted
from plugins.runtime.pubsub import subscription_not_found

MAX_BACKLOG = 10_000
Event = TypeVar("Event")


@dataclass(eq=False)
class Subscription:
    id: str
    namespace: str
    buffer: asyncio.Queue[basic_pb.Message | Exception | None] = field(
        default_factory=lambda: asyncio.Queue(MAX_BACKLOG + 1)
    )
    ended: bool = False
    # set whenever the client takes a message: lets log readers wait instead of piling up
    taken: asyncio.Event = field(default_factory=asyncio.Event)

    async def room(self, below: int) -> None:
        """Wait until fewer than `below` messages wait for the client (or the stream ended)."""
        while self.buffer.qsize() >= below and not self.ended:
            self.taken.clear()
            await self.taken.wait()

    def offer(self, message: basic_pb.Message) -> None:
        if self.ended:
            return
        if self.buffer.qsize() >= MAX_BACKLOG:
            self.end(
                ResourceExhausted(
                    f"more than {MAX_BACKLOG} messages waiting for this subscriber",
                    reason="SLOW_SUBSCRIBER",
                )
            )
        else:
            self.buffer.put_nowait(message)

    def end(self, outcome: Exception | None) -> None:
        """None ends the stream with OK, an error with its status; the buffer keeps one slot
        beyond MAX_BACKLOG for this."""
        if not self.ended:
            self.ended = True
            self.taken.set()
            with contextlib.suppress(asyncio.QueueFull):
                self.buffer.put_nowait(outcome)


class Subscriptions:
    """The live subscriptions of one plugin instance."""

    def __init__(self) -> None:
        self.live: dict[str, Subscription] = {}

    def open(self, namespace: str) -> Subscription:
        sub = Subscription(secrets.token_urlsafe(16), namespace)
        self.live[sub.id] = sub
        return sub

    def discard(self, sub: Subscription) -> None:
        self.live.pop(sub.id, None)
        sub.ended = True

    def unsubscribe(self, subscription_id: str, namespace: str) -> None:
        sub = self.live.get(subscription_id)
        if sub is None or sub.namespace != namespace:
            raise subscription_not_found(subscription_id)
        del self.live[subscription_id]
        sub.end(None)

    def end_all(self, error: Exception) -> None:
        for sub in list(self.live.values()):
            sub.end(error)
        self.live.clear()

    @staticmethod
    async def relay(
        sub: Subscription,
        started: Callable[[basic_pb.SubscriptionStarted], Event],
        message: Callable[[basic_pb.Message], Event],
    ) -> AsyncIterator[Event]:
        """`started`, then the buffered messages until the subscription ends."""
        yield started(basic_pb.SubscriptionStarted(subscription_id=sub.id))
        while True:
            item = await sub.buffer.get()
            sub.taken.set()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield message(item)
