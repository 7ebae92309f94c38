"""Throwaway Prism servers for tests: an in-process server on port 0, and `prism-plugin`
sidecars as real subprocesses (port read from their `listening on` line).

    async with running_server(config, tmp_path) as server:
        channel = grpc.aio.insecure_channel(server.address)
        await stub.Get(req, metadata=namespaced("ns1"))

    async with running_sidecar("sqlite", {}, tmp_path) as address:
        config = {"namespaces": [{... "slots": {"keyvalue": {"backend": "sqlite",
                                                            "address": address}}}]}
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import yaml
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from plugins.runtime.grpc_adapter import NAMESPACE_HEADER
from prismctl.registry import Registry
from server.app import PrismServer, ServerOptions, create_server
from server.crypto import Keyring

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 30.0


def namespaced(namespace: str) -> tuple[tuple[str, str], ...]:
    """Call metadata selecting `namespace`."""
    return ((NAMESPACE_HEADER, namespace),)


def error_details(
    exc: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    """The ErrorInfo and BadRequest a Prism error status carries (None when absent)."""
    info = bad = None
    trailing: Any = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
    return info, bad


@asynccontextmanager
async def running_server(
    config: Mapping[str, Any] | Path | None,
    data_dir: Path,
    *,
    registry: Registry | None = None,
    health_interval: float = 1.0,
    keyring: Keyring | None = None,
    auth: bool = False,
) -> AsyncIterator[PrismServer]:
    """A started in-process server on 127.0.0.1:0 (None config = the embedded default);
    stopped, plugins closed, at exit. Authentication is off unless `auth` (its tests opt in;
    `server.bootstrap_key` is then the admin key)."""
    server = await create_server(
        ServerOptions(
            listen="127.0.0.1:0",
            config=config,
            data_dir=data_dir,
            registry=registry,
            health_interval=health_interval,
            keyring=keyring,
            auth=auth,
        )
    )
    try:
        await server.start()
        yield server
    finally:
        await server.stop(grace=0.5)


class SidecarProcess:
    """One `prism-plugin` subprocess; restartable on the same port for fault tests."""

    def __init__(
        self,
        backend: str,
        config: Mapping[str, Any] | None,
        data_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.data_dir = data_dir
        self.env = dict(env or os.environ)
        self.config_file: Path | None = None
        if config is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.config_file = data_dir / f"{backend}-sidecar.yaml"
            self.config_file.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        args = [str(BIN / "prism-plugin"), self.backend, "--listen", listen]
        args += ["--data-dir", str(self.data_dir)]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, env=self.env
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), STARTUP_TIMEOUT)
        except TimeoutError:
            await self.kill()
            raise
        text = line.decode().strip()
        prefix = f"prism-plugin {self.backend} listening on "
        if not text.startswith(prefix):
            code = await self.proc.wait()
            raise RuntimeError(f"prism-plugin {self.backend} did not start (exit {code}): {text!r}")
        self.address = text.removeprefix(prefix)
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    async def kill(self) -> None:
        """SIGKILL: the sidecar vanishes without a goodbye (fault tests)."""
        await self._end(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        return await self._end(signal.SIGTERM)

    async def _end(self, sig: int) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            return await proc.wait()


@asynccontextmanager
async def running_sidecar(
    backend: str,
    config: Mapping[str, Any] | None,
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[str]:
    """A `prism-plugin <backend>` subprocess on a free port; yields its HOST:PORT and
    terminates it at exit."""
    sidecar = SidecarProcess(backend, config, data_dir, env)
    await sidecar.start()
    try:
        yield sidecar.address
    finally:
        await sidecar.stop()
