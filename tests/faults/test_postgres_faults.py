"""PostgreSQL dies mid-run (SIGKILL of the whole server) and restarts on the same port and data
directory: calls fail fast with UNAVAILABLE, a transaction open across the crash is gone (its
writes never visible), health goes NOT_SERVING, and the pooled plugin reconnects by itself with
every acknowledged write intact (fsync is on in the throwaway cluster)."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_batch_pb2 as batch
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_transactional_pb2_grpc import (
    KeyValueTransactionalServiceStub,
)

from tests.support.harness import namespaced, running_server
from tests.support.servers import throwaway
from tests.support.wait import eventually

BASIC = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
DEADLINE = 3.0
#: well under both the client deadline and the plugin's 5 s default cap: a refused connection
#: is recognised at once instead of waiting for a pool connection that will not come
FAST = 2.0
META = namespaced("faults")


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=BASIC), timeout=2)
    return int(reply.status)


async def _expect_unavailable(call: Awaitable[object]) -> None:
    """The call fails UNAVAILABLE, fast."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    else:
        raise AssertionError("a call succeeded while postgres was down")
    assert time.monotonic() - started < FAST


async def test_postgres_killed_and_restarted(tmp_path: Path) -> None:
    with throwaway("postgres") as db:
        slot = {"backend": "postgres", "config": {"connection": db.url}}
        config = {
            "namespaces": [{"name": "faults", "pattern": "direct", "slots": {"keyvalue": slot}}]
        }
        async with (
            running_server(config, tmp_path, health_interval=0.2) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            kv = KeyValueBasicServiceStub(channel)
            kv_batch = KeyValueBatchServiceStub(channel)
            txns = KeyValueTransactionalServiceStub(channel)

            acknowledged: dict[str, tuple[bytes, int]] = {}
            for i in range(20):
                reply = await kv.Set(basic.SetRequest(key=f"k{i}", value=b"%d" % i), metadata=META)
                acknowledged[f"k{i}"] = (b"%d" % i, reply.revision)
            entries = [batch.BatchSetEntry(key=f"b{i}", value=b"batch") for i in range(20)]
            batch_reply = await kv_batch.BatchSet(
                batch.BatchSetRequest(entries=entries), metadata=META
            )
            acknowledged |= {r.key: (b"batch", r.revision) for r in batch_reply.results}
            begun = await txns.BeginTransaction(tx.BeginTransactionRequest(), metadata=META)
            await txns.SetInTransaction(
                tx.SetInTransactionRequest(
                    transaction_id=begun.transaction_id, key="uncommitted", value=b"x"
                ),
                metadata=META,
            )
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING

            db.kill()

            await _expect_unavailable(
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=DEADLINE)
            )
            await _expect_unavailable(
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META, timeout=DEADLINE)
            )
            await _expect_unavailable(
                txns.Commit(
                    tx.CommitRequest(transaction_id=begun.transaction_id),
                    metadata=META,
                    timeout=DEADLINE,
                )
            )

            async def health_is(status: int) -> bool:
                return await _health(channel) == status

            await eventually(
                lambda: health_is(health_pb2.HealthCheckResponse.NOT_SERVING),
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
                lambda: health_is(health_pb2.HealthCheckResponse.SERVING),
                message="health did not come back to SERVING",
            )
            for key, (value, revision) in acknowledged.items():
                got = await kv.Get(basic.GetRequest(key=key), metadata=META)
                assert (got.found, got.value, got.revision) == (True, value, revision), key
            for key in ("uncommitted", "lost"):
                assert not (await kv.Exists(basic.ExistsRequest(key=key), metadata=META)).exists
            after = await kv.Set(basic.SetRequest(key="k0", value=b"new"), metadata=META)
            assert after.revision > max(r for _, r in acknowledged.values())
