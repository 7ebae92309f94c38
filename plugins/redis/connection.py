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

from plugins.redis import queue_scripts, scripts
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted, Unavailable

T = TypeVar("T")

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


class Scripts:
    """The Lua scripts of plugins/redis/scripts.py registered on one client (EVALSHA, loaded
    again by redis-py when a restarted server has lost its script cache)."""

    def __init__(self, client: aioredis.Redis) -> None:
        def register(body: str, prelude: str = scripts.PRELUDE) -> AsyncScript:
            return client.register_script(prelude + body)

        def register_queue(body: str) -> AsyncScript:
            return register(body, queue_scripts.PRELUDE)

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


class RedisConnection:
    """The client, its scripts, and `run()` which every Redis call goes through."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.pool_max_size,
            timeout=settings.pool_timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self.scripts = Scripts(self.client)

    async def run(self, ctx: CallContext | None, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run `op` within the call's remaining deadline (or `call_timeout`), turning the
        driver's connection failures into Unavailable."""
        limit = (
            self.settings.call_timeout if ctx is None else ctx.timeout(self.settings.call_timeout)
        )
        return await self._guarded(op(self.client), limit)

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
            await self._guarded(self.client.ping(), self.settings.health_timeout)
        except Unavailable:
            return False
        return True

    async def server_version(self) -> str:
        info = await self._guarded(self.client.info("server"), self.settings.call_timeout)
        return str(info.get("redis_version", "unknown"))

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.disconnect()

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
