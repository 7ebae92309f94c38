"""Queue internals on real JetStream: compare-and-set leases, state clean-up, lazy
dead-lettering of expired leases, survival of leases across plugin instances."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq
from prism.interfaces.queue.v1 import queue_priority_pb2 as priority_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility

from plugins.nats import NatsPlugin
from plugins.nats.queue import CLAIM_GRACE_NS, _State
from plugins.runtime.context import CallContext
from tests.support.wait import eventually


async def _enqueue(plugin: NatsPlugin, ctx: CallContext, n: int, queue: str = "q") -> list[str]:
    return [
        (
            await plugin.queue.enqueue(basic.EnqueueRequest(queue=queue, payload=b"%d" % i), ctx)
        ).message_id
        for i in range(n)
    ]


async def test_concurrent_dequeues_never_share_a_message(
    plugin: NatsPlugin, ctx: CallContext
) -> None:
    ids = await _enqueue(plugin, ctx, 20)
    replies = await asyncio.gather(
        *(
            plugin.queue.dequeue(basic.DequeueRequest(queue="q", max_messages=3), ctx)
            for _ in range(10)
        )
    )
    leased = [m.message_id for r in replies for m in r.messages]
    assert len(leased) == len(set(leased))
    assert set(leased) <= set(ids)
    # whatever a lost race left behind is still there for the next Dequeue
    rest = await plugin.queue.dequeue(basic.DequeueRequest(queue="q", max_messages=100), ctx)
    assert sorted(leased + [m.message_id for m in rest.messages]) == sorted(ids)


async def test_concurrent_dequeues_each_get_a_message_while_there_are_enough(
    plugin: NatsPlugin, ctx: CallContext
) -> None:
    """Dequeues of one instance racing for the head of the queue hand over to each other
    instead of losing the race and answering empty."""
    ids = await _enqueue(plugin, ctx, 12)
    replies = await asyncio.gather(
        *(plugin.queue.dequeue(basic.DequeueRequest(queue="q"), ctx) for _ in range(12))
    )
    assert sorted(m.message_id for r in replies for m in r.messages) == sorted(ids)


async def test_ack_leaves_no_state_behind(plugin: NatsPlugin, ctx: CallContext) -> None:
    await _enqueue(plugin, ctx, 3)
    got = await plugin.queue.dequeue(basic.DequeueRequest(queue="q", max_messages=3), ctx)
    assert len(await plugin.queue._states(ctx, "q")) == 3
    for message in got.messages:
        await plugin.queue.ack(
            basic.AckRequest(queue="q", receipt_handle=message.receipt_handle), ctx
        )
    assert await plugin.queue._states(ctx, "q") == {}
    stream, _ = plugin.queue.jetstreams.names(ctx, "q")
    info = await plugin.queue.jetstreams.info(ctx, stream)
    assert info is not None and info.state.messages == 0


async def test_expired_lease_is_dead_lettered_by_peek(plugin: NatsPlugin, ctx: CallContext) -> None:
    await plugin.queue.configure_dead_letter(
        dlq.ConfigureDeadLetterRequest(queue="q", dead_letter_queue="dead", max_deliveries=1), ctx
    )
    [poison] = await _enqueue(plugin, ctx, 1)
    await plugin.queue.dequeue_with_timeout(
        visibility.DequeueWithTimeoutRequest(
            queue="q", visibility_timeout=Duration(nanos=200_000_000)
        ),
        ctx,
    )
    assert (await plugin.queue.peek(basic.PeekRequest(queue="dead"), ctx)).messages == []

    async def moved_by_peek() -> bool:
        assert (await plugin.queue.peek(basic.PeekRequest(queue="q"), ctx)).messages == []
        return bool((await plugin.queue.peek(basic.PeekRequest(queue="dead"), ctx)).messages)

    await eventually(moved_by_peek, timeout=5, message="expired lease never dead-lettered")
    dead = (await plugin.queue.peek(basic.PeekRequest(queue="dead"), ctx)).messages
    assert [(m.message_id, m.delivery_count) for m in dead] == [(poison, 0)]


async def test_leases_outlive_the_plugin_instance(
    plugin: NatsPlugin, ctx: CallContext, tmp_path: Path
) -> None:
    await _enqueue(plugin, ctx, 2)
    first = (await plugin.queue.dequeue(basic.DequeueRequest(queue="q"), ctx)).messages[0]
    other = NatsPlugin(plugin.raw_config, data_dir=tmp_path)
    await other.start()
    try:
        peeked = await other.queue.peek(basic.PeekRequest(queue="q"), ctx)
        assert [m.payload for m in peeked.messages] == [b"1"]
        started = time.monotonic()
        await other.queue.ack(basic.AckRequest(queue="q", receipt_handle=first.receipt_handle), ctx)
        assert time.monotonic() - started < 2
    finally:
        await other.close()


async def test_priorities_deliver_first_but_redrive_goes_by_age(
    plugin: NatsPlugin, ctx: CallContext
) -> None:
    await plugin.queue.configure_dead_letter(
        dlq.ConfigureDeadLetterRequest(queue="q", dead_letter_queue="dead", max_deliveries=1), ctx
    )
    for payload, priority in ((b"lo", 0), (b"hi", 5)):
        await plugin.queue.enqueue_with_priority(
            priority_pb.EnqueueWithPriorityRequest(queue="q", payload=payload, priority=priority),
            ctx,
        )
        leased = (await plugin.queue.dequeue(basic.DequeueRequest(queue="q"), ctx)).messages[0]
        assert (leased.payload, leased.priority) == (payload, priority)
        await plugin.queue.release(
            visibility.ReleaseRequest(queue="q", receipt_handle=leased.receipt_handle), ctx
        )
    dead = (await plugin.queue.peek(basic.PeekRequest(queue="dead", max_messages=10), ctx)).messages
    assert [m.payload for m in dead] == [b"hi", b"lo"]  # delivery order: priority first
    moved = await plugin.queue.redrive_dead_letters(
        dlq.RedriveDeadLettersRequest(queue="q", max_messages=1), ctx
    )
    assert moved.moved == 1
    back = (await plugin.queue.peek(basic.PeekRequest(queue="q"), ctx)).messages
    assert [(m.payload, m.priority) for m in back] == [(b"lo", 0)]  # oldest dead-lettered


async def test_a_lapsed_claim_makes_the_message_visible_again(
    plugin: NatsPlugin, ctx: CallContext
) -> None:
    """A plugin that died between claiming a message (to ack or move it) and finishing leaves a
    claim; once CLAIM_GRACE_NS has passed the message is deliverable again."""
    await _enqueue(plugin, ctx, 2)
    key = plugin.queue._state_key(ctx, "q", 1)
    stale = _State(1, -(time.time_ns() - CLAIM_GRACE_NS - 1), "", 0)
    fresh = _State.claim(1)
    await plugin.queue._put_state(ctx, key, stale, None)
    peeked = (await plugin.queue.peek(basic.PeekRequest(queue="q", max_messages=10), ctx)).messages
    assert [(m.payload, m.delivery_count) for m in peeked] == [(b"0", 1), (b"1", 0)]
    state = await plugin.queue._get_state(ctx, key)
    assert state is not None
    await plugin.queue._put_state(ctx, key, fresh, state)
    peeked = (await plugin.queue.peek(basic.PeekRequest(queue="q", max_messages=10), ctx)).messages
    assert [m.payload for m in peeked] == [b"1"]


async def test_consumers_of_two_instances_drain_each_message_once(
    plugin: NatsPlugin, ctx: CallContext, tmp_path: Path
) -> None:
    """Dequeue+Ack loops racing in one instance (which step over each other's picks) and in
    another (which only the compare-and-set keeps apart) take every message exactly once."""
    ids = await _enqueue(plugin, ctx, 40)
    other = NatsPlugin(plugin.raw_config, data_dir=tmp_path)
    await other.start()
    acked: list[str] = []

    async def consume(instance: NatsPlugin) -> None:
        while True:
            got = await instance.queue.dequeue(basic.DequeueRequest(queue="q"), ctx)
            if not got.messages:
                return
            [message] = got.messages
            handle = message.receipt_handle
            await instance.queue.ack(basic.AckRequest(queue="q", receipt_handle=handle), ctx)
            acked.append(message.message_id)

    try:
        await asyncio.gather(*(consume(p) for p in (plugin, other) for _ in range(4)))
    finally:
        await other.close()
    assert sorted(acked) == sorted(ids)
    assert await plugin.queue._states(ctx, "q") == {}
