"""Redis dies mid-run (SIGKILL) and comes back on the same port and data dir: calls fail fast
with UNAVAILABLE, health goes NOT_SERVING, and the plugin recovers on its own with every
acknowledged write (keys and queued messages) intact: the throwaway server fsyncs its
append-only file on every write. A live subscription ends with UNAVAILABLE instead of hanging."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub_pb
from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceStub
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue_pb
from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceStub

from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway
from tests.support.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import (
        KeyValueBasicServiceAsyncStub,
    )
    from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceAsyncStub
    from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceAsyncStub

SERVICE = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
CALL_DEADLINE = 3.0
META = namespaced("ns1")


async def _status(health: health_pb2_grpc.HealthStub) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
    return int(reply.status)


async def _get(kv: KeyValueBasicServiceAsyncStub, key: str) -> basic.GetResponse | None:
    """The reply, or None while the backend is still unavailable."""
    try:
        reply: basic.GetResponse = await kv.Get(
            basic.GetRequest(key=key), metadata=META, timeout=CALL_DEADLINE
        )
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return None
    return reply


async def test_redis_killed_and_restarted(tmp_path: Path) -> None:
    with throwaway("redis") as db:
        slot = {"backend": "redis", "config": {"connection": db.url, "key_prefix": "fault:"}}
        slots = {"keyvalue": slot, "queue": slot, "pubsub": slot}
        config = {"namespaces": [{"name": "ns1", "pattern": "direct", "slots": slots}]}
        async with (
            running_server(config, tmp_path, health_interval=0.2) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            kv: KeyValueBasicServiceAsyncStub = KeyValueBasicServiceStub(channel)
            queue: QueueBasicServiceAsyncStub = QueueBasicServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            acknowledged = {}
            for i in range(50):
                reply = await kv.Set(
                    basic.SetRequest(key=f"k{i}", value=f"v{i}".encode()), metadata=META
                )
                acknowledged[f"k{i}"] = (f"v{i}".encode(), reply.revision)
            enqueued = set()
            for i in range(20):
                sent = await queue.Enqueue(
                    queue_pb.EnqueueRequest(queue="jobs", payload=b"%d" % i), metadata=META
                )
                enqueued.add(sent.message_id)
            assert await _status(health) == health_pb2.HealthCheckResponse.SERVING
            pubsub: PubSubBasicServiceAsyncStub = PubSubBasicServiceStub(channel)
            subscription = pubsub.Subscribe(pubsub_pb.SubscribeRequest(topic="news"), metadata=META)
            events = aiter(subscription)
            assert (await anext(events)).HasField("started")

            db.kill()

            try:  # a live subscription cannot go on honestly: it ends, it does not hang
                await asyncio.wait_for(anext(events), CALL_DEADLINE)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            else:
                raise AssertionError("the subscription went on while redis was down")

            for call in (
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=CALL_DEADLINE),
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META,
                       timeout=CALL_DEADLINE),
                queue.Enqueue(queue_pb.EnqueueRequest(queue="jobs"), metadata=META,
                              timeout=CALL_DEADLINE),
            ):  # fmt: skip
                started = time.monotonic()
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                else:
                    raise AssertionError("a call succeeded while redis was down")
                assert time.monotonic() - started < CALL_DEADLINE
            await eventually(
                lambda: _is(health, health_pb2.HealthCheckResponse.NOT_SERVING),
                message="health did not go NOT_SERVING",
            )

            db.start()

            await eventually(lambda: _get(kv, "k0"), timeout=15, message="plugin did not recover")
            await eventually(
                lambda: _is(health, health_pb2.HealthCheckResponse.SERVING),
                message="health did not come back to SERVING",
            )
            for key, (value, revision) in acknowledged.items():
                got = await _get(kv, key)
                assert got is not None and got.found, key
                assert (got.value, got.revision) == (value, revision)
            peeked = await queue.Peek(
                queue_pb.PeekRequest(queue="jobs", max_messages=100), metadata=META
            )
            assert {m.message_id for m in peeked.messages} == enqueued
            after = await kv.Set(basic.SetRequest(key="k0", value=b"new"), metadata=META)
            assert after.revision > max(r for _, r in acknowledged.values())
            resumed = aiter(
                pubsub.Subscribe(pubsub_pb.SubscribeRequest(topic="news"), metadata=META)
            )
            assert (await anext(resumed)).HasField("started")
            await pubsub.Publish(
                pubsub_pb.PublishRequest(topic="news", payload=b"back"), metadata=META
            )
            event = await asyncio.wait_for(anext(resumed), CALL_DEADLINE)
            assert event.message.payload == b"back"


async def _is(health: health_pb2_grpc.HealthStub, status: int) -> bool:
    return await _status(health) == status
