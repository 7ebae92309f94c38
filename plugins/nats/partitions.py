"""Stream partitioning: each partition of a stream is its own JetStream stream.

Partition p of contract stream S is the JetStream stream `<stream prefix>_<ns>_sp<p>_S` on
subject `<root>.sp.S.<p>`, apart from S's plain log (stream.py), so each partition numbers its
records 1, 2, 3... exactly like a plain stream. The partition count a stream uses is fixed by
its first partitioned append: key `p.<ns>.S` of the slot's KV bucket `<stream prefix>_state`
holds it (created with compare-and-set, so concurrent first appends agree); until then
GetPartitions reports the slot's `stream_partitions` (default 4).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats.js.errors
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_partitioning_pb2 as partitioning_pb

from plugins.nats.connection import STATE_BUCKET, Names, NatsConnection, namespace_token
from plugins.nats.stream import NatsStreams, wrap
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument

DEFAULT_PARTITIONS = 4
MAX_PARTITIONS = 256


def fnv1a32(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


class NatsPartitions:
    """stream_partitioning."""

    def __init__(
        self, conn: NatsConnection, streams: NatsStreams, default_count: int = DEFAULT_PARTITIONS
    ) -> None:
        self.conn = conn
        self.streams = streams
        self.default_count = default_count

    def _target(self, ctx: CallContext, name: str, partition: int) -> tuple[str, str]:
        names = Names.of(self.conn.settings, ctx)
        return names.stream(f"sp{partition}", name), names.subject("sp", f"{name}.{partition}")

    def _key(self, ctx: CallContext, name: str) -> str:
        return f"p.{namespace_token(ctx.namespace)}.{name}"

    async def _count(self, ctx: CallContext, name: str, fix: bool = False) -> int:
        """The stream's partition count; with `fix`, record it if it was not yet."""
        key = self._key(ctx, name)

        async def count() -> int:
            kv = await self.conn.bucket(STATE_BUCKET)
            try:
                return int((await kv.get(key)).value or b"0")
            except nats.js.errors.KeyNotFoundError:
                if not fix:
                    return self.default_count
            try:
                await kv.create(key, b"%d" % self.default_count)
            except nats.js.errors.KeyWrongLastSequenceError:  # fixed meanwhile
                return int((await kv.get(key)).value or b"0")
            return self.default_count

        return await self.conn.run(ctx, count)

    @staticmethod
    def _checked(partition: int, count: int) -> int:
        if partition >= count:
            raise InvalidArgument("partition", f"must be below the partition count {count}")
        return partition

    async def get_partitions(
        self, request: partitioning_pb.GetPartitionsRequest, ctx: CallContext
    ) -> partitioning_pb.GetPartitionsResponse:
        name = validation.stream_name(request.stream)
        return partitioning_pb.GetPartitionsResponse(partition_count=await self._count(ctx, name))

    async def append_to_partition(
        self, request: partitioning_pb.AppendToPartitionRequest, ctx: CallContext
    ) -> partitioning_pb.AppendToPartitionResponse:
        name = validation.stream_name(request.stream)
        key = validation.record_key(request.key)
        record = basic_pb.Record(
            key=key,
            payload=validation.value(request.payload, "payload"),
            attributes=validation.attributes(request.attributes),
        )
        if not request.HasField("partition") and not key:
            raise InvalidArgument("key", "is required when no partition is given")
        count = await self._count(ctx, name)
        if request.HasField("partition"):
            partition = self._checked(request.partition, count)
        else:
            partition = fnv1a32(key.encode("utf-8")) % count
        count = await self._count(ctx, name, fix=True)
        partition = self._checked(partition, count)
        record.partition = partition
        stream, subject = self._target(ctx, name, partition)
        jetstreams = self.streams.jetstreams
        offset = await jetstreams.publish(ctx, stream, subject, record.SerializeToString())
        return partitioning_pb.AppendToPartitionResponse(partition=partition, offset=offset)

    def read_partition(
        self, request: partitioning_pb.ReadPartitionRequest, ctx: CallContext
    ) -> AsyncIterator[partitioning_pb.ReadPartitionResponse]:
        name = validation.stream_name(request.stream)
        limit = validation.non_negative(request.max_records, "max_records")
        return self._read(ctx, name, request, limit)

    async def _read(
        self,
        ctx: CallContext,
        name: str,
        request: partitioning_pb.ReadPartitionRequest,
        limit: int,
    ) -> AsyncIterator[partitioning_pb.ReadPartitionResponse]:
        partition = self._checked(request.partition, await self._count(ctx, name))
        target = self._target(ctx, name, partition)
        start = max(request.start_offset, 1)
        records = self.streams.records(ctx, target, start, None, limit, request.follow)
        async for event in wrap(records, lambda r: partitioning_pb.ReadPartitionResponse(record=r)):
            yield event
