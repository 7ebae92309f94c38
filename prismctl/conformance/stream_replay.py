"""stream_replay: inclusive offset ranges that end without waiting, and the first record at or
after a time."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_replay_pb2 as pb
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention_pb
from prism.interfaces.stream.v1.stream_replay_pb2_grpc import StreamReplayServiceStub
from prism.interfaces.stream.v1.stream_retention_pb2_grpc import StreamRetentionServiceStub

from prismctl.conformance.core import Target, case, equal, expect_invalid
from prismctl.conformance.stream_basic import READ_TIMEOUT, append

if TYPE_CHECKING:
    from prism.interfaces.stream.v1.stream_replay_pb2_grpc import StreamReplayServiceAsyncStub

REQUIRES = ("stream_basic",)


def stub(t: Target) -> StreamReplayServiceAsyncStub:
    return StreamReplayServiceStub(t.channel)


async def replay(t: Target, stream: str, start: int, end: int) -> list[basic_pb.Record]:
    """A whole ReplayRange; failing (timeout) if it waits for records instead of ending."""
    call: Any = stub(t).ReplayRange(
        pb.ReplayRangeRequest(stream=stream, start_offset=start, end_offset=end)
    )

    async def collect() -> list[basic_pb.Record]:
        return [r.record async for r in call]

    return await asyncio.wait_for(collect(), READ_TIMEOUT)


async def offset_for(t: Target, stream: str, when: Timestamp) -> tuple[bool, int]:
    response: pb.GetOffsetForTimestampResponse = await stub(t).GetOffsetForTimestamp(
        pb.GetOffsetForTimestampRequest(stream=stream, time=when)
    )
    return response.found, response.offset


def offsets(records: list[basic_pb.Record]) -> list[int]:
    return [r.offset for r in records]


def nanos(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


@case("stream_replay", requires=REQUIRES)
async def replay_ranges_are_inclusive(t: Target) -> None:
    """ReplayRange returns start..end inclusive in offset order with the records' content, stops
    at the latest record when end is beyond it, and ends instead of waiting."""
    s = t.name("replay")
    for i in range(6):
        await append(t, s, f"r{i + 1}".encode(), key=f"k{i + 1}")
    middle = await replay(t, s, 2, 4)
    equal(offsets(middle), [2, 3, 4], "ReplayRange 2..4")
    equal([r.payload for r in middle], [b"r2", b"r3", b"r4"], "payloads of 2..4")
    equal([r.key for r in middle], ["k2", "k3", "k4"], "keys of 2..4")
    equal(offsets(await replay(t, s, 3, 3)), [3], "ReplayRange 3..3")
    equal(offsets(await replay(t, s, 5, 1000)), [5, 6], "ReplayRange 5..1000")
    equal(offsets(await replay(t, s, 1, 6)), [1, 2, 3, 4, 5, 6], "ReplayRange 1..6")
    equal(await replay(t, s, 7, 9), [], "ReplayRange past the latest offset")
    equal(await replay(t, t.name("never"), 1, 5), [], "ReplayRange of a never-written stream")


@case("stream_replay", requires=REQUIRES)
async def offset_for_timestamp(t: Target) -> None:
    """GetOffsetForTimestamp is the first record appended at or after the time (by the
    append_time the records carry), and found=false, offset 0 past the last one."""
    s = t.name("bytime")
    times = [(await append(t, s, bytes([i]))).append_time.ToNanoseconds() for i in range(4)]
    for probe in sorted(set(times)):
        expected = 1 + next(i for i, at in enumerate(times) if at >= probe)
        equal(await offset_for(t, s, nanos(probe)), (True, expected), f"offset at time {probe}")
    equal(await offset_for(t, s, nanos(1_000_000_000)), (True, 1), "offset at an early time")
    after = times[-1] + 60 * 1_000_000_000
    equal(await offset_for(t, s, nanos(after)), (False, 0), "offset after the last append")
    equal(
        await offset_for(t, t.name("never"), nanos(1_000_000_000)),
        (False, 0),
        "offset in a never-written stream",
    )


@case("stream_replay", requires=("stream_basic", "stream_retention"))
async def removed_records_are_skipped(t: Target) -> None:
    """After a Trim, ReplayRange skips the removed records without error and
    GetOffsetForTimestamp finds only retained ones."""
    s = t.name("trimmed")
    first = await append(t, s, b"1")
    for i in range(2, 6):
        await append(t, s, bytes([i]))
    await StreamRetentionServiceStub(t.channel).Trim(
        retention_pb.TrimRequest(stream=s, before_offset=3)
    )
    equal(offsets(await replay(t, s, 1, 4)), [3, 4], "ReplayRange 1..4 after Trim(3)")
    equal(offsets(await replay(t, s, 1, 2)), [], "ReplayRange of trimmed records only")
    equal(
        await offset_for(t, s, first.append_time),
        (True, 3),
        "offset at the time of a trimmed record",
    )


@case("stream_replay", requires=REQUIRES)
async def invalid_replay_input(t: Target) -> None:
    """A zero start, an end before the start, a bad stream name and a missing time are
    INVALID_ARGUMENT naming the field."""
    s = t.name("bad")
    await append(t, s, b"x")
    await expect_invalid(replay(t, s, 0, 5), "start_offset", "ReplayRange from offset 0")
    await expect_invalid(replay(t, s, 3, 2), "end_offset", "ReplayRange 3..2")
    await expect_invalid(replay(t, "Bad", 1, 2), "stream", "ReplayRange of stream 'Bad'")
    await expect_invalid(
        stub(t).GetOffsetForTimestamp(pb.GetOffsetForTimestampRequest(stream=s)),
        "time",
        "GetOffsetForTimestamp without a time",
    )
    await expect_invalid(
        stub(t).GetOffsetForTimestamp(
            pb.GetOffsetForTimestampRequest(stream="", time=nanos(1_000_000_000))
        ),
        "stream",
        "GetOffsetForTimestamp of stream ''",
    )
