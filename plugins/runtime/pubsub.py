"""pubsub_basic/pubsub_wildcards pieces every backend answers alike.

`MatchingSubscriptions` serves Subscribe and SubscribePattern for a backend that filters
published messages itself by topic tokens: the backend gives one `_stream(ctx, matches)`, this
turns it into the two response streams.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import TypeVar

from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards_pb

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import NotFound

EventT = TypeVar("EventT", basic_pb.SubscribeResponse, wildcards_pb.SubscribePatternResponse)


def new_message(topic: str, payload: bytes, attributes: Mapping[str, str]) -> basic_pb.Message:
    """A new message from the fields of a Publish-like request, after the shared input rules."""
    message = basic_pb.Message(
        message_id=secrets.token_urlsafe(16),
        topic=validation.topic(topic),
        payload=validation.value(payload, "payload"),
        attributes=validation.attributes(attributes),
    )
    message.publish_time.FromNanoseconds(time.time_ns())
    return message


def subscription_not_found(subscription_id: str) -> NotFound:
    """Unsubscribe named no live subscription of this namespace."""
    return NotFound(
        f"subscription {subscription_id!r} is unknown or has ended",
        reason="SUBSCRIPTION_NOT_FOUND",
        subscription_id=subscription_id,
    )


class MatchingSubscriptions(ABC):
    """Subscribe and SubscribePattern over one `_stream`."""

    @abstractmethod
    def _stream(
        self, ctx: CallContext, matches: Callable[[list[str]], bool]
    ) -> AsyncGenerator[tuple[str, basic_pb.Message | None], None]:
        """(subscription id, None) once the subscription is live, then (id, message) for every
        message whose topic tokens `matches`, until it ends."""

    async def _events(
        self, ctx: CallContext, matches: Callable[[list[str]], bool], event: type[EventT]
    ) -> AsyncIterator[EventT]:
        async with contextlib.aclosing(self._stream(ctx, matches)) as stream:
            async for sub_id, message in stream:
                if message is None:
                    yield event(started=basic_pb.SubscriptionStarted(subscription_id=sub_id))
                else:
                    yield event(message=message)

    def subscribe(
        self, request: basic_pb.SubscribeRequest, ctx: CallContext
    ) -> AsyncIterator[basic_pb.SubscribeResponse]:
        tokens = validation.topic(request.topic).split(".")
        return self._events(ctx, tokens.__eq__, basic_pb.SubscribeResponse)

    def subscribe_pattern(
        self, request: wildcards_pb.SubscribePatternRequest, ctx: CallContext
    ) -> AsyncIterator[wildcards_pb.SubscribePatternResponse]:
        pattern = validation.topic_pattern(request.pattern)
        matcher = functools.partial(validation.topic_matches, pattern)
        return self._events(ctx, matcher, wildcards_pb.SubscribePatternResponse)
