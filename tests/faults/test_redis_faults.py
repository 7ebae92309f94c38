"""Redis dies mid-run (SIGKILL) and comes back on the same port and data dir: calls fail fast
with UNAVAILABLE, health goes NOT_SERVING, and the plugin recovers on its own with every
acknowledged write (keys and queued messages) intact: the throwaway server fsyncs its
append-only file on every write. A live subscription ends with UNAVAILABLE instead of hanging."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub_pb
from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceStub
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue_pb
from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceStub

from tests.support.faults import (
    SERVING,
    await_outage,
    await_recovery,
    check_keys,
    expect_stream_ends,
    expect_unavailable,
    health_is,
)
from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import (
        KeyValueBasicServiceAsyncStub,
    )
    from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceAsyncStub
    from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceAsyncStub

SERVICE = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
CALL_DEADLINE = 3.0
META = namespaced("ns1")


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
            assert await health_is(channel, SERVING, SERVICE)
            pubsub: PubSubBasicServiceAsyncStub = PubSubBasicServiceStub(channel)
            subscription = pubsub.Subscribe(pubsub_pb.SubscribeRequest(topic="news"), metadata=META)
            events = aiter(subscription)
            assert (await anext(events)).HasField("started")

            db.kill()

            await expect_stream_ends(events, CALL_DEADLINE, "redis")

            for call in (
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=CALL_DEADLINE),
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META,
                       timeout=CALL_DEADLINE),
                queue.Enqueue(queue_pb.EnqueueRequest(queue="jobs"), metadata=META,
                              timeout=CALL_DEADLINE),
            ):  # fmt: skip
                await expect_unavailable(call, CALL_DEADLINE, "redis")
            await await_outage(channel, SERVICE)

            db.start()

            await await_recovery(
                channel,
                lambda: kv.Get(basic.GetRequest(key="k0"), metadata=META, timeout=CALL_DEADLINE),
                SERVICE,
                patience=15,
            )
            await check_keys(kv, acknowledged, META)
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
