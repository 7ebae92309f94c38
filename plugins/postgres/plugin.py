"""PostgresPlugin: KeyValue, Document, Queue and PubSub on PostgreSQL through psycopg 3
(async) and psycopg_pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugins.postgres.db import Conn, Database
from plugins.postgres.document import PostgresDocuments
from plugins.postgres.keyvalue import TX_ISOLATION, PostgresKeyValue
from plugins.postgres.pubsub import PostgresPubSub
from plugins.postgres.queue import PostgresQueue, default_visibility, table_name
from plugins.runtime.base import BackendPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, PrismError

log = logging.getLogger(__name__)

DEFAULTS: dict[str, float] = {
    "pool_min_size": 2,
    "pool_max_size": 10,
    "timeout_seconds": 5.0,
    "connect_timeout_seconds": 2.0,
    "lock_timeout_ms": 2000,
    "sweep_interval_seconds": 5.0,
    "health_timeout_seconds": 1.0,
}
#: expired rows the sweeper deletes per statement, so it never holds locks for long
SWEEP_CHUNK = 1000

ISOLATION = (
    f"{TX_ISOLATION.lower()} (snapshot): a transaction reads a snapshot taken at its first "
    "statement plus its own writes; writing a key another transaction changed since dooms it, "
    "and Commit answers TRANSACTION_CONFLICT (first updater wins, no lost updates)"
)


def _number(config: Mapping[str, Any], name: str) -> float:
    value = config.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgument(name, "must be a positive number")
    return float(value)


class PostgresPlugin(BackendPlugin):
    """KeyValue, Document, Queue and PubSub interfaces on one PostgreSQL database, partitioned
    by namespace."""

    name: ClassVar[str] = "postgres"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        connection = config.get("connection")
        if not isinstance(connection, str) or not connection:
            raise InvalidArgument("connection", "is required (postgresql://user@host:port/db)")
        min_size = int(_number(config, "pool_min_size"))
        max_size = int(_number(config, "pool_max_size"))
        if max_size < min_size:
            raise InvalidArgument("pool_max_size", "must be at least pool_min_size")
        self.sweep_interval = _number(config, "sweep_interval_seconds")
        self.health_timeout = _number(config, "health_timeout_seconds")
        self.db = Database(
            connection,
            min_size=min_size,
            max_size=max_size,
            op_timeout=_number(config, "timeout_seconds"),
            connect_timeout=_number(config, "connect_timeout_seconds"),
            lock_timeout_ms=int(_number(config, "lock_timeout_ms")),
        )
        # held transactions pin connections: leave at least one for everything else
        max_transactions = int(config.get("max_transactions", max(1, max_size - 1)))
        if not 0 < max_transactions < max_size:
            raise InvalidArgument("max_transactions", "must be between 1 and pool_max_size - 1")
        self.keyvalue = PostgresKeyValue(self.db, max_transactions=max_transactions)
        self.documents = PostgresDocuments(self.db)
        self.queue = PostgresQueue(
            self.db,
            table=table_name(config.get("table")),
            visibility=default_visibility(config.get("visibility_timeout")),
        )
        self.pubsub = PostgresPubSub(self.db)
        self._sweeper: asyncio.Task[None] | None = None

    def implementations(self) -> Mapping[str, object]:
        return {
            "keyvalue_basic": self.keyvalue,
            "keyvalue_batch": self.keyvalue,
            "keyvalue_cas": self.keyvalue,
            "keyvalue_scan": self.keyvalue,
            "keyvalue_ttl": self.keyvalue,
            "keyvalue_transactional": self.keyvalue,
            "document_basic": self.documents,
            "document_query": self.documents,
            "document_indexing": self.documents,
            "document_search": self.documents,
            "queue_basic": self.queue,
            "queue_visibility": self.queue,
            "queue_dead_letter": self.queue,
            "queue_delayed": self.queue,
            "queue_priority": self.queue,
            "pubsub_basic": self.pubsub,
            "pubsub_wildcards": self.pubsub,
        }

    async def start(self) -> None:
        await self.db.open()
        try:
            await self.queue.prepare(CallContext(namespace=""))
        except BaseException:
            await self.db.close()  # no pool left behind by a refused start
            raise
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="postgres-sweeper")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await self.keyvalue.close()
        await self.pubsub.close()
        await self.db.close()

    async def check_health(self) -> bool:
        return await self.db.ping(self.health_timeout)

    def details(self) -> dict[str, str]:
        return {
            "server_version": self.db.server_version,
            "transaction_isolation": ISOLATION,
            "pool": f"{self.db.min_size}..{self.db.max_size} connections",
        }

    async def sweep(self) -> int:
        """Reclaim expired keys, spilled pub/sub messages and idle transactions now; returns
        the expired keys deleted."""
        await self.keyvalue.purge_idle_transactions()
        ctx = CallContext(namespace="")
        async with self.db.connection(ctx) as conn:
            await self.pubsub.sweep(conn)
        total = 0
        while True:
            async with self.db.connection(ctx) as conn:
                deleted = await _delete_expired(conn)
            total += deleted
            if deleted < SWEEP_CHUNK:
                return total

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except PrismError as exc:  # the database is unreachable; try again next round
                log.warning("postgres sweep failed: %s", exc)


async def _delete_expired(conn: Conn) -> int:
    cur = await conn.execute(
        "DELETE FROM prism_kv WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM prism_kv WHERE expires_at <= statement_timestamp() LIMIT %s "
        "FOR UPDATE SKIP LOCKED))",
        (SWEEP_CHUNK,),
    )
    return cur.rowcount
