"""Stream replay and retention through the plugin object, on the real JetStream behaviour
(offsets survive purges and limits; removal is oldest first)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic
from prism.interfaces.stream.v1 import stream_replay_pb2 as replay
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention

from plugins.nats import NatsPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument

T = TypeVar("T")


async def _collect(events: AsyncIterator[T]) -> list[T]:
    async def run() -> list[T]:
        return [e async for e in events]

    return await asyncio.wait_for(run(), 10)


async def _append(plugin: NatsPlugin, ctx: CallContext, n: int) -> list[basic.AppendResponse]:
    return [
        await plugin.streams.append(basic.AppendRequest(stream="s", payload=b"%d" % i), ctx)
        for i in range(n)
    ]


async def _offsets(plugin: NatsPlugin, ctx: CallContext) -> list[int]:
    events = await _collect(plugin.streams.read(basic.ReadRequest(stream="s"), ctx))
    return [e.record.offset for e in events]


async def test_replay_range_and_timestamps(plugin: NatsPlugin, ctx: CallContext) -> None:
    appended = await _append(plugin, ctx, 5)
    ranged = await _collect(
        plugin.streams.replay_range(
            replay.ReplayRangeRequest(stream="s", start_offset=2, end_offset=40), ctx
        )
    )
    assert [e.record.offset for e in ranged] == [2, 3, 4, 5]
    for wanted in (appended[2].append_time, appended[0].append_time):
        found = await plugin.streams.get_offset_for_timestamp(
            replay.GetOffsetForTimestampRequest(stream="s", time=wanted), ctx
        )
        assert found.found
        assert found.offset == next(a.offset for a in appended if a.append_time == wanted)
    later = Timestamp()
    later.FromNanoseconds(appended[-1].append_time.ToNanoseconds() + 1)
    none = await plugin.streams.get_offset_for_timestamp(
        replay.GetOffsetForTimestampRequest(stream="s", time=later), ctx
    )
    assert (none.found, none.offset) == (False, 0)
    with pytest.raises(InvalidArgument) as missing:
        await plugin.streams.get_offset_for_timestamp(
            replay.GetOffsetForTimestampRequest(stream="s"), ctx
        )
    assert missing.value.field == "time"
    with pytest.raises(InvalidArgument) as backwards:
        plugin.streams.replay_range(
            replay.ReplayRangeRequest(stream="s", start_offset=3, end_offset=2), ctx
        )
    assert backwards.value.field == "end_offset"


async def test_trim_and_limits_keep_offsets(plugin: NatsPlugin, ctx: CallContext) -> None:
    unset = await plugin.streams.get_retention(retention.GetRetentionRequest(stream="s"), ctx)
    assert (unset.max_records, unset.HasField("max_age")) == (0, False)
    await _append(plugin, ctx, 6)
    with pytest.raises(InvalidArgument) as too_far:
        await plugin.streams.trim(retention.TrimRequest(stream="s", before_offset=8), ctx)
    assert too_far.value.field == "before_offset"
    trimmed = await plugin.streams.trim(retention.TrimRequest(stream="s", before_offset=3), ctx)
    assert trimmed.trimmed == 2
    again = await plugin.streams.trim(retention.TrimRequest(stream="s", before_offset=3), ctx)
    assert again.trimmed == 0
    assert await _offsets(plugin, ctx) == [3, 4, 5, 6]

    await plugin.streams.set_retention(
        retention.SetRetentionRequest(stream="s", max_records=3, max_age=Duration(seconds=3600)),
        ctx,
    )
    limits = await plugin.streams.get_retention(retention.GetRetentionRequest(stream="s"), ctx)
    assert (limits.max_records, limits.max_age.seconds) == (3, 3600)
    await _append(plugin, ctx, 1)
    assert await _offsets(plugin, ctx) == [5, 6, 7]
    latest = await plugin.streams.get_latest_offset(basic.GetLatestOffsetRequest(stream="s"), ctx)
    assert (latest.offset, latest.first_offset) == (7, 5)
    await plugin.streams.trim(retention.TrimRequest(stream="s", before_offset=8), ctx)
    empty = await plugin.streams.get_latest_offset(basic.GetLatestOffsetRequest(stream="s"), ctx)
    assert (empty.offset, empty.first_offset) == (7, 0)
    assert (await _append(plugin, ctx, 1))[0].offset == 8


async def test_namespaces_are_apart(plugin: NatsPlugin, ctx: CallContext) -> None:
    """Namespaces differing only in '.' vs '_' (one JetStream name part each) never mix."""
    other = CallContext.with_timeout("ns_1", 5.0)
    await _append(plugin, ctx, 2)
    assert await _offsets(plugin, other) == []
    reply = await plugin.streams.append(basic.AppendRequest(stream="s", payload=b"o"), other)
    assert reply.offset == 1
