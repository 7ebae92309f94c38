"""The SQLite file behind the plugin, reached only from worker threads.

One writer thread owns the only write connection: writes queue up and every job the thread finds
waiting is applied in ONE transaction (each job inside its own SAVEPOINT, so a job that fails
rolls back alone), then committed with synchronous=FULL before any caller is answered — durable
acknowledgements at a fraction of one fsync per write. Reads run on a small pool of reader
threads, each with its own connection; in WAL mode they never wait for the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from plugins.runtime.errors import PrismError, Unavailable
from plugins.sqlite.schema import migrate

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]

#: writes gathered into one transaction at most; bounds the latency one commit adds
MAX_BATCH_JOBS = 256


@dataclass
class _Pending:
    job: Job
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread is safe to drop
    # because each connection is only ever used by the one thread that owns it.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _resolve(pending: _Pending, result: Any, error: BaseException | None) -> None:
    def deliver() -> None:
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
        pending.loop.call_soon_threadsafe(deliver)


def _translate(exc: sqlite3.Error) -> PrismError:
    """Driver errors a client can do something about (retry later) become Unavailable."""
    return Unavailable(f"sqlite: {exc}", backend="sqlite")


class Database:
    """Owns the connections and threads; `write`/`read` run a function on the right one."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000, readers: int = 2) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._readers = readers
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(None, self._open_writer)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name=f"sqlite-writer:{self.path.name}"
        )
        self._writer.daemon = True
        self._writer.start()
        self._reader_pool = ThreadPoolExecutor(
            max_workers=self._readers, thread_name_prefix=f"sqlite-reader:{self.path.name}"
        )

    def _open_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, self.busy_timeout_ms)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            conn.close()
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        migrate(conn)
        return conn

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        pool, self._reader_pool = self._reader_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    @property
    def readers(self) -> int:
        """Reader threads, so a benchmark can size its baseline pool the same way."""
        return self._readers

    @property
    def is_open(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    # -- calls -------------------------------------------------------------------------------

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` inside a write transaction shared with other queued jobs; returns once the
        transaction is durably committed. An exception from `job` undoes only `job`'s changes."""
        if self._writer is None:
            raise Unavailable("sqlite plugin is not started", backend="sqlite")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(job, loop, future))
        return await future

    async def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` on a reader connection inside one read transaction (a consistent
        snapshot of committed data)."""
        pool = self._reader_pool
        if pool is None:
            raise Unavailable("sqlite plugin is not started", backend="sqlite")
        return await asyncio.get_running_loop().run_in_executor(pool, self._run_read, job)

    def _run_read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = _connect(self.path, self.busy_timeout_ms)
                conn.execute("PRAGMA query_only = ON")
                self._local.conn = conn
                with self._lock:
                    self._reader_conns.append(conn)
            conn.execute("BEGIN")
            try:
                return job(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise _translate(exc) from exc

    # -- writer thread -----------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH_JOBS:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._apply(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _apply(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        outcomes: list[tuple[_Pending, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for pending in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = pending.job(conn)
                except BaseException as exc:  # handed to the caller, never lost
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    error = _translate(exc) if isinstance(exc, sqlite3.OperationalError) else exc
                    outcomes.append((pending, None, error))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((pending, result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The transaction itself failed (disk full, I/O error, locked by another process):
            # nothing of it is stored, so every job in it fails.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _translate(exc)
            for pending in batch:
                _resolve(pending, None, error)
            return
        for pending, result, err in outcomes:
            _resolve(pending, result, err)
