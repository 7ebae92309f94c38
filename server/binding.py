"""Slots → contract objects: an in-process plugin (via the loader) or a proxy to a sidecar.

In-process plugins are shared by slots with the same backend and config (the embedded default's
three slots use one SQLite file through one plugin). Sidecar channels are shared per address and
reconnect quickly (~1 s backoff), so a sidecar that comes back is used again without a restart.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.plugin.v1 import plugin_pb2, plugin_pb2_grpc

from plugins.runtime.base import BackendPlugin
from plugins.runtime.grpc_adapter import ContractProxy
from plugins.runtime.interfaces import catalog
from plugins.runtime.loader import load_plugin
from plugins.runtime.serving import MESSAGE_SIZE_OPTIONS, Check
from prismctl.config import SlotConfig
from prismctl.registry import Registry
from server.tls import ClientTLS, TLSError

#: keep reconnect attempts to a lost sidecar about a second apart (grpc's default backoff grows
#: to two minutes, which would keep a returned sidecar unused for that long)
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 1000),
    *MESSAGE_SIZE_OPTIONS,
)
DESCRIBE_TIMEOUT = 5.0


class BindError(Exception):
    """A slot that cannot be bound; the message names namespace, slot and the reason."""


@dataclass
class SlotBinding:
    """One filled slot: the contract object per interface it serves, and its health check."""

    namespace: str
    slot: str
    backend: str
    implementations: dict[str, object]
    check: Check
    address: str = ""


@dataclass
class Binder:
    """Creates and owns plugins and sidecar channels for one server."""

    registry: Registry
    data_dir: Path
    #: how long to wait for a sidecar's Describe at startup (it may still be starting)
    describe_timeout: float = DESCRIBE_TIMEOUT
    plugins: dict[str, BackendPlugin] = field(default_factory=dict)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    sidecar_checks: dict[str, Check] = field(default_factory=dict)
    #: per namespace, the cleanups its pattern executor registered (run before plugins close)
    closers: list[list[Callable[[], Awaitable[object]]]] = field(default_factory=list)

    async def bind(self, namespace: str, slot: SlotConfig) -> SlotBinding:
        """Bind one validated slot, requiring every interface it lists (`slot.interfaces`)."""
        where = f"namespace '{namespace}' slot '{slot.name}' ({slot.backend})"
        if slot.address:
            return await self._bind_sidecar(namespace, slot, slot.address, where)
        plugin = await self._plugin(slot.backend, slot.config, where)
        impls = plugin.implementations()
        missing = [iid for iid in slot.interfaces if iid not in impls]
        if missing:
            raise BindError(f"{where}: backend does not implement {', '.join(missing)}")
        return SlotBinding(
            namespace,
            slot.name,
            slot.backend,
            {iid: impls[iid] for iid in slot.interfaces},
            plugin.check_health,
        )

    async def _plugin(self, backend: str, config: dict[str, Any], where: str) -> BackendPlugin:
        key = f"{backend}:{json.dumps(config, sort_keys=True)}"
        plugin = self.plugins.get(key)
        if plugin is None:
            try:
                plugin = load_plugin(backend, config, self.data_dir, self.registry)
                await plugin.start()
            except Exception as exc:
                raise BindError(f"{where}: {exc}") from None
            self.plugins[key] = plugin
        return plugin

    async def _bind_sidecar(
        self, namespace: str, slot: SlotConfig, address: str, where: str
    ) -> SlotBinding:
        # slots reaching one sidecar the same way share a channel (and its health probe)
        channel_key = f"{address} {slot.tls}"
        channel = self.channels.get(channel_key)
        if channel is None:
            channel = _sidecar_channel(address, slot.tls, where)
            self.channels[channel_key] = channel
            self.sidecar_checks[channel_key] = sidecar_health_check(channel)
        try:
            described = await plugin_pb2_grpc.PluginServiceStub(channel).Describe(
                plugin_pb2.DescribeRequest(), timeout=self.describe_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise BindError(
                f"{where}: sidecar at {address} did not answer Describe: "
                f"{exc.code().name} {exc.details()}"
            ) from None
        verify_sidecar(described, slot.backend, address, slot.interfaces, where)
        known = catalog()
        labels = {
            "backend": slot.backend,
            "namespace": namespace,
            "slot": slot.name,
            "address": address,
        }
        impls: dict[str, object] = {
            iid: ContractProxy(known[iid], channel, {**labels, "interface": iid})
            for iid in slot.interfaces
        }
        check = self.sidecar_checks[channel_key]  # one probe per sidecar, however many slots
        return SlotBinding(namespace, slot.name, slot.backend, impls, check, address=address)

    async def close(self) -> None:
        for namespace_closers in self.closers:
            for close in namespace_closers:
                with contextlib.suppress(Exception):
                    await close()
        for plugin in self.plugins.values():
            with contextlib.suppress(Exception):
                await plugin.close()
        for channel in self.channels.values():
            await channel.close(None)
        self.closers.clear()
        self.plugins.clear()
        self.channels.clear()
        self.sidecar_checks.clear()


def _sidecar_channel(address: str, tls: ClientTLS | None, where: str) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        credentials = tls.credentials()
    except TLSError as exc:
        raise BindError(f"{where}: {exc}") from None
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def verify_sidecar(
    described: plugin_pb2.DescribeResponse,
    backend: str,
    address: str,
    needed: list[str],
    where: str,
) -> None:
    """Refuse a sidecar of another backend, or one lacking an interface or built from a
    different proto file than this server."""
    if described.backend != backend:
        raise BindError(
            f"{where}: sidecar at {address} serves backend '{described.backend}', not '{backend}'"
        )
    served = {i.id: i for i in described.interfaces}
    known = catalog()
    for iid in needed:
        if iid not in served:
            raise BindError(f"{where}: sidecar at {address} does not serve {iid}")
        if served[iid].proto_sha256 != known[iid].proto_sha256:
            raise BindError(
                f"{where}: sidecar at {address} serves {iid} from a different "
                f"{known[iid].proto_file} (proto_sha256 {served[iid].proto_sha256[:12]}… "
                f"≠ {known[iid].proto_sha256[:12]}…)"
            )


def sidecar_health_check(channel: grpc.aio.Channel) -> Check:
    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> bool:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.5)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return check
