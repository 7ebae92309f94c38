from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from plugins.redis import RedisPlugin
from plugins.runtime.context import CallContext
from tests.support.servers import ThrowawayServer, throwaway


@pytest.fixture(scope="module")
def redis_server() -> Iterator[ThrowawayServer]:
    with throwaway("redis") as server:
        yield server


@pytest.fixture
async def plugin(redis_server: ThrowawayServer, tmp_path: Path) -> AsyncIterator[RedisPlugin]:
    """A plugin under a key prefix no other test uses."""
    p = RedisPlugin(
        {"connection": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"},
        data_dir=tmp_path,
    )
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def ctx() -> CallContext:
    return CallContext.with_timeout("ns1", 5.0)
