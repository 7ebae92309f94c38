"""queue_dead_letter: after N deliveries a message moves to the DLQ; redrive brings it back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as pb
from prism.interfaces.queue.v1.queue_dead_letter_pb2_grpc import QueueDeadLetterServiceStub

from prismctl.conformance.core import Target, case, equal, expect_error, expect_invalid
from prismctl.conformance.queue_basic import dequeue, enqueue, payloads, peek
from prismctl.conformance.queue_visibility import release

if TYPE_CHECKING:
    from prism.interfaces.queue.v1.queue_dead_letter_pb2_grpc import (
        QueueDeadLetterServiceAsyncStub,
    )

REQUIRES = ("queue_basic", "queue_visibility")


def stub(t: Target) -> QueueDeadLetterServiceAsyncStub:
    return QueueDeadLetterServiceStub(t.channel)


async def configure(t: Target, queue: str, dlq: str, max_deliveries: int) -> None:
    await stub(t).ConfigureDeadLetter(
        pb.ConfigureDeadLetterRequest(
            queue=queue, dead_letter_queue=dlq, max_deliveries=max_deliveries
        )
    )


@case("queue_dead_letter", requires=REQUIRES)
async def dead_letter_after_max_deliveries(t: Target) -> None:
    """With max_deliveries 3, the third failed delivery moves the message to the DLQ (same id,
    payload, attributes, delivery_count reset); the next message is untouched."""
    q, dlq = t.name("work"), t.name("dlq")
    await configure(t, q, dlq, 3)
    cfg: pb.GetDeadLetterConfigResponse = await stub(t).GetDeadLetterConfig(
        pb.GetDeadLetterConfigRequest(queue=q)
    )
    equal((cfg.configured, cfg.dead_letter_queue, cfg.max_deliveries), (True, dlq, 3), "config")
    poison = await enqueue(t, q, b"poison", kind="bad")
    await enqueue(t, q, b"fine")
    for attempt in range(1, 4):
        msg = (await dequeue(t, q))[0]
        equal((msg.payload, msg.delivery_count), (b"poison", attempt), f"delivery {attempt}")
        await release(t, q, msg)
    equal(payloads(await peek(t, q)), [b"fine"], "queue after the third failed delivery")
    dead = await peek(t, dlq)
    equal(
        [(m.message_id, m.payload, dict(m.attributes), m.delivery_count) for m in dead],
        [(poison, b"poison", {"kind": "bad"}, 0)],
        "dead-letter queue contents",
    )
    moved: pb.RedriveDeadLettersResponse = await stub(t).RedriveDeadLetters(
        pb.RedriveDeadLettersRequest(queue=q)
    )
    equal(moved.moved, 1, "RedriveDeadLetters moved")
    back = await peek(t, q)
    equal(
        [(m.payload, m.message_id) for m in back],
        [(b"fine", back[0].message_id), (b"poison", poison)],
        "queue after redrive (behind existing messages, same id)",
    )
    equal(await peek(t, dlq), [], "dead-letter queue after redrive")


@case("queue_dead_letter", requires=REQUIRES)
async def dead_letter_config_rules(t: Target) -> None:
    """Configuration validation, removal, and redrive without a configuration."""
    q = t.name("cfg")
    none: pb.GetDeadLetterConfigResponse = await stub(t).GetDeadLetterConfig(
        pb.GetDeadLetterConfigRequest(queue=q)
    )
    equal(none.configured, False, "configured before ConfigureDeadLetter")
    await expect_error(
        stub(t).RedriveDeadLetters(pb.RedriveDeadLettersRequest(queue=q)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RedriveDeadLetters without a configuration",
        reason="DEAD_LETTER_NOT_CONFIGURED",
    )
    await expect_invalid(configure(t, q, q, 3), "dead_letter_queue", "DLQ equal to the queue")
    await expect_invalid(configure(t, q, "Bad Name", 3), "dead_letter_queue", "bad DLQ name")
    for n in (0, 1001):
        await expect_invalid(
            configure(t, q, t.name("d"), n), "max_deliveries", f"max_deliveries {n}"
        )
    await configure(t, q, t.name("d"), 5)
    await configure(t, q, "", 0)
    removed: pb.GetDeadLetterConfigResponse = await stub(t).GetDeadLetterConfig(
        pb.GetDeadLetterConfigRequest(queue=q)
    )
    equal(removed.configured, False, "configured after removing the configuration")
