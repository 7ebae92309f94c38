"""Encryption at rest of private sources (docs/authorization.md, "Encryption at rest").

Applied where documents of the `artifacts` collection cross into a slot (the store and the L2
cache): a private version's `source` and `source_sha256` are stored as "" and the pair travels
as one AES-256-GCM envelope (server/crypto.py) in the base64 text field `sealed`, bound to the
namespace, collection and document id, so an envelope copied to another version fails. Reading
restores the pair, so the service only ever sees plaintext documents. Public and unlisted
versions are stored as they are; a visibility change is a write, which seals or unseals.

Whether a stored document is sealed is decided by the `sealed` field, not by its visibility: a
private document without one is from before encryption (readable as is, and sealed by the
background pass), one with a modified envelope is DATA_LOSS DECRYPTION_FAILED.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from plugins.runtime.errors import DataLoss
from server.crypto import DECRYPTION_FAILED, Keyring

SEALED = "sealed"
#: the fields a private version keeps only inside its envelope
FIELDS = ("source", "source_sha256")
PRIVATE = "private"


class Sealer:
    """Seals private documents for storage and opens them again, under one namespace's keys."""

    def __init__(self, keyring: Keyring, namespace: str) -> None:
        self.keyring = keyring
        self.namespace = namespace

    def _context(self, collection: str, doc_id: str) -> bytes:
        return f"prism.artifact-registry.v1\0{self.namespace}\0{collection}\0{doc_id}".encode()

    def seal(self, collection: str, doc_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The form to store: a private document's sealed fields emptied and enveloped (a new
        dict; `doc` stays as it is)."""
        stored = {k: v for k, v in doc.items() if k != SEALED}
        if stored.get("visibility") != PRIVATE:
            return stored
        plaintext = json.dumps({f: stored[f] for f in FIELDS}, ensure_ascii=False).encode()
        envelope = self.keyring.encrypt(plaintext, self._context(collection, doc_id))
        stored.update(dict.fromkeys(FIELDS, ""))
        stored[SEALED] = base64.b64encode(envelope).decode("ascii")
        return stored

    def open(self, collection: str, doc_id: str, stored: dict[str, Any]) -> dict[str, Any]:
        """The plaintext document of a stored one (the same dict when it is not sealed)."""
        if SEALED not in stored:
            return stored
        envelope = _envelope(stored, doc_id)
        plaintext = self.keyring.decrypt(envelope, self._context(collection, doc_id))
        try:
            fields = json.loads(plaintext)
        except ValueError:
            fields = None
        if not isinstance(fields, dict) or not all(isinstance(fields.get(f), str) for f in FIELDS):
            # authentic, yet not what `seal` writes: a bug, never served as a source
            raise DataLoss(
                f"artifact {doc_id}: sealed fields are malformed",
                reason="RECORD_CORRUPT",
                id=doc_id,
            )
        doc = {k: v for k, v in stored.items() if k != SEALED}
        doc.update({f: fields[f] for f in FIELDS})
        return doc

    def stale(self, doc_id: str, stored: dict[str, Any]) -> bool:
        """A stored private document not (yet) sealed under the primary key."""
        if stored.get("visibility") != PRIVATE:
            return False
        if SEALED not in stored:
            return True
        return self.keyring.needs_reencryption(_envelope(stored, doc_id))


def _envelope(stored: dict[str, Any], doc_id: str) -> bytes:
    value = stored[SEALED]
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataLoss(
            f"artifact {doc_id}: sealed source is not base64", reason=DECRYPTION_FAILED, id=doc_id
        ) from None


def searchable(doc: dict[str, Any]) -> dict[str, Any]:
    """What full-text search may see of a plaintext document: a private one without its
    sealed fields, exactly like a backend indexing the stored form."""
    if doc.get("visibility") != PRIVATE:
        return doc
    return {**doc, **dict.fromkeys(FIELDS, "")}
