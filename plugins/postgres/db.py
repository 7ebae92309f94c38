"""The connection pool behind the plugin, and the one place driver errors become domain errors.

Every call borrows a connection for at most the caller's remaining deadline (capped by
`op_timeout`): waiting for a free connection, connecting, and running the statements all count
against it, so an unreachable or stalled server answers UNAVAILABLE in time instead of hanging.
Pooled connections are autocommit. A connection idle for more than FRESH_SECONDS is checked
with a round trip when borrowed, so connections broken by a server restart are dropped and
replaced without the caller seeing them; a connection used a moment ago skips the check (it
halves the cost of a call) — if the server died in that moment, the call fails UNAVAILABLE,
which it would have anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import psycopg
from psycopg import AsyncConnection, errors
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from plugins.postgres.schema import migrate
from plugins.runtime.context import CallContext
from plugins.runtime.errors import Aborted, Unavailable

log = logging.getLogger(__name__)

Conn = AsyncConnection[TupleRow]

#: a connection returned to the pool less than this long ago is lent without a check
FRESH_SECONDS = 1.0

#: SQLSTATEs meaning "another transaction got in the way": retrying the whole unit can succeed
CONFLICTS = (errors.SerializationFailure, errors.DeadlockDetected, errors.LockNotAvailable)


#: what a driver call can fail with that translate() knows how to map
DRIVER_ERRORS = (psycopg.Error, PoolTimeout, PoolClosed, TimeoutError)


def unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"postgres unavailable: {exc}".strip(), backend="postgres")


def conflict(exc: BaseException) -> Aborted:
    return Aborted(
        f"conflicting concurrent transaction ({exc}); retry the whole transaction",
        reason="TRANSACTION_CONFLICT",
    )


def translate(exc: BaseException, timeout: float) -> NoReturn:
    """Raise the domain error for a driver/pool/timeout failure; anything else is re-raised as
    is (a bug, reported as INTERNAL)."""
    if isinstance(exc, CONFLICTS):
        raise conflict(exc) from exc
    if isinstance(exc, TimeoutError | PoolTimeout):
        raise Unavailable(
            f"postgres did not answer within {timeout:.3g}s", backend="postgres"
        ) from exc
    if isinstance(exc, psycopg.OperationalError | PoolClosed) or (
        isinstance(exc, psycopg.InterfaceError | psycopg.InternalError)
        and not isinstance(exc, errors.InFailedSqlTransaction)
    ):
        raise unavailable(exc) from exc
    raise exc


class Database:
    """An AsyncConnectionPool plus schema migration on first successful connect."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int,
        max_size: int,
        op_timeout: float,
        connect_timeout: float,
        lock_timeout_ms: int,
    ) -> None:
        self.op_timeout = op_timeout
        self.connect_timeout = connect_timeout
        self.conninfo = conninfo
        self.connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(connect_timeout)),
            "options": f"-c lock_timeout={int(lock_timeout_ms)}",
            "application_name": "prism",
        }
        self.min_size = min_size
        self.max_size = max_size
        self.pool = self._new_pool()
        self._last_used: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()
        self._opened = False
        #: a connection-level failure was seen; cleared by the next successful connect
        self._suspect = False
        self._migrated = False
        self._migrate_lock = asyncio.Lock()
        self.server_version = ""

    def _new_pool(self) -> AsyncConnectionPool[Conn]:
        """An unopened pool (a closed pool cannot be reopened, so close() makes a new one)."""
        return AsyncConnectionPool(
            self.conninfo,
            kwargs=self.connect_kwargs,
            min_size=self.min_size,
            max_size=self.max_size,
            open=False,
            check=self._check,
            timeout=self.op_timeout,
            # Give up background reconnects quickly: the pool then grows again on the next
            # request, so a restarted server is picked up at once rather than after a long
            # exponential backoff.
            reconnect_timeout=self.connect_timeout,
            name="prism-postgres",
        )

    async def _check(self, conn: Conn) -> None:
        if time.monotonic() - self._last_used.get(conn, 0.0) > FRESH_SECONDS:
            await AsyncConnectionPool.check_connection(conn)

    async def open(self) -> None:
        """Open the pool and migrate; Unavailable within connect_timeout when the server cannot
        be reached (the pool keeps trying until then: a server still starting up is waited
        for)."""
        if not self._opened:
            await self.pool.open(wait=False)
            self._opened = True
        try:
            await self._ready(self.connect_timeout)
        except BaseException:
            await self.close()  # no pool left retrying in the background of a failed start
            raise

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            pool, self.pool = self.pool, self._new_pool()
            await pool.close(timeout=5.0)

    async def _ensure_migrated(self, limit: float) -> None:
        if self._migrated:
            return
        async with self._migrate_lock:
            if self._migrated:
                return
            try:
                async with asyncio.timeout(limit):
                    async with self.pool.connection(timeout=limit) as conn:
                        await migrate(conn)
                        self.server_version = str(conn.info.server_version)
            except DRIVER_ERRORS as exc:
                translate(exc, limit)
            self._migrated = True

    @contextlib.asynccontextmanager
    async def connection(self, ctx: CallContext) -> AsyncIterator[Conn]:
        """A pooled autocommit connection for one call, everything bounded by the deadline."""
        timeout = ctx.timeout(self.op_timeout)
        await self._ready(timeout)
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.connection(timeout=timeout) as conn:
                    try:
                        yield conn
                    finally:
                        self._last_used[conn] = time.monotonic()
        except DRIVER_ERRORS as exc:
            self._note_failure(exc)
            translate(exc, timeout)

    async def dedicated(self, limit: float) -> Conn:
        """A connection taken out of the pool (for a transaction held across calls); give it
        back with `release`."""
        await self._ready(limit)
        try:
            async with asyncio.timeout(limit):
                return await self.pool.getconn(timeout=limit)
        except DRIVER_ERRORS as exc:
            self._note_failure(exc)
            translate(exc, limit)

    async def connect(self, limit: float) -> Conn:
        """A new connection outside the pool (a LISTEN session lives as long as its listener);
        the caller closes it."""
        await self._ready(limit)
        return await self._connect(limit)

    async def _connect(self, limit: float) -> Conn:
        try:
            async with asyncio.timeout(limit):
                return await AsyncConnection.connect(self.conninfo, **self.connect_kwargs)
        except DRIVER_ERRORS as exc:
            translate(exc, limit)

    async def _ready(self, limit: float) -> None:
        """Started, migrated, and — while the server is suspected down — reachable.

        psycopg_pool does not wake a client waiting for a connection when connecting fails, so
        with the server down every call would wait out its whole deadline. After a
        connection-level failure one direct connection attempt decides instead: refused is
        known in milliseconds (UNAVAILABLE at once); success clears the suspicion."""
        if not self._opened:
            raise Unavailable("postgres plugin is not started", backend="postgres")
        if self._suspect:
            probe = await self._connect(limit)
            await probe.close()
            self._suspect = False
        await self._ensure_migrated(limit)

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, PoolTimeout | TimeoutError) or (
            # no SQLSTATE: the connection itself failed; 08: connection exception; 57P:
            # server shutting down / crashed / not accepting connections yet
            isinstance(exc, psycopg.OperationalError)
            and (exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P")))
        ):
            self._suspect = True

    async def release(self, conn: Conn) -> None:
        """Return a dedicated connection; the pool resets (rolls back) or discards it."""
        with contextlib.suppress(PoolClosed):
            await self.pool.putconn(conn)

    async def ping(self, limit: float) -> bool:
        try:
            async with asyncio.timeout(limit):
                async with self.pool.connection(timeout=limit) as conn:
                    await conn.execute("SELECT 1")
        except DRIVER_ERRORS as exc:
            log.debug("postgres health check failed: %r", exc)
            self._note_failure(exc)
            return False
        self._suspect = False
        return True
