"""KeyValue Get/Set through prism-server (memstore, SQLite) against a bare gRPC echo server.

    make bench                      # or: .venv/bin/python -m bench.kv --seconds 3

Every target runs in its own process and is driven by the same client in this process, with the
same concurrency, in the same run; the report prints each result's ratio to the echo baseline.
The measured time of each operation and concurrency is split into `--rounds` short runs that
take turns between the targets, so load from other work on the machine drifting during the run
weighs on every target alike instead of on whichever target happened to run then.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import grpc
import yaml
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from bench.common import BIN, Result, closed_loop, print_report, run_fast, spawn

KEYSPACE = 10_000
VALUE = b"x" * 100


def prism_config(backend: str) -> dict[str, object]:
    return {
        "namespaces": [
            {
                "name": "bench",
                "pattern": "keyvalue",
                "pattern_version": "v1",
                "slots": {"store": {"backend": backend}},
            }
        ]
    }


def calls(stub: Any, op: str) -> Callable[[int], Awaitable[object]]:
    """One call of `op` on a KeyValueBasic stub over a grpc.aio channel."""
    if op == "Set":
        # values change on every call: SQLite skips writing unchanged rows
        async def call(n: int) -> object:
            return await stub.Set(
                kv.SetRequest(key=f"k{n % KEYSPACE}", value=VALUE + n.to_bytes(8, "big"))
            )
    else:

        async def call(n: int) -> object:
            return await stub.Get(kv.GetRequest(key=f"k{(n % 20) * 500}"))

    return call


async def measure(
    addresses: dict[str, str], concurrencies: list[int], seconds: float, rounds: int
) -> list[Result]:
    """Every target measured `seconds` per operation and concurrency, in `rounds` turns."""
    stubs: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        for target, address in addresses.items():
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            stubs[target] = kv_grpc.KeyValueBasicServiceStub(channel)
            for i in range(0, KEYSPACE, 500):  # the keys Get reads
                await stubs[target].Set(kv.SetRequest(key=f"k{i}", value=VALUE))
        results: list[Result] = []
        for conc in concurrencies:
            for op in ("Set", "Get"):
                runs = {t: Result(t, op, conc, 0, 0.0, []) for t in stubs}
                for turn in range(rounds):
                    for target, stub in stubs.items():
                        warmup = 0.5 if turn == 0 else 0.1
                        n, elapsed, lat = await closed_loop(
                            calls(stub, op), conc, seconds / rounds, warmup
                        )
                        runs[target].calls += n
                        runs[target].seconds += elapsed
                        runs[target].latencies_ms += lat
                for r in runs.values():
                    print(
                        f"  {r.target:<9} {op} c={conc}: {r.throughput:,.0f} calls/s",
                        file=sys.stderr,
                    )
                results += runs.values()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated in-flight calls")
    parser.add_argument("--targets", default="echo,memstore,sqlite")
    parser.add_argument("--rounds", type=int, default=5, help="turns the targets take")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    addresses: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp, ExitStack() as servers:
        for target in args.targets.split(","):
            if target == "echo":
                command = [sys.executable, "-m", "bench.echo_server"]
            else:
                config = Path(tmp) / f"{target}.yaml"
                config.write_text(yaml.safe_dump(prism_config(target)))
                command = [
                    str(BIN / "prism-server"), "--config", str(config),
                    "--listen", "127.0.0.1:0", "--data-dir", str(Path(tmp) / target),
                    "--no-auth",
                ]  # fmt: skip
            addresses[target] = servers.enter_context(spawn(command, r"listening on (\S+:\d+)"))
        results = run_fast(measure(addresses, concurrencies, args.seconds, args.rounds))
    print()
    print_report(results, baseline_target="echo")


if __name__ == "__main__":
    main()
