"""The MongoDB-wire server dies mid-run (SIGKILL) and restarts on the same port and data
directory: KeyValue and Document calls fail fast with UNAVAILABLE, health goes NOT_SERVING, and
the plugin's client reconnects by itself with every acknowledged write intact (the throwaway
server syncs every commit; the plugin writes with j=true)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from prism.interfaces.document.v1 import document_basic_pb2 as doc
from prism.interfaces.document.v1.document_basic_pb2_grpc import DocumentBasicServiceStub
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceStub

from tests.support.faults import (
    SERVING,
    await_outage,
    await_recovery,
    check_keys,
    expect_unavailable,
    health_is,
    write_keys,
)
from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway

SERVICES = (
    "prism.interfaces.keyvalue.v1.KeyValueBasicService",
    "prism.interfaces.document.v1.DocumentBasicService",
)
DEADLINE = 3.0
META = namespaced("faults")


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

            acknowledged = await write_keys(kv, kv_batch, META)
            documents = {}
            for i in range(10):
                inserted = await docs.Insert(
                    doc.InsertRequest(collection="c", id=f"d{i}", json=json.dumps({"n": i})),
                    metadata=META,
                )
                documents[f"d{i}"] = inserted.document
            assert await health_is(channel, SERVING, *SERVICES)

            db.kill()

            await expect_unavailable(
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=DEADLINE),
                DEADLINE,
                "mongodb",
            )
            await expect_unavailable(
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META, timeout=DEADLINE),
                DEADLINE,
                "mongodb",
            )
            await expect_unavailable(
                docs.Get(doc.GetRequest(collection="c", id="d1"), metadata=META, timeout=DEADLINE),
                DEADLINE,
                "mongodb",
            )
            await expect_unavailable(
                docs.Insert(
                    doc.InsertRequest(collection="c", id="lost", json="{}"),
                    metadata=META,
                    timeout=DEADLINE,
                ),
                DEADLINE,
                "mongodb",
            )
            await await_outage(channel, *SERVICES)

            db.start()

            await await_recovery(
                channel,
                lambda: kv.Get(basic.GetRequest(key="k0"), metadata=META, timeout=DEADLINE),
                *SERVICES,
            )
            await check_keys(kv, acknowledged, META)
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
