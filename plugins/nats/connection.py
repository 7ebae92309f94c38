"""One nats-py client per slot: bounded connect, background reconnects, fast Unavailable.

The client reconnects forever in the background (max_reconnect_attempts=-1), but no call waits
for it: every operation first checks that the client is connected right now and runs under
`ctx.timeout(request_timeout)`, so during an outage calls fail with Unavailable at once and the
plugin recovers by itself when the server is back.

Names. Every subject is `<subject_prefix>.<ns>.<kind>.<...>` and every JetStream stream or
consumer name is `<stream prefix>_<ns>_<kind>_<...>`, where `<ns>` is the namespace's UTF-8
bytes in lowercase RFC 4648 base32 without padding: only [a-z2-7], which is a valid subject
token and a valid stream/consumer name part (no '.', '*', '>', '/', '\\', whitespace), never
contains '_' so names stay unambiguous, and is injective (namespaces "a.b" and "a_b" differ).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# The KV bucket (suffix) of queue leases, dead-letter configs and partition counts.
STATE_BUCKET = "state"


class Unsubscribable(Protocol):
    async def unsubscribe(self) -> None: ...


# What a lost or unanswering server looks like through nats-py.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # nats.errors.TimeoutError and FetchTimeoutError included
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)
# ...plus anything else the client raises (protocol, auth), for connect and health checks
CLIENT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, nats.errors.Error)


@dataclass(frozen=True)
class Settings:
    url: str
    subject_prefix: str = "prism"
    stream_prefix: str = ""
    connect_timeout: float = 2.0
    request_timeout: float = 5.0
    reconnect_wait: float = 0.5
    stream_replicas: int = 1


def namespace_token(namespace: str) -> str:
    """The namespace as a subject token and name part (see the module docstring)."""
    return base64.b32encode(namespace.encode("utf-8")).decode("ascii").rstrip("=").lower()


def subject_prefix(raw: str) -> str:
    """`raw` without a trailing '.', checked to be literal subject tokens ("iot.devices.")."""
    prefix = raw.rstrip(".")
    tokens = prefix.split(".")
    for token in tokens:
        if not token or any(c in "*>" or c.isspace() for c in token):
            raise InvalidArgument(
                "subject_prefix", "must be dot-separated NATS tokens without '*', '>' or spaces"
            )
    return prefix


@dataclass(frozen=True)
class Names:
    """Subjects and JetStream names of one namespace (see the module docstring)."""

    subject_root: str
    name_root: str

    @classmethod
    def of(cls, settings: Settings, ctx: CallContext) -> Names:
        token = namespace_token(ctx.namespace)
        return cls(f"{settings.subject_prefix}.{token}", f"{settings.stream_prefix}_{token}")

    def subject(self, kind: str, rest: str) -> str:
        return f"{self.subject_root}.{kind}.{rest}"

    def stream(self, kind: str, name: str = "") -> str:
        return f"{self.name_root}_{kind}_{name}" if name else f"{self.name_root}_{kind}"


class NatsConnection:
    """The slot's client; `run` is the one way operations reach the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client()
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._buckets: dict[str, KeyValue] = {}
        # called when the connection drops (live subscriptions end: core NATS loses messages)
        self.on_disconnect: list[Callable[[], None]] = []
        # called with every asynchronous client error (e.g. a subscription's slow consumer)
        self.on_error: list[Callable[[Exception], None]] = []

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable("the nats plugin is not connected")
        return self._js

    async def connect(self) -> None:
        """Connect within connect_timeout (Unavailable otherwise); idempotent."""
        async with self._lock:
            if self._js is not None:
                return
            client = Client()
            try:
                await asyncio.wait_for(
                    client.connect(
                        self.settings.url,
                        connect_timeout=self.settings.connect_timeout,  # type: ignore[arg-type]
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=self.settings.reconnect_wait,  # type: ignore[arg-type]
                        ping_interval=5,
                        max_outstanding_pings=2,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    ),
                    self.settings.connect_timeout,
                )
            except CLIENT_ERRORS as exc:
                await client.close()
                raise Unavailable(
                    f"cannot connect to NATS at {self.settings.url}: {exc!r}"
                ) from exc
            self.client = client
            self._js = client.jetstream(timeout=self.settings.request_timeout)

    async def bucket(self, suffix: str) -> KeyValue:
        """The slot's JetStream KV bucket `<stream prefix>_<suffix>`, created on first use (to be
        awaited inside `run`)."""
        kv = self._buckets.get(suffix)
        if kv is None:
            name = f"{self.settings.stream_prefix}_{suffix}"
            try:
                kv = await self.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                kv = await self.js.create_key_value(
                    bucket=name,
                    history=1,
                    storage=api.StorageType.FILE,
                    replicas=self.settings.stream_replicas,
                )
            self._buckets[suffix] = kv
        return kv

    async def close(self) -> None:
        self._buckets.clear()
        if self._js is not None:
            self._js = None
            await self.client.close()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats client error: %r", exc)
        for listener in self.on_error:
            listener(exc)

    async def _on_disconnected(self) -> None:
        if self._js is None:  # our own close()
            return
        log.warning("nats: disconnected, reconnecting in the background")
        for listener in self.on_disconnect:
            listener()

    @staticmethod
    async def _on_reconnected() -> None:
        log.warning("nats: reconnected")

    def ensure_connected(self) -> None:
        """Unavailable unless the client is connected right now (it never waits for a
        reconnect)."""
        if self._js is None or not self.client.is_connected:
            raise Unavailable("NATS is not reachable right now (reconnecting in the background)")

    def timeout(self, ctx: CallContext) -> float:
        return ctx.timeout(self.settings.request_timeout)

    async def run(self, ctx: CallContext, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` bounded by the call's deadline; connection trouble → Unavailable."""
        self.ensure_connected()
        try:
            async with asyncio.timeout(self.timeout(ctx)):  # no task per request
                return await operation()
        except CONNECTION_ERRORS as exc:
            raise Unavailable(f"NATS did not answer: {exc!r}") from exc
        except nats.errors.MaxPayloadError as exc:
            raise ResourceExhausted(
                f"message larger than the NATS server's max_payload ({self.client.max_payload} "
                "bytes); raise max_payload in the server's configuration",
                reason="MESSAGE_TOO_LARGE",
            ) from exc

    async def unsubscribe(self, sub: Unsubscribable) -> None:
        """Best effort: when the connection is gone, so is the subscription."""
        if self.client.is_connected:
            with contextlib.suppress(*CLIENT_ERRORS):
                await sub.unsubscribe()

    async def healthy(self) -> bool:
        """Connected, and JetStream answers a cheap account-info request quickly."""
        if self._js is None or not self.client.is_connected:
            return False
        try:
            await asyncio.wait_for(self._js.account_info(), 1.0)
        except CLIENT_ERRORS:
            return False
        return True

    async def server_version(self) -> str:
        self.ensure_connected()
        return str(self.client.connected_server_version)
