"""KeyValue contract errors every backend raises alike (same reason, metadata and wording)."""

from __future__ import annotations

from plugins.runtime.errors import Aborted, AlreadyExists


def key_exists(key: str) -> AlreadyExists:
    """An insert-only CompareAndSwap (expected revision 0) found the key live."""
    return AlreadyExists(f"key {key!r} already exists", reason="KEY_EXISTS", key=key)


def revision_mismatch(key: str, expected: int, current: int) -> Aborted:
    """A CompareAndSwap/Delete expected another revision (current 0: the key is absent)."""
    return Aborted(
        f"revision of {key!r} is {current}, not {expected}",
        reason="REVISION_MISMATCH",
        key=key,
        current_revision=current,
    )
