"""TLS: the server over TLS and mTLS (plaintext, untrusted and certificate-less clients refused),
the server reaching `prism-plugin` sidecars over TLS and mTLS (a conformance smoke through
both hops), and bad certificate files refused at startup with one line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from prismctl.conformance.runner import cases_for, run_case
from server.app import PrismServer, ServerOptions, StartupError, create_server
from server.tls import ServerTLS
from tests.security.certs import Issued
from tests.security.conftest import PKI
from tests.server.test_server_cli import LISTENING, server_process
from tests.support.harness import BIN, running_sidecar

MEMSTORE: dict[str, Any] = {
    "namespaces": [
        {"name": "default", "pattern": "direct", "slots": {"keyvalue": {"backend": "memstore"}}}
    ]
}
REFUSED = (grpc.StatusCode.UNAVAILABLE,)


@asynccontextmanager
async def tls_server(
    tmp_path: Path, tls: ServerTLS | None, config: Mapping[str, Any] = MEMSTORE, **kw: Any
) -> AsyncIterator[PrismServer]:
    server = await create_server(
        ServerOptions(config=config, data_dir=tmp_path / "data", tls=tls, auth=False, **kw)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


def tls_channel(address: str, pki: PKI, identity: Issued | None = None) -> grpc.aio.Channel:
    ca = pki.ca.cert.read_bytes()
    if identity is None:
        credentials = grpc.ssl_channel_credentials(ca)
    else:
        credentials = grpc.ssl_channel_credentials(
            ca, identity.key.read_bytes(), identity.cert.read_bytes()
        )
    return grpc.aio.secure_channel(address, credentials)


async def round_trip(channel: grpc.aio.Channel, key: str) -> bytes:
    async with channel:
        stub = kv_grpc.KeyValueBasicServiceStub(channel)
        await stub.Set(kv.SetRequest(key=key, value=b"v-" + key.encode()), timeout=10)
        got: kv.GetResponse = await stub.Get(kv.GetRequest(key=key), timeout=10)
        return got.value


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kv_grpc.KeyValueBasicServiceStub(channel).Get(kv.GetRequest(key="k"), timeout=5)
        code: grpc.StatusCode = err.value.code()
        return code


async def test_tls_server_serves_tls_clients_only(tmp_path: Path, pki: PKI) -> None:
    async with tls_server(tmp_path, ServerTLS(pki.server.cert, pki.server.key)) as server:
        assert await round_trip(tls_channel(server.address, pki), "a") == b"v-a"
        # a client certificate is not asked for, so presenting one changes nothing
        assert await round_trip(tls_channel(server.address, pki, pki.client), "b") == b"v-b"
        assert await refused(grpc.aio.insecure_channel(server.address)) in REFUSED
        # a client that does not trust the server's CA refuses the server
        untrusting = grpc.ssl_channel_credentials(pki.other_ca.cert.read_bytes())
        assert await refused(grpc.aio.secure_channel(server.address, untrusting)) in REFUSED


async def test_mtls_requires_a_certificate_from_the_client_ca(tmp_path: Path, pki: PKI) -> None:
    tls = ServerTLS(pki.server.cert, pki.server.key, client_ca=pki.ca.cert)
    async with tls_server(tmp_path, tls) as server:
        assert await refused(tls_channel(server.address, pki)) in REFUSED
        assert await refused(tls_channel(server.address, pki, pki.stranger)) in REFUSED
        assert await refused(grpc.aio.insecure_channel(server.address)) in REFUSED
        assert await round_trip(tls_channel(server.address, pki, pki.client), "c") == b"v-c"


def sidecar_env(pki: PKI, client_ca: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PRISM_PLUGIN_TLS_CERT"] = str(pki.server.cert)
    env["PRISM_PLUGIN_TLS_KEY"] = str(pki.server.key)
    if client_ca:
        env["PRISM_PLUGIN_TLS_CLIENT_CA"] = str(pki.ca.cert)
    return env


def through_sidecar(address: str, tls: Mapping[str, str]) -> dict[str, Any]:
    slot = {"backend": "memstore", "address": address, "tls": dict(tls)}
    return {"namespaces": [{"name": "default", "pattern": "direct", "slots": {"keyvalue": slot}}]}


async def conformance_smoke(server: PrismServer) -> None:
    """The keyvalue_basic and keyvalue_cas cases, client → server → TLS → sidecar."""
    interfaces = ["keyvalue_basic", "keyvalue_cas"]
    cases = cases_for(interfaces)
    assert len(cases) >= 4
    async with grpc.aio.insecure_channel(server.address) as channel:
        for case in cases:
            await run_case(case, channel, interfaces)


async def test_server_reaches_a_tls_sidecar(tmp_path: Path, pki: PKI) -> None:
    env = sidecar_env(pki, client_ca=False)
    async with running_sidecar("memstore", None, tmp_path / "sidecar", env=env) as address:
        assert await refused(grpc.aio.insecure_channel(address)) in REFUSED
        config = through_sidecar(address, {"ca": str(pki.ca.cert)})
        async with tls_server(tmp_path, None, config) as server:
            await conformance_smoke(server)


async def test_server_reaches_an_mtls_sidecar_with_its_client_cert(
    tmp_path: Path, pki: PKI
) -> None:
    env = sidecar_env(pki, client_ca=True)
    async with running_sidecar("memstore", None, tmp_path / "sidecar", env=env) as address:
        without = through_sidecar(address, {"ca": str(pki.ca.cert)})
        with pytest.raises(StartupError, match="did not answer Describe"):
            async with tls_server(tmp_path, None, without, sidecar_timeout=1.0):
                pass
        tls = {"ca": str(pki.ca.cert), "cert": str(pki.client.cert), "key": str(pki.client.key)}
        async with tls_server(tmp_path, None, through_sidecar(address, tls)) as server:
            await conformance_smoke(server)


def run(command: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / command), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "command", [("prism-server",), ("prism-plugin", "memstore")], ids=["server", "plugin"]
)
def test_bad_certificate_files_are_one_line_errors(
    command: tuple[str, ...], tmp_path: Path, pki: PKI
) -> None:
    base: list[str | Path] = [*command[1:], "--listen", "127.0.0.1:0"]
    base += ["--data-dir", tmp_path / "data"]
    name = command[0]
    cert, key = pki.server.cert, pki.server.key
    missing = tmp_path / "missing.pem"
    proc = run(name, *base, "--tls-cert", missing, "--tls-key", key, cwd=tmp_path)
    one_line(proc, 3, str(missing), "cannot read certificate")
    proc = run(name, *base, "--tls-cert", key, "--tls-key", key, cwd=tmp_path)
    one_line(proc, 2, str(key), "not a PEM X.509 certificate")
    proc = run(name, *base, "--tls-cert", cert, "--tls-key", cert, cwd=tmp_path)
    one_line(proc, 2, str(cert), "not a PEM private key")
    proc = run(name, *base, "--tls-cert", cert, "--tls-key", pki.client.key, cwd=tmp_path)
    one_line(proc, 2, "does not match certificate")
    with_ca = [*base, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", missing]
    proc = run(name, *with_ca, cwd=tmp_path)
    one_line(proc, 3, str(missing), "cannot read client CA")
    proc = run(name, *base, "--tls-key", key, cwd=tmp_path)
    assert proc.returncode == 2 and "--tls-cert and --tls-key go together" in proc.stderr
    proc = run(name, *base, "--tls-client-ca", cert, cwd=tmp_path)
    assert proc.returncode == 2 and "--tls-client-ca needs --tls-cert" in proc.stderr


async def test_prism_server_command_serves_mtls(tmp_path: Path, pki: PKI) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text(yaml.safe_dump(MEMSTORE), encoding="utf-8")
    flags = ["--tls-cert", pki.server.cert, "--tls-key", pki.server.key]
    flags += ["--tls-client-ca", pki.ca.cert, "--config", config]
    args = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), *map(str, flags)]
    async with server_process(*args) as (proc, lines):
        assert any("client certificates required (mTLS)" in line for line in lines), lines
        address = lines[-1].removeprefix(LISTENING)
        assert await refused(tls_channel(address, pki)) in REFUSED
        assert await round_trip(tls_channel(address, pki, pki.client), "d") == b"v-d"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
