"""nats-server dies mid-run (SIGKILL) and restarts on the same port and JetStream store dir:
calls fail fast with UNAVAILABLE, a live subscription ends with UNAVAILABLE instead of silently
missing messages, health goes NOT_SERVING, and the plugin's background reconnect brings it back
by itself with every acknowledged stream append and persistent publish intact (same offsets and
sequences, same payloads) and every queue message and lease where it was (leases live in a
JetStream KV, so they survive too)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub
from prism.interfaces.pubsub.v1 import pubsub_persistent_pb2 as persistent
from prism.interfaces.pubsub.v1.pubsub_basic_pb2_grpc import PubSubBasicServiceStub
from prism.interfaces.pubsub.v1.pubsub_persistent_pb2_grpc import PubSubPersistentServiceStub
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue
from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceStub
from prism.interfaces.stream.v1 import stream_basic_pb2 as stream
from prism.interfaces.stream.v1.stream_basic_pb2_grpc import StreamBasicServiceStub

from tests.support.faults import (
    SERVING,
    await_outage,
    await_recovery,
    expect_stream_ends,
    expect_unavailable,
    health_is,
)
from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway

SERVICE = "prism.interfaces.stream.v1.StreamBasicService"
DEADLINE = 3.0
META = namespaced("faults")
#: well before the client's deadline
FAST = DEADLINE - 0.5


async def _read_all(streams: Any, name: str) -> list[tuple[int, bytes]]:
    call = streams.Read(stream.ReadRequest(stream=name), metadata=META, timeout=DEADLINE)
    return [(r.record.offset, r.record.payload) async for r in call]


async def test_nats_killed_and_restarted(tmp_path: Path) -> None:
    with throwaway("nats") as server_proc:
        config = {"connection": server_proc.url, "request_timeout_seconds": 2}
        slots = {
            "stream": {"backend": "nats", "config": config},
            "pubsub": {"backend": "nats", "config": config},
            "queue": {"backend": "nats", "config": config},
        }
        namespaces = [{"name": "faults", "pattern": "direct", "slots": slots}]
        async with (
            running_server({"namespaces": namespaces}, tmp_path, health_interval=0.2) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            streams = StreamBasicServiceStub(channel)
            topics = PubSubBasicServiceStub(channel)
            jobs = QueueBasicServiceStub(channel)
            log = PubSubPersistentServiceStub(channel)
            logged = []
            for i in range(5):
                published = await log.PublishPersistent(
                    persistent.PublishPersistentRequest(topic="audit", payload=b"a%d" % i),
                    metadata=META,
                )
                logged.append((published.sequence, published.message_id, b"a%d" % i))
            enqueued = [
                (
                    await jobs.Enqueue(
                        queue.EnqueueRequest(queue="jobs", payload=b"j%d" % i), metadata=META
                    )
                ).message_id
                for i in range(10)
            ]
            leased = await jobs.Dequeue(
                queue.DequeueRequest(queue="jobs", max_messages=2), metadata=META
            )
            await jobs.Ack(
                queue.AckRequest(queue="jobs", receipt_handle=leased.messages[0].receipt_handle),
                metadata=META,
            )
            acknowledged = []
            for i in range(30):
                reply = await streams.Append(
                    stream.AppendRequest(stream="events", payload=b"e%d" % i), metadata=META
                )
                acknowledged.append((reply.offset, b"e%d" % i))
            assert [offset for offset, _ in acknowledged] == list(range(1, 31))
            assert await health_is(channel, SERVING, SERVICE)

            live = topics.Subscribe(pubsub.SubscribeRequest(topic="alerts"), metadata=META)
            events = live.__aiter__()
            first = await asyncio.wait_for(anext(events), DEADLINE)
            assert first.WhichOneof("event") == "started"

            server_proc.kill()

            await expect_stream_ends(events, DEADLINE, "NATS")
            await expect_unavailable(
                streams.Append(
                    stream.AppendRequest(stream="events", payload=b"lost"),
                    metadata=META,
                    timeout=DEADLINE,
                ),
                FAST,
                "nats-server",
            )
            await expect_unavailable(_read_all(streams, "events"), FAST, "nats-server")
            await expect_unavailable(
                jobs.Dequeue(queue.DequeueRequest(queue="jobs"), metadata=META, timeout=DEADLINE),
                FAST,
                "nats-server",
            )
            await expect_unavailable(
                topics.Publish(
                    pubsub.PublishRequest(topic="alerts", payload=b"x"),
                    metadata=META,
                    timeout=DEADLINE,
                ),
                FAST,
                "nats-server",
            )

            await await_outage(channel, SERVICE)

            server_proc.start()

            await await_recovery(
                channel,
                lambda: streams.GetLatestOffset(
                    stream.GetLatestOffsetRequest(stream="events"), metadata=META, timeout=DEADLINE
                ),
                SERVICE,
            )
            assert await _read_all(streams, "events") == acknowledged
            after = await streams.Append(
                stream.AppendRequest(stream="events", payload=b"after"), metadata=META
            )
            assert after.offset == 31
            last = await log.GetLastMessageID(
                persistent.GetLastMessageIDRequest(topic="audit"), metadata=META
            )
            assert (last.sequence, last.message_id) == logged[-1][:2]
            durable = log.SubscribeDurable(
                persistent.SubscribeDurableRequest(
                    topic="audit", durable_name="after", start=persistent.START_POSITION_BEGINNING
                ),
                metadata=META,
            )
            replayed = durable.__aiter__()
            assert (await anext(replayed)).WhichOneof("event") == "started"
            got = [(await asyncio.wait_for(anext(replayed), DEADLINE)).message for _ in logged]
            assert [(m.sequence, m.message_id, m.payload) for m in got] == logged
            durable.cancel()
            # the acked job is gone, the leased one is still leased, the rest wait in order
            waiting = await jobs.Peek(
                queue.PeekRequest(queue="jobs", max_messages=100), metadata=META
            )
            assert [m.message_id for m in waiting.messages] == enqueued[2:]
            await jobs.Ack(
                queue.AckRequest(queue="jobs", receipt_handle=leased.messages[1].receipt_handle),
                metadata=META,
            )
