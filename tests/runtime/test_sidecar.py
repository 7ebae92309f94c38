"""`prism-plugin` as a real subprocess: Describe, health, reflection, namespaced data, the error
mapping on the wire, and its command-line diagnostics. Backend: the test-only `testkv`."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.plugin.v1 import plugin_pb2, plugin_pb2_grpc

from plugins.runtime.interfaces import catalog
from tests.runtime.kvfake import registry_with_testkv, subprocess_env
from tests.support.harness import BIN, SidecarProcess, error_details, namespaced

KV_BASIC = "prism.interfaces.keyvalue.v1.KeyValueBasicService"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return subprocess_env(registry_with_testkv(tmp_path_factory.mktemp("reg")))


@pytest.fixture(scope="module")
async def sidecar(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SidecarProcess]:
    process = SidecarProcess("testkv", {"slow_seconds": 5}, tmp_path_factory.mktemp("sidecar"), env)
    await process.start()
    yield process
    assert await process.stop() == 0  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
async def channel(sidecar: SidecarProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(sidecar.address) as ch:
        yield ch


async def test_listening_line_gives_a_real_port(sidecar: SidecarProcess) -> None:
    assert sidecar.address.startswith("127.0.0.1:") and sidecar.port > 0


async def test_describe_reports_interfaces_with_proto_hashes(channel: grpc.aio.Channel) -> None:
    reply = await plugin_pb2_grpc.PluginServiceStub(channel).Describe(plugin_pb2.DescribeRequest())
    assert reply.backend == "testkv" and reply.version == "0.1.0"
    ids = [i.id for i in reply.interfaces]
    assert ids == ["keyvalue_basic", "keyvalue_scan", "pubsub_basic"]
    for item in reply.interfaces:
        info = catalog()[item.id]
        assert item.service == info.service_name
        assert item.proto_file == info.proto_file
        assert item.proto_sha256 == info.proto_sha256


async def test_health_per_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in (KV_BASIC, "prism.plugin.v1.PluginService", ""):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="prism.No.Such"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_plugin_services(sidecar: SidecarProcess) -> None:
    channel = grpc.insecure_channel(sidecar.address)
    try:
        services = await asyncio.to_thread(
            lambda: set(ProtoReflectionDescriptorDatabase(channel).get_services())
        )
    finally:
        channel.close()
    assert {KV_BASIC, "prism.plugin.v1.PluginService", "grpc.health.v1.Health"} <= services


async def test_namespaces_are_separate_in_one_sidecar(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    await stub.Set(kv.SetRequest(key="k", value=b"one"), metadata=namespaced("one"))
    await stub.Set(kv.SetRequest(key="k", value=b"two"), metadata=namespaced("two"))
    assert (await stub.Get(kv.GetRequest(key="k"), metadata=namespaced("one"))).value == b"one"
    assert (await stub.Get(kv.GetRequest(key="k"))).found is False  # `default` namespace


async def test_errors_carry_error_info_and_bad_request(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(kv.GetRequest(key="x" * 2000), metadata=namespaced("one"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(caught.value)
    assert info is not None and bad is not None
    assert info.metadata["backend"] == "testkv" and info.metadata["namespace"] == "one"
    assert bad.field_violations[0].field == "key"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(kv.GetRequest(key="boom"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prism-plugin"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("slow_seconds: -1\n", "1:15: slow_seconds: -1 is less than the minimum of 0"),
        ("colour: blue\n", "Additional properties are not allowed ('colour' was unexpected)"),
        ("- a\n- b\n", "config must be a YAML mapping"),
        ("connection: redis://x\n", "1:13: connection: 'redis://x' does not match testkv's format"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_bad_config_file_is_one_line_exit_2(
    env: dict[str, str], tmp_path: Path, content: str, expected: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(content, encoding="utf-8")
    done = run_cli(env, "testkv", "--listen", "127.0.0.1:0", "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_exit_3(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    done = run_cli(env, "testkv", "--listen", "127.0.0.1:0", "--config", str(missing))
    assert done.returncode == 3
    assert done.stderr.strip() == f"prism-plugin: {missing}:1:1: no such file"


def test_unknown_and_planned_backends_are_named(env: dict[str, str]) -> None:
    done = run_cli(env, "nosuch", "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "unknown backend 'nosuch'" in done.stderr
    done = run_cli(env, "testplanned", "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "backend 'testplanned' is planned" in done.stderr
    assert "Traceback" not in done.stderr
