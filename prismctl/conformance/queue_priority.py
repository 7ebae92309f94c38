"""queue_priority: higher priority first, FIFO within a priority."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prism.interfaces.queue.v1 import queue_priority_pb2 as pb
from prism.interfaces.queue.v1.queue_priority_pb2_grpc import QueuePriorityServiceStub

from prismctl.conformance.core import Target, case, equal, expect_invalid
from prismctl.conformance.queue_basic import dequeue, enqueue, payloads, peek

if TYPE_CHECKING:
    from prism.interfaces.queue.v1.queue_priority_pb2_grpc import QueuePriorityServiceAsyncStub

REQUIRES = ("queue_basic",)


def stub(t: Target) -> QueuePriorityServiceAsyncStub:
    return QueuePriorityServiceStub(t.channel)


async def enqueue_priority(t: Target, queue: str, payload: bytes, priority: int) -> None:
    await stub(t).EnqueueWithPriority(
        pb.EnqueueWithPriorityRequest(queue=queue, payload=payload, priority=priority)
    )


@case("queue_priority", requires=REQUIRES)
async def priority_order(t: Target) -> None:
    """Peek and Dequeue give higher priorities first and FIFO within one priority; plain
    Enqueue is priority 0."""
    q = t.name("prio")
    await enqueue_priority(t, q, b"low-1", -5)
    await enqueue(t, q, b"zero-1")
    await enqueue_priority(t, q, b"high-1", 10)
    await enqueue_priority(t, q, b"low-2", -5)
    await enqueue_priority(t, q, b"high-2", 10)
    await enqueue_priority(t, q, b"top", 1000)
    await enqueue_priority(t, q, b"zero-2", 0)
    expected = [b"top", b"high-1", b"high-2", b"zero-1", b"zero-2", b"low-1", b"low-2"]
    peeked = await peek(t, q)
    equal(payloads(peeked), expected, "Peek order")
    equal([m.priority for m in peeked], [1000, 10, 10, 0, 0, -5, -5], "priorities")
    equal(payloads(await dequeue(t, q, 3)), expected[:3], "first Dequeue of 3")
    await enqueue_priority(t, q, b"urgent", 50)
    equal(payloads(await dequeue(t, q, 10)), [b"urgent", *expected[3:]], "after a late urgent")


@case("queue_priority", requires=REQUIRES)
async def invalid_priority(t: Target) -> None:
    """A priority outside -1000..1000 is INVALID_ARGUMENT naming priority."""
    q = t.name("badprio")
    for p in (1001, -1001):
        await expect_invalid(enqueue_priority(t, q, b"x", p), "priority", f"priority {p}")
    equal(await peek(t, q), [], "queue after rejected enqueues")
