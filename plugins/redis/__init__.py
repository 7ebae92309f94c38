"""The Redis backend (redis.asyncio): KeyValue, Queue, PubSub and Stream on hashes, sorted sets,
Redis Streams, PUBLISH/SUBSCRIBE and Lua scripts."""

from plugins.redis.plugin import RedisPlugin

__all__ = ["RedisPlugin"]
