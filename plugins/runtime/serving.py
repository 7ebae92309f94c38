"""Pieces both gRPC processes (prism-server and prism-plugin) share: health reporting from
periodic backend checks, reflection over every served service, and shutdown on signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from plugins.runtime.interceptors import RequestLogInterceptor

log = logging.getLogger("prism.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: gRPC's 4 MiB default would reject a request carrying a maximal value (4 MiB plus framing)
#: before validation could answer INVALID_ARGUMENT, and a Get returning one; batches carry more.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

#: True when the backend behind some services answers right now.
Check = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class _Watch:
    services: tuple[str, ...]
    check: Check


class HealthMonitor:
    """Publishes grpc.health.v1 status per service from periodic checks.

    Each watched check covers some service names (a slot's interfaces, a sidecar's services);
    a failing, raising or slow check turns them NOT_SERVING until it passes again. The overall
    "" status is SERVING only while every check passes."""

    def __init__(self, interval: float = 1.0) -> None:
        self.servicer = health_aio.HealthServicer()
        self.interval = interval
        #: a check slower than this counts as failed; not tied to a short test interval, so a
        #: loaded machine does not flap statuses
        self.probe_timeout = max(interval, 2.0)
        self._watches: list[_Watch] = []
        self._task: asyncio.Task[None] | None = None

    def watch(self, services: Iterable[str], check: Check) -> None:
        self._watches.append(_Watch(tuple(services), check))

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def poll_once(self) -> None:
        results = await asyncio.gather(*(self._probe(w.check) for w in self._watches))
        status: dict[str, int] = {}
        for watch, healthy in zip(self._watches, results, strict=True):
            for service in watch.services:
                # a service fed by several checks is only as healthy as the worst of them
                if status.get(service, SERVING) == SERVING:
                    status[service] = SERVING if healthy else NOT_SERVING
        for service, value in status.items():
            await self.servicer.set(service, value)
        await self.servicer.set("", SERVING if all(results) else NOT_SERVING)

    async def _probe(self, check: Check) -> bool:
        try:
            async with asyncio.timeout(self.probe_timeout):
                return await check()
        except Exception as exc:
            log.debug("health check failed: %r", exc)
            return False

    async def start(self) -> None:
        """First poll before returning, so status is right from the first client call."""
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="prism-health")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_once()

    async def shutdown(self) -> None:
        """Everything NOT_SERVING from now on (load balancers drain us), polling stopped."""
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def new_server(*interceptors: grpc.aio.ServerInterceptor) -> grpc.aio.Server:  # type: ignore[type-arg]
    """A grpc.aio server with Prism's request-id interceptor first (so `interceptors`, e.g. the
    rate limiter, see the call's request id) and message size limits."""
    return grpc.aio.server(
        interceptors=[RequestLogInterceptor(), *interceptors], options=MESSAGE_SIZE_OPTIONS
    )


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Reflection over `services` plus health and reflection themselves."""
    names = [
        *services,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)


def on_shutdown_signals(callback: Callable[[], object]) -> None:
    """Run `callback` on SIGTERM or SIGINT (graceful shutdown instead of a traceback)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


def install_uvloop() -> None:
    """uvloop is the fastest event loop for grpc.aio here; plain asyncio when it is missing."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def configure_logging() -> None:
    """One line per record on stderr; access log lines are JSON already. PRISM_LOG_LEVEL
    (default INFO: one access line per call; WARNING silences them) sets the level."""
    name = os.environ.get("PRISM_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelNamesMapping().get(name, logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
