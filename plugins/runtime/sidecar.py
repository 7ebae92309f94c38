"""`prism-plugin <name> --listen HOST:PORT [--config FILE] [--data-dir DIR]
[--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]`: any plugin as a gRPC sidecar serving
its interfaces, PluginService.Describe, health and reflection (over TLS, optionally mTLS).

The server talks to a sidecar through the same contract it uses in-process
(grpc_adapter.ContractProxy), so a plugin behaves identically in both modes. Data is scoped by
the caller's `x-prism-namespace` (or `default` when a client sends none).
"""

from __future__ import annotations

import os

# before grpc is imported: grpc core would log its own lines for e.g. a port in use, which we
# report once as a one-line diagnostic (GRPC_VERBOSITY set by the user still wins)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from prism.plugin.v1 import plugin_pb2, plugin_pb2_grpc

from plugins.runtime import errors
from plugins.runtime.base import BackendPlugin
from plugins.runtime.grpc_adapter import Target, service_handler
from plugins.runtime.interfaces import catalog
from plugins.runtime.loader import (
    PluginLoadError,
    backend_spec,
    config_errors,
    describe_path,
    instantiate,
    plugin_class,
)
from plugins.runtime.serving import (
    HealthMonitor,
    configure_logging,
    enable_reflection,
    install_uvloop,
    new_server,
    on_shutdown_signals,
)
from plugins.runtime.tls import TLSError, add_port, add_tls_arguments, server_tls_from_args
from prismctl.source import IOProblem, load_yaml

DEFAULT_NAMESPACE = "default"
PLUGIN_SERVICE = plugin_pb2.DESCRIPTOR.services_by_name["PluginService"].full_name


def describe(plugin: BackendPlugin) -> plugin_pb2.DescribeResponse:
    """What PluginService.Describe answers: the contract hashes let the server refuse a sidecar
    built from different protos."""
    known = catalog()
    return plugin_pb2.DescribeResponse(
        backend=plugin.name,
        version=plugin.version,
        interfaces=[
            plugin_pb2.ImplementedInterface(
                id=iid,
                service=known[iid].service_name,
                proto_file=known[iid].proto_file,
                proto_sha256=known[iid].proto_sha256,
            )
            for iid in sorted(plugin.implementations())
        ],
        details=plugin.details(),
    )


class _PluginService(plugin_pb2_grpc.PluginServiceServicer):
    def __init__(self, plugin: BackendPlugin) -> None:
        self._plugin = plugin

    async def Describe(
        self, request: plugin_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> plugin_pb2.DescribeResponse:
        return describe(self._plugin)


class Sidecar:
    """One started plugin served on one port. `start()` binds (port 0 allowed) and serves."""

    def __init__(
        self,
        plugin: BackendPlugin,
        listen: str,
        health_interval: float = 1.0,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.plugin = plugin
        self.listen = listen
        #: None: plaintext
        self.credentials = credentials
        self.health = HealthMonitor(health_interval)
        self.server = new_server()
        self.port = 0

    @property
    def address(self) -> str:
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    def bind(self) -> None:
        """Register every service and bind the port (RuntimeError when it cannot)."""
        plugin = self.plugin
        known = catalog()
        labels = {"backend": plugin.name}
        services: list[str] = []
        for iid, impl in sorted(plugin.implementations().items()):
            info = known[iid]
            target_labels = {**labels, "interface": iid}

            def resolve(
                namespace: str, impl: object = impl, lab: dict[str, str] = target_labels
            ) -> Target:
                ns = namespace or DEFAULT_NAMESPACE
                return Target(ns, impl, {**lab, "namespace": ns})

            self.server.add_generic_rpc_handlers((service_handler(info.service, resolve),))
            services.append(info.service_name)
        plugin_pb2_grpc.add_PluginServiceServicer_to_server(_PluginService(plugin), self.server)
        self.health.watch([*services, PLUGIN_SERVICE], plugin.check_health)
        self.health.add_to_server(self.server)
        enable_reflection(self.server, [*services, PLUGIN_SERVICE])
        self.port = add_port(self.server, self.listen, self.credentials)

    async def start(self) -> None:
        """Start the plugin, then health reporting, then serving."""
        await self.plugin.start()
        await self.health.start()
        await self.server.start()

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.shutdown()
        await self.server.stop(grace)
        await self.plugin.close()


class UsageError(Exception):
    """Bad command line or config file: printed as one line, exit 2 (3 when unreadable)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_config(path: Path | None, spec_name: str) -> dict[str, Any]:
    """The --config FILE mapping, validated against the backend's config_schema; findings are
    located `file:line:col` (prismctl's YAML loader keeps positions)."""
    if path is None:
        config: dict[str, Any] = {}
        src = None
    else:
        try:
            src = load_yaml(path)
        except IOProblem as exc:
            d = exc.diagnostic
            raise UsageError(f"{d.location}: {d.message}", exit_code=3) from None
        if src.diagnostics:
            d = src.diagnostics[0]
            raise UsageError(f"{d.location}: {d.message}")
        if not isinstance(src.data, dict):
            raise UsageError(
                f"{path}:1:1: config must be a YAML mapping (the keys of a slot's config)"
            )
        config = src.data
    spec = backend_spec(spec_name)
    problems = config_errors(spec, config)
    if problems:
        where, message = problems[0]
        location = src.at(where) if src is not None else f"{spec.source_file} (defaults)"
        raise UsageError(f"{location}: {describe_path(where)}: {message}")
    return config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prism-plugin", description="Serve one backend plugin as a gRPC sidecar."
    )
    parser.add_argument("backend", help="backend name, e.g. sqlite or memstore")
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--config", type=Path, help="YAML mapping with the slot config keys")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="default: ./data")
    add_tls_arguments(parser, "PRISM_PLUGIN_")
    args = parser.parse_args(argv)
    args.tls = server_tls_from_args(parser, args)
    return args


def build_plugin(backend: str, config_file: Path | None, data_dir: Path) -> BackendPlugin:
    try:
        config = read_config(config_file, backend)
        spec = backend_spec(backend)
        return instantiate(plugin_class(spec), spec, config, data_dir)
    except PluginLoadError as exc:
        raise UsageError(str(exc)) from None


async def run(args: argparse.Namespace) -> int:
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{args.data_dir}: cannot create data dir: {exc.strerror}", 3) from None
    try:
        credentials = None if args.tls is None else args.tls.credentials()
    except TLSError as exc:
        raise UsageError(str(exc), exc.exit_code) from None
    plugin = build_plugin(args.backend, args.config, args.data_dir)
    stopping = asyncio.Event()
    on_shutdown_signals(stopping.set)  # before anyone can learn the address and signal us
    sidecar = Sidecar(plugin, args.listen, credentials=credentials)
    try:
        sidecar.bind()
    except RuntimeError as exc:  # grpc: the address cannot be bound
        reason = str(exc).split(";")[0]
        raise UsageError(f"cannot listen on {args.listen}: {reason}", 3) from None
    try:
        await sidecar.start()
    except Exception as exc:
        message = (
            exc.message if isinstance(exc, errors.PrismError) else f"{type(exc).__name__}: {exc}"
        )
        raise UsageError(f"backend '{args.backend}' failed to start: {message}", 3) from None
    print(f"prism-plugin {args.backend} listening on {sidecar.address}", flush=True)
    await stopping.wait()
    await sidecar.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    install_uvloop()
    try:
        return asyncio.run(run(args))
    except UsageError as exc:
        print(f"prism-plugin: {exc}", file=sys.stderr)
        return exc.exit_code
