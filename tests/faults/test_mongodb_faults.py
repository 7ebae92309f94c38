"""The MongoDB-wire server dies mid-run (SIGKILL) and restarts on the same port and data
directory: KeyValue and Document calls fail fast with UNAVAILABLE, health goes NOT_SERVING, and
the plugin's client reconnects by itself with every acknowledged write intact (the throwaway
server syncs every commit; the plugin writes with j=true)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.document.v1 import document_basic_pb2 as doc
from prism.interfaces.document.v1.document_basic_pb2_grpc import DocumentBasicServiceStub
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceStub

from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway
from tests.support.wait import eventually

SERVICES = (
    "prism.interfaces.keyvalue.v1.KeyValueBasicService",
    "prism.interfaces.document.v1.DocumentBasicService",
)
DEADLINE = 3.0
META = namespaced("faults")


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(reply.status)


async def _all_health(channel: grpc.aio.Channel, status: int) -> bool:
    return all([await _health(channel, s) == status for s in SERVICES])


async def _expect_unavailable(call: Awaitable[object]) -> None:
    """The call fails UNAVAILABLE, before the client's deadline would have fired."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    else:
        raise AssertionError("a call succeeded while mongodb was down")
    assert time.monotonic() - started < DEADLINE


async def test_mongodb_killed_and_restarted(tmp_path: Path) -> None:
    with throwaway("mongodb") as db:
        slot = {"backend": "mongodb", "config": {"connection": db.url, "timeout_seconds": 1}}
        config = {
            "namespaces": [
                {
                    "name": "faults",
                    "pattern": "direct",
                    "slots": {"keyvalue": slot, "document": slot},
                }
            ]
        }
        async with (
            running_server(config, tmp_path, health_interval=0.2) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            kv = KeyValueBasicServiceStub(channel)
            kv_batch = KeyValueBatchServiceStub(channel)
            docs = DocumentBasicServiceStub(channel)

            acknowledged: dict[str, tuple[bytes, int]] = {}
            for i in range(20):
                reply = await kv.Set(basic.SetRequest(key=f"k{i}", value=b"%d" % i), metadata=META)
                acknowledged[f"k{i}"] = (b"%d" % i, reply.revision)
            entries = [batch.BatchSetEntry(key=f"b{i}", value=b"batch") for i in range(20)]
            batch_reply = await kv_batch.BatchSet(
                batch.BatchSetRequest(entries=entries), metadata=META
            )
            acknowledged |= {r.key: (b"batch", r.revision) for r in batch_reply.results}
            documents = {}
            for i in range(10):
                inserted = await docs.Insert(
                    doc.InsertRequest(collection="c", id=f"d{i}", json=json.dumps({"n": i})),
                    metadata=META,
                )
                documents[f"d{i}"] = inserted.document
            assert await _all_health(channel, health_pb2.HealthCheckResponse.SERVING)

            db.kill()

            await _expect_unavailable(
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=DEADLINE)
            )
            await _expect_unavailable(
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META, timeout=DEADLINE)
            )
            await _expect_unavailable(
                docs.Get(doc.GetRequest(collection="c", id="d1"), metadata=META, timeout=DEADLINE)
            )
            await _expect_unavailable(
                docs.Insert(
                    doc.InsertRequest(collection="c", id="lost", json="{}"),
                    metadata=META,
                    timeout=DEADLINE,
                )
            )
            await eventually(
                lambda: _all_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING),
                message="health did not go NOT_SERVING",
            )

            db.start()

            async def answers() -> bool:
                try:
                    await kv.Get(basic.GetRequest(key="k0"), metadata=META, timeout=DEADLINE)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return False
                return True

            await eventually(answers, timeout=20, message="plugin did not recover")
            await eventually(
                lambda: _all_health(channel, health_pb2.HealthCheckResponse.SERVING),
                message="health did not come back to SERVING",
            )
            for key, (value, revision) in acknowledged.items():
                got = await kv.Get(basic.GetRequest(key=key), metadata=META)
                assert (got.found, got.value, got.revision) == (True, value, revision), key
            assert not (await kv.Exists(basic.ExistsRequest(key="lost"), metadata=META)).exists
            for doc_id, stored in documents.items():
                got_doc = await docs.Get(doc.GetRequest(collection="c", id=doc_id), metadata=META)
                assert got_doc.document == stored, doc_id
            try:
                await docs.Get(doc.GetRequest(collection="c", id="lost"), metadata=META)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            else:
                raise AssertionError("a document written while mongodb was down exists")
            after = await kv.Set(basic.SetRequest(key="k0", value=b"new"), metadata=META)
            assert after.revision not in {r for _, r in acknowledged.values()}
