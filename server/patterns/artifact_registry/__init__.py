"""The artifact-registry pattern: the PCL registry for personas, teams, workflows and skills.

Slots (registry/patterns/artifact-registry.yaml): `store` (document_basic + document_query;
document_indexing and document_search used when present), `search` (document_search; else the
store's, else the pattern scores itself), `cache` (keyvalue_basic + keyvalue_ttl as L2 behind an
in-process LRU) and `events` (pubsub_basic for WatchArtifacts). The pattern talks to them only
through those thin interfaces. Private sources are encrypted at rest under the server's keyring
(sealing.py); versions sealed under an older key (or before encryption) are re-sealed under the
primary key by a background pass at start.
"""

from __future__ import annotations

from typing import Any

from prism.interfaces.document.v1 import document_indexing_pb2 as indexing_pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.context import CallContext
from server.binding import BindError
from server.crypto import Reencryption
from server.patterns import BoundNamespace, Exposed
from server.patterns.artifact_registry.cache import ArtifactCache
from server.patterns.artifact_registry.events import ChangeFeed
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.sealing import Sealer
from server.patterns.artifact_registry.search import ArtifactSearch
from server.patterns.artifact_registry.service import ArtifactRegistry
from server.patterns.artifact_registry.store import DocumentStore, Stored

#: value indexes that keep the registry's common filters fast where the store can index
INDEXES = {
    "by_lineage": ["lineage"],
    "by_org_latest": ["organization", "is_latest"],
    "by_latest_type": ["is_latest", "type"],
    # ListArtifacts' default listing (latest versions by name): walked in order, page by page
    "by_latest_name": ["is_latest", "name"],
    "by_trend": ["stats.trend"],
}


async def expose(namespace: BoundNamespace) -> list[Exposed]:
    if namespace.keyring is None:  # create_server always gives one (its data dir's, at worst)
        raise BindError(f"namespace '{namespace.name}' (pattern artifact-registry) needs a keyring")
    sealer = Sealer(namespace.keyring, namespace.name)
    slots = namespace.slots
    store_impls = slots["store"].implementations
    search_slot = slots.get("search")
    search_impl = (
        search_slot.implementations.get("document_search")
        if search_slot
        else store_impls.get("document_search")
    )
    store = DocumentStore(
        store_impls["document_basic"], store_impls["document_query"], search_impl, sealer
    )
    cache_impls = slots["cache"].implementations if "cache" in slots else {}
    events = slots["events"].implementations.get("pubsub_basic") if "events" in slots else None
    cache = ArtifactCache(
        cache_impls.get("keyvalue_basic"), cache_impls.get("keyvalue_ttl"), sealer=sealer
    )
    registry = ArtifactRegistry(store, cache, ChangeFeed(events), ArtifactSearch(store))
    indexing: Any = store_impls.get("document_indexing")
    if indexing is not None:
        ctx = CallContext.with_timeout(namespace.name, 30.0)
        for name, paths in INDEXES.items():
            await indexing.create_index(
                indexing_pb.CreateIndexRequest(
                    collection=ARTIFACTS,
                    index=indexing_pb.Index(
                        name=name,
                        fields=[indexing_pb.IndexField(path=p) for p in paths],
                        kind=indexing_pb.INDEX_KIND_VALUE,
                    ),
                ),
                ctx,
            )
    pass_ctx = CallContext(namespace=namespace.name, request_id="reseal")

    async def reseal(doc_id: str, raw: Stored) -> int:
        moved = await store.reseal(doc_id, raw, pass_ctx)
        if moved:
            await cache.invalidate(doc_id, pass_ctx)  # cached copies carry the old revision
        return moved

    resealing = Reencryption(namespace.name, lambda: store.private_artifacts(pass_ctx), reseal)
    resealing.start()
    namespace.on_close.append(resealing.stop)
    labels = {"namespace": namespace.name, "pattern": namespace.pattern.name}
    # the registry authorizes each call itself (roles, owners, visibility: docs/authorization.md)
    service = pb.DESCRIPTOR.services_by_name["ArtifactRegistryService"]
    return [Exposed(service, registry, labels, tuple(slots), authorizes=True)]
