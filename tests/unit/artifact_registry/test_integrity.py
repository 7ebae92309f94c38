"""Integrity checks that need to reach under the pattern: a stored source modified behind the
registry's back (through the store's own thin interface) is DATA_LOSS on read, never served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.memstore import MemstorePlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import DataLoss
from server.patterns.artifact_registry.cache import ArtifactCache
from server.patterns.artifact_registry.events import ChangeFeed
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.search import ArtifactSearch
from server.patterns.artifact_registry.service import ArtifactRegistry
from server.patterns.artifact_registry.store import DocumentStore


async def test_tampered_source_is_data_loss(tmp_path: Path) -> None:
    plugin = MemstorePlugin({}, data_dir=tmp_path)
    await plugin.start()
    try:
        impls = plugin.implementations()
        store = DocumentStore(impls["document_basic"], impls["document_query"], None)
        registry = ArtifactRegistry(
            store, ArtifactCache(None, None, l1_size=0), ChangeFeed(None), ArtifactSearch(store)
        )
        ctx = CallContext(namespace="ns")
        made = await registry.create_artifact(
            pb.CreateArtifactRequest(
                artifact=pb.Artifact(
                    organization="acme", name="P", type=pb.ARTIFACT_TYPE_PERSONA, source="real"
                )
            ),
            ctx,
        )
        basic = impls["document_basic"]
        stored = await basic.get(doc_pb.GetRequest(collection=ARTIFACTS, id=made.artifact.id), ctx)
        body = json.loads(stored.document.json)
        body["source"] = "forged"
        await basic.update(
            doc_pb.UpdateRequest(collection=ARTIFACTS, id=made.artifact.id, json=json.dumps(body)),
            ctx,
        )
        with pytest.raises(DataLoss) as info:
            await registry.get_artifact(pb.GetArtifactRequest(id=made.artifact.id), ctx)
        assert info.value.reason == "DIGEST_MISMATCH"
    finally:
        await plugin.close()
