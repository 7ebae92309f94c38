"""Backend combinations the artifact-registry pattern suite runs on: one server per combination
for the whole module, each test in its own organization so tests never see each other's data."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as ar_grpc

from prismctl.registry import load_registry
from tests.conformance.backends import SETUPS
from tests.support.harness import running_server

NAMESPACE = "registry"

#: combination name → slot → backend (slots left out stay empty)
COMBINATIONS: dict[str, dict[str, str]] = {
    "memstore": {"store": "memstore", "cache": "memstore", "events": "memstore"},
    "sqlite": {"store": "sqlite", "cache": "sqlite"},
    "postgres+redis+nats": {"store": "postgres", "cache": "redis", "events": "nats"},
    "mongodb+redis": {"store": "mongodb", "cache": "redis"},
}


@dataclass
class Registry:
    """One running registry server and a fresh organization name per test."""

    combination: str
    stub: ar_grpc.ArtifactRegistryServiceStub
    channel: grpc.aio.Channel
    _orgs: itertools.count[int]

    def org(self) -> str:
        return f"org{next(self._orgs)}"


async def _start(
    name: str, stack: contextlib.AsyncExitStack, root: Path
) -> tuple[str, grpc.aio.Channel]:
    backends = load_registry().backends
    slots: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    for slot, backend in COMBINATIONS[name].items():
        if backends[backend].status != "available":
            pytest.fail(f"{name}: backend {backend} is not available yet", pytrace=False)
        if backend not in configs:
            configs[backend] = await stack.enter_async_context(SETUPS[backend](root / backend))
        slots[slot] = {"backend": backend, "config": configs[backend]}
    config = {
        "namespaces": [
            {
                "name": NAMESPACE,
                "pattern": "artifact-registry",
                "pattern_version": "v1",
                "slots": slots,
            }
        ]
    }
    server = await stack.enter_async_context(running_server(config, root / "server"))
    channel = grpc.aio.insecure_channel(server.address)
    stack.push_async_callback(channel.close)
    return server.address, channel


@pytest_asyncio.fixture(scope="module", params=list(COMBINATIONS), ids=list(COMBINATIONS))
async def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    name: str = request.param
    async with contextlib.AsyncExitStack() as stack:
        _, channel = await _start(name, stack, tmp_path_factory.mktemp(name.replace("+", "-")))
        yield Registry(
            name, ar_grpc.ArtifactRegistryServiceStub(channel), channel, itertools.count()
        )
