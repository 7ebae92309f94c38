from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from plugins.nats import NatsPlugin
from plugins.runtime.context import CallContext
from tests.support.servers import ThrowawayServer, throwaway


@pytest.fixture(scope="module")
def nats_server() -> Iterator[ThrowawayServer]:
    with throwaway("nats") as server:
        yield server


@pytest.fixture
async def plugin(nats_server: ThrowawayServer, tmp_path: Path) -> AsyncIterator[NatsPlugin]:
    """A plugin under a subject prefix no other test uses."""
    p = NatsPlugin(
        {"connection": nats_server.url, "subject_prefix": f"t{uuid.uuid4().hex[:8]}"},
        data_dir=tmp_path,
    )
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def ctx() -> CallContext:
    return CallContext.with_timeout("ns.1", 5.0)
