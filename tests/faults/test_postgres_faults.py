"""PostgreSQL dies mid-run (SIGKILL of the whole server) and restarts on the same port and data
directory: calls fail fast with UNAVAILABLE, a transaction open across the crash is gone (its
writes never visible), health goes NOT_SERVING, and the pooled plugin reconnects by itself with
every acknowledged write intact (fsync is on in the throwaway cluster)."""

from __future__ import annotations

from pathlib import Path

import grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_transactional_pb2 as tx
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_batch_pb2_grpc import KeyValueBatchServiceStub
from prism.interfaces.keyvalue.v1.keyvalue_transactional_pb2_grpc import (
    KeyValueTransactionalServiceStub,
)

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

BASIC = "prism.interfaces.keyvalue.v1.KeyValueBasicService"
DEADLINE = 3.0
#: well under both the client deadline and the plugin's 5 s default cap: a refused connection
#: is recognised at once instead of waiting for a pool connection that will not come
FAST = 2.0
META = namespaced("faults")


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

            acknowledged = await write_keys(kv, kv_batch, META)
            begun = await txns.BeginTransaction(tx.BeginTransactionRequest(), metadata=META)
            await txns.SetInTransaction(
                tx.SetInTransactionRequest(
                    transaction_id=begun.transaction_id, key="uncommitted", value=b"x"
                ),
                metadata=META,
            )
            assert await health_is(channel, SERVING, BASIC)

            db.kill()

            await expect_unavailable(
                kv.Get(basic.GetRequest(key="k1"), metadata=META, timeout=DEADLINE),
                FAST,
                "postgres",
            )
            await expect_unavailable(
                kv.Set(basic.SetRequest(key="lost", value=b"x"), metadata=META, timeout=DEADLINE),
                FAST,
                "postgres",
            )
            await expect_unavailable(
                txns.Commit(
                    tx.CommitRequest(transaction_id=begun.transaction_id),
                    metadata=META,
                    timeout=DEADLINE,
                ),
                FAST,
                "postgres",
            )

            await await_outage(channel, BASIC)

            db.start()

            await await_recovery(
                channel,
                lambda: kv.Get(basic.GetRequest(key="k0"), metadata=META, timeout=DEADLINE),
                BASIC,
            )
            await check_keys(kv, acknowledged, META)
            for key in ("uncommitted", "lost"):
                assert not (await kv.Exists(basic.ExistsRequest(key=key), metadata=META)).exists
            after = await kv.Set(basic.SetRequest(key="k0", value=b"new"), metadata=META)
            assert after.revision > max(r for _, r in acknowledged.values())
