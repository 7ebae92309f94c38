"""NatsPlugin: one nats-py client (with JetStream) per slot binding."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from plugins.nats.connection import NatsConnection, Settings, namespace_token, subject_prefix
from plugins.nats.groups import NatsConsumerGroups
from plugins.nats.partitions import DEFAULT_PARTITIONS, MAX_PARTITIONS, NatsPartitions
from plugins.nats.persistent import DEFAULT_MAX_AGE_SECONDS, NatsPersistent
from plugins.nats.pubsub import NatsPubSub
from plugins.nats.queue import NatsQueue
from plugins.nats.stream import NatsStreams
from plugins.nats.subscriptions import Subscriptions
from plugins.runtime.base import BackendPlugin
from plugins.runtime.errors import InvalidArgument, Unavailable

DEFAULT_SUBJECT_PREFIX = "prism"
PUBSUB_INTERFACES = ("pubsub_basic", "pubsub_wildcards", "pubsub_filtering", "pubsub_ordering")
STREAM_INTERFACES = ("stream_basic", "stream_replay", "stream_retention")
QUEUE_INTERFACES = (
    "queue_basic",
    "queue_visibility",
    "queue_dead_letter",
    "queue_delayed",
    "queue_priority",
)


def _positive(config: Mapping[str, Any], name: str, default: float) -> float:
    value = float(config.get(name, default))
    if value <= 0:
        raise InvalidArgument(name, "must be positive")
    return value


def settings_from(config: Mapping[str, Any]) -> Settings:
    """The settings of a slot's `config:` block (already schema-checked)."""
    url = str(config.get("connection", ""))
    if not url.startswith(("nats://", "tls://")):
        raise InvalidArgument("connection", "must look like nats://host:port")
    prefix = subject_prefix(str(config.get("subject_prefix", DEFAULT_SUBJECT_PREFIX)))
    defaults = Settings(url=url)
    return Settings(
        url=url,
        subject_prefix=prefix,
        # distinct subject prefixes get distinct stream names unless stream_name says otherwise
        stream_prefix=str(config.get("stream_name") or "P" + namespace_token(prefix)),
        connect_timeout=_positive(config, "connect_timeout_seconds", defaults.connect_timeout),
        request_timeout=_positive(config, "request_timeout_seconds", defaults.request_timeout),
        reconnect_wait=_positive(config, "reconnect_wait_seconds", defaults.reconnect_wait),
        stream_replicas=int(_positive(config, "stream_replicas", defaults.stream_replicas)),
    )


class NatsPlugin(BackendPlugin):
    """PubSub on core NATS (and a JetStream log for persistent pub/sub); Streams and Queues on
    JetStream streams and KV. registry/backends/nats.yaml says how each interface maps.

    Config: `connection` (nats://host:port), `subject_prefix` (default "prism"), `stream_name`
    (prefix of JetStream stream names), `connect_timeout_seconds`, `request_timeout_seconds`,
    `reconnect_wait_seconds`, `stream_replicas`, `persistent_max_age_seconds` and
    `persistent_max_messages` (retention of each namespace's persistent pub/sub log),
    `stream_partitions` (partition count of new partitioned streams).
    """

    name: ClassVar[str] = "nats"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.settings = settings_from(config)
        self.conn = NatsConnection(self.settings)
        self.subscriptions = Subscriptions()
        self.conn.on_disconnect.append(self._end_live_streams)
        self.pubsub = NatsPubSub(self.conn, self.subscriptions)
        self.persistent = NatsPersistent(
            self.conn,
            self.pubsub,
            self.subscriptions,
            max_age=_positive(config, "persistent_max_age_seconds", DEFAULT_MAX_AGE_SECONDS),
            max_messages=int(config.get("persistent_max_messages", -1)),
        )
        self.streams = NatsStreams(self.conn)
        self.queue = NatsQueue(self.conn)
        self.groups = NatsConsumerGroups(self.conn, self.streams.jetstreams)
        partitions = int(config.get("stream_partitions", DEFAULT_PARTITIONS))
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise InvalidArgument("stream_partitions", f"must be 1 to {MAX_PARTITIONS}")
        self.partitions = NatsPartitions(self.conn, self.streams, partitions)
        self._version = "unknown"

    def implementations(self) -> Mapping[str, object]:
        return {
            **dict.fromkeys(PUBSUB_INTERFACES, self.pubsub),
            **dict.fromkeys(STREAM_INTERFACES, self.streams),
            **dict.fromkeys(QUEUE_INTERFACES, self.queue),
            "pubsub_persistent": self.persistent,
            "stream_consumer_groups": self.groups,
            "stream_partitioning": self.partitions,
        }

    def _end_live_streams(self) -> None:
        self.subscriptions.end_all(Unavailable("the connection to NATS was lost"))

    async def start(self) -> None:
        """Connect (Unavailable within connect_timeout if the server is unreachable)."""
        await self.conn.connect()
        self._version = await self.conn.server_version()

    async def close(self) -> None:
        self.subscriptions.end_all(Unavailable("the nats plugin is shutting down"))
        await self.conn.close()

    async def check_health(self) -> bool:
        return await self.conn.healthy()

    def details(self) -> dict[str, str]:
        return {
            "server_version": self._version,
            "subject_prefix": self.settings.subject_prefix,
            "stream_prefix": self.settings.stream_prefix,
            "max_payload": str(self.conn.client.max_payload),
        }
