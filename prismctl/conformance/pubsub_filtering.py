"""pubsub_filtering: a subscription receives exactly the messages whose attributes contain its
filter (byte-for-byte), and the filter follows the attribute input rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_filtering_pb2 as pb
from prism.interfaces.pubsub.v1.pubsub_filtering_pb2_grpc import PubSubFilteringServiceStub

from prismctl.conformance.core import Target, case, equal, expect_invalid
from prismctl.conformance.pubsub_basic import Subscription, payloads, publish, topic
from prismctl.conformance.pubsub_basic import stub as basic_stub

if TYPE_CHECKING:
    from prism.interfaces.pubsub.v1.pubsub_filtering_pb2_grpc import (
        PubSubFilteringServiceAsyncStub,
    )

REQUIRES = ("pubsub_basic",)


def stub(t: Target) -> PubSubFilteringServiceAsyncStub:
    return PubSubFilteringServiceStub(t.channel)


async def subscribe_filtered(
    t: Target, topic_name: str, attribute_filter: dict[str, str] | None = None
) -> Subscription:
    return await Subscription.open(
        stub(t).SubscribeFiltered(
            pb.SubscribeFilteredRequest(topic=topic_name, attribute_filter=attribute_filter)
        )
    )


@case("pubsub_filtering", requires=REQUIRES)
async def filters_match_attributes_exactly(t: Target) -> None:
    """Only messages carrying every filter entry with exactly the same value arrive (extra
    attributes ignored, no case folding or trimming); an empty filter passes the whole topic;
    other topics never arrive."""
    name = topic(t, "events")
    red = await subscribe_filtered(t, name, {"color": "red"})
    red_large = await subscribe_filtered(t, name, {"color": "red", "size": "L"})
    everything = await subscribe_filtered(t, name)
    subs = (red, red_large, everything)
    try:
        published: list[tuple[str, dict[str, str]]] = [
            ("red", {"color": "red"}),
            ("red-L-extra", {"color": "red", "size": "L", "extra": "x"}),
            ("blue-L", {"color": "blue", "size": "L"}),
            ("none", {}),
            ("Red", {"color": "Red"}),
            ("red-space", {"color": "red "}),
            ("COLOR", {"COLOR": "red"}),
            ("red-l", {"color": "red", "size": "l"}),
        ]
        await publish(t, topic(t, "events", "sub"), b"other-topic", color="red", size="L")
        for label, attributes in published:
            await publish(t, name, label.encode(), **attributes)
        # A sentinel every filter passes, published last: once it arrives, anything published
        # earlier that was going to arrive has arrived.
        await publish(t, name, b"end", color="red", size="L")
        equal(
            payloads(await red.wait_for(4)),
            [b"red", b"red-L-extra", b"red-l", b"end"],
            "filter color=red",
        )
        equal(
            payloads(await red_large.wait_for(2)),
            [b"red-L-extra", b"end"],
            "filter color=red,size=L",
        )
        equal(
            payloads(await everything.wait_for(len(published) + 1)),
            [label.encode() for label, _ in published] + [b"end"],
            "empty filter",
        )
        equal(
            dict(red.messages[1].attributes),
            {"color": "red", "size": "L", "extra": "x"},
            "attributes of a filtered message",
        )
        equal({m.topic for s in subs for m in s.messages}, {name}, "topics received")
        equal([len(s.messages) for s in subs], [4, 2, len(published) + 1], "no further messages")
    finally:
        for sub in subs:
            await sub.close()


@case("pubsub_filtering", requires=REQUIRES)
async def unsubscribe_ends_filtered_stream(t: Target) -> None:
    """Unsubscribe ends a filtered subscription with OK and nothing more arrives."""
    name = topic(t, "bye")
    sub = await subscribe_filtered(t, name, {"kind": "a"})
    try:
        await publish(t, name, b"first", kind="a")
        await sub.wait_for(1)
        await basic_stub(t).Unsubscribe(basic_pb.UnsubscribeRequest(subscription_id=sub.id))
        equal(await sub.wait_ended(), grpc.StatusCode.OK, "stream status after Unsubscribe")
        await publish(t, name, b"second", kind="a")
        equal(payloads(sub.messages), [b"first"], "messages after Unsubscribe")
    finally:
        await sub.close()


@case("pubsub_filtering")
async def invalid_filters(t: Target) -> None:
    """A filter breaking the attribute rules, or a bad topic, is INVALID_ARGUMENT naming the
    field."""
    name = topic(t, "bad")
    bad_filters: list[tuple[str, dict[str, str]]] = [
        ("an empty key", {"": "v"}),
        ("a 257-byte key", {"k" * 257: "v"}),
        ("a 4097-byte value", {"k": "v" * 4097}),
        ("65 entries", {f"k{i}": "v" for i in range(65)}),
    ]
    for what, attribute_filter in bad_filters:
        await expect_invalid(
            subscribe_filtered(t, name, attribute_filter),
            "attribute_filter",
            f"SubscribeFiltered with {what}",
        )
    for bad in ("", "a..b", "a.*", "a.>"):
        await expect_invalid(subscribe_filtered(t, bad), "topic", f"SubscribeFiltered {bad!r}")
    edge = await subscribe_filtered(t, name, {"k" * 256: "v" * 4096})
    await edge.close()
