"""queue_visibility: lease expiry redelivers, ExtendVisibility, Release, stale handles."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.queue.v1 import queue_basic_pb2 as basic_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as pb
from prism.interfaces.queue.v1.queue_visibility_pb2_grpc import QueueVisibilityServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_error, expect_invalid
from prismctl.conformance.queue_basic import ack, dequeue, enqueue, payloads, peek
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.queue.v1.queue_visibility_pb2_grpc import (
        QueueVisibilityServiceAsyncStub,
    )

REQUIRES = ("queue_basic",)
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def stub(t: Target) -> QueueVisibilityServiceAsyncStub:
    return QueueVisibilityServiceStub(t.channel)


def seconds(value: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def lease(t: Target, queue: str, lease_seconds: float, n: int = 1) -> list[basic_pb.Message]:
    response: pb.DequeueWithTimeoutResponse = await stub(t).DequeueWithTimeout(
        pb.DequeueWithTimeoutRequest(
            queue=queue, max_messages=n, visibility_timeout=seconds(lease_seconds)
        )
    )
    return list(response.messages)


async def release(t: Target, queue: str, message: basic_pb.Message) -> None:
    await stub(t).Release(pb.ReleaseRequest(queue=queue, receipt_handle=message.receipt_handle))


async def redelivered(t: Target, queue: str) -> list[basic_pb.Message]:
    """Poll until a message is visible again and lease it (for 30 s)."""
    result: list[basic_pb.Message] = await eventually(
        lambda: dequeue(t, queue), timeout=10.0, message=f"no redelivery on {queue}"
    )
    return result


@case("queue_visibility", requires=REQUIRES)
async def lease_expiry_redelivers(t: Target) -> None:
    """A message not acked within its visibility timeout is delivered again, in its original
    place, with delivery_count 2; the expired handle is NOT_FOUND."""
    q = t.name("vt")
    await enqueue(t, q, b"first")
    await enqueue(t, q, b"second")
    first = (await lease(t, q, 0.5))[0]
    equal(first.payload, b"first", "leased message")
    equal(payloads(await peek(t, q)), [b"second"], "Peek during the lease")

    async def both_visible() -> bool:
        return len(await peek(t, q)) == 2

    await eventually(both_visible, timeout=10.0, message="lease never expired")
    equal(payloads(await peek(t, q)), [b"first", b"second"], "order after the lease expired")
    redo = (await dequeue(t, q))[0]
    equal((redo.payload, redo.delivery_count), (b"first", 2), "redelivery keeps its place")
    check(redo.receipt_handle != first.receipt_handle, "redelivery reused the receipt handle")
    await expect_error(
        ack(t, q, first),
        NOT_FOUND,
        "Ack with an expired lease's handle",
        reason="RECEIPT_NOT_FOUND",
    )
    await ack(t, q, redo)


@case("queue_visibility", requires=REQUIRES)
async def extend_visibility(t: Target) -> None:
    """ExtendVisibility keeps a message hidden past its original timeout (and may shorten it);
    the handle stays valid."""
    q = t.name("ext")
    await enqueue(t, q, b"job")
    msg = (await lease(t, q, 1.0))[0]
    extended: pb.ExtendVisibilityResponse = await stub(t).ExtendVisibility(
        pb.ExtendVisibilityRequest(
            queue=q, receipt_handle=msg.receipt_handle, visibility_timeout=seconds(30)
        )
    )
    check(extended.HasField("lease_expire_time"), "ExtendVisibility without lease_expire_time")
    # A control message leased for the original timeout expires while `job` stays hidden.
    control_q = t.name("extc")
    await enqueue(t, control_q, b"control")
    await lease(t, control_q, 1.0)
    await redelivered(t, control_q)
    equal(await peek(t, q), [], "extended message visible after its original timeout")
    await stub(t).ExtendVisibility(
        pb.ExtendVisibilityRequest(
            queue=q, receipt_handle=msg.receipt_handle, visibility_timeout=seconds(0.2)
        )
    )
    redo = (await redelivered(t, q))[0]
    equal((redo.payload, redo.delivery_count), (b"job", 2), "after a shortened lease")


@case("queue_visibility", requires=REQUIRES)
async def release_makes_visible_now(t: Target) -> None:
    """Release makes the message visible at once in its original place, keeps the delivery
    count, and invalidates the handle."""
    q = t.name("rel")
    await enqueue(t, q, b"a")
    await enqueue(t, q, b"b")
    msg = (await lease(t, q, 60))[0]
    await release(t, q, msg)
    peeked = await peek(t, q)
    equal(payloads(peeked), [b"a", b"b"], "queue right after Release")
    again = (await dequeue(t, q))[0]
    equal((again.payload, again.delivery_count), (b"a", 2), "redelivery after Release")
    for call, label in (
        (release(t, q, msg), "Release"),
        (ack(t, q, msg), "Ack"),
        (
            stub(t).ExtendVisibility(
                pb.ExtendVisibilityRequest(
                    queue=q, receipt_handle=msg.receipt_handle, visibility_timeout=seconds(5)
                )
            ),
            "ExtendVisibility",
        ),
    ):
        await expect_error(
            call, NOT_FOUND, f"{label} with a released handle", reason="RECEIPT_NOT_FOUND"
        )


@case("queue_visibility", requires=REQUIRES)
async def invalid_visibility_timeout(t: Target) -> None:
    """A missing, zero, negative or over-12-hours visibility_timeout is INVALID_ARGUMENT."""
    q = t.name("badvt")
    await enqueue(t, q, b"x")
    for bad, label in (
        (None, "missing"),
        (Duration(), "0"),
        (Duration(seconds=-1), "-1s"),
        (Duration(seconds=12 * 3600 + 1), "12h+1s"),
    ):
        await expect_invalid(
            stub(t).DequeueWithTimeout(
                pb.DequeueWithTimeoutRequest(queue=q, visibility_timeout=bad)
            ),
            "visibility_timeout",
            f"DequeueWithTimeout with visibility_timeout {label}",
        )
    equal(payloads(await peek(t, q)), [b"x"], "message after rejected leases")
