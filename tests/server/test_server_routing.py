"""The in-process server over real gRPC on loopback: namespace routing, the error mapping on the
wire, deadlines, server streaming, reflection and health. The backend is the test-only `testkv`
plugin (tests/runtime/kvfake.py), so these tests depend on no database and no other plugin."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as kvscan
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2_grpc as kvscan_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as kvttl
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2_grpc as kvttl_grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as ps
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2_grpc as ps_grpc

from plugins.runtime.validation import MAX_VALUE_BYTES
from prismctl.registry import Registry, load_registry
from server.app import ConfigError, PrismServer, ServerOptions, StartupError, create_server
from tests.runtime.kvfake import KvFakePlugin, registry_with_testkv
from tests.support.harness import error_details, namespaced, running_server
from tests.support.wait import eventually

KV = {"backend": "testkv", "config": {"connection": "testkv://local", "slow_seconds": 5}}
CONFIG = {
    "namespaces": [
        {
            "name": "alpha",
            "pattern": "direct",
            "pattern_version": "v1",
            "slots": {"keyvalue": KV, "pubsub": {"backend": "testkv"}},
        },
        {
            "name": "beta",
            "pattern": "direct",
            "pattern_version": "v1",
            "slots": {"keyvalue": {**KV, "interfaces": ["keyvalue_basic"]}},
        },
    ]
}
KV_BASIC = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
KV_SCAN = "prism.interfaces.keyvalue.v1.KeyValueScanService"
PUBSUB = "prism.interfaces.pubsub.v1.PubSubBasicService"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return load_registry(registry_with_testkv(tmp_path_factory.mktemp("reg")))


@pytest.fixture(scope="module")
async def server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PrismServer]:
    data = tmp_path_factory.mktemp("data")
    async with running_server(CONFIG, data, registry=registry, health_interval=0.1) as srv:
        yield srv


@pytest.fixture(scope="module")
async def channel(server: PrismServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_namespaces_keep_the_same_key_apart(
    server: PrismServer, channel: grpc.aio.Channel
) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    await stub.Set(kv.SetRequest(key="k", value=b"a"), metadata=namespaced("alpha"))
    await stub.Set(kv.SetRequest(key="k", value=b"b"), metadata=namespaced("beta"))
    got_a = await stub.Get(kv.GetRequest(key="k"), metadata=namespaced("alpha"))
    got_b = await stub.Get(kv.GetRequest(key="k"), metadata=namespaced("beta"))
    assert (got_a.value, got_b.value) == (b"a", b"b")
    # both namespaces really share one plugin instance: the separation is by namespace
    routes = server.router.routes[KV_BASIC]
    assert routes["alpha"].impl is routes["beta"].impl


async def test_ambiguous_namespace_is_invalid_argument_naming_candidates(
    channel: grpc.aio.Channel,
) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    err = await rpc_error(stub.Get(kv.GetRequest(key="k")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err)
    assert info is not None and bad is not None
    assert info.reason == "NAMESPACE_AMBIGUOUS" and info.domain == "prism"
    assert info.metadata["candidates"] == "alpha, beta"
    assert "alpha, beta" in (err.details() or "")
    assert bad.field_violations[0].field == "x-prism-namespace"


async def test_only_namespace_serving_an_interface_is_the_default(
    channel: grpc.aio.Channel,
) -> None:
    basic = kv_grpc.KeyValueBasicServiceStub(channel)
    await basic.Set(kv.SetRequest(key="scan/1", value=b"x"), metadata=namespaced("alpha"))
    await basic.Set(kv.SetRequest(key="scan/2", value=b"y"), metadata=namespaced("beta"))
    scan = kvscan_grpc.KeyValueScanServiceStub(channel)
    counted = await scan.Count(kvscan.CountRequest(prefix="scan/"))  # no metadata: alpha
    assert counted.count == 1


async def test_namespace_without_the_interface_is_unimplemented(
    channel: grpc.aio.Channel,
) -> None:
    scan = kvscan_grpc.KeyValueScanServiceStub(channel)
    err = await rpc_error(scan.Count(kvscan.CountRequest(prefix=""), metadata=namespaced("beta")))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    info, _ = error_details(err)
    assert info is not None and info.reason == "INTERFACE_NOT_PROVIDED"
    assert info.metadata["namespace"] == "beta"


async def test_unknown_namespace_is_not_found(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    err = await rpc_error(stub.Get(kv.GetRequest(key="k"), metadata=namespaced("gamma")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info, _ = error_details(err)
    assert info is not None and info.reason == "NAMESPACE_NOT_FOUND"


async def test_interface_no_namespace_serves_is_unimplemented(channel: grpc.aio.Channel) -> None:
    ttl = kvttl_grpc.KeyValueTTLServiceStub(channel)
    err = await rpc_error(ttl.GetTTL(kvttl.GetTTLRequest(key="k")))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_bad_input_names_the_field(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    err = await rpc_error(stub.Set(kv.SetRequest(key="", value=b"v"), metadata=namespaced("alpha")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err)
    assert info is not None and bad is not None
    assert info.reason == "INVALID_ARGUMENT"
    assert (
        dict(info.metadata).items()
        >= {
            "backend": "testkv",
            "interface": "keyvalue_basic",
            "namespace": "alpha",
            "field": "key",
        }.items()
    )
    assert bad.field_violations[0].field == "key"
    assert bad.field_violations[0].description == "must not be empty"


async def test_oversize_value_is_invalid_argument_not_a_transport_error(
    channel: grpc.aio.Channel,
) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    too_big = kv.SetRequest(key="big", value=b"x" * (MAX_VALUE_BYTES + 1))
    err = await rpc_error(stub.Set(too_big, metadata=namespaced("alpha")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(err)
    assert bad is not None and bad.field_violations[0].field == "value"


async def test_unexpected_exception_is_internal_with_request_id(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    metadata = (*namespaced("alpha"), ("x-request-id", "req-12345"))
    call = stub.Get(kv.GetRequest(key="boom"), metadata=metadata)
    with caplog.at_level(logging.INFO):
        err = await rpc_error(call)
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "prism.access"]
    assert access[-1]["request_id"] == "req-12345" and access[-1]["code"] == "INTERNAL"
    assert access[-1]["method"].endswith("KeyValueBasicService/Get")
    assert access[-1]["namespace"] == "alpha" and access[-1]["duration_ms"] >= 0
    (bug,) = [r for r in caplog.records if r.name == "prism.errors"]
    assert bug.exc_info is not None and "req-12345" in bug.getMessage()  # traceback logged
    assert err.code() == grpc.StatusCode.INTERNAL
    info, _ = error_details(err)
    assert info is not None and info.reason == "INTERNAL"
    assert info.metadata["request_id"] == "req-12345"
    assert "req-12345" in (err.details() or "")
    assert "kaboom" not in (err.details() or "")  # no internals leak to the client
    assert ("x-request-id", "req-12345") in tuple(await call.trailing_metadata())


async def test_a_refused_call_echoes_the_request_id_in_its_trailers(
    channel: grpc.aio.Channel,
) -> None:
    """An error's status carries trailers of its own; the request id rides along with them."""
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    metadata = (*namespaced("alpha"), ("x-request-id", "bad-key"))
    call = stub.Set(kv.SetRequest(key="", value=b"v"), metadata=metadata)
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = tuple(await call.trailing_metadata())
    assert ("x-request-id", "bad-key") in trailers
    info, _ = error_details(err)  # the status details survive beside it
    assert info is not None and info.reason == "INVALID_ARGUMENT"


async def test_request_id_is_generated_and_echoed(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    call = stub.Exists(kv.ExistsRequest(key="k"), metadata=namespaced("alpha"))
    await call
    echoed = dict(await call.trailing_metadata())
    assert len(str(echoed["x-request-id"])) == 32
    int(str(echoed["x-request-id"]), 16)  # hex


async def test_repeated_headers_are_read_alike_by_routing_and_the_access_log(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """The call's metadata is parsed once and shared: with a namespace and a request id sent
    twice, the call acts in the namespace the access log names, under the id it echoes."""
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    await stub.Set(kv.SetRequest(key="twice", value=b"b"), metadata=namespaced("beta"))
    metadata = (
        *namespaced("alpha"), ("x-request-id", "first"),
        *namespaced("beta"), ("x-request-id", "second"),
    )  # fmt: skip
    call = stub.Get(kv.GetRequest(key="twice"), metadata=metadata)
    with caplog.at_level(logging.INFO):
        got = await call
    assert got.found and got.value == b"b"  # beta's value: alpha has no such key
    (line,) = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "prism.access" and json.loads(r.getMessage())["request_id"] == "second"
    ]
    assert line["namespace"] == "beta" and line["code"] == "OK"
    assert ("x-request-id", "second") in tuple(await call.trailing_metadata())


async def test_deadline_inside_a_slow_backend_call(channel: grpc.aio.Channel) -> None:
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    started = time.monotonic()
    err = await rpc_error(
        stub.Get(kv.GetRequest(key="slow"), metadata=namespaced("alpha"), timeout=0.3)
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0  # not after the backend's 5 s


async def test_server_streaming_fan_out_and_unsubscribe(channel: grpc.aio.Channel) -> None:
    stub = ps_grpc.PubSubBasicServiceStub(channel)
    stream = stub.Subscribe(ps.SubscribeRequest(topic="t"))  # only alpha serves pubsub
    first = await stream.read()
    assert isinstance(first, ps.SubscribeResponse)
    # a stream's request id arrives first, in the initial metadata, for the reader to log
    assert len(dict(await stream.initial_metadata())["x-request-id"]) == 32
    subscription_id = first.started.subscription_id
    await stub.Publish(ps.PublishRequest(topic="t", payload=b"hello"))
    second = await stream.read()
    assert isinstance(second, ps.SubscribeResponse)
    assert second.message.payload == b"hello"
    await stub.Unsubscribe(ps.UnsubscribeRequest(subscription_id=subscription_id))
    assert await asyncio.wait_for(stream.read(), 5) is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await stream.code() == grpc.StatusCode.OK


async def test_reflection_lists_served_services(server: PrismServer) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        services = await asyncio.to_thread(
            lambda: set(ProtoReflectionDescriptorDatabase(channel).get_services())
        )
    finally:
        channel.close()
    assert {KV_BASIC, KV_SCAN, PUBSUB, "grpc.health.v1.Health"} <= services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert "prism.interfaces.keyvalue.v1.KeyValueTTLService" not in services


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return int(reply.status)


async def test_health_per_service_follows_the_backend(
    server: PrismServer, channel: grpc.aio.Channel
) -> None:
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    for service in (KV_BASIC, KV_SCAN, PUBSUB, ""):
        assert await health_of(channel, service) == serving
    plugins = [p for p in server.binder.plugins.values() if isinstance(p, KvFakePlugin)]
    assert len(plugins) == 2  # alpha+beta keyvalue share one; alpha's pubsub has its own
    plugin = next(p for p in plugins if p.implementations()["keyvalue_basic"] is _kv(server))
    plugin.healthy = False
    try:
        await eventually(lambda: _is(channel, KV_BASIC, not_serving), timeout=5)
        assert await health_of(channel, "") == not_serving
    finally:
        plugin.healthy = True
    await eventually(lambda: _is(channel, KV_BASIC, serving), timeout=5)
    assert await health_of(channel, "") == serving


def _kv(server: PrismServer) -> object:
    return server.router.routes[KV_BASIC]["alpha"].impl


async def _is(channel: grpc.aio.Channel, service: str, status: int) -> bool:
    return await health_of(channel, service) == status


def test_data_dir_is_the_one_given(server: PrismServer) -> None:
    assert isinstance(server.data_dir, Path) and server.data_dir.is_dir()


async def test_pattern_without_executor_refuses_to_start(
    registry: Registry, tmp_path: Path
) -> None:
    config = {
        "namespaces": [
            {"name": "x", "pattern": "test-executorless", "slots": {"store": {"backend": "testkv"}}}
        ]
    }
    options = ServerOptions(config=config, data_dir=tmp_path, registry=registry)
    with pytest.raises(StartupError, match="pattern 'test-executorless' has no usable executor"):
        await create_server(options)


async def test_config_findings_refuse_to_start(registry: Registry, tmp_path: Path) -> None:
    config = {"namespaces": [{"name": "x", "pattern": "direct", "slots": {}}]}
    with pytest.raises(ConfigError) as caught:
        await create_server(ServerOptions(config=config, data_dir=tmp_path, registry=registry))
    assert caught.value.diagnostics and all(d.severity == "error" for d in caught.value.diagnostics)
