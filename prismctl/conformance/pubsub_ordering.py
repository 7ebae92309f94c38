"""pubsub_ordering: one order per (topic, ordering_key) across publishers, the same at every
subscriber, consistent with non-overlapping calls, gap-free; ordering_key input rules."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_ordering_pb2 as pb
from prism.interfaces.pubsub.v1.pubsub_ordering_pb2_grpc import PubSubOrderingServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.pubsub_basic import Subscription, payloads, subscribe, topic
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.pubsub.v1.pubsub_ordering_pb2_grpc import (
        PubSubOrderingServiceAsyncStub,
    )

REQUIRES = ("pubsub_basic",)
PUBLISHERS = 3
PER_PUBLISHER = 10


def stub(t: Target, channel: grpc.aio.Channel | None = None) -> PubSubOrderingServiceAsyncStub:
    return PubSubOrderingServiceStub(channel or t.channel)


async def publish_ordered(
    t: Target,
    topic_name: str,
    key: str,
    payload: bytes,
    channel: grpc.aio.Channel | None = None,
) -> str:
    response: pb.PublishOrderedResponse = await stub(t, channel).PublishOrdered(
        pb.PublishOrderedRequest(topic=topic_name, payload=payload, ordering_key=key)
    )
    return response.message_id


async def publisher(
    t: Target, topic_name: str, name: str, keys: list[str], count: int
) -> dict[str, str]:
    """One client on its own connection publishing `count` messages per key, each call after the
    previous returned (payload name:key:i); message id → payload."""
    channel = t.extra_channel()
    ids: dict[str, str] = {}
    for i in range(count):
        for key in keys:
            payload = f"{name}:{key}:{i}"
            ids[await publish_ordered(t, topic_name, key, payload.encode(), channel)] = payload
    return ids


def of_key(messages: list[basic_pb.Message], key: str) -> list[str]:
    return [m.payload.decode() for m in messages if m.ordering_key == key]


def check_publisher_order(order: list[str], what: str) -> None:
    """Each publisher's calls did not overlap, so its messages keep their call order."""
    for name in {p.split(":")[0] for p in order}:
        mine = [int(p.split(":")[2]) for p in order if p.startswith(f"{name}:")]
        equal(mine, sorted(mine), f"{what}: order of {name}'s messages")


@case("pubsub_ordering", requires=REQUIRES)
async def one_order_per_key_for_every_subscriber(t: Target) -> None:
    """Concurrent publishers on separate connections: every subscriber receives each key's
    messages in the same order, all of them once, each publisher's in its call order, tagged
    with their ordering key and id."""
    name = topic(t, "orders")
    keys = ["a", "b"]
    subs = [await subscribe(t, name, t.extra_channel()) for _ in range(2)]
    try:
        published = await asyncio.gather(
            *(publisher(t, name, f"p{n}", keys, PER_PUBLISHER) for n in range(PUBLISHERS))
        )
        ids = {mid: payload for batch in published for mid, payload in batch.items()}
        total = PUBLISHERS * PER_PUBLISHER * len(keys)
        equal(len(ids), total, "distinct message ids")
        received = [await sub.wait_for(total) for sub in subs]
        for n, messages in enumerate(received):
            equal(
                sorted(payloads(messages)),
                sorted(p.encode() for p in ids.values()),
                f"messages at subscriber {n}",
            )
            for m in messages:
                check(
                    ids.get(m.message_id) == m.payload.decode()
                    and m.ordering_key == m.payload.decode().split(":")[1],
                    f"message id / ordering_key of {m.payload!r}: {m.message_id}, "
                    f"{m.ordering_key!r}",
                )
        for key in keys:
            order = of_key(received[0], key)
            equal(of_key(received[1], key), order, f"key {key}: order at the two subscribers")
            check_publisher_order(order, f"key {key}")
    finally:
        for sub in subs:
            await sub.close()


@case("pubsub_ordering", requires=REQUIRES)
async def late_subscriber_gets_a_gap_free_suffix(t: Target) -> None:
    """A subscription started while a key's messages are being published receives an unbroken
    tail of the key's order: nothing after its first message is skipped."""
    name = topic(t, "ticks")
    early = await subscribe(t, name)
    late: Subscription | None = None
    total = PUBLISHERS * PER_PUBLISHER * 2
    publishing = asyncio.gather(
        *(publisher(t, name, f"p{n}", ["k"], 2 * PER_PUBLISHER) for n in range(PUBLISHERS))
    )
    try:
        await eventually(
            lambda: len(early.messages) >= total // 4,
            timeout=10.0,
            interval=0.005,
            message="first quarter of the messages at the early subscriber",
        )
        late = await subscribe(t, name)
        await publishing
        order = of_key(await early.wait_for(total), "k")
        last = order[-1]
        await eventually(
            lambda: late is not None and of_key(late.messages, "k")[-1:] == [last],
            timeout=10.0,
            interval=0.01,
            message="the last message at the late subscriber",
        )
        tail = of_key(late.messages, "k")
        equal(tail, order[len(order) - len(tail) :], "late subscriber's messages")
        check_publisher_order(order, "key k")
    finally:
        publishing.cancel()
        await early.close()
        if late is not None:
            await late.close()


@case("pubsub_ordering")
async def invalid_ordering_input(t: Target) -> None:
    """An empty or over-256-byte ordering key (counted in UTF-8 bytes), a bad topic or bad
    attributes are INVALID_ARGUMENT naming the field; 256 bytes is accepted."""
    name = topic(t, "bad")
    for key, what in (("", "an empty key"), ("k" * 257, "257 bytes"), ("é" * 129, "258 bytes")):
        await expect_invalid(
            publish_ordered(t, name, key, b"x"), "ordering_key", f"ordering_key of {what}"
        )
    for key in ("k" * 256, "é" * 128):
        check(await publish_ordered(t, name, key, b"x"), "empty message id")
    for bad in ("", "a..b", "a.*"):
        await expect_invalid(publish_ordered(t, bad, "k", b"x"), "topic", f"topic {bad!r}")
    await expect_invalid(
        stub(t).PublishOrdered(
            pb.PublishOrderedRequest(
                topic=name, payload=b"x", ordering_key="k", attributes={"": "v"}
            )
        ),
        "attributes",
        "PublishOrdered with an empty attribute key",
    )
