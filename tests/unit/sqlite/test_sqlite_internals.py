"""SQLite plugin internals the black-box conformance suite cannot see: the file's schema version
and pragmas, migrations on reopen, the writer's batching, the sweeper, config parsing, the word
index and lease persistence."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import Aborted, InvalidArgument, NotFound, Unavailable
from plugins.sqlite import SqlitePlugin
from plugins.sqlite.keyvalue import prefix_upper_bound
from plugins.sqlite.plugin import database_path
from plugins.sqlite.schema import SCHEMA_VERSION, migrate
from tests.support.wait import eventually

CTX = CallContext(namespace="ns")


@pytest.fixture
async def plugin(tmp_path: Path) -> AsyncIterator[SqlitePlugin]:
    p = SqlitePlugin({"sweep_interval_seconds": 0.05}, data_dir=tmp_path)
    await p.start()
    yield p
    await p.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


async def test_file_is_wal_with_current_schema_and_durable_writer(plugin: SqlitePlugin) -> None:
    await plugin.keyvalue.set(basic_pb.SetRequest(key="k", value=b"v"), CTX)
    conn = raw(plugin.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT value FROM kv WHERE key = 'k'").fetchone()[0] == b"v"
    finally:
        conn.close()
    # synchronous and foreign_keys are per connection: ask the writer's own connection
    pragmas = await plugin.db.write(
        lambda c: (
            c.execute("PRAGMA synchronous").fetchone()[0],
            c.execute("PRAGMA foreign_keys").fetchone()[0],
        )
    )
    assert pragmas == (2, 1)  # 2 = FULL: every commit is fsynced before it is acknowledged


async def test_reopen_keeps_data_and_migrates_nothing_twice(tmp_path: Path) -> None:
    first = SqlitePlugin({}, data_dir=tmp_path)
    await first.start()
    await first.keyvalue.set(basic_pb.SetRequest(key="kept", value=b"1"), CTX)
    await first.close()

    conn = raw(tmp_path / "prism.db")
    try:
        assert migrate(conn) == SCHEMA_VERSION  # already current: nothing applied
        assert migrate(conn) == SCHEMA_VERSION
    finally:
        conn.close()

    second = SqlitePlugin({}, data_dir=tmp_path)
    await second.start()
    try:
        got = await second.keyvalue.get(basic_pb.GetRequest(key="kept"), CTX)
        assert got.found and got.value == b"1"
        # the revision counter survived too: a new write never reuses an old revision
        again = await second.keyvalue.set(basic_pb.SetRequest(key="kept", value=b"2"), CTX)
        assert again.revision > got.revision
    finally:
        await second.close()


async def test_older_file_is_brought_up_to_date(tmp_path: Path) -> None:
    from plugins.sqlite.schema import MIGRATIONS

    conn = raw(tmp_path / "prism.db")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO kv (ns, key, value, revision) VALUES ('ns', 'old', x'01', 1)")
    conn.close()

    p = SqlitePlugin({}, data_dir=tmp_path)
    await p.start()
    try:
        got = await p.keyvalue.get(basic_pb.GetRequest(key="old"), CTX)
        assert got.found and got.value == b"\x01"
    finally:
        await p.close()
    conn = raw(tmp_path / "prism.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_newer_schema_is_refused_as_unavailable(tmp_path: Path) -> None:
    conn = raw(tmp_path / "prism.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    p = SqlitePlugin({}, data_dir=tmp_path)
    with pytest.raises(Unavailable, match="newer"):
        await p.start()
    await p.close()


async def test_failed_job_in_a_batch_leaves_the_others_committed(plugin: SqlitePlugin) -> None:
    """Concurrent writes share one transaction; a CAS mismatch among them rolls back alone."""
    kv = plugin.keyvalue
    base = await kv.set(basic_pb.SetRequest(key="cas", value=b"0"), CTX)
    sets = [kv.set(basic_pb.SetRequest(key=f"k{i}", value=b"x"), CTX) for i in range(50)]
    bad = kv.compare_and_swap(
        cas_pb.CompareAndSwapRequest(key="cas", value=b"1", expected_revision=base.revision + 99),
        CTX,
    )
    results = await asyncio.gather(*sets, bad, return_exceptions=True)
    assert isinstance(results[-1], Aborted)
    assert all(isinstance(r, basic_pb.SetResponse) for r in results[:-1])
    revisions = [r.revision for r in results[:-1] if isinstance(r, basic_pb.SetResponse)]
    assert len(set(revisions)) == 50
    conn = raw(plugin.path)
    try:
        assert conn.execute("SELECT count(*) FROM kv WHERE key LIKE 'k%'").fetchone()[0] == 50
        assert conn.execute("SELECT value FROM kv WHERE key = 'cas'").fetchone()[0] == b"0"
    finally:
        conn.close()


async def test_sweeper_reclaims_expired_rows(plugin: SqlitePlugin) -> None:
    await plugin.keyvalue.set_with_ttl(
        ttl_pb.SetWithTTLRequest(key="gone", value=b"x", ttl=Duration(nanos=20_000_000)), CTX
    )
    await plugin.keyvalue.set(basic_pb.SetRequest(key="stays", value=b"x"), CTX)

    def rows() -> list[str]:
        conn = raw(plugin.path)
        try:
            return [r[0] for r in conn.execute("SELECT key FROM kv ORDER BY key")]
        finally:
            conn.close()

    assert rows() == ["gone", "stays"]
    await eventually(lambda: rows() == ["stays"], timeout=5, message="expired row not swept")


async def test_sweeper_forgets_idle_transactions(plugin: SqlitePlugin) -> None:
    begun = await plugin.keyvalue.begin_transaction(
        tx_pb.BeginTransactionRequest(timeout=Duration(nanos=30_000_000)), CTX
    )
    assert begun.transaction_id in plugin.keyvalue.transactions
    await eventually(
        lambda: begun.transaction_id not in plugin.keyvalue.transactions,
        timeout=5,
        message="idle transaction kept",
    )
    with pytest.raises(NotFound):
        await plugin.keyvalue.commit(tx_pb.CommitRequest(transaction_id=begun.transaction_id), CTX)


def test_prefix_upper_bound_is_the_next_string_in_utf8_order() -> None:
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"  # surrogates are skipped
    assert prefix_upper_bound("") is None


def test_database_path_from_config(tmp_path: Path) -> None:
    assert database_path({}, tmp_path) == tmp_path / "prism.db"
    assert database_path({"connection": "sqlite:///rel/x.db"}, tmp_path) == tmp_path / "rel/x.db"
    assert database_path({"connection": "sqlite:////abs/x.db"}, tmp_path) == Path("/abs/x.db")
    assert database_path({"path": "y.db", "connection": "sqlite:///x.db"}, tmp_path) == (
        tmp_path / "y.db"
    )
    with pytest.raises(InvalidArgument) as err:
        database_path({"connection": "postgres://x"}, tmp_path)
    assert err.value.field == "connection"


async def test_word_index_follows_document_writes(plugin: SqlitePlugin) -> None:
    """The FTS5 prefilter rows track every insert, update and delete of a document."""
    docs = plugin.documents

    def indexed(word: str) -> int:
        conn = raw(plugin.path)
        try:
            return int(
                conn.execute(
                    "SELECT count(*) FROM doc_words WHERE text MATCH ?", (f'"{word}"',)
                ).fetchone()[0]
            )
        finally:
            conn.close()

    await docs.insert(doc_pb.InsertRequest(collection="c", id="d", json='{"a": "Alpha"}'), CTX)
    assert (indexed("alpha"), indexed("beta")) == (1, 0)
    body = '{"n": {"x": ["beta", 1]}}'
    await docs.update(doc_pb.UpdateRequest(collection="c", id="d", json=body), CTX)
    assert (indexed("alpha"), indexed("beta")) == (0, 1)
    await docs.delete(doc_pb.DeleteRequest(collection="c", id="d"), CTX)
    assert indexed("beta") == 0


async def test_leases_survive_a_restart(tmp_path: Path) -> None:
    """A leased message stays invisible after reopening the file, and its handle still acks."""
    first = SqlitePlugin({}, data_dir=tmp_path)
    await first.start()
    await first.queue.enqueue(queue_pb.EnqueueRequest(queue="q", payload=b"job"), CTX)
    leased = await first.queue.dequeue(queue_pb.DequeueRequest(queue="q"), CTX)
    await first.close()

    second = SqlitePlugin({}, data_dir=tmp_path)
    await second.start()
    try:
        peeked = await second.queue.peek(queue_pb.PeekRequest(queue="q"), CTX)
        assert list(peeked.messages) == []
        handle = leased.messages[0].receipt_handle
        await second.queue.ack(queue_pb.AckRequest(queue="q", receipt_handle=handle), CTX)
        with pytest.raises(NotFound):
            await second.queue.ack(queue_pb.AckRequest(queue="q", receipt_handle=handle), CTX)
    finally:
        await second.close()
