from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugins.memstore import MemstorePlugin
from plugins.runtime.context import CallContext


@pytest.fixture
async def plugin(tmp_path: Path) -> AsyncIterator[MemstorePlugin]:
    p = MemstorePlugin({"sweep_interval": 0.02}, data_dir=tmp_path)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def ctx() -> CallContext:
    return CallContext(namespace="ns1")
