"""Where each piece of a namespace's data lives in the Redis keyspace.

Every Redis key starts with the slot's `key_prefix` and then a namespace segment
`<byte length of the namespace>:<namespace>:`. The length prefix makes the segment a prefix-free
code: whatever bytes a namespace or a user key contains (including `:`), two different
(namespace, key) pairs can never produce the same Redis key, so nothing needs escaping. After the
segment a one-letter tag tells the structures apart:

| key | type | what |
|---|---|---|
| `<p>rev` | string | the revision counter shared by every namespace of the prefix |
| `<p><ns>k:<key>` | hash | one entry: `v` value, `r` revision; its Redis TTL is the entry's |
| `<p><ns>i` | sorted set | every key of the namespace, score 0: ZRANGE BYLEX pages by bytes |
| `<p><ns>x` | sorted set | keys with an expiry, scored by expiry time (ms), to prune `i` |
| `<p><ns>q:<queue>:<tag>`, `<p><ns>qm:<id>` | | queues (plugins/redis/queue_scripts.py) |
| `<p><ns>s:<stream>:<tag>` | | streams (plugins/redis/stream_scripts.py) |
| `<p><ns>ps:<topic>` | channel | pub/sub (plugins/redis/pubsub.py) |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keyspace:
    """The Redis keys of one namespace under one key prefix."""

    prefix: bytes
    namespace: str

    @property
    def segment(self) -> bytes:
        ns = self.namespace.encode("utf-8")
        return self.prefix + str(len(ns)).encode("ascii") + b":" + ns + b":"

    @property
    def counter(self) -> bytes:
        return self.prefix + b"rev"

    @property
    def data_prefix(self) -> bytes:
        return self.segment + b"k:"

    def data(self, key: str) -> bytes:
        return self.data_prefix + key.encode("utf-8")

    @property
    def index(self) -> bytes:
        return self.segment + b"i"

    @property
    def expiring(self) -> bytes:
        return self.segment + b"x"

    @property
    def queue_prefix(self) -> bytes:
        """Queue structures: `<queue_prefix><queue>:<tag>` (see plugins/redis/queue_scripts.py;
        queue names never contain `:`)."""
        return self.segment + b"q:"

    def queue_key(self, queue: str, tag: str) -> bytes:
        return self.queue_prefix + f"{queue}:{tag}".encode("ascii")

    @property
    def message_prefix(self) -> bytes:
        return self.segment + b"qm:"

    def stream_prefix(self, stream: str) -> bytes:
        """A stream's keys: `<stream_prefix><tag>` (stream names never contain `:`)."""
        return self.segment + f"s:{stream}:".encode("ascii")

    @property
    def channel_prefix(self) -> bytes:
        return self.segment + b"ps:"


def lex_range(prefix: str, after: str | None) -> tuple[bytes, bytes]:
    """ZRANGE BYLEX bounds for the keys starting with `prefix` (literal bytes: BYLEX has no
    wildcards) that sort after `after` when given.

    UTF-8 never contains the byte 0xFF, so every key starting with `prefix` sorts below
    `prefix + 0xFF`.
    """
    raw = prefix.encode("utf-8")
    low = b"[" + raw if raw else b"-"
    if after is not None:
        low = b"(" + after.encode("utf-8")
    high = b"(" + raw + b"\xff" if raw else b"+"
    return low, high
