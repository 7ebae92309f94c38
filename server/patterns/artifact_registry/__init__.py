"""The artifact-registry pattern: the PCL registry for personas, teams, workflows and skills.

Slots (registry/patterns/artifact-registry.yaml): `store` (document_basic + document_query;
document_indexing and document_search used when present), `search` (document_search; else the
store's, else the pattern scores itself), `cache` (keyvalue_basic + keyvalue_ttl as L2 behind an
in-process LRU) and `events` (pubsub_basic for WatchArtifacts). The pattern talks to them only
through those thin interfaces.
"""

from __future__ import annotations

from typing import Any

from prism.interfaces.document.v1 import document_indexing_pb2 as indexing_pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.context import CallContext
from server.patterns import BoundNamespace, Exposed
from server.patterns.artifact_registry.cache import ArtifactCache
from server.patterns.artifact_registry.events import ChangeFeed
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.search import ArtifactSearch
from server.patterns.artifact_registry.service import ArtifactRegistry
from server.patterns.artifact_registry.store import DocumentStore

#: value indexes that keep the registry's common filters fast where the store can index
INDEXES = {
    "by_lineage": ["lineage"],
    "by_org_latest": ["organization", "is_latest"],
    "by_latest_type": ["is_latest", "type"],
    "by_trend": ["stats.trend"],
}


async def expose(namespace: BoundNamespace) -> list[Exposed]:
    slots = namespace.slots
    store_impls = slots["store"].implementations
    search_slot = slots.get("search")
    search_impl = (
        search_slot.implementations.get("document_search")
        if search_slot
        else store_impls.get("document_search")
    )
    store = DocumentStore(store_impls["document_basic"], store_impls["document_query"], search_impl)
    cache_impls = slots["cache"].implementations if "cache" in slots else {}
    events = slots["events"].implementations.get("pubsub_basic") if "events" in slots else None
    registry = ArtifactRegistry(
        store,
        ArtifactCache(cache_impls.get("keyvalue_basic"), cache_impls.get("keyvalue_ttl")),
        ChangeFeed(events),
        ArtifactSearch(store),
    )
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
    labels = {"namespace": namespace.name, "pattern": namespace.pattern.name}
    return [Exposed(pb.DESCRIPTOR.services_by_name["ArtifactRegistryService"], registry, labels,
                    tuple(slots))]  # fmt: skip
