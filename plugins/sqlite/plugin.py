"""SqlitePlugin: the embedded default backend, one SQLite file per plugin instance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plugins.runtime.base import BackendPlugin
from plugins.runtime.errors import InvalidArgument, PrismError
from plugins.sqlite.db import Database
from plugins.sqlite.document import SqliteDocuments
from plugins.sqlite.keyvalue import SqliteKeyValue
from plugins.sqlite.queue import SqliteQueue

log = logging.getLogger(__name__)

DEFAULT_FILE = "prism.db"
DEFAULT_BUSY_TIMEOUT_MS = 5000
DEFAULT_SWEEP_INTERVAL = 30.0
#: rows the sweeper deletes per write job, so it never holds the writer for long
SWEEP_CHUNK = 1000

ISOLATION = (
    "serializable (optimistic): reads see committed data plus the transaction's own writes; "
    "at Commit every key the transaction read is re-checked and any change aborts it "
    "(TRANSACTION_CONFLICT); writes apply atomically in one SQLite transaction"
)


def database_path(config: Mapping[str, Any], data_dir: Path) -> Path:
    """`path`, else `connection` (sqlite:///relative or sqlite:////absolute, as SQLAlchemy
    spells it), else <data_dir>/prism.db. Relative paths are relative to the data directory."""
    if config.get("path"):
        raw = str(config["path"])
    elif config.get("connection"):
        connection = str(config["connection"])
        if not connection.startswith("sqlite:///") or connection == "sqlite:///":
            raise InvalidArgument(
                "connection", "must look like sqlite:///relative/file.db or sqlite:////abs.db"
            )
        raw = connection.removeprefix("sqlite:///")
    else:
        return data_dir / DEFAULT_FILE
    path = Path(raw).expanduser()
    return path if path.is_absolute() else data_dir / path


class SqlitePlugin(BackendPlugin):
    """KeyValue, Document and Queue on one WAL-mode SQLite file, durable (synchronous=FULL)."""

    name = "sqlite"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.path = database_path(config, data_dir)
        self.sweep_interval = float(config.get("sweep_interval_seconds", DEFAULT_SWEEP_INTERVAL))
        if self.sweep_interval <= 0:
            raise InvalidArgument("sweep_interval_seconds", "must be positive")
        self.db = Database(
            self.path, busy_timeout_ms=int(config.get("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS))
        )
        self.keyvalue = SqliteKeyValue(self.db)
        self.documents = SqliteDocuments(self.db)
        self.queue = SqliteQueue(self.db)
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
            "document_indexing": self.documents,
            "document_query": self.documents,
            "document_search": self.documents,
            "queue_basic": self.queue,
            "queue_visibility": self.queue,
            "queue_dead_letter": self.queue,
            "queue_delayed": self.queue,
            "queue_priority": self.queue,
        }

    async def start(self) -> None:
        await self.db.open()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sqlite-sweeper")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await self.db.close()

    async def check_health(self) -> bool:
        if not self.db.is_open:
            return False
        try:
            await self.db.read(lambda c: c.execute("SELECT 1").fetchone())
        except PrismError:
            return False
        return True

    def details(self) -> dict[str, str]:
        return {
            "path": str(self.path),
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": "wal",
            "synchronous": "full",
            "isolation": ISOLATION,
        }

    async def sweep(self) -> int:
        """Reclaim expired rows and idle transactions now; returns the rows deleted."""
        self.keyvalue.purge_idle_transactions()
        total = 0
        while True:
            deleted = await self.db.write(_delete_expired)
            total += deleted
            if deleted < SWEEP_CHUNK:
                return total

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except PrismError as exc:  # the database is unreachable; try again next round
                log.warning("sqlite sweep failed: %s", exc)


def _delete_expired(conn: sqlite3.Connection) -> int:
    cursor = conn.execute(
        "DELETE FROM kv WHERE (ns, key) IN (SELECT ns, key FROM kv WHERE expires_at <= ? LIMIT ?)",
        (time.time(), SWEEP_CHUNK),
    )
    return cursor.rowcount
