"""memstore queue and pub/sub internals the black-box suite cannot observe: the sweeper
dead-letters an expired lease with no traffic on the queue, a long poll is woken by the event
(not by polling), and subscriptions free their bookkeeping however their stream ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dead_letter
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility

from plugins.memstore import MemstorePlugin
from plugins.memstore.pubsub import MAX_PENDING
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted


async def poll(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_sweeper_dead_letters_an_expired_lease_without_queue_traffic(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    q = plugin.queues
    await q.configure_dead_letter(
        dead_letter.ConfigureDeadLetterRequest(
            queue="jobs", dead_letter_queue="dlq", max_deliveries=1
        ),
        ctx,
    )
    await q.enqueue(queue.EnqueueRequest(queue="jobs", payload=b"poison"), ctx)
    got = await q.dequeue_with_timeout(
        visibility.DequeueWithTimeoutRequest(
            queue="jobs", visibility_timeout=Duration(nanos=50_000_000)
        ),
        ctx,
    )
    assert len(got.messages) == 1

    def dead_lettered() -> int:
        dlq = q._queues.get((ctx.namespace, "dlq"))
        return 0 if dlq is None else len(dlq.messages)

    assert dead_lettered() == 0
    await poll(lambda: dead_lettered() == 1)  # only the sweeper touches the queues meanwhile
    assert not q._queues[(ctx.namespace, "jobs")].messages
    assert not q._queues[(ctx.namespace, "jobs")].leases


async def test_long_poll_is_woken_by_enqueue_not_by_a_timer(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    q = plugin.queues
    waiter = asyncio.create_task(
        q.dequeue(queue.DequeueRequest(queue="lp", wait_time=Duration(seconds=20)), ctx)
    )
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    await q.enqueue(queue.EnqueueRequest(queue="lp", payload=b"x"), ctx)
    got = await asyncio.wait_for(waiter, 2)
    assert [m.payload for m in got.messages] == [b"x"]
    assert time.monotonic() - started < 0.5


async def test_subscriptions_forget_their_state_on_unsubscribe_and_cancel(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    ps = plugin._pubsub
    stream = ps.subscribe(pubsub.SubscribeRequest(topic="a.b"), ctx)
    first = await stream.__anext__()
    await ps.unsubscribe(
        pubsub.UnsubscribeRequest(subscription_id=first.started.subscription_id), ctx
    )
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()

    async def consume() -> None:
        async for _ in ps.subscribe_pattern(wildcards.SubscribePatternRequest(pattern="a.>"), ctx):
            pass

    task = asyncio.create_task(consume())
    await poll(lambda: bool(ps._subscriptions))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not ps._subscriptions
    assert not any(ps._by_namespace.values())


async def test_slow_subscriber_is_disconnected_not_thinned(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    ps = plugin._pubsub
    stream = ps.subscribe(pubsub.SubscribeRequest(topic="firehose"), ctx)
    assert (await stream.__anext__()).HasField("started")
    for _ in range(MAX_PENDING):
        await ps.publish(pubsub.PublishRequest(topic="firehose"), ctx)
    assert (await stream.__anext__()).HasField("message")  # within the bound: still delivering
    for _ in range(2):
        await ps.publish(pubsub.PublishRequest(topic="firehose"), ctx)
    with pytest.raises(ResourceExhausted) as err:
        await stream.__anext__()
    assert err.value.reason == "SLOW_SUBSCRIBER"
    assert not ps._subscriptions
