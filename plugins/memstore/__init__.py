"""memstore: the in-memory backend plugin."""

from plugins.memstore.plugin import MemstorePlugin

__all__ = ["MemstorePlugin"]
