"""queue_delayed: a delayed message is never delivered before its time, then is ordinary."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prism.interfaces.queue.v1 import queue_delayed_pb2 as pb
from prism.interfaces.queue.v1.queue_delayed_pb2_grpc import QueueDelayedServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.queue_basic import dequeue, enqueue, payloads, peek
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.queue.v1.queue_delayed_pb2_grpc import QueueDelayedServiceAsyncStub

REQUIRES = ("queue_basic",)
DELAY = 1.0


def stub(t: Target) -> QueueDelayedServiceAsyncStub:
    return QueueDelayedServiceStub(t.channel)


async def scheduled(t: Target, queue: str) -> int:
    response: pb.GetScheduledCountResponse = await stub(t).GetScheduledCount(
        pb.GetScheduledCountRequest(queue=queue)
    )
    return response.count


@case("queue_delayed", requires=REQUIRES)
async def not_before_its_time(t: Target) -> None:
    """A message delayed by 1 s is invisible to Dequeue and Peek until then, is counted as
    scheduled, and then is delivered in the order it entered the queue."""
    q = t.name("later")
    start = time.time()
    response: pb.EnqueueDelayedResponse = await stub(t).EnqueueDelayed(
        pb.EnqueueDelayedRequest(queue=q, payload=b"delayed", delay=Duration(seconds=1))
    )
    due = response.deliver_time.ToNanoseconds() / 1e9
    check(
        start + DELAY - 0.5 <= due <= time.time() + DELAY + 0.5,
        f"deliver_time {due - start:.2f}s after the call, expected about {DELAY}s",
    )
    await enqueue(t, q, b"now")
    equal(await scheduled(t, q), 1, "GetScheduledCount before the delay passed")
    equal(payloads(await peek(t, q)), [b"now"], "Peek before the delay passed")

    first = await dequeue(t, q, 10)
    equal(payloads(first), [b"now"], "Dequeue before the delay passed")
    arrived: list[float] = []

    async def delivered() -> bool:
        got = await dequeue(t, q, 10)
        if got:
            arrived.append(time.time())
            equal(payloads(got), [b"delayed"], "Dequeue once the delay passed")
        return bool(got)

    await eventually(delivered, timeout=10.0, message="delayed message never delivered")
    early = due - arrived[0]
    check(early < 0.05, f"delayed message delivered {early:.3f}s before its deliver_time")
    equal(await scheduled(t, q), 0, "GetScheduledCount after delivery")
    past = Timestamp()
    past.FromSeconds(int(time.time()) - 60)
    await stub(t).EnqueueDelayed(pb.EnqueueDelayedRequest(queue=q, payload=b"p", deliver_time=past))
    equal(payloads(await dequeue(t, q)), [b"p"], "deliver_time in the past is due now")


@case("queue_delayed", requires=REQUIRES)
async def invalid_schedules(t: Target) -> None:
    """No schedule, a negative or over-7-days delay, or a deliver_time over 7 days ahead is
    INVALID_ARGUMENT naming the field."""
    q = t.name("baddelay")
    await expect_invalid(
        stub(t).EnqueueDelayed(pb.EnqueueDelayedRequest(queue=q, payload=b"x")),
        "delay",
        "EnqueueDelayed without a schedule",
    )
    for delay in (Duration(seconds=-1), Duration(seconds=7 * 86400 + 1)):
        await expect_invalid(
            stub(t).EnqueueDelayed(pb.EnqueueDelayedRequest(queue=q, payload=b"x", delay=delay)),
            "delay",
            f"EnqueueDelayed with delay {delay.seconds}s",
        )
    far = Timestamp()
    far.FromSeconds(int(time.time()) + 8 * 86400)
    await expect_invalid(
        stub(t).EnqueueDelayed(pb.EnqueueDelayedRequest(queue=q, payload=b"x", deliver_time=far)),
        "deliver_time",
        "EnqueueDelayed 8 days ahead",
    )
    equal(await scheduled(t, q), 0, "scheduled messages after rejected calls")
