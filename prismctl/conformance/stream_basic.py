"""stream_basic: dense offsets from 1, ordered reads from an offset, bounded and following
reads, latest offset, input rules."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from prism.interfaces.stream.v1 import stream_basic_pb2 as pb
from prism.interfaces.stream.v1.stream_basic_pb2_grpc import StreamBasicServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid

if TYPE_CHECKING:
    from prism.interfaces.stream.v1.stream_basic_pb2_grpc import StreamBasicServiceAsyncStub

READ_TIMEOUT = 10.0


def stub(t: Target) -> StreamBasicServiceAsyncStub:
    return StreamBasicServiceStub(t.channel)


async def append(t: Target, stream: str, payload: bytes, key: str = "") -> pb.AppendResponse:
    response: pb.AppendResponse = await stub(t).Append(
        pb.AppendRequest(stream=stream, key=key, payload=payload)
    )
    return response


async def read(t: Target, stream: str, start: int = 0, limit: int = 0) -> list[pb.Record]:
    """A non-following Read to its end."""
    call: Any = stub(t).Read(pb.ReadRequest(stream=stream, start_offset=start, max_records=limit))

    async def collect() -> list[pb.Record]:
        return [r.record async for r in call]

    return await asyncio.wait_for(collect(), READ_TIMEOUT)


@case("stream_basic")
async def offsets_and_reads(t: Target) -> None:
    """Appends get offsets 1, 2, 3...; Read returns records in offset order from start_offset,
    with key, payload and non-decreasing append_time, and stops at max_records."""
    s = t.name("log")
    appended = [await append(t, s, f"r{i}".encode(), key=f"k{i % 2}") for i in range(6)]
    equal([a.offset for a in appended], [1, 2, 3, 4, 5, 6], "offsets of six appends")
    records = await read(t, s)
    equal([r.offset for r in records], [1, 2, 3, 4, 5, 6], "offsets read")
    equal([r.payload for r in records], [f"r{i}".encode() for i in range(6)], "payloads read")
    equal([r.key for r in records], ["k0", "k1"] * 3, "keys read")
    times = [r.append_time.ToNanoseconds() for r in records]
    equal(times, sorted(times), "append_time never decreases")
    equal(
        [r.append_time for r in records],
        [a.append_time for a in appended],
        "append_time read vs returned by Append",
    )
    equal([r.offset for r in await read(t, s, start=4)], [4, 5, 6], "Read from offset 4")
    equal([r.offset for r in await read(t, s, start=2, limit=3)], [2, 3, 4], "max_records 3")
    equal(await read(t, s, start=7), [], "Read past the end")
    equal(await read(t, t.name("never")), [], "Read of a never-written stream")


@case("stream_basic")
async def latest_offset(t: Target) -> None:
    """GetLatestOffset is (0, 0) for an empty stream and (last, first retained) after appends."""
    s = t.name("latest")
    empty: pb.GetLatestOffsetResponse = await stub(t).GetLatestOffset(
        pb.GetLatestOffsetRequest(stream=s)
    )
    equal((empty.offset, empty.first_offset), (0, 0), "latest offsets of an empty stream")
    for i in range(3):
        await append(t, s, bytes([i]))
    latest: pb.GetLatestOffsetResponse = await stub(t).GetLatestOffset(
        pb.GetLatestOffsetRequest(stream=s)
    )
    equal((latest.offset, latest.first_offset), (3, 1), "latest offsets after three appends")


@case("stream_basic")
async def follow_receives_new_records(t: Target) -> None:
    """A following Read sends the existing records and then each new append as it happens."""
    s = t.name("follow")
    await append(t, s, b"old")
    call: Any = stub(t).Read(pb.ReadRequest(stream=s, start_offset=1, follow=True))
    stream = call.__aiter__()
    try:
        first = await asyncio.wait_for(anext(stream), READ_TIMEOUT)
        equal((first.record.offset, first.record.payload), (1, b"old"), "first followed record")
        await append(t, s, b"new-1")
        await append(t, s, b"new-2")
        got = [(await asyncio.wait_for(anext(stream), READ_TIMEOUT)).record for _ in range(2)]
        equal(
            [(r.offset, r.payload) for r in got],
            [(2, b"new-1"), (3, b"new-2")],
            "records appended while following",
        )
    finally:
        call.cancel()


@case("stream_basic")
async def concurrent_appends_are_dense(t: Target) -> None:
    """Concurrent appends get distinct, gap-free offsets, and Read returns each exactly once."""
    s = t.name("dense")
    results = await asyncio.gather(*(append(t, s, f"c{i}".encode()) for i in range(40)))
    equal(sorted(r.offset for r in results), list(range(1, 41)), "offsets of 40 concurrent appends")
    records = await read(t, s)
    equal(len({r.payload for r in records}), 40, "distinct records read")
    check([r.offset for r in records] == list(range(1, 41)), "records not in offset order")


@case("stream_basic")
async def invalid_stream_input(t: Target) -> None:
    """Bad names, keys and limits are INVALID_ARGUMENT naming the field; nothing is appended."""
    s = t.name("bad")
    for name in ("", "Upper", "1s", "s" * 64):
        await expect_invalid(
            stub(t).Append(pb.AppendRequest(stream=name, payload=b"x")),
            "stream",
            f"Append to stream {name!r}",
        )
    await expect_invalid(
        stub(t).Append(pb.AppendRequest(stream=s, key="k" * 1025, payload=b"x")),
        "key",
        "Append with a key over 1024 bytes",
    )
    await expect_invalid(
        stub(t).Append(pb.AppendRequest(stream=s, payload=b"x", attributes={"": "v"})),
        "attributes",
        "Append with an empty attribute key",
    )

    async def negative_limit() -> Any:
        return await read(t, s, limit=-1)

    await expect_invalid(negative_limit(), "max_records", "Read with max_records -1")
    equal(await read(t, s), [], "stream after rejected appends")
