"""KeyValue and Document workloads through prism-server on every backend, each next to the
backend's own driver doing the same read from the same client process, and a bare gRPC echo
server, all measured in the same run.

    make bench-backends               # or: .venv/bin/python -m bench.backends --seconds 3
    .venv/bin/python -m bench.backends --backends redis,postgres --concurrency 16

Throwaway PostgreSQL / Redis / SecantusDB servers come from tests/support/servers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import yaml
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.interfaces.document.v1 import document_basic_pb2_grpc as doc_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from bench.common import BIN, Result, closed_loop, run_fast, spawn
from prismctl.registry import load_registry
from tests.support.servers import throwaway

KEYS = 1000
VALUE = b"x" * 100
DOCUMENT = {"name": "bench", "tags": ["a", "b"], "n": 1}
Call = Callable[[int], Awaitable[object]]


@asynccontextmanager
async def raw_driver(backend: str, url: str, tmp: Path) -> AsyncIterator[Call | None]:
    """One primary-key read with the backend's own async driver (None for memstore)."""
    if backend == "redis":
        import redis.asyncio as aioredis

        blocking = aioredis.BlockingConnectionPool.from_url(url, max_connections=64)
        redis_client = aioredis.Redis(connection_pool=blocking)
        await redis_client.mset({f"k{i}": VALUE for i in range(KEYS)})

        async def redis_get(n: int) -> object:
            return await redis_client.get(f"k{n % KEYS}")

        yield redis_get
        await redis_client.aclose()
    elif backend == "postgres":
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(url, min_size=8, max_size=32) as pool:
            async with pool.connection() as conn:
                await conn.execute("CREATE TABLE IF NOT EXISTS raw (k text PRIMARY KEY, v bytea)")
                await conn.execute(
                    "INSERT INTO raw SELECT 'k' || i, %s FROM generate_series(0, %s) i "
                    "ON CONFLICT DO NOTHING",
                    (VALUE, KEYS),
                )

            async def pg_get(n: int) -> object:
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT v FROM raw WHERE k = %s", (f"k{n % KEYS}",))
                    return await cur.fetchone()

            yield pg_get
    elif backend == "mongodb":
        from pymongo import AsyncMongoClient

        mongo: Any = AsyncMongoClient(url)
        coll = mongo.bench.raw
        await coll.insert_many([{"_id": f"k{i}", "v": VALUE} for i in range(KEYS)])

        async def mongo_get(n: int) -> object:
            return await coll.find_one({"_id": f"k{n % KEYS}"})

        yield mongo_get
        await mongo.close()
    elif backend == "sqlite":
        path = tmp / "raw.db"
        setup = sqlite3.connect(path)
        setup.execute("CREATE TABLE raw (k TEXT PRIMARY KEY, v BLOB)")
        setup.executemany("INSERT INTO raw VALUES (?, ?)", [(f"k{i}", VALUE) for i in range(KEYS)])
        setup.commit()
        setup.close()
        reader = sqlite3.connect(path, check_same_thread=False)

        def select(key: str) -> object:
            return reader.execute("SELECT v FROM raw WHERE k = ?", (key,)).fetchone()

        async def sqlite_get(n: int) -> object:
            return await asyncio.to_thread(select, f"k{n % KEYS}")

        yield sqlite_get
        reader.close()
    else:
        yield None


def server_config(backend: str, url: str) -> dict[str, Any]:
    spec = load_registry().backends[backend]
    slot: dict[str, Any] = {"backend": backend, "config": {"connection": url} if url else {}}
    slots = {"keyvalue": slot}
    if "document_basic" in spec.implements:
        slots["document"] = slot
    return {
        "namespaces": [
            {"name": "bench", "pattern": "direct", "pattern_version": "v1", "slots": slots}
        ]
    }


async def prism_workloads(address: str, has_documents: bool) -> dict[str, Call]:
    channel = grpc.aio.insecure_channel(address)
    stub = kv_grpc.KeyValueBasicServiceStub(channel)
    for i in range(KEYS):
        await stub.Set(kv.SetRequest(key=f"k{i}", value=VALUE))

    async def kv_get(n: int) -> object:
        return await stub.Get(kv.GetRequest(key=f"k{n % KEYS}"))

    async def kv_set(n: int) -> object:  # values change: SQLite skips unchanged rows
        return await stub.Set(kv.SetRequest(key=f"k{n % KEYS}", value=VALUE + n.to_bytes(8, "big")))

    calls: dict[str, Call] = {"kv-get": kv_get, "kv-set": kv_set}
    if has_documents:
        docs = doc_grpc.DocumentBasicServiceStub(channel)
        body = json.dumps(DOCUMENT)
        for i in range(KEYS):
            await docs.Insert(doc_pb.InsertRequest(collection="bench", id=f"d{i}", json=body))

        async def doc_get(n: int) -> object:
            return await docs.Get(doc_pb.GetRequest(collection="bench", id=f"d{n % KEYS}"))

        async def doc_insert(n: int) -> object:
            return await docs.Insert(doc_pb.InsertRequest(collection="bench", json=body))

        calls |= {"doc-get": doc_get, "doc-insert": doc_insert}
    return calls


async def measure(
    backend: str, url: str, address: str, tmp: Path, concurrency: int, seconds: float
) -> list[Result]:
    results = []
    has_documents = "document_basic" in load_registry().backends[backend].implements
    for name, call in (await prism_workloads(address, has_documents)).items():
        calls, elapsed, lat = await closed_loop(call, concurrency, seconds)
        results.append(Result(backend, name, concurrency, calls, elapsed, lat))
        print(f"  {backend} {name}: {calls / elapsed:,.0f}/s", file=sys.stderr)
    async with raw_driver(backend, url, tmp) as raw:
        if raw is not None:
            calls, elapsed, lat = await closed_loop(raw, concurrency, seconds)
            results.append(Result(backend, "raw-get", concurrency, calls, elapsed, lat))
            print(f"  {backend} raw driver get: {calls / elapsed:,.0f}/s", file=sys.stderr)
    return results


async def measure_echo(address: str, concurrency: int, seconds: float) -> Result:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_grpc.KeyValueBasicServiceStub(channel)

        async def call(n: int) -> object:
            return await stub.Get(kv.GetRequest(key="k"))

        calls, elapsed, lat = await closed_loop(call, concurrency, seconds)
        return Result("echo", "kv-get", concurrency, calls, elapsed, lat)


def report(results: list[Result], echo: Result) -> None:
    raw = {r.target: r for r in results if r.operation == "raw-get"}
    header = (
        f"{'backend':<9} {'operation':<11} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'× raw driver get':>16} {'× echo':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in [echo, *results]:
        base = raw.get(r.target)
        vs_raw = f"{r.throughput / base.throughput:16.2f}" if base and r is not base else f"{'':16}"
        print(
            f"{r.target:<9} {r.operation:<11} {r.throughput:8.0f} {r.percentile(50):7.2f}"
            f" {r.percentile(99):7.2f} {vs_raw} {r.throughput / echo.throughput:7.2f}"
        )
    print(
        f"\nbaselines, same run, {echo.concurrency} in flight: a bare gRPC echo server, and each"
        " backend's own driver reading one key by primary key from this process"
    )


async def run_backend(
    backend: str, stack: AsyncExitStack, tmp: Path, concurrency: int, seconds: float
) -> list[Result]:
    url = ""
    if backend in ("postgres", "redis", "mongodb", "nats"):
        server = stack.enter_context(throwaway(backend))
        url = server.url
    config = tmp / f"{backend}.yaml"
    config.write_text(yaml.safe_dump(server_config(backend, url)))
    command = [
        str(BIN / "prism-server"), "--config", str(config), "--listen", "127.0.0.1:0",
        "--data-dir", str(tmp / backend), "--no-auth",
    ]  # fmt: skip
    address = stack.enter_context(spawn(command, r"listening on (\S+:\d+)"))
    return await measure(backend, url, address, tmp, concurrency, seconds)


async def main_async(backends: list[str], concurrency: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="prism-bench-backends-") as tmp_name:
        tmp = Path(tmp_name)
        with spawn([sys.executable, "-m", "bench.echo_server"], r"listening on (\S+:\d+)") as a:
            echo = await measure_echo(a, concurrency, seconds)
        results: list[Result] = []
        for backend in backends:
            async with AsyncExitStack() as stack:
                results += await run_backend(backend, stack, tmp, concurrency, seconds)
    print()
    report(results, echo)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backends", default="memstore,sqlite,postgres,redis,mongodb")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    run_fast(main_async(args.backends.split(","), args.concurrency, args.seconds))


if __name__ == "__main__":
    main()
