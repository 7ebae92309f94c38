"""The server bound to a real `prism-plugin` subprocess: calls, errors and deadlines relayed
unchanged, streaming through the proxy, the Describe checks, and losing the sidecar (calls
UNAVAILABLE, health NOT_SERVING) then recovering when it returns on the same port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as ps
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2_grpc as ps_grpc
from prism.plugin.v1 import plugin_pb2

from plugins.runtime.interfaces import catalog
from plugins.runtime.serving import MESSAGE_SIZE_OPTIONS
from plugins.runtime.validation import MAX_VALUE_BYTES
from prismctl.registry import Registry, load_registry
from server.app import ServerOptions, StartupError, create_server
from server.binding import BindError, verify_sidecar
from tests.runtime.kvfake import registry_with_testkv, subprocess_env
from tests.support.harness import SidecarProcess, error_details, namespaced, running_server
from tests.support.servers import free_port
from tests.support.wait import eventually

KV_BASIC = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config_for(address: str) -> dict[str, object]:
    return {
        "namespaces": [
            {
                "name": "remote",
                "pattern": "direct",
                "pattern_version": "v1",
                "slots": {
                    "keyvalue": {"backend": "testkv", "address": address},
                    "pubsub": {"backend": "testkv", "address": address},
                },
            }
        ]
    }


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return registry_with_testkv(tmp_path_factory.mktemp("reg"))


@pytest.fixture(scope="module")
def registry(registry_root: Path) -> Registry:
    return load_registry(registry_root)


@pytest.fixture
async def sidecar(
    registry_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SidecarProcess]:
    process = SidecarProcess(
        "testkv",
        {"slow_seconds": 5},
        tmp_path_factory.mktemp("sidecar"),
        subprocess_env(registry_root),
    )
    await process.start()
    yield process
    await process.stop()


async def test_calls_errors_deadlines_and_streams_go_through_the_sidecar(
    sidecar: SidecarProcess, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = tmp_path_factory.mktemp("data")
    async with (
        running_server(config_for(sidecar.address), data, registry=registry) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = kv_grpc.KeyValueBasicServiceStub(channel)
        await stub.Set(kv.SetRequest(key="k", value=b"v"))
        assert (await stub.Get(kv.GetRequest(key="k"))).value == b"v"
        # the sidecar saw the namespace: its data lives under "remote", not "default"
        async with grpc.aio.insecure_channel(sidecar.address) as direct:
            direct_stub = kv_grpc.KeyValueBasicServiceStub(direct)
            assert (await direct_stub.Get(kv.GetRequest(key="k"))).found is False
            remote = await direct_stub.Get(kv.GetRequest(key="k"), metadata=namespaced("remote"))
            assert remote.value == b"v"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Set(kv.SetRequest(key="", value=b"v"), metadata=(("x-request-id", "r1"),))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info, bad = error_details(caught.value)
        assert info is not None and bad is not None
        assert info.reason == "INVALID_ARGUMENT" and bad.field_violations[0].field == "key"
        assert info.metadata["backend"] == "testkv" and info.metadata["namespace"] == "remote"
        assert caught.value.details() == "key: must not be empty"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv.GetRequest(key="boom"), metadata=(("x-request-id", "r-boom"),))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        info, _ = error_details(caught.value)
        assert info is not None and info.metadata["request_id"] == "r-boom"

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv.GetRequest(key="slow"), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0

        largest = kv.SetRequest(key="big", value=b"x" * MAX_VALUE_BYTES)
        await stub.Set(largest)  # > gRPC's 4 MiB default message size, through both hops
        async with grpc.aio.insecure_channel(server.address, options=MESSAGE_SIZE_OPTIONS) as big:
            got = await kv_grpc.KeyValueBasicServiceStub(big).Get(kv.GetRequest(key="big"))
            assert len(got.value) == MAX_VALUE_BYTES

        pubsub = ps_grpc.PubSubBasicServiceStub(channel)
        stream = pubsub.Subscribe(ps.SubscribeRequest(topic="t"))
        first = await stream.read()
        assert isinstance(first, ps.SubscribeResponse) and first.started.subscription_id
        await pubsub.Publish(ps.PublishRequest(topic="t", payload=b"p"))
        second = await stream.read()
        assert isinstance(second, ps.SubscribeResponse) and second.message.payload == b"p"
        stream.cancel()


async def test_sidecar_loss_and_recovery_without_restart(
    sidecar: SidecarProcess, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = tmp_path_factory.mktemp("data")
    config = config_for(sidecar.address)
    async with (
        running_server(config, data, registry=registry, health_interval=0.1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = kv_grpc.KeyValueBasicServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=KV_BASIC))
            return int(reply.status)

        await eventually(lambda: _equals(status(), SERVING), timeout=5)
        await stub.Set(kv.SetRequest(key="k", value=b"v"))

        port = sidecar.port
        await sidecar.kill()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv.GetRequest(key="k"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_details(caught.value)
        assert info is not None and info.reason == "BACKEND_UNAVAILABLE"
        assert info.metadata["address"] == f"127.0.0.1:{port}"
        await eventually(lambda: _equals(status(), NOT_SERVING), timeout=5)

        await sidecar.start(f"127.0.0.1:{port}")

        async def answers() -> bool:
            try:
                reply = await stub.Exists(kv.ExistsRequest(key="k"), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return reply.exists is False  # a fresh in-memory sidecar: the key is gone

        await eventually(answers, timeout=10, interval=0.1)
        await eventually(lambda: _equals(status(), SERVING), timeout=5)


async def _equals(value: object, expected: int) -> bool:
    assert asyncio.iscoroutine(value)
    return bool(await value == expected)


async def test_unreachable_sidecar_refuses_to_start(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    options = ServerOptions(
        config=config_for(f"127.0.0.1:{free_port()}"),
        data_dir=tmp_path_factory.mktemp("data"),
        registry=registry,
        sidecar_timeout=0.5,
    )
    with pytest.raises(StartupError, match="did not answer Describe"):
        await create_server(options)


def described(**changes: str) -> plugin_pb2.DescribeResponse:
    info = catalog()["keyvalue_basic"]
    item = plugin_pb2.ImplementedInterface(
        id=info.id,
        service=info.service_name,
        proto_file=info.proto_file,
        proto_sha256=changes.get("sha", info.proto_sha256),
    )
    return plugin_pb2.DescribeResponse(backend=changes.get("backend", "testkv"), interfaces=[item])


def test_describe_checks_refuse_mismatched_sidecars() -> None:
    verify_sidecar(described(), "testkv", "a:1", ["keyvalue_basic"], "slot")  # accepted
    with pytest.raises(BindError, match="does not serve keyvalue_scan"):
        verify_sidecar(described(), "testkv", "a:1", ["keyvalue_basic", "keyvalue_scan"], "slot")
    with pytest.raises(BindError, match="different prism/interfaces/keyvalue/v1/keyvalue_basic"):
        verify_sidecar(described(sha="0" * 64), "testkv", "a:1", ["keyvalue_basic"], "slot")
    with pytest.raises(BindError, match="serves backend 'redis', not 'testkv'"):
        verify_sidecar(described(backend="redis"), "testkv", "a:1", ["keyvalue_basic"], "slot")
