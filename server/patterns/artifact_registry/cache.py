"""Two cache levels for artifact reads: an in-process LRU (L1) and the optional `cache` slot
(L2: KeyValueBasic + KeyValueTTL). Every write invalidates both before it returns.

A read that raced with a write must not put the old document back after the write invalidated
it: each id has a generation that invalidation bumps, and a fill only lands if the generation it
started under is still current. (Across several server replicas, L1 of another replica can lag
until its entry is invalidated or evicted; run one replica per cache slot or keep L1 small.)

L2 is a backend like the store, so it holds private versions in their sealed form (sealing.py)
and opens them on the way back, while L1 (process memory) holds plaintext. Caching the sealed
form rather than skipping private versions keeps L2 useful for them (one AES-GCM operation is
far cheaper than the store read it saves). An L2 entry that fails to open is dropped and read
from the store, the source of truth, which then answers DATA_LOSS itself if it is tampered too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from typing import Any

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import DataLoss, PrismError, Unavailable
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.sealing import Sealer
from server.patterns.artifact_registry.store import Stored

log = logging.getLogger("prism.artifact_registry")

L1_SIZE = 10_000
L2_TTL_SECONDS = 300


class ArtifactCache:
    def __init__(
        self,
        kv: Any | None,
        ttl: Any | None,
        l1_size: int = L1_SIZE,
        sealer: Sealer | None = None,
    ) -> None:
        self.kv = kv
        self.ttl = ttl
        self.sealer = sealer
        self.l1: OrderedDict[str, Stored] = OrderedDict()
        self.l1_size = l1_size
        self.generations: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def generation(self, doc_id: str) -> int:
        return self.generations.get(doc_id, 0)

    async def get(self, doc_id: str, ctx: CallContext) -> Stored | None:
        stored = self.l1.get(doc_id)
        if stored is not None:
            self.l1.move_to_end(doc_id)
            self.hits += 1
            return stored
        if self.kv is not None:
            try:
                response = await self.kv.get(kv_pb.GetRequest(key=f"artifact:{doc_id}"), ctx)
            except Unavailable:
                response = None  # a cache outage only costs speed
            if response is not None and response.found:
                data = json.loads(response.value)
                try:
                    doc = self._open(doc_id, data["d"])
                except DataLoss as exc:
                    log.warning("dropping L2 cache entry of artifact %s: %s", doc_id, exc.message)
                    with contextlib.suppress(PrismError):
                        await self.kv.delete(kv_pb.DeleteRequest(key=f"artifact:{doc_id}"), ctx)
                else:
                    stored = Stored(doc_id, doc, data["r"])
                    self._remember(stored)
                    self.hits += 1
                    return stored
        self.misses += 1
        return None

    async def put(self, stored: Stored, generation: int, ctx: CallContext) -> None:
        """Cache what a read found, unless a write invalidated the id since the read began."""
        if self.generation(stored.id) != generation:
            return
        if self.kv is not None and self.ttl is not None:
            key = f"artifact:{stored.id}"
            value = json.dumps({"d": self._sealed(stored), "r": stored.revision}).encode()
            try:
                await self.ttl.set_with_ttl(
                    ttl_pb.SetWithTTLRequest(
                        key=key, value=value, ttl=Duration(seconds=L2_TTL_SECONDS)
                    ),
                    ctx,
                )
                if self.generation(stored.id) != generation:  # invalidated meanwhile: undo
                    await self.kv.delete(kv_pb.DeleteRequest(key=key), ctx)
                    return
            except PrismError:
                return
        if self.generation(stored.id) == generation:
            self._remember(stored)

    async def invalidate(self, doc_id: str, ctx: CallContext) -> None:
        self.generations[doc_id] = self.generation(doc_id) + 1
        self.l1.pop(doc_id, None)
        if self.kv is not None:
            await self.kv.delete(kv_pb.DeleteRequest(key=f"artifact:{doc_id}"), ctx)

    def _remember(self, stored: Stored) -> None:
        self.l1[stored.id] = stored
        self.l1.move_to_end(stored.id)
        while len(self.l1) > self.l1_size:
            self.l1.popitem(last=False)

    def _sealed(self, stored: Stored) -> dict[str, Any]:
        """What L2 holds: the form the store holds (a private source never in clear)."""
        return (
            stored.doc
            if self.sealer is None
            else self.sealer.seal(ARTIFACTS, stored.id, stored.doc)
        )

    def _open(self, doc_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        return doc if self.sealer is None else self.sealer.open(ARTIFACTS, doc_id, doc)
