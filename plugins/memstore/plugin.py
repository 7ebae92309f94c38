"""The memstore backend: everything in process memory, gone when the process exits.

Fast and dependency-free, for tests, development and caches. Every operation is a synchronous
run of dict/heap manipulation inside an async method, so it is atomic on the event loop; the
only background work is one sweeper task that reclaims expired keys and idle transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugins.memstore.document import MemstoreDocuments
from plugins.memstore.keyvalue import KeyValueStore, MemstoreKeyValue
from plugins.memstore.pubsub import MemstorePubSub
from plugins.memstore.queue import MemstoreQueues
from plugins.runtime.base import BackendPlugin

DEFAULT_SWEEP_INTERVAL = 1.0

KEYVALUE_INTERFACES = (
    "keyvalue_basic",
    "keyvalue_scan",
    "keyvalue_ttl",
    "keyvalue_batch",
    "keyvalue_cas",
    "keyvalue_transactional",
)
DOCUMENT_INTERFACES = ("document_basic", "document_query", "document_indexing", "document_search")
QUEUE_INTERFACES = (
    "queue_basic",
    "queue_visibility",
    "queue_dead_letter",
    "queue_delayed",
    "queue_priority",
)
PUBSUB_INTERFACES = ("pubsub_basic", "pubsub_wildcards")


class MemstorePlugin(BackendPlugin):
    """In-memory backend. Config: optional `sweep_interval` (seconds between sweeps)."""

    name: ClassVar[str] = "memstore"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.sweep_interval = float(config.get("sweep_interval", DEFAULT_SWEEP_INTERVAL))
        self.kv_store = KeyValueStore()
        self._kv = MemstoreKeyValue(self.kv_store)
        self._documents = MemstoreDocuments()
        self.queues = MemstoreQueues()
        self._pubsub = MemstorePubSub()
        self._sweeper: asyncio.Task[None] | None = None

    def implementations(self) -> Mapping[str, object]:
        return {
            **dict.fromkeys(KEYVALUE_INTERFACES, self._kv),
            **dict.fromkeys(DOCUMENT_INTERFACES, self._documents),
            **dict.fromkeys(QUEUE_INTERFACES, self.queues),
            **dict.fromkeys(PUBSUB_INTERFACES, self._pubsub),
        }

    async def start(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="memstore-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def details(self) -> dict[str, str]:
        return {
            "storage": "process memory (lost on restart)",
            "transaction_isolation": "serializable (optimistic, validated at commit)",
        }

    def sweep(self) -> None:
        """One pass of background reclamation over every store."""
        self.kv_store.sweep()
        self.queues.sweep()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()
