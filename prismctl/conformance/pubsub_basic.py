"""pubsub_basic: `started` handshake, fan-out, ordering, Unsubscribe, topic rules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pb
from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceStub

from prismctl.conformance.core import (
    CaseFailure,
    Target,
    case,
    check,
    equal,
    expect_error,
    expect_invalid,
)
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceAsyncStub

RECEIVE_TIMEOUT = 10.0


def stub(t: Target) -> PubSubBasicServiceAsyncStub:
    return PubSubBasicServiceStub(t.channel)


def topic(t: Target, *tokens: str) -> str:
    return ".".join([t.prefix.rstrip("-"), *tokens])


async def publish(t: Target, topic_name: str, payload: bytes, **attributes: str) -> str:
    response: pb.PublishResponse = await stub(t).Publish(
        pb.PublishRequest(topic=topic_name, payload=payload, attributes=attributes)
    )
    return response.message_id


class Subscription:
    """A live subscription stream: `open` returns once `started` arrived (so later publishes
    are guaranteed to reach it); messages are collected in the background."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.id = ""
        self.messages: list[pb.Message] = []
        self.ended: grpc.StatusCode | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, call: Any) -> Subscription:
        sub = cls(call)
        stream: AsyncIterator[Any] = call.__aiter__()
        try:
            first = await asyncio.wait_for(anext(stream), RECEIVE_TIMEOUT)
        except StopAsyncIteration:
            raise CaseFailure("subscription stream ended before its `started` event") from None
        check(first.WhichOneof("event") == "started", f"first event is not `started`: {first}")
        check(first.started.subscription_id, "`started` without a subscription_id")
        sub.id = first.started.subscription_id
        sub._reader = asyncio.create_task(sub._read(stream))
        return sub

    async def _read(self, stream: AsyncIterator[Any]) -> None:
        try:
            async for event in stream:
                if event.WhichOneof("event") != "message":
                    raise CaseFailure(f"unexpected event after `started`: {event}")
                self.messages.append(event.message)
            self.ended = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            self.ended = exc.code()

    async def wait_for(self, count: int) -> list[pb.Message]:
        """The first `count` messages, failing if they do not arrive in time."""
        with contextlib.suppress(TimeoutError):
            await eventually(
                lambda: len(self.messages) >= count or self.ended is not None,
                timeout=RECEIVE_TIMEOUT,
                interval=0.01,
            )
        if len(self.messages) < count:
            got = [m.payload for m in self.messages]
            raise CaseFailure(f"expected {count} messages, got {got} (stream ended: {self.ended})")
        return self.messages[:count]

    async def wait_ended(self) -> grpc.StatusCode:
        if self._reader is not None:
            await asyncio.wait_for(asyncio.shield(self._reader), RECEIVE_TIMEOUT)
        check(self.ended is not None, "stream did not end")
        assert self.ended is not None
        return self.ended

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def subscribe(
    t: Target, topic_name: str, channel: grpc.aio.Channel | None = None
) -> Subscription:
    client = PubSubBasicServiceStub(channel or t.channel)
    return await Subscription.open(client.Subscribe(pb.SubscribeRequest(topic=topic_name)))


def payloads(messages: list[pb.Message]) -> list[bytes]:
    return [m.payload for m in messages]


@case("pubsub_basic")
async def fan_out_to_every_subscriber(t: Target) -> None:
    """Every live subscriber of a topic (on separate connections) receives every message, in
    publish order, with its topic, attributes and id; other topics' messages do not arrive."""
    name, other = topic(t, "orders"), topic(t, "orders", "eu")
    subs = [await subscribe(t, name, t.extra_channel()) for _ in range(3)]
    try:
        equal(len({s.id for s in subs}), 3, "distinct subscription ids")
        await publish(t, other, b"not for you")
        ids = [await publish(t, name, f"m{i}".encode(), n=str(i)) for i in range(5)]
        equal(len(set(ids)), 5, "distinct message ids")
        for i, sub in enumerate(subs):
            got = await sub.wait_for(5)
            equal(payloads(got), [f"m{j}".encode() for j in range(5)], f"subscriber {i}")
            equal([m.message_id for m in got], ids, f"message ids at subscriber {i}")
            equal({m.topic for m in got}, {name}, f"topics at subscriber {i}")
            equal(dict(got[3].attributes), {"n": "3"}, f"attributes at subscriber {i}")
    finally:
        for sub in subs:
            await sub.close()


@case("pubsub_basic")
async def unsubscribe_stops_delivery(t: Target) -> None:
    """Unsubscribe ends the stream with OK; the remaining subscriber keeps receiving; the id is
    then unknown (NOT_FOUND, SUBSCRIPTION_NOT_FOUND)."""
    name = topic(t, "news")
    leaving = await subscribe(t, name)
    staying = await subscribe(t, name)
    try:
        await publish(t, name, b"before")
        equal(payloads(await leaving.wait_for(1)), [b"before"], "leaving subscriber, before")
        await stub(t).Unsubscribe(pb.UnsubscribeRequest(subscription_id=leaving.id))
        equal(await leaving.wait_ended(), grpc.StatusCode.OK, "stream status after Unsubscribe")
        await publish(t, name, b"after")
        equal(payloads(await staying.wait_for(2)), [b"before", b"after"], "staying subscriber")
        equal(payloads(leaving.messages), [b"before"], "messages after Unsubscribe")
        for sid in (leaving.id, "no-such-subscription"):
            await expect_error(
                stub(t).Unsubscribe(pb.UnsubscribeRequest(subscription_id=sid)),
                grpc.StatusCode.NOT_FOUND,
                f"Unsubscribe of {sid!r}",
                reason="SUBSCRIPTION_NOT_FOUND",
            )
    finally:
        await leaving.close()
        await staying.close()


@case("pubsub_basic")
async def publish_without_subscribers(t: Target) -> None:
    """Publishing to a topic nobody listens to is not an error, and is not replayed to a later
    subscriber (live fan-out, nothing persisted)."""
    name = topic(t, "void")
    await publish(t, name, b"lost")
    sub = await subscribe(t, name)
    try:
        await publish(t, name, b"seen")
        equal(payloads(await sub.wait_for(1)), [b"seen"], "first message of a late subscriber")
    finally:
        await sub.close()


@case("pubsub_basic")
async def invalid_topics(t: Target) -> None:
    """Bad topics are INVALID_ARGUMENT naming topic, for Publish and Subscribe."""
    bad_topics = [
        "",
        "a..b",
        ".a",
        "a.",
        "a.*",
        "a.>",
        "has space",
        "x" * 256,
        ".".join(["t"] * 17),
    ]
    for bad in bad_topics:
        await expect_invalid(
            stub(t).Publish(pb.PublishRequest(topic=bad, payload=b"x")),
            "topic",
            f"Publish to {bad[:20]!r}",
        )

        async def first_event(bad: str = bad) -> Any:
            call = stub(t).Subscribe(pb.SubscribeRequest(topic=bad))
            try:
                return await anext(call.__aiter__())
            finally:
                call.cancel()

        await expect_invalid(first_event(), "topic", f"Subscribe to {bad[:20]!r}")
    await expect_invalid(
        stub(t).Publish(pb.PublishRequest(topic=topic(t, "x"), payload=b"x", attributes={"": "v"})),
        "attributes",
        "Publish with an empty attribute key",
    )
