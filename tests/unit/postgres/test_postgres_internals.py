"""PostgreSQL plugin internals the black-box conformance suite cannot see: migrations, the
held-transaction reaper, pool limits, the TTL sweeper, byte-order keys, SKIP LOCKED leases,
the NOTIFY spill path and a lost LISTEN connection."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as ps_pb
from prism.interfaces.queue.v1 import queue_basic_pb2 as q_pb

from plugins.postgres import PostgresPlugin
from plugins.postgres.schema import SCHEMA_VERSION, SchemaTooNew
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tests.support.servers import ThrowawayServer, free_port
from tests.support.wait import eventually


@contextlib.asynccontextmanager
async def fresh_database(server: ThrowawayServer, name: str) -> AsyncIterator[str]:
    """A new, empty database on the shared server; its URL."""
    async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as admin:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_concurrent_first_starts_migrate_once(
    pg_server: ThrowawayServer, tmp_path: Path
) -> None:
    async with fresh_database(pg_server, "migrations") as url:
        plugins = [PostgresPlugin({"connection": url}, data_dir=tmp_path) for _ in range(3)]
        await asyncio.gather(*(p.start() for p in plugins))
        try:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY 1")
                versions = [row[0] for row in await cur.fetchall()]
            assert versions == list(range(1, SCHEMA_VERSION + 1))
            await plugins[0].close()
            await plugins[0].start()  # reopening an up-to-date database changes nothing
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute("SELECT count(*) FROM schema_migrations")
                assert (await cur.fetchone()) == (SCHEMA_VERSION,)
        finally:
            for p in plugins:
                await p.close()


async def test_newer_schema_is_refused(pg_server: ThrowawayServer, tmp_path: Path) -> None:
    async with fresh_database(pg_server, "newer") as url:
        first = PostgresPlugin({"connection": url}, data_dir=tmp_path)
        await first.start()
        await first.close()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (999,))
        later = PostgresPlugin({"connection": url}, data_dir=tmp_path)
        with pytest.raises(SchemaTooNew):
            await later.start()
        await later.close()


async def test_unreachable_database_is_unavailable_fast(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    plugin = PostgresPlugin({"connection": url, "connect_timeout_seconds": 1}, data_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await plugin.start()
    assert time.monotonic() - started < 3
    assert not await plugin.check_health()
    await plugin.close()


async def test_abandoned_transaction_is_rolled_back(plugin: PostgresPlugin, namespace: str) -> None:
    ctx = CallContext(namespace=namespace)
    kv = plugin.keyvalue
    begun = await kv.begin_transaction(
        tx_pb.BeginTransactionRequest(timeout=Duration(nanos=200_000_000)), ctx
    )
    tid = begun.transaction_id
    await kv.set_in_transaction(
        tx_pb.SetInTransactionRequest(transaction_id=tid, key="abandoned", value=b"x"), ctx
    )
    await asyncio.sleep(0.3)
    assert await kv.purge_idle_transactions() == 1
    with pytest.raises(NotFound) as raised:
        await kv.commit(tx_pb.CommitRequest(transaction_id=tid), ctx)
    assert raised.value.reason == "TRANSACTION_NOT_FOUND"
    assert not (await kv.exists(kv_pb.ExistsRequest(key="abandoned"), ctx)).exists
    async with plugin.db.connection(ctx) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'prism' "
            "AND state = 'idle in transaction'"
        )
        assert (await cur.fetchone()) == (0,)


async def test_open_transactions_are_bounded(
    pg_server: ThrowawayServer, tmp_path: Path, namespace: str
) -> None:
    config = {"connection": pg_server.url, "pool_min_size": 1, "pool_max_size": 3}
    plugin = PostgresPlugin(config, data_dir=tmp_path)
    await plugin.start()
    try:
        ctx = CallContext(namespace=namespace)
        held = [
            await plugin.keyvalue.begin_transaction(tx_pb.BeginTransactionRequest(), ctx)
            for _ in range(2)
        ]
        with pytest.raises(ResourceExhausted):
            await plugin.keyvalue.begin_transaction(tx_pb.BeginTransactionRequest(), ctx)
        # the connection left over still serves plain calls
        await plugin.keyvalue.set(kv_pb.SetRequest(key="k", value=b"v"), ctx)
        await plugin.keyvalue.rollback(
            tx_pb.RollbackRequest(transaction_id=held[0].transaction_id), ctx
        )
        await plugin.keyvalue.begin_transaction(tx_pb.BeginTransactionRequest(), ctx)
    finally:
        await plugin.close()


async def test_sweeper_reclaims_expired_rows(plugin: PostgresPlugin, namespace: str) -> None:
    ctx = CallContext(namespace=namespace)
    ttl = Duration(nanos=100_000_000)
    for i in range(3):
        await plugin.keyvalue.set_with_ttl(
            ttl_pb.SetWithTTLRequest(key=f"e{i}", value=b"x", ttl=ttl), ctx
        )
    await plugin.keyvalue.set(kv_pb.SetRequest(key="kept", value=b"x"), ctx)
    await asyncio.sleep(0.15)
    assert await plugin.sweep() >= 3
    async with plugin.db.connection(ctx) as conn:
        cur = await conn.execute("SELECT count(*) FROM prism_kv WHERE ns = %s", (namespace,))
        assert (await cur.fetchone()) == (1,)


async def test_keys_scan_in_utf8_byte_order(plugin: PostgresPlugin, namespace: str) -> None:
    """NUL characters round-trip and order follows UTF-8 bytes (= code points), not a locale."""
    ctx = CallContext(namespace=namespace)
    keys = ["a\x00b", "a", "B", "b", "é", "\uffff", "\U00010000", "a%", "a_"]
    for k in keys:
        await plugin.keyvalue.set(kv_pb.SetRequest(key=k, value=k.encode()), ctx)
    scanned = await plugin.keyvalue.scan_keys(scan_pb.ScanKeysRequest(), ctx)
    assert list(scanned.keys) == sorted(keys, key=lambda k: k.encode("utf-8"))
    got = await plugin.keyvalue.get(kv_pb.GetRequest(key="a\x00b"), ctx)
    assert got.found and got.value == b"a\x00b"


async def test_concurrent_consumers_never_share_a_message(
    plugin: PostgresPlugin, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    for i in range(40):
        await plugin.queue.enqueue(q_pb.EnqueueRequest(queue="work", payload=b"%d" % i), ctx)

    async def consume() -> list[bytes]:
        got: list[bytes] = []
        while True:
            reply = await plugin.queue.dequeue(
                q_pb.DequeueRequest(queue="work", max_messages=3), ctx
            )
            if not reply.messages:
                return got
            got += [m.payload for m in reply.messages]

    results = await asyncio.gather(*(consume() for _ in range(4)))
    everything = [p for r in results for p in r]
    assert sorted(everything) == sorted(b"%d" % i for i in range(40))


async def _first_events(
    plugin: PostgresPlugin, ctx: CallContext, topic: str
) -> tuple[AsyncIterator[ps_pb.SubscribeResponse], str]:
    stream = plugin.pubsub.subscribe(ps_pb.SubscribeRequest(topic=topic), ctx)
    started = await anext(stream)
    return stream, started.started.subscription_id


async def test_large_messages_travel_through_the_spill_table(
    plugin: PostgresPlugin, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    stream, _ = await _first_events(plugin, ctx, "big")
    payloads = [b"s" * 10, b"L" * (1024 * 1024), b"t" * 20]  # NOTIFY holds < 8000 bytes
    for payload in payloads:
        await plugin.pubsub.publish(ps_pb.PublishRequest(topic="big", payload=payload), ctx)
    received = [(await anext(stream)).message.payload for _ in payloads]
    assert received == payloads  # in publish order, the spilled one included
    await stream.aclose()  # type: ignore[attr-defined]


async def test_lost_listener_ends_streams_unavailable(
    plugin: PostgresPlugin, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    stream, _ = await _first_events(plugin, ctx, "t")
    async with plugin.db.connection(ctx) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN prism_pubsub%' AND pid <> pg_backend_pid()"
        )
    with pytest.raises(Unavailable):
        await asyncio.wait_for(anext(stream), 5)
    # a new subscription connects a new listener and works
    again, _ = await _first_events(plugin, ctx, "t")
    await plugin.pubsub.publish(ps_pb.PublishRequest(topic="t", payload=b"x"), ctx)
    message = await eventually(lambda: anext(again), message="no message after reconnect")
    assert message.message.payload == b"x"
    await again.aclose()  # type: ignore[attr-defined]


async def test_nul_characters_in_documents_are_invalid_not_internal(
    plugin: PostgresPlugin, namespace: str
) -> None:
    """PostgreSQL text and JSONB cannot hold U+0000: a clear INVALID_ARGUMENT, nothing stored."""
    ctx = CallContext(namespace=namespace)
    with pytest.raises(InvalidArgument) as raised:
        await plugin.documents.insert(
            doc_pb.InsertRequest(collection="c", id="a\x00b", json="{}"), ctx
        )
    assert raised.value.field == "id"
    with pytest.raises(InvalidArgument) as raised:
        await plugin.documents.insert(
            doc_pb.InsertRequest(collection="c", id="x", json='{"s": "a\\u0000b"}'), ctx
        )
    assert raised.value.field == "json"
    count = await plugin.documents.count(query_pb.CountRequest(collection="c"), ctx)
    assert count.count == 0


async def test_deadline_cuts_a_slow_statement(plugin: PostgresPlugin, namespace: str) -> None:
    """A statement still running at the deadline is abandoned with UNAVAILABLE in time, and the
    pool goes on serving (the abandoned connection is not handed out again mid-query)."""
    ctx = CallContext.with_timeout(namespace, 0.3)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        async with plugin.db.connection(ctx) as conn:
            await conn.execute("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 1.5
    for i in range(plugin.db.max_size + 1):
        fresh = CallContext.with_timeout(namespace, 2)
        await plugin.keyvalue.set(kv_pb.SetRequest(key=f"after{i}", value=b"v"), fresh)


async def test_foreign_notifications_are_ignored(plugin: PostgresPlugin, namespace: str) -> None:
    ctx = CallContext(namespace=namespace)
    stream, _ = await _first_events(plugin, ctx, "t")
    async with plugin.db.connection(ctx) as conn:
        for junk in ("not json", '{"ns": "x"}', '{"m": "!!"}', "[1]"):
            await conn.execute("SELECT pg_notify('prism_pubsub', %s)", (junk,))
    await plugin.pubsub.publish(ps_pb.PublishRequest(topic="t", payload=b"ok"), ctx)
    event = await asyncio.wait_for(anext(stream), 5)
    assert event.message.payload == b"ok"
    await stream.aclose()  # type: ignore[attr-defined]
