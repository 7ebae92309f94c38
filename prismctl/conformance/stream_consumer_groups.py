"""stream_consumer_groups: start positions, each record to one live consumer, the in-flight
bound, redelivery after the ack timeout, CONSUMER_IN_USE, acks and group info."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_consumer_groups_pb2 as pb
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention_pb
from prism.interfaces.stream.v1.stream_consumer_groups_pb2_grpc import (
    StreamConsumerGroupsServiceStub,
)
from prism.interfaces.stream.v1.stream_retention_pb2_grpc import StreamRetentionServiceStub

from prismctl.conformance.core import (
    CaseFailure,
    Target,
    case,
    check,
    equal,
    expect_error,
    expect_invalid,
    when_free,
)
from prismctl.conformance.stream_basic import append
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.stream.v1.stream_consumer_groups_pb2_grpc import (
        StreamConsumerGroupsServiceAsyncStub,
    )

REQUIRES = ("stream_basic",)
RECEIVE_TIMEOUT = 10.0
# The smallest ack timeout the contract allows: redelivery cases wait about this long.
SHORT_ACK = Duration(seconds=1)
REDELIVERY_TIMEOUT = 5.0


def stub(
    t: Target, channel: grpc.aio.Channel | None = None
) -> StreamConsumerGroupsServiceAsyncStub:
    return StreamConsumerGroupsServiceStub(channel or t.channel)


async def create(
    t: Target,
    stream: str,
    group: str,
    start: int = pb.GROUP_START_POSITION_EARLIEST,
    start_offset: int = 0,
    ack_timeout: Duration | None = None,
) -> None:
    await stub(t).CreateConsumerGroup(
        pb.CreateConsumerGroupRequest(
            stream=stream,
            group=group,
            start=start,  # type: ignore[arg-type]
            start_offset=start_offset,
            ack_timeout=ack_timeout,
        )
    )


async def ack(t: Target, stream: str, group: str, offsets: list[int]) -> int:
    response: pb.AckRecordsResponse = await stub(t).AckRecords(
        pb.AckRecordsRequest(stream=stream, group=group, offsets=offsets)
    )
    return response.acked


async def info(t: Target, stream: str, group: str) -> pb.GetConsumerGroupInfoResponse:
    response: pb.GetConsumerGroupInfoResponse = await stub(t).GetConsumerGroupInfo(
        pb.GetConsumerGroupInfoRequest(stream=stream, group=group)
    )
    return response


class Consumer:
    """A live JoinConsumerGroup stream: `join` returns once `joined` arrived; records are
    collected in the background."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.records: list[basic_pb.Record] = []
        self.ended: grpc.StatusCode | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def join(
        cls,
        t: Target,
        stream: str,
        group: str,
        consumer: str,
        max_in_flight: int = 0,
        channel: grpc.aio.Channel | None = None,
    ) -> Consumer:
        request = pb.JoinConsumerGroupRequest(
            stream=stream, group=group, consumer=consumer, max_in_flight=max_in_flight
        )
        live = cls(stub(t, channel).JoinConsumerGroup(request))
        events: AsyncIterator[Any] = live.call.__aiter__()
        try:
            first = await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)
        except StopAsyncIteration:
            raise CaseFailure("JoinConsumerGroup ended before its `joined` event") from None
        except BaseException:
            live.call.cancel()
            raise
        check(first.WhichOneof("event") == "joined", f"first event is not `joined`: {first}")
        equal((first.joined.group, first.joined.consumer), (group, consumer), "`joined` event")
        live._reader = asyncio.create_task(live._read(events))
        return live

    async def _read(self, events: AsyncIterator[Any]) -> None:
        try:
            async for event in events:
                if event.WhichOneof("event") != "record":
                    raise CaseFailure(f"unexpected event after `joined`: {event}")
                self.records.append(event.record)
            self.ended = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            self.ended = exc.code()

    def offsets(self) -> list[int]:
        return [r.offset for r in self.records]

    async def wait_for(self, count: int) -> list[basic_pb.Record]:
        """The first `count` records, failing if they do not arrive in time."""
        with contextlib.suppress(TimeoutError):
            await eventually(
                lambda: len(self.records) >= count or self.ended is not None,
                timeout=RECEIVE_TIMEOUT,
                interval=0.01,
            )
        if len(self.records) < count:
            raise CaseFailure(
                f"expected {count} records, got offsets {self.offsets()} (ended: {self.ended})"
            )
        return self.records[:count]

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@case("stream_consumer_groups", requires=REQUIRES)
async def create_and_describe(t: Target) -> None:
    """A group can be created on a never-written stream, once (ALREADY_EXISTS); its info starts
    empty with the default 30 s or the given ack timeout; unknown groups are NOT_FOUND."""
    s = t.name("groups")
    await create(t, s, "g", start=pb.GROUP_START_POSITION_UNSPECIFIED)
    await expect_error(
        create(t, s, "g"),
        grpc.StatusCode.ALREADY_EXISTS,
        "creating group g twice",
        reason="CONSUMER_GROUP_EXISTS",
    )
    described = await info(t, s, "g")
    equal(
        (described.last_delivered_offset, described.pending_count, list(described.consumers)),
        (0, 0, []),
        "info of a new group",
    )
    equal(described.ack_timeout, Duration(seconds=30), "default ack_timeout")
    await create(t, s, "short", ack_timeout=Duration(seconds=2))
    equal((await info(t, s, "short")).ack_timeout, Duration(seconds=2), "ack_timeout 2 s")
    await create(t, t.name("other"), "g")
    missing = (
        info(t, s, "nope"),
        ack(t, s, "nope", [1]),
        Consumer.join(t, s, "nope", "c"),
        info(t, t.name("never"), "g"),
    )
    for call in missing:
        await expect_error(
            call,
            grpc.StatusCode.NOT_FOUND,
            "an unknown group",
            reason="CONSUMER_GROUP_NOT_FOUND",
        )


@case("stream_consumer_groups", requires=REQUIRES)
async def start_positions(t: Target) -> None:
    """EARLIEST covers every record, LATEST only those appended after creation (UNSPECIFIED is
    LATEST), OFFSET those from start_offset; before any delivery last_delivered_offset is the
    start position - 1."""
    s = t.name("starts")
    for i in range(3):
        await append(t, s, bytes([i]))
    starts = {
        "earliest": (pb.GROUP_START_POSITION_EARLIEST, 0, 0),
        "latest": (pb.GROUP_START_POSITION_LATEST, 0, 3),
        "unspecified": (pb.GROUP_START_POSITION_UNSPECIFIED, 0, 3),
        "from2": (pb.GROUP_START_POSITION_OFFSET, 2, 1),
    }
    for group, (start, offset, before) in starts.items():
        await create(t, s, group, start=start, start_offset=offset)
        equal((await info(t, s, group)).last_delivered_offset, before, f"{group}: before delivery")
    consumers = {group: await Consumer.join(t, s, group, "c") for group in starts}
    try:
        await append(t, s, b"new")
        expected = {
            "earliest": [1, 2, 3, 4],
            "latest": [4],
            "unspecified": [4],
            "from2": [2, 3, 4],
        }
        for group, offsets in expected.items():
            got = await consumers[group].wait_for(len(offsets))
            equal([r.offset for r in got], offsets, f"{group}: offsets delivered")
            equal(got[-1].payload, b"new", f"{group}: payload of the new record")
            equal((await info(t, s, group)).last_delivered_offset, 4, f"{group}: after delivery")
        equal(consumers["earliest"].offsets(), [1, 2, 3, 4], "earliest: no extra deliveries")
    finally:
        for consumer in consumers.values():
            await consumer.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def each_record_to_one_consumer(t: Target) -> None:
    """Records are shared among live consumers (separate connections): each goes to exactly one,
    each consumer gets its records in offset order, and info counts pending per consumer until
    AckRecords acknowledges them."""
    s = t.name("shared")
    await create(t, s, "g")
    names = ["c1", "c2", "c3"]
    consumers = [await Consumer.join(t, s, "g", n, channel=t.extra_channel()) for n in names]
    try:
        for i in range(30):
            await append(t, s, f"r{i + 1}".encode())
        await eventually(
            lambda: sum(len(c.records) for c in consumers) >= 30,
            timeout=RECEIVE_TIMEOUT,
            message="30 records delivered",
        )
        every = sorted(o for c in consumers for o in c.offsets())
        equal(every, list(range(1, 31)), "offsets delivered across consumers")
        for c, name in zip(consumers, names, strict=True):
            equal(c.offsets(), sorted(c.offsets()), f"{name}: delivery order")
            check(all(r.payload == f"r{r.offset}".encode() for r in c.records), f"{name}: payloads")
        described = await info(t, s, "g")
        equal(described.pending_count, 30, "group pending before acks")
        equal(described.last_delivered_offset, 30, "last_delivered_offset")
        equal(
            [(ci.consumer, ci.pending_count) for ci in described.consumers],
            [(n, len(c.records)) for n, c in zip(names, consumers, strict=True)],
            "consumers and their pending counts",
        )
        equal(await ack(t, s, "g", consumers[0].offsets()), len(consumers[0].records), "acked")
        equal(await ack(t, s, "g", list(range(1, 31))), 30 - len(consumers[0].records), "acked")
        described = await info(t, s, "g")
        equal(described.pending_count, 0, "group pending after acks")
        equal([ci.pending_count for ci in described.consumers], [0, 0, 0], "consumer pending")
    finally:
        for c in consumers:
            await c.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def max_in_flight_bounds_pending(t: Target) -> None:
    """A consumer with max_in_flight 2 holds at most two pending records and gets the next one
    only when one is acknowledged."""
    s = t.name("inflight")
    await create(t, s, "g")
    consumer = await Consumer.join(t, s, "g", "c", max_in_flight=2)
    try:
        for i in range(5):
            await append(t, s, bytes([i]))
        equal([r.offset for r in await consumer.wait_for(2)], [1, 2], "first deliveries")
        described = await info(t, s, "g")
        equal(
            (described.last_delivered_offset, described.pending_count),
            (2, 2),
            "group with two records in flight",
        )
        equal(await ack(t, s, "g", [1]), 1, "acked")
        equal([r.offset for r in await consumer.wait_for(3)], [1, 2, 3], "after acking 1")
        equal((await info(t, s, "g")).last_delivered_offset, 3, "last_delivered after acking 1")
    finally:
        await consumer.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def unacked_records_are_redelivered(t: Target) -> None:
    """A record left pending past the ack timeout is delivered again (same record); acknowledged
    ones are not; acking it then counts once."""
    s = t.name("redeliver")
    await create(t, s, "g", ack_timeout=SHORT_ACK)
    consumer = await Consumer.join(t, s, "g", "c")
    try:
        await append(t, s, b"keep-me")
        await append(t, s, b"acked")
        await consumer.wait_for(2)
        equal(await ack(t, s, "g", [2]), 1, "acked")
        again = await eventually(
            lambda: consumer.records[2:],
            timeout=REDELIVERY_TIMEOUT,
            message="record 1 redelivered after the ack timeout",
        )
        equal((again[0].offset, again[0].payload), (1, b"keep-me"), "redelivered record")
        check(2 not in consumer.offsets()[2:], f"acked record redelivered: {consumer.offsets()}")
        equal(await ack(t, s, "g", [1]), 1, "acked after redelivery")
        equal(await ack(t, s, "g", [1, 2]), 0, "acked again")
        equal((await info(t, s, "g")).pending_count, 0, "pending after acks")
    finally:
        await consumer.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def redeliveries_come_before_new_records(t: Target) -> None:
    """With one record in flight allowed, a record that timed out is sent again before a newer
    record waiting behind it."""
    s = t.name("first")
    await create(t, s, "g", ack_timeout=SHORT_ACK)
    consumer = await Consumer.join(t, s, "g", "c", max_in_flight=1)
    try:
        await append(t, s, b"old")
        await consumer.wait_for(1)
        await append(t, s, b"new")
        equal([r.offset for r in await consumer.wait_for(2)], [1, 1], "redelivery first")
        equal(await ack(t, s, "g", [1]), 1, "acked")
        equal([r.offset for r in await consumer.wait_for(3)], [1, 1, 2], "then the new record")
    finally:
        await consumer.close()


@case("stream_consumer_groups", requires=("stream_basic", "stream_retention"))
async def removed_records_are_skipped(t: Target) -> None:
    """Records trimmed before the group delivered them are skipped, not an error."""
    s = t.name("skipped")
    for i in range(4):
        await append(t, s, bytes([i]))
    await create(t, s, "g")
    await StreamRetentionServiceStub(t.channel).Trim(
        retention_pb.TrimRequest(stream=s, before_offset=3)
    )
    consumer = await Consumer.join(t, s, "g", "c")
    try:
        await append(t, s, b"last")
        equal([r.offset for r in await consumer.wait_for(3)], [3, 4, 5], "offsets delivered")
    finally:
        await consumer.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def records_of_a_gone_consumer_go_to_another(t: Target) -> None:
    """Records pending for a consumer whose stream ended are delivered to another live consumer
    once the ack timeout expires; the ended consumer leaves the info."""
    s = t.name("handover")
    await create(t, s, "g", ack_timeout=SHORT_ACK)
    leaving = await Consumer.join(t, s, "g", "a")
    await append(t, s, b"orphan")
    await leaving.wait_for(1)
    await leaving.close()
    staying = await Consumer.join(t, s, "g", "b")
    try:
        got = await staying.wait_for(1)
        equal((got[0].offset, got[0].payload), (1, b"orphan"), "record handed over")
        equal(await ack(t, s, "g", [1]), 1, "acked by the new consumer")
        names = await eventually(
            _live_names(t, s, "g", ["b"]),
            timeout=REDELIVERY_TIMEOUT,
            message="only consumer b listed",
        )
        equal(names, ["b"], "live consumers")
    finally:
        await staying.close()


def _live_names(t: Target, stream: str, group: str, expected: list[str]) -> Any:
    async def names() -> list[str] | None:
        got = [c.consumer for c in (await info(t, stream, group)).consumers]
        return got if got == expected else None

    return names


@case("stream_consumer_groups", requires=REQUIRES)
async def consumer_in_use(t: Target) -> None:
    """A second live stream with the same consumer name is FAILED_PRECONDITION CONSUMER_IN_USE;
    the name is free again once the first stream ends."""
    s = t.name("inuse")
    # A short ack timeout: a record the server hands to the stream of "d" before it notices that
    # stream ended comes back (to "c") soon.
    await create(t, s, "g", ack_timeout=SHORT_ACK)
    first = await Consumer.join(t, s, "g", "c")
    try:
        await expect_error(
            Consumer.join(t, s, "g", "c", channel=t.extra_channel()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "joining as a consumer that is live",
            reason="CONSUMER_IN_USE",
        )
        other = await Consumer.join(t, s, "g", "d")
        await other.close()
    finally:
        await first.close()
    again = await when_free(lambda: Consumer.join(t, s, "g", "c"), "consumer c")
    try:
        await append(t, s, b"x")
        equal([r.offset for r in await again.wait_for(1)], [1], "delivery to the rejoined consumer")
    finally:
        await again.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def acks_ignore_what_is_not_pending(t: Target) -> None:
    """AckRecords counts only pending records: never-delivered and unknown offsets are ignored;
    1 to 1000 offsets (INVALID_ARGUMENT field offsets)."""
    s = t.name("acks")
    for i in range(3):
        await append(t, s, bytes([i]))
    await create(t, s, "g")
    equal(await ack(t, s, "g", [1, 2, 3, 999]), 0, "acked before any delivery")
    consumer = await Consumer.join(t, s, "g", "c", max_in_flight=1)
    try:
        await consumer.wait_for(1)
        equal(await ack(t, s, "g", [3, 1, 1, 999]), 1, "acked with duplicates and strangers")
        await expect_invalid(ack(t, s, "g", []), "offsets", "AckRecords without offsets")
        await expect_invalid(
            ack(t, s, "g", list(range(1, 1002))), "offsets", "AckRecords of 1001 offsets"
        )
    finally:
        await consumer.close()


@case("stream_consumer_groups", requires=REQUIRES)
async def invalid_group_input(t: Target) -> None:
    """Bad names, start offsets, ack timeouts and in-flight bounds are INVALID_ARGUMENT naming
    the field; no group is created by a rejected call."""
    s = t.name("bad")
    await create(t, s, "g")
    for name in ("", "Upper", "1g", "g" * 64):
        await expect_invalid(create(t, s, name), "group", f"CreateConsumerGroup {name!r}")
    await expect_invalid(create(t, "Bad", "h"), "stream", "CreateConsumerGroup on stream 'Bad'")
    await expect_invalid(
        create(t, s, "h", start=pb.GROUP_START_POSITION_OFFSET, start_offset=0),
        "start_offset",
        "GROUP_START_POSITION_OFFSET with start_offset 0",
    )
    for bad in (Duration(nanos=500_000_000), Duration(seconds=12 * 3600 + 1), Duration(seconds=-1)):
        await expect_invalid(
            create(t, s, "h", ack_timeout=bad), "ack_timeout", f"ack_timeout {bad.ToJsonString()}"
        )
    await expect_error(
        info(t, s, "h"),
        grpc.StatusCode.NOT_FOUND,
        "group h after rejected creations",
        reason="CONSUMER_GROUP_NOT_FOUND",
    )
    for consumer, limit, field in (
        ("Bad", 0, "consumer"),
        ("", 0, "consumer"),
        ("c", -1, "max_in_flight"),
        ("c", 1001, "max_in_flight"),
    ):
        await expect_invalid(
            Consumer.join(t, s, "g", consumer, max_in_flight=limit),
            field,
            f"JoinConsumerGroup as {consumer!r} with max_in_flight {limit}",
        )
    await expect_invalid(ack(t, s, "G", [1]), "group", "AckRecords of group 'G'")
    await expect_invalid(info(t, s, ""), "group", "GetConsumerGroupInfo of group ''")
