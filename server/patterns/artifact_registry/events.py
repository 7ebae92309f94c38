"""Change events for WatchArtifacts: published on the `events` slot (PubSubBasic) when it is
filled, so watchers on every server replica see every change; otherwise broadcast in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub_pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, PrismError, ResourceExhausted
from server.authz import current_principal
from server.patterns.artifact_registry import model

TOPIC = "prism-artifact-changes"
LOCAL_QUEUE_LIMIT = 10_000


class ChangeFeed:
    def __init__(self, pubsub: Any | None) -> None:
        self.pubsub = pubsub
        self.local: set[asyncio.Queue[pb.ArtifactChange | None]] = set()

    async def emit(
        self, kind: pb.ChangeKind.ValueType, doc_id: str, doc: dict[str, Any], ctx: CallContext
    ) -> None:
        ts = model._timestamp(model.now())
        change = pb.ArtifactChange(
            kind=kind,
            id=doc_id,
            organization=doc["organization"],
            slug=doc["slug"],
            version=doc["version"],
            time=ts,
            visibility=pb.Visibility.Value(f"VISIBILITY_{doc['visibility'].upper()}"),
        )
        if self.pubsub is not None:
            # the write already happened: a lost event must not turn it into an error
            with contextlib.suppress(PrismError):
                await self.pubsub.publish(
                    pubsub_pb.PublishRequest(topic=TOPIC, payload=change.SerializeToString()),
                    ctx,
                )
            return
        for queue in list(self.local):
            if queue.qsize() >= LOCAL_QUEUE_LIMIT:
                queue.put_nowait(None)  # tell that watcher it fell behind
                self.local.discard(queue)
            else:
                queue.put_nowait(change)

    async def watch(
        self, request: pb.WatchArtifactsRequest, ctx: CallContext
    ) -> AsyncIterator[pb.WatchArtifactsResponse]:
        if request.resume_token:
            raise FailedPrecondition(
                "the events slot cannot resume (pubsub_basic keeps no history)",
                reason="RESUME_UNSUPPORTED",
            )
        org = request.organization
        principal = current_principal.get()

        def wanted(change: pb.ArtifactChange) -> bool:
            """The watcher's organization filter, and only what it may list (authorization)."""
            if org and change.organization != org:
                return False
            listed = change.visibility == pb.VISIBILITY_PUBLIC
            return listed or principal.member_of(change.organization)

        if self.pubsub is not None:
            async for event in self.pubsub.subscribe(pubsub_pb.SubscribeRequest(topic=TOPIC), ctx):
                if event.HasField("started"):
                    yield pb.WatchArtifactsResponse(started=True)
                    continue
                change = pb.ArtifactChange.FromString(event.message.payload)
                if wanted(change):
                    yield pb.WatchArtifactsResponse(change=change)
            return
        queue: asyncio.Queue[pb.ArtifactChange | None] = asyncio.Queue()
        self.local.add(queue)
        try:
            yield pb.WatchArtifactsResponse(started=True)
            while True:
                item = await queue.get()
                if item is None:
                    raise ResourceExhausted("watcher fell behind", reason="SLOW_WATCHER")
                if wanted(item):
                    yield pb.WatchArtifactsResponse(change=item)
        finally:
            self.local.discard(queue)
