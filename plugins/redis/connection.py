"""One Redis client per plugin instance, and the single place driver errors become domain errors.

The pool is a BlockingConnectionPool: past its size, callers wait (bounded by `pool_timeout`)
instead of failing with "Too many connections". Connect and socket timeouts are bounded and the
driver's own retries are off, so a dead server answers Unavailable within a call's deadline; a
restarted server is picked up again by the pool without help (stale sockets are detected and
reconnected when taken from the pool).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from plugins.redis import queue_scripts, scripts, stream_scripts
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted, Unavailable

T = TypeVar("T")
PoolT = TypeVar("PoolT", bound=aioredis.ConnectionPool)

#: server replies meaning "not now" rather than "bad command"
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS")


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    pool_max_size: int = 32
    pool_timeout: float = 2.0
    connect_timeout: float = 2.0
    socket_timeout: float = 5.0
    #: upper bound of one call when the client sets no deadline
    call_timeout: float = 10.0
    health_timeout: float = 1.0
    #: connections for long-lived work: pub/sub subscriptions, stream followers and consumers
    max_dedicated: int = 1000


class Scripts:
    """The Lua scripts of plugins/redis/scripts.py registered on one client (EVALSHA, loaded
    again by redis-py when a restarted server has lost its script cache)."""

    def __init__(self, client: aioredis.Redis) -> None:
        def register(body: str, prelude: str = scripts.PRELUDE) -> AsyncScript:
            return client.register_script(prelude + body)

        def register_queue(body: str) -> AsyncScript:
            return register(body, queue_scripts.PRELUDE)

        def register_stream(body: str) -> AsyncScript:
            return register(body, stream_scripts.PRELUDE)

        self.set = register(scripts.SET)
        self.delete = register(scripts.DELETE)
        self.batch_set = register(scripts.BATCH_SET)
        self.batch_delete = register(scripts.BATCH_DELETE)
        self.compare_and_swap = register(scripts.COMPARE_AND_SWAP)
        self.compare_and_delete = register(scripts.COMPARE_AND_DELETE)
        self.expire = register(scripts.EXPIRE)
        self.persist = register(scripts.PERSIST)
        self.scan = register(scripts.SCAN)
        self.count = register(scripts.COUNT)
        self.commit = register(scripts.COMMIT)
        self.q_enqueue = register_queue(queue_scripts.ENQUEUE)
        self.q_lease = register_queue(queue_scripts.LEASE)
        self.q_peek = register_queue(queue_scripts.PEEK)
        self.q_ack = register_queue(queue_scripts.ACK)
        self.q_extend = register_queue(queue_scripts.EXTEND)
        self.q_release = register_queue(queue_scripts.RELEASE)
        self.q_redrive = register_queue(queue_scripts.REDRIVE)
        self.q_scheduled = register_queue(queue_scripts.SCHEDULED)
        self.s_append = register_stream(stream_scripts.APPEND)
        self.s_range = register_stream(stream_scripts.RANGE)
        self.s_offsets = register_stream(stream_scripts.OFFSETS)
        self.s_offset_for_time = register_stream(stream_scripts.OFFSET_FOR_TIME)
        self.s_trim = register_stream(stream_scripts.TRIM)
        self.s_set_retention = register_stream(stream_scripts.SET_RETENTION)
        self.s_create_group = register_stream(stream_scripts.CREATE_GROUP)
        self.s_claim_consumer = register_stream(stream_scripts.CLAIM_CONSUMER)
        self.s_leave = register_stream(stream_scripts.LEAVE)
        self.s_ack = register_stream(stream_scripts.ACK)
        self.s_group_state = register_stream(stream_scripts.GROUP_STATE)


class RedisConnection:
    """The client, its scripts, and `run()` which every Redis call goes through."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = self._pool(
            aioredis.BlockingConnectionPool,
            max_connections=settings.pool_max_size,
            timeout=settings.pool_timeout,
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self.scripts = Scripts(self.client)
        # A separate, non-blocking bounded pool for subscriptions and blocking reads (XREAD
        # BLOCK), so they never starve the request pool; past its size: ResourceExhausted.
        self.dedicated_pool = self._pool(
            aioredis.ConnectionPool, max_connections=settings.max_dedicated
        )
        self.dedicated = aioredis.Redis(connection_pool=self.dedicated_pool)
        # Health probes get their own tiny pool: a busy request pool must not read as "down".
        self.probe_pool = self._pool(
            aioredis.ConnectionPool,
            max_connections=2,
            socket_connect_timeout=settings.health_timeout,
            socket_timeout=settings.health_timeout,
        )
        self.probe = aioredis.Redis(connection_pool=self.probe_pool)

    def _pool(self, kind: type[PoolT], **options: Any) -> PoolT:
        """A pool of `kind` on the slot's URL with bounded timeouts and no driver retries
        (`options` override)."""
        settings = {
            "socket_connect_timeout": self.settings.connect_timeout,
            "socket_timeout": self.settings.socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            **options,
        }
        return kind.from_url(self.settings.url, **settings)

    async def run(
        self,
        ctx: CallContext,
        op: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        dedicated: bool = False,
    ) -> T:
        """Run `op` (on the dedicated client when asked) within the call's remaining deadline
        (capped by `call_timeout`), turning the driver's connection failures into Unavailable."""
        limit = ctx.timeout(self.settings.call_timeout)
        return await self._guarded(op(self.dedicated if dedicated else self.client), limit)

    async def eval(
        self,
        ctx: CallContext,
        script: AsyncScript,
        keys: Sequence[bytes],
        args: Sequence[bytes | str | int],
    ) -> Any:
        """Run one registered Lua script."""
        return await self.run(ctx, lambda _: script(keys=keys, args=args))

    async def ping(self) -> bool:
        try:
            await self._guarded(self.probe.ping(), self.settings.health_timeout)
        except (Unavailable, ResourceExhausted):
            return False
        return True

    async def server_version(self) -> str:
        info = await self._guarded(self.client.info("server"), self.settings.call_timeout)
        return str(info.get("redis_version", "unknown"))

    async def close(self) -> None:
        for client, pool in (
            (self.client, self.pool),
            (self.dedicated, self.dedicated_pool),
            (self.probe, self.probe_pool),
        ):
            await client.aclose()
            await pool.disconnect()

    async def _guarded(self, awaitable: Awaitable[T], limit: float) -> T:
        where = self.pool.connection_kwargs.get("host", "redis")
        try:
            async with asyncio.timeout(limit):
                return await awaitable
        except TimeoutError as exc:
            raise Unavailable(f"redis at {where} did not answer within {limit:.3g}s") from exc
        except MaxConnectionsError as exc:  # a local limit (e.g. live subscriptions), not Redis
            raise ResourceExhausted(f"connection limit reached for redis at {where}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise Unavailable(f"redis at {where} is unreachable: {exc}") from exc
        except ResponseError as exc:
            text = str(exc)
            if text.startswith(_TRANSIENT_REPLIES):
                raise Unavailable(f"redis at {where} is not serving: {text}") from exc
            if text.startswith("OOM"):
                raise ResourceExhausted(f"redis at {where} is out of memory: {text}") from exc
            raise
