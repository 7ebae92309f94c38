from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from plugins.postgres import PostgresPlugin
from tests.support.servers import ThrowawayServer, throwaway


@pytest.fixture(scope="package")
def pg_server() -> Iterator[ThrowawayServer]:
    with throwaway("postgres") as server:
        yield server


@pytest.fixture
async def plugin(pg_server: ThrowawayServer, tmp_path: Path) -> AsyncIterator[PostgresPlugin]:
    p = PostgresPlugin(
        {"connection": pg_server.url, "sweep_interval_seconds": 3600}, data_dir=tmp_path
    )
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses (they share one database)."""
    return f"t{uuid.uuid4().hex[:8]}"
