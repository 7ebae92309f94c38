"""The MongoDB client behind the plugin, and the one place driver errors become domain errors.

Every call runs under `pymongo.timeout(...)` with the caller's remaining deadline (capped by
`timeout_seconds`), so server selection, connecting and the operation itself all count against
it: an unreachable server answers UNAVAILABLE in time instead of hanging. pymongo's monitors
reconnect on their own, so a restarted server is picked up without the plugin doing anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import pymongo
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    InvalidURI,
    PyMongoError,
)
from pymongo.uri_parser import parse_uri

from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

Doc = dict[str, Any]

DEFAULTS: dict[str, float] = {
    "pool_min_size": 0,
    "pool_max_size": 50,
    "timeout_seconds": 5.0,
    "server_selection_timeout_ms": 2000,
    "connect_timeout_ms": 2000,
    "socket_timeout_ms": 10000,
    "health_timeout_seconds": 1.0,
}


@dataclass(frozen=True)
class Settings:
    connection: str
    database: str
    prefix: str
    pool_min_size: int
    pool_max_size: int
    timeout: float
    server_selection_timeout_ms: int
    connect_timeout_ms: int
    socket_timeout_ms: int
    health_timeout: float


def _number(config: Mapping[str, Any], name: str, *, allow_zero: bool = False) -> float:
    value = config.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(name, "must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(name, "must be positive")
    return float(value)


def settings(config: Mapping[str, Any]) -> Settings:
    """The slot config, checked; the database defaults to the URI's, else "prism"."""
    connection = config.get("connection")
    if not isinstance(connection, str) or not connection:
        raise InvalidArgument("connection", "is required (mongodb://host:port/db)")
    try:
        uri_database = parse_uri(connection).get("database")
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise InvalidArgument("connection", f"not a MongoDB URI: {exc}") from exc
    database = config.get("database") or uri_database or "prism"
    prefix = config.get("collection_prefix", "prism_")
    if not isinstance(database, str) or not isinstance(prefix, str):
        raise InvalidArgument("database", "database and collection_prefix must be strings")
    pool_min = int(_number(config, "pool_min_size", allow_zero=True))
    pool_max = int(_number(config, "pool_max_size"))
    if pool_max < pool_min:
        raise InvalidArgument("pool_max_size", "must be at least pool_min_size")
    return Settings(
        connection=connection,
        database=database,
        prefix=prefix,
        pool_min_size=pool_min,
        pool_max_size=pool_max,
        timeout=_number(config, "timeout_seconds"),
        server_selection_timeout_ms=int(_number(config, "server_selection_timeout_ms")),
        connect_timeout_ms=int(_number(config, "connect_timeout_ms")),
        socket_timeout_ms=int(_number(config, "socket_timeout_ms")),
        health_timeout=_number(config, "health_timeout_seconds"),
    )


def translate(exc: PyMongoError, limit: float) -> NoReturn:
    """Raise the domain error for a connection or timeout failure; anything else (a server
    error we did not expect) is re-raised as is and reported as INTERNAL."""
    if getattr(exc, "timeout", False):
        raise Unavailable(f"mongodb did not answer within {limit:.3g}s", backend="mongodb") from exc
    if isinstance(exc, ConnectionFailure):
        raise Unavailable(f"mongodb unavailable: {exc}", backend="mongodb") from exc
    raise exc


class Mongo:
    """One AsyncMongoClient (it pools connections) and the plugin's database."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.client: AsyncMongoClient[Doc] = AsyncMongoClient(
            s.connection,
            minPoolSize=s.pool_min_size,
            maxPoolSize=s.pool_max_size,
            serverSelectionTimeoutMS=s.server_selection_timeout_ms,
            connectTimeoutMS=s.connect_timeout_ms,
            socketTimeoutMS=s.socket_timeout_ms,
            appname="prism",
            tz_aware=True,
            connect=False,
        )
        # journaled acknowledgement: an acknowledged write survives a crash of the server
        self.db: AsyncDatabase[Doc] = self.client.get_database(
            s.database, write_concern=WriteConcern(w=1, j=True)
        )
        self.server_version = ""

    def name(self, suffix: str) -> str:
        """A collection name of this plugin."""
        return f"{self.settings.prefix}{suffix}"

    @contextlib.asynccontextmanager
    async def call(
        self, ctx: CallContext | None, default: float | None = None
    ) -> AsyncIterator[None]:
        """Bound everything inside by the caller's deadline; driver failures → Unavailable."""
        limit = default or self.settings.timeout
        if ctx is not None:
            limit = ctx.timeout(limit)
        try:
            with pymongo.timeout(max(limit, 0.001)):
                yield
        except PyMongoError as exc:
            translate(exc, limit)

    async def ping(self) -> bool:
        try:
            async with self.call(None, self.settings.health_timeout):
                await self.client.admin.command("ping")
        except Unavailable as exc:
            log.debug("mongodb health check failed: %s", exc)
            return False
        return True

    async def close(self) -> None:
        await self.client.close()
