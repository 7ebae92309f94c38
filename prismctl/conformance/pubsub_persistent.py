"""pubsub_persistent: the per-topic log (increasing sequences), durable subscriptions that
resume after their cumulative acknowledgement, start positions, DURABLE_IN_USE, input rules."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

import grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_persistent_pb2 as pb
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards_pb
from prism.interfaces.pubsub.v1.pubsub_persistent_pb2_grpc import PubSubPersistentServiceStub
from prism.interfaces.pubsub.v1.pubsub_wildcards_pb2_grpc import PubSubWildcardsServiceStub

from prismctl.conformance.core import (
    Target,
    case,
    check,
    equal,
    expect_error,
    expect_invalid,
    when_free,
)
from prismctl.conformance.pubsub_basic import Subscription, payloads, publish, subscribe, topic
from prismctl.conformance.pubsub_basic import stub as basic_stub

if TYPE_CHECKING:
    from prism.interfaces.pubsub.v1.pubsub_persistent_pb2_grpc import (
        PubSubPersistentServiceAsyncStub,
    )

REQUIRES = ("pubsub_basic",)
# How long a cancelled durable stream may still count as live on the server.
RELEASE_TIMEOUT = 5.0


def stub(t: Target) -> PubSubPersistentServiceAsyncStub:
    return PubSubPersistentServiceStub(t.channel)


async def publish_persistent(
    t: Target, topic_name: str, payload: bytes, **attributes: str
) -> pb.PublishPersistentResponse:
    response: pb.PublishPersistentResponse = await stub(t).PublishPersistent(
        pb.PublishPersistentRequest(topic=topic_name, payload=payload, attributes=attributes)
    )
    return response


async def subscribe_durable(
    t: Target,
    topic_name: str,
    durable: str,
    start: int = pb.START_POSITION_UNSPECIFIED,
    start_sequence: int = 0,
) -> Subscription:
    request = pb.SubscribeDurableRequest(
        topic=topic_name,
        durable_name=durable,
        start=start,  # type: ignore[arg-type]
        start_sequence=start_sequence,
    )
    return await Subscription.open(stub(t).SubscribeDurable(request))


async def resubscribe(
    t: Target,
    topic_name: str,
    durable: str,
    start: int = pb.START_POSITION_UNSPECIFIED,
    start_sequence: int = 0,
) -> Subscription:
    """SubscribeDurable once the durable's previous (cancelled) stream is gone."""
    return await when_free(
        lambda: subscribe_durable(t, topic_name, durable, start, start_sequence),
        f"durable {durable}",
        RELEASE_TIMEOUT,
    )


async def ack_durable(t: Target, topic_name: str, durable: str, sequence: int) -> int:
    response: pb.AckDurableResponse = await stub(t).AckDurable(
        pb.AckDurableRequest(topic=topic_name, durable_name=durable, sequence=sequence)
    )
    return response.acked_sequence


async def last_message(t: Target, topic_name: str) -> tuple[int, str]:
    response: pb.GetLastMessageIDResponse = await stub(t).GetLastMessageID(
        pb.GetLastMessageIDRequest(topic=topic_name)
    )
    return response.sequence, response.message_id


def sequences(messages: list[basic_pb.Message]) -> list[int]:
    return [m.sequence for m in messages]


async def publish_many(t: Target, topic_name: str, count: int, tag: str = "m") -> list[int]:
    """`count` persistent messages with payloads tag0, tag1...; their sequences."""
    return [
        (await publish_persistent(t, topic_name, f"{tag}{i}".encode())).sequence
        for i in range(count)
    ]


@case("pubsub_persistent")
async def sequences_and_last_message(t: Target) -> None:
    """Sequences are positive and strictly increasing per topic; GetLastMessageID reports the
    newest logged message, and (0, "") for an unknown topic."""
    name = topic(t, "log")
    equal(await last_message(t, name), (0, ""), "GetLastMessageID of an unknown topic")
    published = [await publish_persistent(t, name, f"m{i}".encode()) for i in range(4)]
    seqs = [p.sequence for p in published]
    check(seqs[0] > 0, f"first sequence is not positive: {seqs}")
    check(all(a < b for a, b in itertools.pairwise(seqs)), f"not increasing: {seqs}")
    equal(len({p.message_id for p in published}), 4, "distinct message ids")
    check(all(p.message_id for p in published), "a message id is empty")
    equal(
        await last_message(t, name),
        (seqs[-1], published[-1].message_id),
        "GetLastMessageID after four publishes",
    )
    equal(await last_message(t, topic(t, "other")), (0, ""), "GetLastMessageID of another topic")


@case("pubsub_persistent")
async def new_durable_reads_the_log_then_live(t: Target) -> None:
    """A new durable (UNSPECIFIED = LAST_ACKED, nothing acked) first gets every logged message in
    sequence order with id, topic, attributes and sequence, then new ones as published."""
    name = topic(t, "orders")
    logged = [await publish_persistent(t, name, f"m{i}".encode(), n=str(i)) for i in range(3)]
    sub = await subscribe_durable(t, name, "reader")
    try:
        got = await sub.wait_for(3)
        equal(payloads(got), [b"m0", b"m1", b"m2"], "logged messages")
        equal(sequences(got), [p.sequence for p in logged], "sequences of logged messages")
        equal([m.message_id for m in got], [p.message_id for p in logged], "message ids")
        equal({m.topic for m in got}, {name}, "topics")
        equal(dict(got[1].attributes), {"n": "1"}, "attributes")
        live = await publish_persistent(t, name, b"live")
        got = await sub.wait_for(4)
        equal((got[3].payload, got[3].sequence), (b"live", live.sequence), "live message")
    finally:
        await sub.close()


@case("pubsub_persistent")
async def durable_resumes_after_last_ack(t: Target) -> None:
    """Acks are cumulative and never go back; a later stream of the durable starts after the
    acknowledged sequence, so unacknowledged messages come again; acking everything leaves only
    new messages."""
    name = topic(t, "jobs")
    seqs = await publish_many(t, name, 5)
    sub = await subscribe_durable(t, name, "worker")
    try:
        equal(sequences(await sub.wait_for(5)), seqs, "first stream")
        equal(await ack_durable(t, name, "worker", seqs[1]), seqs[1], "ack of the 2nd message")
        equal(await ack_durable(t, name, "worker", seqs[0]), seqs[1], "ack below the ack")
        equal(await ack_durable(t, name, "worker", 0), seqs[1], "ack of sequence 0")
    finally:
        await sub.close()
    sub = await resubscribe(t, name, "worker")
    try:
        equal(payloads(await sub.wait_for(3)), [b"m2", b"m3", b"m4"], "second stream")
        equal(await ack_durable(t, name, "worker", seqs[4]), seqs[4], "ack of the last message")
    finally:
        await sub.close()
    sub = await resubscribe(t, name, "worker", pb.START_POSITION_LAST_ACKED)
    try:
        later = await publish_persistent(t, name, b"later")
        got = await sub.wait_for(1)
        equal((got[0].payload, got[0].sequence), (b"later", later.sequence), "third stream")
        check(len(sub.messages) == 1, f"repeated messages: {payloads(sub.messages)}")
    finally:
        await sub.close()


@case("pubsub_persistent")
async def start_positions(t: Target) -> None:
    """BEGINNING replays the whole log whatever was acked; SEQUENCE starts at the first message
    with sequence >= start_sequence."""
    name = topic(t, "history")
    seqs = await publish_many(t, name, 4)
    await subscribe_then_ack(t, name, "d", seqs[2])
    sub = await resubscribe(t, name, "d", pb.START_POSITION_BEGINNING)
    try:
        equal(sequences(await sub.wait_for(4)), seqs, "BEGINNING after acking the 3rd message")
    finally:
        await sub.close()
    for start, expected in ((seqs[1], seqs[1:]), (seqs[0] + 1, seqs[1:]), (seqs[3], seqs[3:])):
        sub = await resubscribe(t, name, "d", pb.START_POSITION_SEQUENCE, start)
        try:
            equal(sequences(await sub.wait_for(len(expected))), expected, f"SEQUENCE {start}")
        finally:
            await sub.close()
    sub = await resubscribe(t, name, "d", pb.START_POSITION_SEQUENCE, seqs[3] + 1)
    try:
        after = await publish_persistent(t, name, b"after")
        equal(sequences(await sub.wait_for(1)), [after.sequence], "SEQUENCE past the end")
    finally:
        await sub.close()


async def subscribe_then_ack(t: Target, topic_name: str, durable: str, sequence: int) -> None:
    """Create the durable (by subscribing) and acknowledge up to `sequence`."""
    sub = await subscribe_durable(t, topic_name, durable)
    try:
        equal(await ack_durable(t, topic_name, durable, sequence), sequence, "acked sequence")
    finally:
        await sub.close()


@case("pubsub_persistent")
async def catch_up_without_gaps_or_repeats(t: Target) -> None:
    """A durable stream opened while messages are being published gets every message exactly
    once, in sequence order, across the switch from the log to live delivery."""
    name = topic(t, "race")
    seqs = await publish_many(t, name, 10, "before")

    async def publish_more() -> list[int]:
        return await publish_many(t, name, 20, "during")

    more = asyncio.create_task(publish_more())
    sub = await subscribe_durable(t, name, "racer", pb.START_POSITION_BEGINNING)
    try:
        seqs += await more
        equal(sequences(await sub.wait_for(30)), seqs, "sequences received")
        last = await publish_persistent(t, name, b"last")
        equal(sequences(await sub.wait_for(31))[-1], last.sequence, "message after the race")
        equal(len(sub.messages), 31, "messages received")
    finally:
        more.cancel()
        await sub.close()


@case("pubsub_persistent", requires=REQUIRES)
async def log_and_live_subscribers(t: Target) -> None:
    """PublishPersistent also reaches plain live subscribers (with its sequence); plain Publish
    is not logged and never reaches a durable subscriber."""
    name = topic(t, "mixed")
    live = await subscribe(t, name)
    durable = await subscribe_durable(t, name, "d")
    try:
        logged = await publish_persistent(t, name, b"logged")
        await publish(t, name, b"plain")
        last = await publish_persistent(t, name, b"last")
        got = await live.wait_for(3)
        equal(payloads(got), [b"logged", b"plain", b"last"], "live subscriber")
        equal(sequences(got), [logged.sequence, 0, last.sequence], "sequences at a live subscriber")
        equal(payloads(await durable.wait_for(2)), [b"logged", b"last"], "durable subscriber")
        equal(await last_message(t, name), (last.sequence, last.message_id), "last logged")
    finally:
        await live.close()
        await durable.close()


@case("pubsub_persistent", requires=("pubsub_wildcards",))
async def reaches_pattern_subscribers(t: Target) -> None:
    """PublishPersistent reaches a matching SubscribePattern subscription like a plain Publish,
    carrying its sequence."""
    name = topic(t, "eu", "orders")
    sub = await Subscription.open(
        PubSubWildcardsServiceStub(t.channel).SubscribePattern(
            wildcards_pb.SubscribePatternRequest(pattern=topic(t, "*", "orders"))
        )
    )
    try:
        logged = await publish_persistent(t, name, b"logged")
        got = await sub.wait_for(1)
        equal((got[0].payload, got[0].sequence), (b"logged", logged.sequence), "pattern match")
    finally:
        await sub.close()


@case("pubsub_persistent", requires=REQUIRES)
async def one_live_stream_per_durable(t: Target) -> None:
    """A second SubscribeDurable of a live durable is FAILED_PRECONDITION DURABLE_IN_USE; the
    same name on another topic is another durable; after Unsubscribe ends the stream with OK the
    durable can be subscribed again."""
    name = topic(t, "exclusive")
    first = await subscribe_durable(t, name, "d")
    try:
        await expect_error(
            subscribe_durable(t, name, "d"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "a second stream of a live durable",
            reason="DURABLE_IN_USE",
        )
        other = await subscribe_durable(t, topic(t, "elsewhere"), "d")
        await other.close()
        await basic_stub(t).Unsubscribe(basic_pb.UnsubscribeRequest(subscription_id=first.id))
        equal(await first.wait_ended(), grpc.StatusCode.OK, "durable stream after Unsubscribe")
    finally:
        await first.close()
    again = await resubscribe(t, name, "d")
    await again.close()


@case("pubsub_persistent")
async def invalid_persistent_input(t: Target) -> None:
    """Bad topics, durable names, start sequences and ack sequences are INVALID_ARGUMENT naming
    the field; an unknown durable is NOT_FOUND DURABLE_NOT_FOUND."""
    name = topic(t, "bad")
    seqs = await publish_many(t, name, 2)
    for bad in ("", "a..b", "a.*", "has space"):
        await expect_invalid(
            publish_persistent(t, bad, b"x"), "topic", f"PublishPersistent to {bad!r}"
        )
        await expect_invalid(subscribe_durable(t, bad, "d"), "topic", f"SubscribeDurable {bad!r}")
    await expect_invalid(
        stub(t).PublishPersistent(
            pb.PublishPersistentRequest(topic=name, payload=b"x", attributes={"": "v"})
        ),
        "attributes",
        "PublishPersistent with an empty attribute key",
    )
    for durable in ("", "Upper", "1d", "d" * 64, "d.e"):
        await expect_invalid(
            subscribe_durable(t, name, durable), "durable_name", f"durable_name {durable!r}"
        )
        await expect_invalid(
            ack_durable(t, name, durable, 1), "durable_name", f"AckDurable of {durable!r}"
        )
    await expect_invalid(
        subscribe_durable(t, name, "d", pb.START_POSITION_SEQUENCE, 0),
        "start_sequence",
        "START_POSITION_SEQUENCE with start_sequence 0",
    )
    await expect_error(
        ack_durable(t, name, "nobody", seqs[0]),
        grpc.StatusCode.NOT_FOUND,
        "AckDurable of an unknown durable",
        reason="DURABLE_NOT_FOUND",
    )
    await subscribe_then_ack(t, name, "d", seqs[0])
    await expect_invalid(
        ack_durable(t, name, "d", seqs[1] + 1), "sequence", "AckDurable past the last sequence"
    )
    equal(await ack_durable(t, name, "d", 0), seqs[0], "acked sequence after a rejected ack")
    equal((await last_message(t, name))[0], seqs[1], "last sequence after rejected publishes")
