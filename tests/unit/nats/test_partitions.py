"""The partition count a stream used is kept in JetStream, whatever a later slot config says."""

from __future__ import annotations

from pathlib import Path

import pytest
from prism.interfaces.stream.v1 import stream_partitioning_pb2 as pb

from plugins.nats import NatsPlugin
from plugins.nats.partitions import fnv1a32
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument


def test_fnv1a32_reference_values() -> None:
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


async def test_count_is_fixed_by_the_first_append(
    plugin: NatsPlugin, ctx: CallContext, tmp_path: Path
) -> None:
    await plugin.partitions.append_to_partition(
        pb.AppendToPartitionRequest(stream="s", key="k", payload=b"x"), ctx
    )
    wider = NatsPlugin({**plugin.raw_config, "stream_partitions": 16}, data_dir=tmp_path)
    await wider.start()
    try:
        used = await wider.partitions.get_partitions(pb.GetPartitionsRequest(stream="s"), ctx)
        fresh = await wider.partitions.get_partitions(pb.GetPartitionsRequest(stream="t"), ctx)
        assert (used.partition_count, fresh.partition_count) == (4, 16)
        with pytest.raises(InvalidArgument) as bad:
            await wider.partitions.append_to_partition(
                pb.AppendToPartitionRequest(stream="s", payload=b"x", partition=4), ctx
            )
        assert bad.value.field == "partition"
    finally:
        await wider.close()


def test_partition_count_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as bad:
        NatsPlugin({"connection": "nats://h:1", "stream_partitions": 0}, data_dir=tmp_path)
    assert bad.value.field == "stream_partitions"
