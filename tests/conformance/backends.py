"""Per-backend setup for the conformance suite: backend name → async context manager that
provides whatever the backend needs and yields its slot `config:` mapping. Adding a backend to
the suite is one entry here (an `available` backend without one fails the suite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from tests.support.servers import throwaway

SlotConfig = dict[str, Any]
Setup = Callable[[Path], AbstractAsyncContextManager[SlotConfig]]


@asynccontextmanager
async def memstore(data_dir: Path) -> AsyncIterator[SlotConfig]:
    yield {"sweep_interval": 0.2}


@asynccontextmanager
async def sqlite(data_dir: Path) -> AsyncIterator[SlotConfig]:
    # A relative path: the server and a sidecar each resolve it in their own data dir.
    yield {"connection": "sqlite:///conformance.db"}


def _database_server(backend: str) -> Setup:
    """A throwaway database server (tests/support/servers.py) for the duration of the suite;
    started in a worker thread because starting it blocks."""

    @asynccontextmanager
    async def setup(data_dir: Path) -> AsyncIterator[SlotConfig]:
        manager = throwaway(backend)
        server = await asyncio.to_thread(manager.__enter__)
        try:
            yield {"connection": server.url}
        finally:
            await asyncio.to_thread(manager.__exit__, None, None, None)

    return setup


SETUPS: dict[str, Setup] = {
    "memstore": memstore,
    "sqlite": sqlite,
    "postgres": _database_server("postgres"),
    "redis": _database_server("redis"),
    "mongodb": _database_server("mongodb"),
    "nats": _database_server("nats"),
}
