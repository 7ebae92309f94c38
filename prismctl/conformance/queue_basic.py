"""queue_basic: FIFO delivery, leases hide messages, Peek, Ack, stale receipts, input rules."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.queue.v1 import queue_basic_pb2 as pb
from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_error, expect_invalid

if TYPE_CHECKING:
    from prism.interfaces.queue.v1.queue_basic_pb2_grpc import QueueBasicServiceAsyncStub

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def stub(t: Target) -> QueueBasicServiceAsyncStub:
    return QueueBasicServiceStub(t.channel)


async def enqueue(t: Target, queue: str, payload: bytes, **attributes: str) -> str:
    response: pb.EnqueueResponse = await stub(t).Enqueue(
        pb.EnqueueRequest(queue=queue, payload=payload, attributes=attributes)
    )
    return response.message_id


async def dequeue(t: Target, queue: str, n: int = 1, wait: float = 0.0) -> list[pb.Message]:
    request = pb.DequeueRequest(queue=queue, max_messages=n)
    if wait:
        request.wait_time.FromNanoseconds(int(wait * 1e9))
    response: pb.DequeueResponse = await stub(t).Dequeue(request)
    return list(response.messages)


async def peek(t: Target, queue: str, n: int = 100) -> list[pb.Message]:
    response: pb.PeekResponse = await stub(t).Peek(pb.PeekRequest(queue=queue, max_messages=n))
    return list(response.messages)


async def ack(t: Target, queue: str, message: pb.Message) -> None:
    await stub(t).Ack(pb.AckRequest(queue=queue, receipt_handle=message.receipt_handle))


def payloads(messages: list[pb.Message]) -> list[bytes]:
    return [m.payload for m in messages]


@case("queue_basic")
async def fifo_delivery(t: Target) -> None:
    """Messages come out in the order they went in, with payload, attributes and a first
    delivery_count of 1; max_messages bounds a Dequeue."""
    q = t.name("fifo")
    ids = [await enqueue(t, q, f"m{i}".encode(), n=str(i)) for i in range(5)]
    equal(len(set(ids)), 5, "distinct message ids")
    first = await dequeue(t, q, 2)
    equal(payloads(first), [b"m0", b"m1"], "first Dequeue of 2")
    equal([m.message_id for m in first], ids[:2], "message ids of the first two")
    equal([dict(m.attributes) for m in first], [{"n": "0"}, {"n": "1"}], "attributes")
    equal([m.delivery_count for m in first], [1, 1], "delivery_count on first delivery")
    check(all(m.receipt_handle for m in first), "leased message without a receipt handle")
    rest = await dequeue(t, q, 10)
    equal(payloads(rest), [b"m2", b"m3", b"m4"], "second Dequeue (leased ones hidden)")
    equal(await dequeue(t, q, 10), [], "Dequeue with everything leased")
    equal(await dequeue(t, t.name("never"), 1), [], "Dequeue of a never-written queue")
    empty = await enqueue(t, q, b"")
    got = await dequeue(t, q)
    equal((got[0].message_id, got[0].payload), (empty, b""), "an empty payload is a message")


@case("queue_basic")
async def peek_does_not_lease(t: Target) -> None:
    """Peek shows visible messages in delivery order without leasing or counting them."""
    q = t.name("peek")
    for i in range(3):
        await enqueue(t, q, f"p{i}".encode())
    peeked = await peek(t, q)
    equal(payloads(peeked), [b"p0", b"p1", b"p2"], "Peek order")
    equal(
        [(m.delivery_count, m.receipt_handle) for m in peeked],
        [(0, "")] * 3,
        "Peek (delivery_count, receipt_handle)",
    )
    equal(payloads(await peek(t, q, 1)), [b"p0"], "Peek with max_messages 1")
    leased = await dequeue(t, q)
    equal((leased[0].payload, leased[0].delivery_count), (b"p0", 1), "Dequeue after Peek")
    equal(payloads(await peek(t, q)), [b"p1", b"p2"], "Peek hides the leased message")


@case("queue_basic")
async def ack_deletes_and_stale_receipts(t: Target) -> None:
    """Ack removes a message for good; its handle is then NOT_FOUND (RECEIPT_NOT_FOUND), as are
    made-up handles and handles used on another queue."""
    q = t.name("ack")
    await enqueue(t, q, b"a")
    await enqueue(t, q, b"b")
    msg = (await dequeue(t, q))[0]
    await ack(t, q, msg)
    equal(payloads(await peek(t, q)), [b"b"], "queue after Ack")
    await expect_error(
        ack(t, q, msg), NOT_FOUND, "second Ack of the same handle", reason="RECEIPT_NOT_FOUND"
    )
    other = (await dequeue(t, q))[0]
    await expect_error(
        ack(t, t.name("elsewhere"), other),
        NOT_FOUND,
        "Ack of a handle on another queue",
        reason="RECEIPT_NOT_FOUND",
    )
    bogus = pb.Message(receipt_handle="never-issued")
    await expect_error(
        ack(t, q, bogus), NOT_FOUND, "Ack of a made-up handle", reason="RECEIPT_NOT_FOUND"
    )
    await ack(t, q, other)
    equal(await peek(t, q), [], "queue after acking everything")


@case("queue_basic")
async def long_poll(t: Target) -> None:
    """Dequeue with wait_time returns as soon as a message arrives, or empty after wait_time."""
    q = t.name("poll")
    start = time.monotonic()
    equal(await dequeue(t, q, wait=0.5), [], "long poll on an empty queue")
    waited = time.monotonic() - start
    check(waited >= 0.45, f"long poll returned after {waited:.2f}s, before its 0.5s wait_time")

    later = asyncio.create_task(dequeue(t, q, n=5, wait=10.0))
    await asyncio.sleep(0.2)
    await enqueue(t, q, b"late")
    start = time.monotonic()
    got = await later
    equal(payloads(got), [b"late"], "long poll result")
    check(time.monotonic() - start < 5.0, "long poll did not return soon after the Enqueue")


@case("queue_basic")
async def invalid_queue_input(t: Target) -> None:
    """Bad names, sizes and handles are INVALID_ARGUMENT naming the field; nothing is written."""
    q = t.name("bad")
    basic = stub(t)
    for name in ("", "Upper", "1q", "q" * 64, "with space"):
        await expect_invalid(
            basic.Enqueue(pb.EnqueueRequest(queue=name, payload=b"x")),
            "queue",
            f"Enqueue to queue {name!r}",
        )
    await expect_invalid(
        basic.Enqueue(pb.EnqueueRequest(queue=q, payload=b"\0" * (4 * 1024 * 1024 + 1))),
        "payload",
        "Enqueue of a payload over 4 MiB",
    )
    await expect_invalid(
        basic.Enqueue(pb.EnqueueRequest(queue=q, payload=b"x", attributes={"": "v"})),
        "attributes",
        "Enqueue with an empty attribute key",
    )
    await expect_invalid(
        basic.Enqueue(
            pb.EnqueueRequest(queue=q, payload=b"x", attributes={f"k{i}": "v" for i in range(65)})
        ),
        "attributes",
        "Enqueue with 65 attributes",
    )
    for n in (-1, 101):
        await expect_invalid(
            basic.Dequeue(pb.DequeueRequest(queue=q, max_messages=n)),
            "max_messages",
            f"Dequeue with max_messages {n}",
        )
        await expect_invalid(
            basic.Peek(pb.PeekRequest(queue=q, max_messages=n)),
            "max_messages",
            f"Peek with max_messages {n}",
        )
    for wait in (Duration(seconds=-1), Duration(seconds=21)):
        await expect_invalid(
            basic.Dequeue(pb.DequeueRequest(queue=q, wait_time=wait)),
            "wait_time",
            f"Dequeue with wait_time {wait.seconds}s",
        )
    await expect_invalid(
        basic.Ack(pb.AckRequest(queue=q, receipt_handle="")),
        "receipt_handle",
        "Ack with an empty handle",
    )
    equal(await peek(t, q), [], "queue after rejected Enqueues")
