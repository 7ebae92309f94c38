"""PubSub persistent through the plugin object: the log, durables, cumulative acks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic
from prism.interfaces.pubsub.v1 import pubsub_persistent_pb2 as pb

from plugins.nats import NatsPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

Events = AsyncIterator[pb.SubscribeDurableResponse]


async def _publish(plugin: NatsPlugin, ctx: CallContext, topic: str, payload: bytes) -> int:
    reply = await plugin.persistent.publish_persistent(
        pb.PublishPersistentRequest(topic=topic, payload=payload), ctx
    )
    return reply.sequence


def _durable(
    plugin: NatsPlugin,
    ctx: CallContext,
    start: pb.StartPosition.ValueType = pb.START_POSITION_UNSPECIFIED,
    start_sequence: int = 0,
) -> Events:
    request = pb.SubscribeDurableRequest(
        topic="orders",
        durable_name="d1",
        start=start,
        start_sequence=start_sequence,
    )
    return aiter(plugin.persistent.subscribe_durable(request, ctx))


async def _payloads(events: Events, n: int) -> list[bytes]:
    return [(await asyncio.wait_for(anext(events), 5)).message.payload for _ in range(n)]


async def test_durable_resumes_after_last_ack(plugin: NatsPlugin, ctx: CallContext) -> None:
    empty = await plugin.persistent.get_last_message_id(
        pb.GetLastMessageIDRequest(topic="orders"), ctx
    )
    assert (empty.sequence, empty.message_id) == (0, "")
    other = await _publish(plugin, ctx, "other", b"x")
    seqs = [await _publish(plugin, ctx, "orders", b"m%d" % i) for i in range(3)]
    assert other < seqs[0] < seqs[1] < seqs[2]
    last = await plugin.persistent.get_last_message_id(
        pb.GetLastMessageIDRequest(topic="orders"), ctx
    )
    assert last.sequence == seqs[2] and last.message_id

    events = _durable(plugin, ctx)
    assert (await anext(events)).WhichOneof("event") == "started"
    with pytest.raises(FailedPrecondition) as in_use:
        await anext(_durable(plugin, ctx))
    assert in_use.value.reason == "DURABLE_IN_USE"
    assert await _payloads(events, 3) == [b"m0", b"m1", b"m2"]
    live = await _publish(plugin, ctx, "orders", b"m3")
    got = await asyncio.wait_for(anext(events), 5)
    assert (got.message.payload, got.message.sequence) == (b"m3", live)
    acked = await plugin.persistent.ack_durable(
        pb.AckDurableRequest(topic="orders", durable_name="d1", sequence=seqs[1]), ctx
    )
    assert acked.acked_sequence == seqs[1]
    lower = await plugin.persistent.ack_durable(
        pb.AckDurableRequest(topic="orders", durable_name="d1", sequence=seqs[0]), ctx
    )
    assert lower.acked_sequence == seqs[1]
    await events.aclose()  # type: ignore[attr-defined]

    resumed = _durable(plugin, ctx)
    await anext(resumed)
    assert await _payloads(resumed, 2) == [b"m2", b"m3"]
    await resumed.aclose()  # type: ignore[attr-defined]
    again = _durable(plugin, ctx, start=pb.START_POSITION_SEQUENCE, start_sequence=seqs[1])
    await anext(again)
    assert await _payloads(again, 3) == [b"m1", b"m2", b"m3"]
    await again.aclose()  # type: ignore[attr-defined]


async def test_persistent_messages_reach_live_subscribers(
    plugin: NatsPlugin, ctx: CallContext
) -> None:
    live = aiter(plugin.pubsub.subscribe(basic.SubscribeRequest(topic="orders"), ctx))
    await anext(live)
    seq = await _publish(plugin, ctx, "orders", b"both")
    got = await asyncio.wait_for(anext(live), 5)
    assert (got.message.payload, got.message.sequence) == (b"both", seq)
    await live.aclose()  # type: ignore[attr-defined]


async def test_durable_errors(plugin: NatsPlugin, ctx: CallContext) -> None:
    with pytest.raises(NotFound) as missing:
        await plugin.persistent.ack_durable(
            pb.AckDurableRequest(topic="orders", durable_name="nope", sequence=0), ctx
        )
    assert missing.value.reason == "DURABLE_NOT_FOUND"
    seq = await _publish(plugin, ctx, "orders", b"x")
    with pytest.raises(InvalidArgument) as above:
        await plugin.persistent.ack_durable(
            pb.AckDurableRequest(topic="orders", durable_name="d1", sequence=seq + 1), ctx
        )
    assert above.value.field == "sequence"
    with pytest.raises(InvalidArgument) as bad_name:
        plugin.persistent.subscribe_durable(
            pb.SubscribeDurableRequest(topic="orders", durable_name="Bad"), ctx
        )
    assert bad_name.value.field == "durable_name"
    with pytest.raises(InvalidArgument) as bad_start:
        plugin.persistent.subscribe_durable(
            pb.SubscribeDurableRequest(
                topic="orders", durable_name="d1", start=pb.START_POSITION_SEQUENCE
            ),
            ctx,
        )
    assert bad_start.value.field == "start_sequence"


async def test_catching_up_on_a_long_log_is_not_a_slow_subscriber(
    plugin: NatsPlugin, ctx: CallContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable stream reads the log only as fast as its client: a backlog longer than the
    slow-subscriber limit is delivered in full (the limit is lowered here to keep it quick)."""
    monkeypatch.setattr("plugins.nats.subscriptions.MAX_BACKLOG", 600)
    await asyncio.gather(*(_publish(plugin, ctx, "orders", b"%d" % i) for i in range(1000)))
    events = _durable(plugin, ctx)
    await anext(events)
    await asyncio.sleep(0.2)  # give an unbounded reader every chance to overflow the buffer
    got = await _payloads(events, 1000)
    assert sorted(int(p) for p in got) == list(range(1000))
    await events.aclose()  # type: ignore[attr-defined]
