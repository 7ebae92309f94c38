"""The NATS backend (nats-py): core NATS pub/sub, JetStream for everything that persists."""

from plugins.nats.plugin import NatsPlugin

__all__ = ["NatsPlugin"]
