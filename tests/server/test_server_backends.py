"""The server end to end on the real built-in plugins: the embedded default (SQLite) in-process,
memstore and SQLite as `prism-plugin` sidecars, and two namespaces on different backends.
(The conformance suite covers each interface's behaviour; this checks the wiring.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from plugins.runtime.interfaces import catalog
from prismctl.registry import load_registry
from tests.support.harness import namespaced, running_server, running_sidecar


async def test_embedded_default_serves_every_sqlite_interface(tmp_path: Path) -> None:
    async with running_server(None, tmp_path) as server:
        channel = grpc.insecure_channel(server.address)
        try:
            services = await asyncio.to_thread(
                lambda: set(ProtoReflectionDescriptorDatabase(channel).get_services())
            )
        finally:
            channel.close()
        sqlite = load_registry().backends["sqlite"]
        expected = {
            catalog()[iid].service_name
            for iid in sqlite.implements
            if iid.split("_")[0] in {"keyvalue", "document", "queue"}
        }
        assert expected and expected <= services
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = kv_grpc.KeyValueBasicServiceStub(ch)
            await stub.Set(kv.SetRequest(key="k", value=b"v"))  # the only namespace: default
            got = await stub.Get(kv.GetRequest(key="k"), metadata=namespaced("default"))
            assert got.value == b"v"
    assert (tmp_path / "prism.db").is_file()


def two_namespaces(memstore: dict[str, object], sqlite: dict[str, object]) -> dict[str, object]:
    return {
        "namespaces": [
            {"name": "mem", "pattern": "keyvalue", "slots": {"store": memstore}},
            {"name": "lite", "pattern": "keyvalue", "slots": {"store": sqlite}},
        ]
    }


async def check_two_namespaces(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = kv_grpc.KeyValueBasicServiceStub(ch)
        await stub.Set(kv.SetRequest(key="same", value=b"m"), metadata=namespaced("mem"))
        await stub.Set(kv.SetRequest(key="same", value=b"s"), metadata=namespaced("lite"))
        mem = await stub.Get(kv.GetRequest(key="same"), metadata=namespaced("mem"))
        lite = await stub.Get(kv.GetRequest(key="same"), metadata=namespaced("lite"))
        assert (mem.value, lite.value) == (b"m", b"s")
        health = health_pb2_grpc.HealthStub(ch)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_memstore_and_sqlite_in_process(tmp_path: Path) -> None:
    config = two_namespaces({"backend": "memstore"}, {"backend": "sqlite"})
    async with running_server(config, tmp_path) as server:
        await check_two_namespaces(server.address)


async def test_memstore_and_sqlite_as_sidecars(tmp_path: Path) -> None:
    async with (
        running_sidecar("memstore", None, tmp_path / "mem") as mem_address,
        running_sidecar("sqlite", {"path": "side.db"}, tmp_path / "lite") as lite_address,
    ):
        config = two_namespaces(
            {"backend": "memstore", "address": mem_address},
            {"backend": "sqlite", "address": lite_address},
        )
        async with running_server(config, tmp_path / "server") as server:
            await check_two_namespaces(server.address)
    assert (tmp_path / "lite" / "side.db").is_file()
