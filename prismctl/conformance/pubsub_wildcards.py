"""pubsub_wildcards: `*` matches one token, `>` the rest; non-matching topics never arrive."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as pb
from prism.interfaces.pubsub.v1.pubsub_wildcards_pb2_grpc import PubSubWildcardsServiceStub

from prismctl.conformance.core import Target, case, equal, expect_invalid
from prismctl.conformance.pubsub_basic import Subscription, payloads, publish, topic

if TYPE_CHECKING:
    from prism.interfaces.pubsub.v1.pubsub_wildcards_pb2_grpc import (
        PubSubWildcardsServiceAsyncStub,
    )

REQUIRES = ("pubsub_basic",)


def stub(t: Target) -> PubSubWildcardsServiceAsyncStub:
    return PubSubWildcardsServiceStub(t.channel)


async def subscribe_pattern(t: Target, pattern: str) -> Subscription:
    return await Subscription.open(
        stub(t).SubscribePattern(pb.SubscribePatternRequest(pattern=pattern))
    )


@case("pubsub_wildcards", requires=REQUIRES)
async def wildcard_matching(t: Target) -> None:
    """`orders.*.created` and `orders.>` receive exactly the topics they match, with each
    message's concrete topic; a pattern without wildcards matches only itself."""

    def tp(*tokens: str) -> str:
        return topic(t, *tokens)

    star = await subscribe_pattern(t, tp("orders", "*", "created"))
    rest = await subscribe_pattern(t, tp("orders", ">"))
    exact = await subscribe_pattern(t, tp("orders", "eu"))
    try:
        published = [
            ("orders.eu.created", tp("orders", "eu", "created")),
            ("orders.created", tp("orders", "created")),
            ("orders.eu.x.created", tp("orders", "eu", "x", "created")),
            ("orders", tp("orders")),
            ("orders.eu", tp("orders", "eu")),
            ("other.eu.created", tp("other", "eu", "created")),
            ("orders.us.created", tp("orders", "us", "created")),
        ]
        for label, name in published:
            await publish(t, name, label.encode())
        # Sentinels matching each pattern, published last: when one arrives, anything
        # non-matching published earlier would have arrived before it.
        await publish(t, tp("orders", "zz", "created"), b"end")
        await publish(t, tp("orders", "eu"), b"end")
        equal(
            payloads(await star.wait_for(3)),
            [b"orders.eu.created", b"orders.us.created", b"end"],
            "orders.*.created received",
        )
        equal(
            payloads(await rest.wait_for(7)),
            [
                b"orders.eu.created",
                b"orders.created",
                b"orders.eu.x.created",
                b"orders.eu",
                b"orders.us.created",
                b"end",
                b"end",
            ],
            "orders.> received",
        )
        equal(payloads(await exact.wait_for(2)), [b"orders.eu", b"end"], "orders.eu received")
        equal(star.messages[0].topic, tp("orders", "eu", "created"), "concrete topic")
    finally:
        for sub in (star, rest, exact):
            await sub.close()


@case("pubsub_wildcards", requires=REQUIRES)
async def invalid_patterns(t: Target) -> None:
    """Malformed patterns are INVALID_ARGUMENT naming pattern."""
    for bad in ("", "a..b", "a.>.b", "a.b*", "a.>x", "*x.b", "has space"):

        async def first_event(bad: str = bad) -> Any:
            call = stub(t).SubscribePattern(pb.SubscribePatternRequest(pattern=bad))
            try:
                return await anext(call.__aiter__())
            finally:
                call.cancel()

        await expect_invalid(first_event(), "pattern", f"SubscribePattern {bad!r}")
