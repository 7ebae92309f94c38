"""memstore internals the black-box conformance suite cannot see: memory reclamation by the
sweeper, and the background task's lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as txn
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl

from plugins.memstore import MemstorePlugin
from plugins.runtime.context import CallContext


async def poll(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_sweeper_frees_expired_entries_without_any_read(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    kv = plugin.implementations()["keyvalue_ttl"]
    for i in range(50):
        await kv.set_with_ttl(  # type: ignore[attr-defined]
            ttl.SetWithTTLRequest(key=f"k{i}", value=b"v", ttl=Duration(nanos=50_000_000)), ctx
        )
    await kv.set(basic.SetRequest(key="keep", value=b"v"), ctx)  # type: ignore[attr-defined]
    assert plugin.kv_store.entry_count(ctx.namespace) == 51
    await poll(lambda: plugin.kv_store.entry_count(ctx.namespace) == 1)
    got = await kv.get(basic.GetRequest(key="keep"), ctx)  # type: ignore[attr-defined]
    assert got.found


async def test_sweeper_keeps_key_whose_ttl_was_cleared_by_set(
    plugin: MemstorePlugin, ctx: CallContext
) -> None:
    kv = plugin.implementations()["keyvalue_ttl"]
    await kv.set_with_ttl(  # type: ignore[attr-defined]
        ttl.SetWithTTLRequest(key="k", value=b"old", ttl=Duration(nanos=30_000_000)), ctx
    )
    await kv.set(basic.SetRequest(key="k", value=b"new"), ctx)  # type: ignore[attr-defined]
    await asyncio.sleep(0.1)  # several sweeps past the stale heap item's deadline
    plugin.sweep()
    assert plugin.kv_store.entry_count(ctx.namespace) == 1
    got = await kv.get(basic.GetRequest(key="k"), ctx)  # type: ignore[attr-defined]
    assert got.value == b"new"


async def test_sweeper_drops_idle_transactions(plugin: MemstorePlugin, ctx: CallContext) -> None:
    kv = plugin.implementations()["keyvalue_transactional"]
    begun = await kv.begin_transaction(  # type: ignore[attr-defined]
        txn.BeginTransactionRequest(timeout=Duration(nanos=50_000_000)), ctx
    )
    assert begun.transaction_id in plugin.kv_store.transactions
    await poll(lambda: begun.transaction_id not in plugin.kv_store.transactions)


async def test_close_stops_the_sweeper(plugin: MemstorePlugin) -> None:
    task = plugin._sweeper
    assert task is not None and not task.done()
    await plugin.close()
    assert task.cancelled()
    await plugin.start()  # start is idempotent and restartable
    assert plugin._sweeper is not None and not plugin._sweeper.done()
