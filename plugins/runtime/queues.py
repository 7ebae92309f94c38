"""Queue contract errors every backend raises alike (same reason, metadata and wording)."""

from __future__ import annotations

from plugins.runtime.errors import NotFound


def receipt_not_found(queue: str) -> NotFound:
    """Ack/Nack/ExtendVisibility named no live lease (the contract does not say which case)."""
    return NotFound(
        "receipt handle is not a live lease of this queue (acked, released, expired, "
        "redelivered or never issued)",
        reason="RECEIPT_NOT_FOUND",
        queue=queue,
    )
