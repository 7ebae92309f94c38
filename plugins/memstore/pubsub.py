"""PubSub basic/wildcards in memory: live fan-out, at most once, nothing persisted.

Publish appends to every matching subscription's buffer synchronously (no await), so messages
of non-overlapping publishes reach every subscriber in publish order. A slow subscriber is
disconnected, never silently thinned: when more than MAX_PENDING messages wait unread, its
stream ends with RESOURCE_EXHAUSTED (reason SLOW_SUBSCRIBER), as the proto requires.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from enum import Enum

from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic

from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted
from plugins.runtime.pubsub import MatchingSubscriptions, new_message, subscription_not_found

MAX_PENDING = 10_000


class _State(Enum):
    LIVE = "live"
    UNSUBSCRIBED = "unsubscribed"
    OVERFLOWED = "overflowed"


@dataclass(eq=False, slots=True)
class _Subscription:
    id: str
    namespace: str
    matches: Callable[[list[str]], bool]
    pending: deque[basic.Message] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    state: _State = _State.LIVE

    def offer(self, message: basic.Message) -> None:
        if self.state is not _State.LIVE:
            return
        if len(self.pending) >= MAX_PENDING:
            self.state = _State.OVERFLOWED
            self.pending.clear()
        else:
            self.pending.append(message)
        self.wake.set()

    async def next(self) -> basic.Message | None:
        """The next message; None once unsubscribed; ResourceExhausted after an overflow."""
        while True:
            if self.state is _State.UNSUBSCRIBED:
                return None
            if self.state is _State.OVERFLOWED:
                raise ResourceExhausted(
                    f"more than {MAX_PENDING} messages waited unread; subscription ended",
                    reason="SLOW_SUBSCRIBER",
                    subscription_id=self.id,
                )
            if self.pending:
                return self.pending.popleft()
            self.wake.clear()
            await self.wake.wait()


class MemstorePubSub(MatchingSubscriptions):
    """pubsub_basic and pubsub_wildcards over per-namespace subscription sets."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, _Subscription] = {}
        self._by_namespace: dict[str, set[_Subscription]] = {}

    async def _stream(
        self, ctx: CallContext, matches: Callable[[list[str]], bool]
    ) -> AsyncGenerator[tuple[str, basic.Message | None], None]:
        """Register a live subscription, yield (id, None) once it is live, then its messages."""
        sub = _Subscription(secrets.token_urlsafe(16), ctx.namespace, matches)
        self._subscriptions[sub.id] = sub
        self._by_namespace.setdefault(ctx.namespace, set()).add(sub)
        try:
            yield sub.id, None
            while (message := await sub.next()) is not None:
                yield sub.id, message
        finally:
            self._subscriptions.pop(sub.id, None)
            self._by_namespace.get(ctx.namespace, set()).discard(sub)

    async def publish(
        self, request: basic.PublishRequest, ctx: CallContext
    ) -> basic.PublishResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        tokens = message.topic.split(".")
        for sub in self._by_namespace.get(ctx.namespace, ()):
            if sub.matches(tokens):
                sub.offer(message)
        return basic.PublishResponse(message_id=message.message_id)

    async def unsubscribe(
        self, request: basic.UnsubscribeRequest, ctx: CallContext
    ) -> basic.UnsubscribeResponse:
        sub = self._subscriptions.get(request.subscription_id)
        if sub is None or sub.namespace != ctx.namespace or sub.state is not _State.LIVE:
            raise subscription_not_found(request.subscription_id)
        sub.state = _State.UNSUBSCRIBED
        sub.wake.set()
        self._subscriptions.pop(sub.id, None)
        return basic.UnsubscribeResponse()
