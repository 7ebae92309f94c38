"""The Redis backend (redis.asyncio): KeyValue on hashes, sorted-set indexes and Lua scripts."""

from plugins.redis.plugin import RedisPlugin

__all__ = ["RedisPlugin"]
