"""Stream basic, consumer groups, replay and retention on Redis Streams.

Offset N is the stream ID `0-N` (plugins/redis/stream_scripts.py says why that keeps offsets
dense, never reused and contiguous under retention). Consumer groups are Redis consumer groups:
new records come from XREADGROUP `>`, redeliveries from XAUTOCLAIM with the group's ack timeout as
minimum idle time, acknowledgements are XACK. Which consumers are live (a JoinConsumerGroup stream
is open) is a sorted set of leases renewed by the stream, so a consumer name held by a crashed
process frees itself after CONSUMER_LEASE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_consumer_groups_pb2 as groups_pb
from prism.interfaces.stream.v1 import stream_replay_pb2 as replay_pb
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention_pb

from plugins.redis.connection import RedisConnection
from plugins.redis.keys import Keyspace
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

PAGE = 100
#: how long a blocking XREAD/XREADGROUP waits before the loop looks around again (ms)
BLOCK_MS = 500
CONSUMER_LEASE = 10.0
CONSUMER_RENEW = 2.0
#: values per record in a RANGE reply: offset, key, payload, attributes, append ms
FIELDS = 5

_START = {
    groups_pb.GROUP_START_POSITION_UNSPECIFIED: "latest",
    groups_pb.GROUP_START_POSITION_LATEST: "latest",
    groups_pb.GROUP_START_POSITION_EARLIEST: "earliest",
    groups_pb.GROUP_START_POSITION_OFFSET: "offset",
}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _record(offset: int, key: bytes, payload: bytes, attributes: bytes, ms: int) -> basic_pb.Record:
    stamp = Timestamp()
    stamp.FromMilliseconds(int(ms))
    return basic_pb.Record(
        offset=int(offset),
        key=key.decode("utf-8"),
        payload=bytes(payload),
        attributes=json.loads(attributes),
        append_time=stamp,
    )


def _from_range(reply: list[Any]) -> list[basic_pb.Record]:
    return [_record(*reply[i : i + FIELDS]) for i in range(0, len(reply), FIELDS)]


def _from_entries(entries: list[Any]) -> list[basic_pb.Record]:
    """Records of parsed XREADGROUP/XAUTOCLAIM entries: (b"0-N", {field: value})."""
    return [
        _record(int(ident.split(b"-")[1]), f[b"k"], f[b"p"], f[b"a"], int(f[b"t"]))
        for ident, f in entries
        if f
    ]


async def _xread(r: Any, *, log: bytes, after: str, count: int) -> Any:
    return await r.xread({log: after}, count=count, block=BLOCK_MS)


async def _xautoclaim(
    r: Any, *, log: bytes, group: str, consumer: str, idle: int, count: int
) -> Any:
    return await r.xautoclaim(log, group, consumer, idle, "0-0", count=count)


async def _own_pending(
    r: Any, *, log: bytes, group: str, consumer: str, count: int
) -> dict[bytes, int]:
    """Stream ID → idle ms of (up to `count` of) the records pending to `consumer`."""
    rows = await r.xpending_range(log, group, min="-", max="+", count=count, consumername=consumer)
    return {row["message_id"]: int(row["time_since_delivered"]) for row in rows}


async def _claim(
    r: Any, *, log: bytes, group: str, consumer: str, ids: list[bytes]
) -> list[basic_pb.Record]:
    """Records `ids`, claimed by `consumer` again (a new delivery: idle time reset)."""
    return _from_entries(await r.xclaim(log, group, consumer, 0, ids))


async def _xreadgroup(r: Any, *, log: bytes, group: str, consumer: str, count: int) -> Any:
    return await r.xreadgroup(group, consumer, {log: ">"}, count=count, block=BLOCK_MS)


def _group_not_found(stream: str, group: str) -> NotFound:
    return NotFound(
        f"consumer group {group!r} of stream {stream!r} does not exist",
        reason="CONSUMER_GROUP_NOT_FOUND",
        stream=stream,
        group=group,
    )


class RedisStream:
    """stream_basic, _consumer_groups, _replay and _retention."""

    def __init__(self, conn: RedisConnection, key_prefix: bytes) -> None:
        self.conn = conn
        self.key_prefix = key_prefix
        self._acked: dict[tuple[str, str, str], asyncio.Event] = {}

    def _prefix(self, ctx: CallContext, stream: str) -> bytes:
        return Keyspace(self.key_prefix, ctx.namespace).stream_prefix(stream)

    def _run(self, ctx: CallContext, script: Any, stream: str, *args: bytes | str | int) -> Any:
        return self.conn.eval(ctx, script, [], [self._prefix(ctx, stream), *args])

    # -- basic ---------------------------------------------------------------------------------

    async def append(
        self, request: basic_pb.AppendRequest, ctx: CallContext
    ) -> basic_pb.AppendResponse:
        stream = validation.stream_name(request.stream)
        key = validation.record_key(request.key)
        payload = validation.value(request.payload, "payload")
        attributes = json.dumps(validation.attributes(request.attributes))
        offset, ms = await self._run(
            ctx, self.conn.scripts.s_append, stream, key, payload, attributes
        )
        stamp = Timestamp()
        stamp.FromMilliseconds(int(ms))
        return basic_pb.AppendResponse(offset=int(offset), append_time=stamp)

    async def _offsets(self, ctx: CallContext, stream: str) -> tuple[int, int]:
        """(latest offset, first retained offset)."""
        latest, first = await self._run(ctx, self.conn.scripts.s_offsets, stream)
        return int(latest), int(first)

    async def _range(
        self, ctx: CallContext, stream: str, first: int, last: int, limit: int | None
    ) -> AsyncIterator[basic_pb.Record]:
        """Retained records first..last in offset order, at most `limit`, page by page."""
        sent = 0
        while first <= last and (limit is None or sent < limit):
            count = PAGE if limit is None else min(PAGE, limit - sent)
            reply = await self._run(ctx, self.conn.scripts.s_range, stream, first, last, count)
            records = _from_range(reply)
            if not records:
                return
            for record in records:
                yield record
            sent += len(records)
            first = records[-1].offset + 1

    async def read(
        self, request: basic_pb.ReadRequest, ctx: CallContext
    ) -> AsyncIterator[basic_pb.ReadResponse]:
        stream = validation.stream_name(request.stream)
        limit = validation.non_negative(request.max_records, "max_records") or None
        start = max(1, request.start_offset)
        latest, _ = await self._offsets(ctx, stream)
        sent = 0
        async for record in self._range(ctx, stream, start, latest, limit):
            sent += 1
            start = record.offset + 1
            yield basic_pb.ReadResponse(record=record)
        if not request.follow:
            return
        start = max(start, latest + 1)
        log = self._prefix(ctx, stream) + b"log"
        while limit is None or sent < limit:
            count = PAGE if limit is None else min(PAGE, limit - sent)
            after = f"0-{start - 1}"
            reply = await self.conn.run(
                ctx, partial(_xread, log=log, after=after, count=count), dedicated=True
            )
            for _, entries in reply or []:
                for record in _from_entries(entries):
                    sent += 1
                    start = record.offset + 1
                    yield basic_pb.ReadResponse(record=record)

    async def get_latest_offset(
        self, request: basic_pb.GetLatestOffsetRequest, ctx: CallContext
    ) -> basic_pb.GetLatestOffsetResponse:
        latest, first = await self._offsets(ctx, validation.stream_name(request.stream))
        return basic_pb.GetLatestOffsetResponse(offset=latest, first_offset=first)

    # -- replay --------------------------------------------------------------------------------

    async def replay_range(
        self, request: replay_pb.ReplayRangeRequest, ctx: CallContext
    ) -> AsyncIterator[replay_pb.ReplayRangeResponse]:
        stream = validation.stream_name(request.stream)
        start, end = validation.replay_range(request.start_offset, request.end_offset)
        latest, _ = await self._offsets(ctx, stream)
        async for record in self._range(ctx, stream, start, min(end, latest), None):
            yield replay_pb.ReplayRangeResponse(record=record)

    async def get_offset_for_timestamp(
        self, request: replay_pb.GetOffsetForTimestampRequest, ctx: CallContext
    ) -> replay_pb.GetOffsetForTimestampResponse:
        stream = validation.stream_name(request.stream)
        if not request.HasField("time"):
            raise InvalidArgument("time", "is required")
        target_ms = -(-request.time.ToNanoseconds() // 1_000_000)  # ceiling: records are in ms
        offset = int(await self._run(ctx, self.conn.scripts.s_offset_for_time, stream, target_ms))
        return replay_pb.GetOffsetForTimestampResponse(found=offset > 0, offset=offset)

    # -- retention -----------------------------------------------------------------------------

    async def set_retention(
        self, request: retention_pb.SetRetentionRequest, ctx: CallContext
    ) -> retention_pb.SetRetentionResponse:
        stream = validation.stream_name(request.stream)
        max_records = validation.non_negative(request.max_records, "max_records")
        age = validation.max_age(request.max_age, request.HasField("max_age"))
        age_ms = _ms(age) if age > 0 else 0
        await self._run(ctx, self.conn.scripts.s_set_retention, stream, max_records, age_ms)
        return retention_pb.SetRetentionResponse()

    async def get_retention(
        self, request: retention_pb.GetRetentionRequest, ctx: CallContext
    ) -> retention_pb.GetRetentionResponse:
        meta = self._prefix(ctx, validation.stream_name(request.stream)) + b"meta"
        reply: list[Any] = await self.conn.run(ctx, lambda r: r.hmget(meta, ["mr", "ma"]))
        max_records, age_ms = (int(v or 0) for v in reply)
        response = retention_pb.GetRetentionResponse(max_records=max_records)
        if age_ms:
            response.max_age.FromMilliseconds(age_ms)
        return response

    async def trim(
        self, request: retention_pb.TrimRequest, ctx: CallContext
    ) -> retention_pb.TrimResponse:
        stream = validation.stream_name(request.stream)
        trimmed = int(await self._run(ctx, self.conn.scripts.s_trim, stream, request.before_offset))
        if trimmed < 0:
            raise InvalidArgument("before_offset", "must be at most the latest offset + 1")
        return retention_pb.TrimResponse(trimmed=trimmed)

    # -- consumer groups -----------------------------------------------------------------------

    async def create_consumer_group(
        self, request: groups_pb.CreateConsumerGroupRequest, ctx: CallContext
    ) -> groups_pb.CreateConsumerGroupResponse:
        stream = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        mode = _START.get(request.start)
        if mode is None:
            raise InvalidArgument("start", "unknown start position")
        if mode == "offset" and request.start_offset <= 0:
            raise InvalidArgument("start_offset", "must be positive")
        ack = validation.ack_timeout(request.ack_timeout, request.HasField("ack_timeout"))
        created = await self._run(
            ctx, self.conn.scripts.s_create_group, stream, group, mode, request.start_offset,
            _ms(ack),
        )  # fmt: skip
        if not created:
            raise AlreadyExists(
                f"consumer group {group!r} of stream {stream!r} already exists",
                reason="CONSUMER_GROUP_EXISTS",
                stream=stream,
                group=group,
            )
        return groups_pb.CreateConsumerGroupResponse()

    async def _hold(
        self, ctx: CallContext, stream: str, group: str, consumer: str, how: str
    ) -> None:
        held = int(
            await self._run(
                ctx, self.conn.scripts.s_claim_consumer, stream, group, consumer,
                _ms(CONSUMER_LEASE), how,
            )
        )  # fmt: skip
        if held < 0:
            raise _group_not_found(stream, group)
        if held == 0:
            raise FailedPrecondition(
                f"consumer {consumer!r} already has a live stream in group {group!r}",
                reason="CONSUMER_IN_USE",
                consumer=consumer,
            )

    async def join_consumer_group(
        self, request: groups_pb.JoinConsumerGroupRequest, ctx: CallContext
    ) -> AsyncIterator[groups_pb.JoinConsumerGroupResponse]:
        stream = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        consumer = validation.stream_name(request.consumer, "consumer")
        in_flight = validation.max_in_flight(request.max_in_flight)
        state = await self._run(ctx, self.conn.scripts.s_group_state, stream, group)
        if int(state[0]) < 0:
            raise _group_not_found(stream, group)
        ack_ms = int(state[0])
        await self._hold(ctx, stream, group, consumer, "join")
        try:
            yield groups_pb.JoinConsumerGroupResponse(
                joined=groups_pb.ConsumerJoined(group=group, consumer=consumer)
            )
            async for record in self._deliveries(ctx, stream, group, consumer, in_flight, ack_ms):
                yield groups_pb.JoinConsumerGroupResponse(record=record)
        finally:
            with contextlib.suppress(Exception):  # best effort: the lease expires anyway
                await self._run(ctx, self.conn.scripts.s_leave, stream, group, consumer)

    async def _deliveries(
        self, ctx: CallContext, stream: str, group: str, consumer: str, in_flight: int, ack_ms: int
    ) -> AsyncIterator[basic_pb.Record]:
        """Redeliveries before new records, never more than `in_flight` pending for this
        consumer. Redelivered: this consumer's records idle past the ack timeout, records
        pending to its name that this stream never sent (left by an earlier stream of the same
        name, possibly read by a blocking call that was cancelled after Redis served it), and
        (XAUTOCLAIM) other consumers' records idle past the ack timeout. New: XREADGROUP `>`."""
        log = self._prefix(ctx, stream) + b"log"
        acked = (ctx.namespace, stream, group)
        renewed = time.monotonic()
        sent: set[bytes] = set()
        while True:
            if time.monotonic() - renewed >= CONSUMER_RENEW:
                await self._hold(ctx, stream, group, consumer, "renew")
                renewed = time.monotonic()
            changed = self._acked.setdefault(acked, asyncio.Event())
            pending = await self.conn.run(
                ctx, partial(_own_pending, log=log, group=group, consumer=consumer,
                             count=in_flight + PAGE),
            )  # fmt: skip
            sent &= pending.keys()
            again = [i for i, idle in pending.items() if i not in sent or idle >= ack_ms]
            room = in_flight - len(pending)
            if again:
                records = await self.conn.run(
                    ctx, partial(_claim, log=log, group=group, consumer=consumer, ids=again)
                )
            elif room <= 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), BLOCK_MS / 1000)
                continue
            else:
                claimed = await self.conn.run(
                    ctx, partial(_xautoclaim, log=log, group=group, consumer=consumer,
                                 idle=ack_ms, count=room),
                )  # fmt: skip
                records = _from_entries(claimed[1])
                if not records:
                    reply = await self.conn.run(
                        ctx, partial(_xreadgroup, log=log, group=group, consumer=consumer,
                                     count=room),
                        dedicated=True,
                    )  # fmt: skip
                    records = [rec for _, entries in reply or [] for rec in _from_entries(entries)]
            for record in records:
                sent.add(b"0-%d" % record.offset)
                yield record

    async def ack_records(
        self, request: groups_pb.AckRecordsRequest, ctx: CallContext
    ) -> groups_pb.AckRecordsResponse:
        stream = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        offsets = validation.ack_offsets(request.offsets)
        acked = int(
            await self._run(
                ctx, self.conn.scripts.s_ack, stream, group, *(f"0-{o}" for o in offsets)
            )
        )
        if acked < 0:
            raise _group_not_found(stream, group)
        event = self._acked.pop((ctx.namespace, stream, group), None)
        if event is not None:
            event.set()
        return groups_pb.AckRecordsResponse(acked=acked)

    async def get_consumer_group_info(
        self, request: groups_pb.GetConsumerGroupInfoRequest, ctx: CallContext
    ) -> groups_pb.GetConsumerGroupInfoResponse:
        stream = validation.stream_name(request.stream)
        group = validation.stream_name(request.group, "group")
        state = await self._run(ctx, self.conn.scripts.s_group_state, stream, group)
        if int(state[0]) < 0:
            raise _group_not_found(stream, group)
        ack_ms, now = int(state[0]), int(state[1])
        live = sorted(
            state[i].decode("ascii")
            for i in range(2, len(state), 2)
            if int(float(state[i + 1])) > now
        )
        log = self._prefix(ctx, stream) + b"log"

        async def describe(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.xinfo_groups(log)
            pipe.xpending(log, group)
            return list(await pipe.execute())

        groups, summary = await self.conn.run(ctx, describe)
        info = next(g for g in groups if g["name"] == group.encode())
        pending = {c["name"].decode("ascii"): int(c["pending"]) for c in summary["consumers"]}
        response = groups_pb.GetConsumerGroupInfoResponse(
            last_delivered_offset=int(info["last-delivered-id"].split(b"-")[1]),
            pending_count=int(summary["pending"]),
            consumers=[
                groups_pb.ConsumerInfo(consumer=name, pending_count=pending.get(name, 0))
                for name in live
            ],
        )
        response.ack_timeout.FromMilliseconds(ack_ms)
        return response
