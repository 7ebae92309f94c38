from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import ThrowawayServer, throwaway


@pytest.fixture(scope="package")
def mongo_server() -> Iterator[ThrowawayServer]:
    with throwaway("mongodb") as server:
        yield server
