"""stream_retention: limits that never remove records within them, oldest-first removal into one
contiguous range, Trim, and the input rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_retention_pb2 as pb
from prism.interfaces.stream.v1.stream_basic_pb2_grpc import StreamBasicServiceStub
from prism.interfaces.stream.v1.stream_retention_pb2_grpc import StreamRetentionServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.stream_basic import append, read
from prismctl.conformance.stream_partitioning import append_to, partitions, read_partition

if TYPE_CHECKING:
    from prism.interfaces.stream.v1.stream_retention_pb2_grpc import (
        StreamRetentionServiceAsyncStub,
    )

REQUIRES = ("stream_basic",)
HOUR = Duration(seconds=3600)
TEN_YEARS_SECONDS = 10 * 366 * 24 * 3600


def stub(t: Target) -> StreamRetentionServiceAsyncStub:
    return StreamRetentionServiceStub(t.channel)


async def set_retention(
    t: Target, stream: str, max_records: int = 0, max_age: Duration | None = None
) -> None:
    await stub(t).SetRetention(
        pb.SetRetentionRequest(stream=stream, max_records=max_records, max_age=max_age)
    )


async def get_retention(t: Target, stream: str) -> tuple[int, Duration | None]:
    response: pb.GetRetentionResponse = await stub(t).GetRetention(
        pb.GetRetentionRequest(stream=stream)
    )
    return response.max_records, (response.max_age if response.HasField("max_age") else None)


async def trim(t: Target, stream: str, before: int) -> int:
    response: pb.TrimResponse = await stub(t).Trim(
        pb.TrimRequest(stream=stream, before_offset=before)
    )
    return response.trimmed


async def latest(t: Target, stream: str) -> tuple[int, int]:
    response: basic_pb.GetLatestOffsetResponse = await StreamBasicServiceStub(
        t.channel
    ).GetLatestOffset(basic_pb.GetLatestOffsetRequest(stream=stream))
    return response.offset, response.first_offset


@case("stream_retention", requires=REQUIRES)
async def retention_settings(t: Target) -> None:
    """A never-configured stream is unlimited; SetRetention works before the first Append and
    replaces both limits, which GetRetention reads back."""
    s = t.name("settings")
    unset = await get_retention(t, s)
    check(unset[0] == 0 and not (unset[1] and unset[1].ToNanoseconds()), f"default {unset}")
    await set_retention(t, s, max_records=5, max_age=HOUR)
    equal(await get_retention(t, s), (5, HOUR), "limits set before the first Append")
    await append(t, s, b"x")
    await set_retention(t, s, max_records=7)
    got = await get_retention(t, s)
    equal(got[0], 7, "max_records after replacing the limits")
    check(not (got[1] and got[1].ToNanoseconds()), f"max_age not cleared by a replace: {got}")
    await set_retention(t, s, max_age=Duration(seconds=90))
    equal(await get_retention(t, s), (0, Duration(seconds=90)), "age-only limits")
    equal([r.payload for r in await read(t, s)], [b"x"], "records after SetRetention")


@case("stream_retention", requires=REQUIRES)
async def count_limit_keeps_the_newest(t: Target) -> None:
    """With max_records 3, after every append the retained records are one contiguous range
    ending at the latest offset and holding at least the newest three; a removed record never
    comes back; offsets keep growing from where they were."""
    s = t.name("count")
    await set_retention(t, s, max_records=3, max_age=HOUR)
    lowest = 1
    for n in range(1, 11):
        equal((await append(t, s, f"r{n}".encode())).offset, n, f"offset of append {n}")
        records = await read(t, s)
        got = [r.offset for r in records]
        check(got, f"nothing retained after append {n}")
        equal(got, list(range(got[0], n + 1)), f"retained offsets after append {n}")
        check(got[0] <= max(1, n - 2), f"one of the newest 3 removed after append {n}: {got}")
        check(got[0] >= lowest, f"a removed record came back after append {n}: {got}")
        lowest = got[0]
        equal([r.payload for r in records], [f"r{o}".encode() for o in got], "payloads")
        last, first = await latest(t, s)
        equal(last, n, f"latest offset after append {n}")
        check(got[0] <= first <= max(1, n - 2), f"first offset {first} after append {n}: {got}")


@case("stream_retention", requires=REQUIRES)
async def trim_removes_older_records(t: Target) -> None:
    """Trim(before) removes exactly the records below `before`, reports how many it removed,
    is a no-op on what is already gone, may empty the stream, and never changes offsets."""
    s = t.name("trim")
    for i in range(6):
        await append(t, s, bytes([i]))
    equal(await trim(t, s, 3), 2, "records removed by Trim(3)")
    equal([r.offset for r in await read(t, s)], [3, 4, 5, 6], "records after Trim(3)")
    equal(await latest(t, s), (6, 3), "latest/first offsets after Trim(3)")
    equal(await trim(t, s, 3), 0, "records removed by a repeated Trim(3)")
    equal(await trim(t, s, 1), 0, "records removed by Trim(1)")
    equal(await trim(t, s, 7), 4, "records removed by Trim(latest + 1)")
    equal(await read(t, s), [], "records after trimming everything")
    equal(await latest(t, s), (6, 0), "latest/first offsets of an emptied stream")
    equal((await append(t, s, b"next")).offset, 7, "offset of the next append")
    equal([r.offset for r in await read(t, s)], [7], "records after the next append")
    equal(await trim(t, t.name("never"), 1), 0, "Trim(1) of a never-written stream")


@case("stream_retention", requires=REQUIRES)
async def invalid_retention_input(t: Target) -> None:
    """Negative or out-of-range limits, Trim past latest + 1 and bad stream names are
    INVALID_ARGUMENT naming the field; the stored limits stay as they were."""
    s = t.name("bad")
    await set_retention(t, s, max_records=4)
    await expect_invalid(set_retention(t, s, max_records=-1), "max_records", "max_records -1")
    for bad in (Duration(seconds=-1), Duration(seconds=TEN_YEARS_SECONDS + 86400)):
        await expect_invalid(
            set_retention(t, s, max_age=bad), "max_age", f"max_age {bad.ToJsonString()}"
        )
    equal((await get_retention(t, s))[0], 4, "max_records after rejected changes")
    await append(t, s, b"1")
    await append(t, s, b"2")
    await expect_invalid(trim(t, s, 4), "before_offset", "Trim(before 4) of a 2-record stream")
    equal([r.offset for r in await read(t, s)], [1, 2], "records after a rejected Trim")
    await expect_invalid(set_retention(t, "Bad"), "stream", "SetRetention of stream 'Bad'")
    await expect_invalid(get_retention(t, ""), "stream", "GetRetention of stream ''")
    await expect_invalid(trim(t, "1s", 1), "stream", "Trim of stream '1s'")


@case("stream_retention", requires=("stream_partitioning",))
async def limits_apply_per_partition(t: Target) -> None:
    """On a partitioned stream max_records counts each partition separately: records of a quiet
    partition stay however many records the busy ones get."""
    s = t.name("parts")
    await set_retention(t, s, max_records=2)
    count = await partitions(t, s)
    quiet = count - 1
    await append_to(t, s, b"q1", partition=quiet)
    await append_to(t, s, b"q2", partition=quiet)
    for i in range(4 if count > 1 else 0):
        await append_to(t, s, f"b{i}".encode(), partition=0)
    equal(
        [r.payload for r in await read_partition(t, s, quiet)],
        [b"q1", b"q2"],
        f"partition {quiet}: its two records, within its own limit",
    )
    if count > 1:
        busy = [r.offset for r in await read_partition(t, s, 0)]
        check(busy and busy[-2:] == [3, 4], f"partition 0 lost one of its newest 2: {busy}")
        equal(busy, list(range(busy[0], 5)), "partition 0 retained offsets")
