"""Consumer groups on JetStream durable pull consumers, through the plugin object."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic
from prism.interfaces.stream.v1 import stream_consumer_groups_pb2 as groups

from plugins.nats import NatsPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


async def _append(plugin: NatsPlugin, ctx: CallContext, n: int, stream: str = "s") -> None:
    for i in range(n):
        await plugin.streams.append(basic.AppendRequest(stream=stream, payload=b"%d" % i), ctx)


async def _create(plugin: NatsPlugin, ctx: CallContext, **kw: Any) -> None:
    await plugin.groups.create_consumer_group(
        groups.CreateConsumerGroupRequest(stream="s", group="g", **kw), ctx
    )


def _join(
    plugin: NatsPlugin, ctx: CallContext, consumer: str, max_in_flight: int = 0
) -> AsyncIterator[groups.JoinConsumerGroupResponse]:
    return aiter(
        plugin.groups.join_consumer_group(
            groups.JoinConsumerGroupRequest(
                stream="s", group="g", consumer=consumer, max_in_flight=max_in_flight
            ),
            ctx,
        )
    )


async def _records(events: AsyncIterator[groups.JoinConsumerGroupResponse], n: int) -> list[int]:
    return [(await asyncio.wait_for(anext(events), 5)).record.offset for _ in range(n)]


async def test_group_shares_records_and_acks(plugin: NatsPlugin, ctx: CallContext) -> None:
    await _append(plugin, ctx, 2)
    await _create(plugin, ctx, start=groups.GROUP_START_POSITION_EARLIEST)
    with pytest.raises(AlreadyExists) as exists:
        await _create(plugin, ctx)
    assert exists.value.reason == "CONSUMER_GROUP_EXISTS"
    await _append(plugin, ctx, 3)
    events = _join(plugin, ctx, "c1", max_in_flight=4)
    first = await asyncio.wait_for(anext(events), 5)
    assert (first.joined.group, first.joined.consumer) == ("g", "c1")
    assert await _records(events, 4) == [1, 2, 3, 4]
    with pytest.raises(FailedPrecondition) as in_use:
        await anext(_join(plugin, ctx, "c1"))
    assert in_use.value.reason == "CONSUMER_IN_USE"

    info = await plugin.groups.get_consumer_group_info(
        groups.GetConsumerGroupInfoRequest(stream="s", group="g"), ctx
    )
    assert (info.last_delivered_offset, info.pending_count) == (4, 4)
    assert [(c.consumer, c.pending_count) for c in info.consumers] == [("c1", 4)]
    assert info.ack_timeout.seconds == 30

    acked = await plugin.groups.ack_records(
        groups.AckRecordsRequest(stream="s", group="g", offsets=[1, 2, 2, 99]), ctx
    )
    assert acked.acked == 2
    # room freed by the acks: the fifth record follows
    assert await _records(events, 1) == [5]
    again = await plugin.groups.ack_records(
        groups.AckRecordsRequest(stream="s", group="g", offsets=[1, 3]), ctx
    )
    assert again.acked == 1
    await events.aclose()  # type: ignore[attr-defined]


async def test_unacked_records_are_redelivered(plugin: NatsPlugin, ctx: CallContext) -> None:
    await _create(plugin, ctx, ack_timeout=Duration(seconds=1))
    await _append(plugin, ctx, 2)
    events = _join(plugin, ctx, "c1")
    await anext(events)
    assert await _records(events, 2) == [1, 2]
    acked = await plugin.groups.ack_records(
        groups.AckRecordsRequest(stream="s", group="g", offsets=[2]), ctx
    )
    assert acked.acked == 1
    await events.aclose()  # type: ignore[attr-defined]
    other = _join(plugin, ctx, "c2")
    await anext(other)
    # record 1 comes back after its 1 s ack timeout, to another consumer (2 could too, but
    # only if this loaded machine took over a second to ack it)
    seen = []
    while 1 not in seen:
        seen += await _records(other, 1)
    assert seen[-1] == 1
    await other.aclose()  # type: ignore[attr-defined]


async def test_start_positions_and_unknown_groups(plugin: NatsPlugin, ctx: CallContext) -> None:
    await _append(plugin, ctx, 3)
    await _create(plugin, ctx, start=groups.GROUP_START_POSITION_OFFSET, start_offset=2)
    info = await plugin.groups.get_consumer_group_info(
        groups.GetConsumerGroupInfoRequest(stream="s", group="g"), ctx
    )
    assert info.last_delivered_offset == 1
    latest = groups.CreateConsumerGroupRequest(stream="s", group="late")
    await plugin.groups.create_consumer_group(latest, ctx)
    late = await plugin.groups.get_consumer_group_info(
        groups.GetConsumerGroupInfoRequest(stream="s", group="late"), ctx
    )
    assert late.last_delivered_offset == 3
    with pytest.raises(InvalidArgument) as bad:
        await _create(plugin, ctx, start=groups.GROUP_START_POSITION_OFFSET)
    assert bad.value.field == "start_offset"
    with pytest.raises(NotFound) as missing:
        await plugin.groups.ack_records(
            groups.AckRecordsRequest(stream="s", group="nope", offsets=[1]), ctx
        )
    assert missing.value.reason == "CONSUMER_GROUP_NOT_FOUND"
    never = groups.JoinConsumerGroupRequest(stream="never", group="g", consumer="c")
    with pytest.raises(NotFound):
        await anext(aiter(plugin.groups.join_consumer_group(never, ctx)))
