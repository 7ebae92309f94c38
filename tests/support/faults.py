"""Scaffolding of the kill-and-restart fault tests (tests/faults/): what every backend must show
while its server is down (fast UNAVAILABLE, health NOT_SERVING, live streams ended) and after
it is back (answers again, SERVING, acknowledged KeyValue writes intact)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch

from tests.support.wait import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Metadata = tuple[tuple[str, str], ...]
#: value and revision of every write the server acknowledged, by key
Acknowledged = dict[str, tuple[bytes, int]]


async def health_is(channel: grpc.aio.Channel, status: int, *services: str) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in services:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        if reply.status != status:
            return False
    return True


async def expect_unavailable(call: Awaitable[object], within: float, backend: str) -> None:
    """The call fails UNAVAILABLE in less than `within` seconds."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    else:
        raise AssertionError(f"a call succeeded while {backend} was down")
    assert time.monotonic() - started < within


async def expect_stream_ends(events: AsyncIterator[Any], within: float, backend: str) -> None:
    """A live subscription cannot go on honestly: it ends with UNAVAILABLE, it does not hang."""
    try:
        await asyncio.wait_for(anext(events), within)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    else:
        raise AssertionError(f"the live subscription went on while {backend} was down")


async def await_outage(channel: grpc.aio.Channel, *services: str) -> None:
    await eventually(
        lambda: health_is(channel, NOT_SERVING, *services),
        message="health did not go NOT_SERVING",
    )


async def await_recovery(
    channel: grpc.aio.Channel,
    probe: Callable[[], Awaitable[object]],
    *services: str,
    patience: float = 20,
) -> None:
    """`probe()` succeeds again (it may fail UNAVAILABLE meanwhile, nothing else), then health
    is back to SERVING."""

    async def answers() -> bool:
        try:
            await probe()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False
        return True

    await eventually(answers, timeout=patience, message="plugin did not recover")
    await eventually(
        lambda: health_is(channel, SERVING, *services),
        message="health did not come back to SERVING",
    )


async def write_keys(kv: Any, kv_batch: Any, metadata: Metadata) -> Acknowledged:
    """20 single Sets and a 20-entry BatchSet; what the server acknowledged."""
    acknowledged: Acknowledged = {}
    for i in range(20):
        reply = await kv.Set(basic.SetRequest(key=f"k{i}", value=b"%d" % i), metadata=metadata)
        acknowledged[f"k{i}"] = (b"%d" % i, reply.revision)
    entries = [batch.BatchSetEntry(key=f"b{i}", value=b"batch") for i in range(20)]
    batch_reply = await kv_batch.BatchSet(batch.BatchSetRequest(entries=entries), metadata=metadata)
    acknowledged |= {r.key: (b"batch", r.revision) for r in batch_reply.results}
    return acknowledged


async def check_keys(kv: Any, acknowledged: Acknowledged, metadata: Metadata) -> None:
    """Every acknowledged write is there with its value and revision."""
    for key, (value, revision) in acknowledged.items():
        got = await kv.Get(basic.GetRequest(key=key), metadata=metadata)
        assert (got.found, got.value, got.revision) == (True, value, revision), key
