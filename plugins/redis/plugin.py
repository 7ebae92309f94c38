"""RedisPlugin: one redis.asyncio client (BlockingConnectionPool) per slot binding."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugins.redis.connection import RedisConnection, Settings
from plugins.redis.keyvalue import ISOLATION, RedisKeyValue
from plugins.redis.pubsub import RedisPubSub
from plugins.redis.queue import RedisQueue
from plugins.redis.stream import RedisStream
from plugins.runtime.base import BackendPlugin
from plugins.runtime.errors import FailedPrecondition, InvalidArgument

DEFAULT_KEY_PREFIX = "prism:"
MIN_REDIS_MAJOR = 7

KEYVALUE_INTERFACES = (
    "keyvalue_basic",
    "keyvalue_scan",
    "keyvalue_ttl",
    "keyvalue_batch",
    "keyvalue_cas",
    "keyvalue_transactional",
)
QUEUE_INTERFACES = (
    "queue_basic",
    "queue_visibility",
    "queue_dead_letter",
    "queue_delayed",
    "queue_priority",
)
PUBSUB_INTERFACES = ("pubsub_basic", "pubsub_wildcards")
STREAM_INTERFACES = ("stream_basic", "stream_consumer_groups", "stream_replay", "stream_retention")


def _positive(config: Mapping[str, Any], name: str, default: float) -> float:
    value = float(config.get(name, default))
    if value <= 0:
        raise InvalidArgument(name, "must be positive")
    return value


def settings_from(config: Mapping[str, Any]) -> Settings:
    """The connection settings of a slot's `config:` block (already schema-checked)."""
    url = str(config.get("connection", ""))
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidArgument("connection", "must look like redis://host:port/db")
    defaults = Settings(url=url)
    return Settings(
        url=url,
        pool_max_size=int(_positive(config, "pool_max_size", defaults.pool_max_size)),
        pool_timeout=_positive(config, "pool_timeout_seconds", defaults.pool_timeout),
        connect_timeout=_positive(config, "connect_timeout_seconds", defaults.connect_timeout),
        socket_timeout=_positive(config, "socket_timeout_seconds", defaults.socket_timeout),
        max_dedicated=int(_positive(config, "max_subscriptions", defaults.max_dedicated)),
    )


class RedisPlugin(BackendPlugin):
    """KeyValue, Queue, PubSub and Stream on a standalone Redis ≥ 7.0 (PEXPIRETIME, XADD with
    `0-*`, ZRANGE BYLEX/BYSCORE).

    Config: `connection` (redis://host:port/db), `key_prefix` (default "prism:"), `ttl_seconds`
    (expiry of keys written without their own TTL: a cache slot), `pool_max_size`,
    `pool_timeout_seconds`, `connect_timeout_seconds`, `socket_timeout_seconds`,
    `max_subscriptions` (live subscriptions, stream followers and group consumers: one
    connection each).
    """

    name: ClassVar[str] = "redis"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.settings = settings_from(config)
        self.key_prefix = str(config.get("key_prefix", DEFAULT_KEY_PREFIX))
        default_ttl = config.get("ttl_seconds")
        self.default_ttl = None if default_ttl is None else _positive(config, "ttl_seconds", 0)
        self.conn = RedisConnection(self.settings)
        self.keyvalue = RedisKeyValue(self.conn, self.key_prefix.encode("utf-8"), self.default_ttl)
        self.queue = RedisQueue(self.conn, self.key_prefix.encode("utf-8"))
        self.pubsub = RedisPubSub(self.conn, self.key_prefix.encode("utf-8"))
        self.stream = RedisStream(self.conn, self.key_prefix.encode("utf-8"))
        self._version = "unknown"

    def implementations(self) -> Mapping[str, object]:
        return {
            **dict.fromkeys(KEYVALUE_INTERFACES, self.keyvalue),
            **dict.fromkeys(QUEUE_INTERFACES, self.queue),
            **dict.fromkeys(PUBSUB_INTERFACES, self.pubsub),
            **dict.fromkeys(STREAM_INTERFACES, self.stream),
        }

    async def start(self) -> None:
        """Check the server answers (Unavailable if not) and is recent enough."""
        self._version = await self.conn.server_version()
        major = self._version.split(".")[0]
        if not major.isdigit() or int(major) < MIN_REDIS_MAJOR:
            raise FailedPrecondition(
                f"redis {self._version} is too old: the plugin needs Redis >= {MIN_REDIS_MAJOR}.0 "
                "(PEXPIRETIME, XADD with <ms>-*)",
                reason="BACKEND_TOO_OLD",
            )

    async def close(self) -> None:
        await self.pubsub.close()
        await self.conn.close()

    async def check_health(self) -> bool:
        return await self.conn.ping()

    def details(self) -> dict[str, str]:
        return {
            "server_version": self._version,
            "key_prefix": self.key_prefix,
            "pool": f"blocking, max {self.settings.pool_max_size} connections",
            "isolation": ISOLATION,
        }
