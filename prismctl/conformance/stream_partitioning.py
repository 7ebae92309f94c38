"""stream_partitioning: N partitions, FNV-1a-32(key) mod N or an explicit partition, per-partition
offsets and reads, separation from the unpartitioned log, input rules."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_partitioning_pb2 as pb
from prism.interfaces.stream.v1.stream_partitioning_pb2_grpc import StreamPartitioningServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.stream_basic import READ_TIMEOUT, append, read

if TYPE_CHECKING:
    from prism.interfaces.stream.v1.stream_partitioning_pb2_grpc import (
        StreamPartitioningServiceAsyncStub,
    )

MAX_PARTITIONS = 256
KEYS = [f"key-{i}" for i in range(24)] + ["ключ", "日本", "a", "b"]


def stub(t: Target) -> StreamPartitioningServiceAsyncStub:
    return StreamPartitioningServiceStub(t.channel)


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32 bits: the hash the contract assigns keys to partitions with."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(key: str, count: int) -> int:
    return fnv1a32(key.encode()) % count


async def partitions(t: Target, stream: str) -> int:
    response: pb.GetPartitionsResponse = await stub(t).GetPartitions(
        pb.GetPartitionsRequest(stream=stream)
    )
    return response.partition_count


async def append_to(
    t: Target, stream: str, payload: bytes, key: str = "", partition: int | None = None
) -> tuple[int, int]:
    """(partition, offset) of the appended record."""
    response: pb.AppendToPartitionResponse = await stub(t).AppendToPartition(
        pb.AppendToPartitionRequest(stream=stream, key=key, payload=payload, partition=partition)
    )
    return response.partition, response.offset


async def read_partition(
    t: Target, stream: str, partition: int, start: int = 0, limit: int = 0
) -> list[basic_pb.Record]:
    """A non-following ReadPartition to its end."""
    call: Any = stub(t).ReadPartition(
        pb.ReadPartitionRequest(
            stream=stream, partition=partition, start_offset=start, max_records=limit
        )
    )

    async def collect() -> list[basic_pb.Record]:
        return [r.record async for r in call]

    return await asyncio.wait_for(collect(), READ_TIMEOUT)


@case("stream_partitioning")
async def partition_count_is_fixed(t: Target) -> None:
    """GetPartitions reports N in 1..256, the same before and after the first record."""
    s = t.name("count")
    n = await partitions(t, s)
    check(1 <= n <= MAX_PARTITIONS, f"partition_count {n} outside 1..{MAX_PARTITIONS}")
    await append_to(t, s, b"x", key="k")
    equal(await partitions(t, s), n, "partition_count after an append")


@case("stream_partitioning")
async def keys_pick_partitions_by_fnv1a(t: Target) -> None:
    """Without an explicit partition a record goes to FNV-1a-32(UTF-8 key) mod N, so one key
    always lands in one partition; each partition numbers its records 1, 2, 3...; ReadPartition
    returns exactly that partition's records, in order, carrying their partition."""
    s = t.name("hashed")
    n = await partitions(t, s)
    counts: Counter[int] = Counter()
    expected: dict[int, list[tuple[int, str, bytes]]] = {p: [] for p in range(n)}
    for round_ in range(2):
        for key in KEYS:
            want = partition_of(key, n)
            counts[want] += 1
            payload = f"{key}/{round_}".encode()
            got = await append_to(t, s, payload, key=key)
            equal(got, (want, counts[want]), f"(partition, offset) of key {key!r}, round {round_}")
            expected[want].append((counts[want], key, payload))
    for p in range(n):
        records = await read_partition(t, s, p)
        equal(
            [(r.offset, r.key, r.payload) for r in records], expected[p], f"partition {p} records"
        )
        equal({r.partition for r in records} - {p}, set(), f"partition field in partition {p}")


@case("stream_partitioning")
async def explicit_partition_wins(t: Target) -> None:
    """An explicit partition is used whatever the key (which may then be empty); ReadPartition
    honours start_offset and max_records."""
    s = t.name("explicit")
    n = await partitions(t, s)
    last = n - 1
    key = next(k for k in KEYS if partition_of(k, n) != last) if n > 1 else "k"
    equal(await append_to(t, s, b"p1", partition=last), (last, 1), "explicit, empty key")
    equal(await append_to(t, s, b"p2", key=key, partition=last), (last, 2), "explicit, with key")
    equal(await append_to(t, s, b"p3", key=key, partition=last), (last, 3), "explicit again")
    equal(await append_to(t, s, b"p0", partition=0), (0, 1) if n > 1 else (0, 4), "partition 0")
    records = await read_partition(t, s, last, start=2, limit=1)
    equal([(r.offset, r.payload) for r in records], [(2, b"p2")], "start_offset 2, max_records 1")
    equal(
        [r.payload for r in await read_partition(t, s, last, start=2)],
        [b"p2", b"p3"] + ([] if n > 1 else [b"p0"]),
        "start_offset 2",
    )


@case("stream_partitioning")
async def follow_a_partition(t: Target) -> None:
    """A following ReadPartition sends the partition's records, then each new one appended to
    it, and nothing appended to other partitions."""
    s = t.name("follow")
    n = await partitions(t, s)
    await append_to(t, s, b"old", partition=0)
    call: Any = stub(t).ReadPartition(
        pb.ReadPartitionRequest(stream=s, partition=0, start_offset=1, follow=True)
    )
    events = call.__aiter__()
    try:
        first = await asyncio.wait_for(anext(events), READ_TIMEOUT)
        equal((first.record.offset, first.record.payload), (1, b"old"), "first record")
        if n > 1:
            await append_to(t, s, b"elsewhere", partition=1)
        await append_to(t, s, b"new", partition=0)
        second = await asyncio.wait_for(anext(events), READ_TIMEOUT)
        equal(
            (second.record.offset, second.record.payload, second.record.partition),
            (2, b"new", 0),
            "record appended while following",
        )
    finally:
        call.cancel()


@case("stream_partitioning", requires=("stream_basic",))
async def separate_from_the_unpartitioned_log(t: Target) -> None:
    """Partitioned records and the stream's plain log do not see each other: each has its own
    offsets from 1."""
    s = t.name("separate")
    await append(t, s, b"plain-1")
    equal(await append_to(t, s, b"part", partition=0), (0, 1), "first partitioned record")
    equal((await append(t, s, b"plain-2")).offset, 2, "second plain record")
    equal([r.payload for r in await read(t, s)], [b"plain-1", b"plain-2"], "plain Read")
    equal([r.payload for r in await read_partition(t, s, 0)], [b"part"], "ReadPartition 0")


@case("stream_partitioning")
async def invalid_partition_input(t: Target) -> None:
    """A partition >= N, a missing key without a partition, and the stream input rules are
    INVALID_ARGUMENT naming the field; nothing is appended."""
    s = t.name("bad")
    n = await partitions(t, s)
    await expect_invalid(append_to(t, s, b"x", key="k", partition=n), "partition", "partition N")
    await expect_invalid(append_to(t, s, b"x"), "key", "no key and no partition")
    await expect_invalid(append_to(t, s, b"x", key="k" * 1025), "key", "a key over 1024 bytes")
    await expect_invalid(
        stub(t).AppendToPartition(
            pb.AppendToPartitionRequest(stream=s, key="k", payload=b"x", attributes={"": "v"})
        ),
        "attributes",
        "an empty attribute key",
    )
    for name in ("", "Upper", "s" * 64):
        await expect_invalid(
            append_to(t, name, b"x", key="k"), "stream", f"AppendToPartition to {name!r}"
        )
        await expect_invalid(partitions(t, name), "stream", f"GetPartitions of {name!r}")
    await expect_invalid(read_partition(t, s, n), "partition", "ReadPartition of partition N")
    await expect_invalid(read_partition(t, s, 0, limit=-1), "max_records", "max_records -1")
    for p in range(n):
        equal(await read_partition(t, s, p), [], f"partition {p} after rejected appends")
