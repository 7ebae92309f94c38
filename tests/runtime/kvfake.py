"""A tiny test-only backend plugin (a legitimate fake: it stands in for no database, it is the
plugin under test for the runtime and server machinery). KeyValueBasic/Scan over per-namespace
dicts and a PubSubBasic fan-out (the server-streaming path),
with two trigger keys: `slow` sleeps (deadline tests) and `boom` raises an unexpected exception
(INTERNAL mapping tests). `healthy` toggles check_health()."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as kvscan
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as ps

from plugins.runtime import validation
from plugins.runtime.base import BackendPlugin
from plugins.runtime.context import CallContext

REPO = Path(__file__).resolve().parents[2]

BACKEND_YAML = """\
backend: testkv
description: Test-only KeyValueBasic plugin (tests/runtime/kvfake.py).
status: available
plugin_class: tests.runtime.kvfake:KvFakePlugin
version: 0.0.1
connection_string_format: "testkv://local"
connection_pattern: '^testkv://[a-z]+$'
default_connection: "testkv://local"
implements: [keyvalue_basic, keyvalue_scan, pubsub_basic]
config_schema:
  type: object
  additionalProperties: false
  properties:
    connection: {type: string}
    slow_seconds: {type: number, minimum: 0}
"""


PLANNED_YAML = """\
backend: testplanned
description: Test-only backend that exists only on paper.
status: planned
version: 0.0.1
connection_string_format: "testplanned://x"
connection_pattern: '^testplanned://.+$'
default_connection: "testplanned://x"
implements: [keyvalue_basic]
config_schema:
  type: object
  additionalProperties: false
  properties:
    connection: {type: string}
"""


EXECUTORLESS_PATTERN_YAML = """\
pattern: test-executorless
version: v1
description: Test-only pattern whose executor does not exist in the server.
exposes: prism.patterns.test_executorless.v1.TestExecutorlessService
slots:
  store:
    description: Any key-value backend.
    required_interfaces: [keyvalue_basic]
"""


class KvFakeStore:
    def __init__(self, slow_seconds: float) -> None:
        self.spaces: dict[str, dict[str, tuple[bytes, int]]] = {}
        self.revision = 0
        self.slow_seconds = slow_seconds

    async def _trigger(self, key: str) -> None:
        if key == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif key == "boom":
            raise RuntimeError("kaboom: a bug inside the plugin")

    async def set(self, request: kv.SetRequest, ctx: CallContext) -> kv.SetResponse:
        key = validation.key(request.key)
        validation.value(request.value)
        await self._trigger(key)
        self.revision += 1
        self.spaces.setdefault(ctx.namespace, {})[key] = (request.value, self.revision)
        return kv.SetResponse(revision=self.revision)

    async def get(self, request: kv.GetRequest, ctx: CallContext) -> kv.GetResponse:
        key = validation.key(request.key)
        await self._trigger(key)
        entry = self.spaces.get(ctx.namespace, {}).get(key)
        if entry is None:
            return kv.GetResponse(found=False)
        return kv.GetResponse(found=True, value=entry[0], revision=entry[1])

    async def delete(self, request: kv.DeleteRequest, ctx: CallContext) -> kv.DeleteResponse:
        key = validation.key(request.key)
        return kv.DeleteResponse(
            deleted=self.spaces.get(ctx.namespace, {}).pop(key, None) is not None
        )

    async def exists(self, request: kv.ExistsRequest, ctx: CallContext) -> kv.ExistsResponse:
        key = validation.key(request.key)
        return kv.ExistsResponse(exists=key in self.spaces.get(ctx.namespace, {}))

    def _matching(self, ctx: CallContext, prefix: str) -> list[str]:
        return sorted(k for k in self.spaces.get(ctx.namespace, {}) if k.startswith(prefix))

    def _page(
        self, request: kvscan.ScanRequest | kvscan.ScanKeysRequest, ctx: CallContext
    ) -> tuple[list[str], str]:
        size = validation.page_size(request.page_size)
        after = validation.decode_page_token(request.page_token, "scan", request.prefix)
        keys = [k for k in self._matching(ctx, request.prefix) if after is None or k > after]
        page = keys[:size]
        more = len(keys) > size
        token = validation.encode_page_token("scan", request.prefix, page[-1]) if more else ""
        return page, token

    async def scan(self, request: kvscan.ScanRequest, ctx: CallContext) -> kvscan.ScanResponse:
        page, token = self._page(request, ctx)
        space = self.spaces.get(ctx.namespace, {})
        entries = [kvscan.KeyValue(key=k, value=space[k][0], revision=space[k][1]) for k in page]
        return kvscan.ScanResponse(entries=entries, next_page_token=token)

    async def scan_keys(
        self, request: kvscan.ScanKeysRequest, ctx: CallContext
    ) -> kvscan.ScanKeysResponse:
        page, token = self._page(request, ctx)
        return kvscan.ScanKeysResponse(keys=page, next_page_token=token)

    async def count(self, request: kvscan.CountRequest, ctx: CallContext) -> kvscan.CountResponse:
        return kvscan.CountResponse(count=len(self._matching(ctx, request.prefix)))


class PubSubFake:
    """Fan-out to every live subscription of (namespace, topic); Unsubscribe ends the stream."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, tuple[str, str, asyncio.Queue[ps.Message | None]]] = {}

    async def publish(self, request: ps.PublishRequest, ctx: CallContext) -> ps.PublishResponse:
        message_id = uuid.uuid4().hex
        message = ps.Message(message_id=message_id, topic=request.topic, payload=request.payload)
        for namespace, topic, queue in self.subscriptions.values():
            if (namespace, topic) == (ctx.namespace, request.topic):
                queue.put_nowait(message)
        return ps.PublishResponse(message_id=message_id)

    async def subscribe(
        self, request: ps.SubscribeRequest, ctx: CallContext
    ) -> AsyncIterator[ps.SubscribeResponse]:
        subscription_id = uuid.uuid4().hex
        queue: asyncio.Queue[ps.Message | None] = asyncio.Queue()
        self.subscriptions[subscription_id] = (ctx.namespace, request.topic, queue)
        try:
            yield ps.SubscribeResponse(
                started=ps.SubscriptionStarted(subscription_id=subscription_id)
            )
            while (message := await queue.get()) is not None:
                yield ps.SubscribeResponse(message=message)
        finally:
            self.subscriptions.pop(subscription_id, None)

    async def unsubscribe(
        self, request: ps.UnsubscribeRequest, ctx: CallContext
    ) -> ps.UnsubscribeResponse:
        entry = self.subscriptions.get(request.subscription_id)
        if entry is not None:
            entry[2].put_nowait(None)
        return ps.UnsubscribeResponse()


class KvFakePlugin(BackendPlugin):
    name: ClassVar[str] = "testkv"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.store = KvFakeStore(float(config.get("slow_seconds", 5.0)))
        self.pubsub = PubSubFake()
        self.healthy = True
        self.started = self.closed = False

    def implementations(self) -> Mapping[str, object]:
        return {
            "keyvalue_basic": self.store,
            "keyvalue_scan": self.store,
            "pubsub_basic": self.pubsub,
        }

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def check_health(self) -> bool:
        return self.healthy


def registry_with_testkv(directory: Path) -> Path:
    """A copy of registry/ plus backends/testkv.yaml, a planned testplanned.yaml and a
    test-executorless pattern, for servers and sidecars (subprocesses get it through
    PRISM_REGISTRY_DIR)."""
    root = directory / "registry"
    if not root.exists():
        shutil.copytree(REPO / "registry", root)
        (root / "backends" / "testkv.yaml").write_text(BACKEND_YAML, encoding="utf-8")
        (root / "backends" / "testplanned.yaml").write_text(PLANNED_YAML, encoding="utf-8")
        patterns = root / "patterns"
        (patterns / "test-executorless.yaml").write_text(EXECUTORLESS_PATTERN_YAML, "utf-8")
    return root


def subprocess_env(registry_root: Path) -> dict[str, str]:
    """Environment for prism-plugin/prism-server subprocesses that must find `testkv`."""
    return {
        **os.environ,
        "PRISM_REGISTRY_DIR": str(registry_root),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
