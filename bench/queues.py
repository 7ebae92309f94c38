"""QueueBasic through prism-server on every backend with queue_basic: Enqueue, and a consumer
loop (Dequeue one message, Ack it), at each concurrency, next to a bare gRPC echo server
measured with the same client and concurrency in the same run.

    make bench-queues                 # or: .venv/bin/python -m bench.queues --seconds 3
    .venv/bin/python -m bench.queues --backends nats --concurrency 1,16

Each concurrency gets a fresh queue: the enqueue run fills it, and the consume run then drains
exactly that many messages (or stops at `--seconds`), so consumers never poll an empty queue.
Throwaway PostgreSQL / Redis / NATS servers come from tests/support/servers.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import yaml
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.interfaces.queue.v1 import queue_basic_pb2 as qb
from prism.interfaces.queue.v1 import queue_basic_pb2_grpc as qb_grpc

from bench.common import BIN, Result, closed_loop, run_fast, spawn
from tests.support.servers import throwaway

BACKENDS = "memstore,sqlite,postgres,redis,nats"
SERVERS = ("postgres", "redis", "nats")
PAYLOAD = b"x" * 100
READY = r"listening on (\S+:\d+)"


def server_config(backend: str, url: str) -> dict[str, Any]:
    slot: dict[str, Any] = {"backend": backend, "config": {"connection": url} if url else {}}
    return {
        "namespaces": [
            {
                "name": "bench",
                "pattern": "direct",
                "pattern_version": "v1",
                "slots": {"queue": slot},
            }
        ]
    }


async def measure_echo(address: str, concurrencies: list[int], seconds: float) -> list[Result]:
    """The floor: one unary call answered by a server that does nothing."""
    results = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_grpc.KeyValueBasicServiceStub(channel)

        async def call(n: int) -> object:
            return await stub.Get(kv.GetRequest(key="k"))

        for conc in concurrencies:
            calls, elapsed, lat = await closed_loop(call, conc, seconds)
            results.append(Result("echo", "unary", conc, calls, elapsed, lat))
    return results


async def measure_queue(
    backend: str, address: str, concurrencies: list[int], seconds: float
) -> list[Result]:
    """Enqueue, then Dequeue+Ack of what was enqueued, on a fresh queue per concurrency."""
    results = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = qb_grpc.QueueBasicServiceStub(channel)
        for conc in concurrencies:
            results += await enqueue_then_consume(stub, backend, f"bench-{conc}", conc, seconds)
    return results


async def enqueue_then_consume(
    stub: Any, backend: str, queue: str, conc: int, seconds: float
) -> list[Result]:
    """Fill `queue` for `seconds`, then drain what was enqueued (or stop after `seconds`)."""
    enqueued = 0
    empty = 0

    async def enqueue(n: int) -> object:
        nonlocal enqueued
        enqueued += 1
        return await stub.Enqueue(qb.EnqueueRequest(queue=queue, payload=PAYLOAD))

    async def consume(n: int) -> object:
        nonlocal empty
        got = await stub.Dequeue(qb.DequeueRequest(queue=queue, max_messages=1))
        if not got.messages:
            empty += 1
            return got
        handle = got.messages[0].receipt_handle
        return await stub.Ack(qb.AckRequest(queue=queue, receipt_handle=handle))

    calls, elapsed, lat = await closed_loop(enqueue, conc, seconds)
    filled = Result(backend, "enqueue", conc, calls, elapsed, lat)
    calls, elapsed, lat = await closed_loop(consume, conc, seconds, warmup=0.0, max_calls=enqueued)
    drained = Result(backend, "deq+ack", conc, calls, elapsed, lat)
    print(
        f"  {backend} @{conc}: enqueue {filled.throughput:,.0f}/s,"
        f" dequeue+ack {drained.throughput:,.0f}/s (empty dequeues: {empty})",
        file=sys.stderr,
    )
    return [filled, drained]


def report(results: list[Result], echo: list[Result]) -> None:
    base = {r.concurrency: r for r in echo}
    header = (
        f"{'backend':<9} {'operation':<9} {'conc':>4} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'× echo':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in [*echo, *results]:
        print(
            f"{r.target:<9} {r.operation:<9} {r.concurrency:>4} {r.throughput:8.0f}"
            f" {r.percentile(50):7.2f} {r.percentile(99):7.2f}"
            f" {r.throughput / base[r.concurrency].throughput:7.3f}"
        )
    print(
        "\nbaseline, same run, same client and concurrency: a bare gRPC echo server's unary call;"
        " deq+ack is one Dequeue (max 1) and one Ack"
    )


async def run_backend(
    backend: str, tmp: Path, concurrencies: list[int], seconds: float
) -> list[Result]:
    async with AsyncExitStack() as stack:
        url = stack.enter_context(throwaway(backend)).url if backend in SERVERS else ""
        config = tmp / f"{backend}.yaml"
        config.write_text(yaml.safe_dump(server_config(backend, url)))
        command = [
            str(BIN / "prism-server"), "--config", str(config), "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp / backend), "--no-auth",
        ]  # fmt: skip
        address = stack.enter_context(spawn(command, READY))
        return await measure_queue(backend, address, concurrencies, seconds)


async def main_async(backends: list[str], concurrencies: list[int], seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="prism-bench-queues-") as tmp_name:
        with spawn([sys.executable, "-m", "bench.echo_server"], READY) as address:
            echo = await measure_echo(address, concurrencies, seconds)
        results: list[Result] = []
        for backend in backends:
            results += await run_backend(backend, Path(tmp_name), concurrencies, seconds)
    print()
    report(results, echo)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backends", default=BACKENDS)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    run_fast(main_async(args.backends.split(","), concurrencies, args.seconds))


if __name__ == "__main__":
    main()
