"""The postgres slot config keys `table` (a slot's own messages table) and `visibility_timeout`
(a plain Dequeue's lease): MEMO-006's durability slot sets both."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.queue.v1 import queue_basic_pb2 as q_pb
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dlq_pb
from prism.interfaces.queue.v1 import queue_visibility_pb2 as vis_pb
from psycopg import sql

from plugins.postgres import PostgresPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, NotFound
from plugins.runtime.loader import config_errors
from prismctl.conformance import runner
from prismctl.registry import load_registry
from tests.support.harness import running_server
from tests.support.servers import ThrowawayServer
from tests.support.wait import eventually


@contextlib.asynccontextmanager
async def started(
    server: ThrowawayServer, tmp_path: Path, **config: Any
) -> AsyncIterator[PostgresPlugin]:
    plugin = PostgresPlugin(
        {"connection": server.url, "sweep_interval_seconds": 3600, **config}, data_dir=tmp_path
    )
    await plugin.start()
    try:
        yield plugin
    finally:
        await plugin.close()


async def _payloads(plugin: PostgresPlugin, ctx: CallContext, queue: str) -> list[bytes]:
    peeked = await plugin.queue.peek(q_pb.PeekRequest(queue=queue, max_messages=100), ctx)
    return [m.payload for m in peeked.messages]


async def test_slots_with_different_tables_keep_their_queues_apart(
    pg_server: ThrowawayServer, tmp_path: Path, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    suffix = uuid.uuid4().hex[:8]
    first, second = f"slot_a_{suffix}", f"slot_b_{suffix}"
    async with (
        started(pg_server, tmp_path, table=first) as a,
        started(pg_server, tmp_path, table=second) as b,
        started(pg_server, tmp_path) as shared,
    ):
        await a.queue.enqueue(q_pb.EnqueueRequest(queue="jobs", payload=b"a"), ctx)
        await b.queue.enqueue(q_pb.EnqueueRequest(queue="jobs", payload=b"b"), ctx)
        assert await _payloads(a, ctx, "jobs") == [b"a"]
        assert await _payloads(b, ctx, "jobs") == [b"b"]
        assert await _payloads(shared, ctx, "jobs") == []
        got = await b.queue.dequeue(q_pb.DequeueRequest(queue="jobs", max_messages=10), ctx)
        assert [m.payload for m in got.messages] == [b"b"]
        # a receipt from one table is no lease in another
        receipt = got.messages[0].receipt_handle
        with pytest.raises(NotFound):
            await a.queue.ack(q_pb.AckRequest(queue="jobs", receipt_handle=receipt), ctx)

        # dead-lettering moves a message within its slot's table
        await a.queue.configure_dead_letter(
            dlq_pb.ConfigureDeadLetterRequest(
                queue="jobs", dead_letter_queue="jobs-dlq", max_deliveries=1
            ),
            ctx,
        )
        leased = await a.queue.dequeue_with_timeout(
            vis_pb.DequeueWithTimeoutRequest(queue="jobs", visibility_timeout=Duration(seconds=60)),
            ctx,
        )
        handle = leased.messages[0].receipt_handle
        await a.queue.release(vis_pb.ReleaseRequest(queue="jobs", receipt_handle=handle), ctx)
        assert await _payloads(a, ctx, "jobs-dlq") == [b"a"]
        assert await _payloads(b, ctx, "jobs-dlq") == []
        # and dead-letter configurations belong to the table too
        unset = await b.queue.get_dead_letter_config(
            dlq_pb.GetDeadLetterConfigRequest(queue="jobs"), ctx
        )
        assert not unset.configured
        await b.queue.configure_dead_letter(
            dlq_pb.ConfigureDeadLetterRequest(
                queue="jobs", dead_letter_queue="b-dlq", max_deliveries=5
            ),
            ctx,
        )
        kept = await a.queue.get_dead_letter_config(
            dlq_pb.GetDeadLetterConfigRequest(queue="jobs"), ctx
        )
        assert (kept.dead_letter_queue, kept.max_deliveries) == ("jobs-dlq", 1)

    async with await psycopg.AsyncConnection.connect(pg_server.url) as conn:
        cur = await conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE tablename = ANY(%s) ORDER BY 1, 2",
            ([first, second],),
        )
        indexes = await cur.fetchall()
        cur = await conn.execute(
            sql.SQL("SELECT queue, payload FROM {} WHERE ns = %s").format(sql.Identifier(first)),
            (namespace,),
        )
        assert await cur.fetchall() == [("jobs-dlq", b"a")]
    for table in (first, second):
        own = [(name, definition) for t, name, definition in indexes if t == table]
        # the primary key and prism_queue_messages' three indexes, named after this table
        assert len(own) == 4, own
        assert all(name.startswith(table) for name, _ in own)
        assert any(
            "UNIQUE INDEX" in d and "(receipt)" in d and "WHERE (receipt IS NOT NULL)" in d
            for _, d in own
        ), own


QUEUE_INTERFACES = [
    "queue_basic",
    "queue_visibility",
    "queue_dead_letter",
    "queue_delayed",
    "queue_priority",
]


async def test_queue_conformance_holds_on_a_slots_own_table(
    pg_server: ThrowawayServer, tmp_path: Path
) -> None:
    """Every queue statement goes to the configured table: the whole queue suite passes on a
    server whose slot names one, and prism_queue_messages gets none of its messages."""
    namespace = f"c{uuid.uuid4().hex[:8]}"
    table = f"own_{uuid.uuid4().hex[:8]}"
    slot = {
        "backend": "postgres",
        "interfaces": QUEUE_INTERFACES,
        "config": {"connection": pg_server.url, "table": table, "visibility_timeout": 30},
    }
    config = {
        "namespaces": [
            {
                "name": namespace,
                "pattern": "direct",
                "pattern_version": "v1",
                "slots": {"queue": slot},
            }
        ]
    }
    async with running_server(config, tmp_path) as server:
        report = await runner.run(f"127.0.0.1:{server.port}", QUEUE_INTERFACES, namespace=namespace)
    assert report.ok, report.to_text()
    count = sql.SQL("SELECT count(*) FROM {} WHERE ns = %s")
    async with await psycopg.AsyncConnection.connect(pg_server.url) as conn:
        own = await conn.execute(count.format(sql.Identifier(table)), (namespace,))
        assert ((await own.fetchone()) or (0,))[0] > 0
        shared = await conn.execute(
            count.format(sql.Identifier("prism_queue_messages")), (namespace,)
        )
        assert await shared.fetchone() == (0,)


async def test_visibility_timeout_sets_a_plain_dequeues_lease(
    pg_server: ThrowawayServer, tmp_path: Path, namespace: str
) -> None:
    ctx = CallContext(namespace=namespace)
    async with started(pg_server, tmp_path, visibility_timeout=2) as plugin:
        await plugin.queue.enqueue(q_pb.EnqueueRequest(queue="short", payload=b"m"), ctx)
        leased_at = time.monotonic()
        first = await plugin.queue.dequeue(q_pb.DequeueRequest(queue="short"), ctx)
        assert [m.delivery_count for m in first.messages] == [1]

        async def redelivered() -> list[q_pb.Message]:
            got = await plugin.queue.dequeue(q_pb.DequeueRequest(queue="short"), ctx)
            return list(got.messages)

        again = await eventually(redelivered, timeout=6, message="lease did not expire")
        waited = time.monotonic() - leased_at
        assert [m.delivery_count for m in again] == [2]
        assert 1.5 <= waited < 5, waited


BAD_CONFIG = [
    ("table", "Jobs"),
    ("table", "1jobs"),
    ("table", "jobs; drop table prism_kv"),
    ("table", "t" * 64),
    ("table", 7),
    ("visibility_timeout", 0),
    ("visibility_timeout", -1),
    ("visibility_timeout", 43201),
    ("visibility_timeout", True),
    ("visibility_timeout", "30"),
]


@pytest.mark.parametrize(("key", "value"), BAD_CONFIG, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG])
def test_bad_config_is_refused_by_schema_and_plugin(
    key: str, value: object, tmp_path: Path
) -> None:
    config = {"connection": "postgresql://localhost:1/prism", key: value}
    spec = load_registry().backends["postgres"]
    assert [path for path, _ in config_errors(spec, config)] == [(key,)]
    with pytest.raises(InvalidArgument) as caught:
        PostgresPlugin(config, data_dir=tmp_path)
    assert caught.value.field == key


def test_good_config_is_accepted_by_schema_and_plugin(tmp_path: Path) -> None:
    config = {
        "connection": "postgresql://localhost:1/prism",
        "table": "iot_message_queue",
        "visibility_timeout": 0.5,
    }
    assert config_errors(load_registry().backends["postgres"], config) == []
    plugin = PostgresPlugin(config, data_dir=tmp_path)
    assert (plugin.queue.table, plugin.queue.visibility) == ("iot_message_queue", 0.5)


async def test_a_table_of_another_shape_is_refused_at_start(
    pg_server: ThrowawayServer, tmp_path: Path
) -> None:
    plugin = PostgresPlugin({"connection": pg_server.url, "table": "prism_kv"}, data_dir=tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        await plugin.start()
    assert caught.value.field == "table"
    assert "not a queue messages table" in caught.value.description
    assert plugin.db.pool.closed
