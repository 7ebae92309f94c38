"""The errors every document backend answers alike (reason, message, ErrorInfo metadata)."""

from __future__ import annotations

from plugins.runtime.errors import Aborted, AlreadyExists, NotFound


def not_found(collection: str, doc_id: str) -> NotFound:
    return NotFound(
        f"document {doc_id!r} not found in {collection!r}",
        reason="DOCUMENT_NOT_FOUND",
        collection=collection,
        id=doc_id,
    )


def revision_mismatch(collection: str, doc_id: str, expected: int, current: int) -> Aborted:
    return Aborted(
        f"revision of document {doc_id!r} is {current}, not {expected}",
        reason="REVISION_MISMATCH",
        collection=collection,
        id=doc_id,
        current_revision=current,
    )


def unique_violation(collection: str, doc_id: str, index: str) -> AlreadyExists:
    return AlreadyExists(
        f"document {doc_id!r} duplicates another document under unique index {index!r}",
        reason="UNIQUE_VIOLATION",
        collection=collection,
        id=doc_id,
        index=index,
    )
