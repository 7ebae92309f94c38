"""KeyValue Get/Set through prism-server (memstore, SQLite) against a bare gRPC echo server.

    make bench                      # or: .venv/bin/python -m bench.kv --seconds 3

Every target runs in its own process and is driven by the same client in this process, with the
same concurrency, in the same run; the report prints each result's ratio to the echo baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

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


async def measure(
    target: str, address: str, concurrencies: list[int], seconds: float
) -> list[Result]:
    results: list[Result] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_grpc.KeyValueBasicServiceStub(channel)
        for i in range(0, KEYSPACE, 500):  # the keys Get reads
            await stub.Set(kv.SetRequest(key=f"k{i}", value=VALUE))
        for conc in concurrencies:
            for op in ("Set", "Get"):
                if op == "Set":
                    # values change on every call: SQLite skips writing unchanged rows
                    async def call(n: int) -> object:
                        return await stub.Set(
                            kv.SetRequest(
                                key=f"k{n % KEYSPACE}", value=VALUE + n.to_bytes(8, "big")
                            )
                        )
                else:

                    async def call(n: int) -> object:
                        return await stub.Get(kv.GetRequest(key=f"k{(n % 20) * 500}"))

                calls, elapsed, lat = await closed_loop(call, conc, seconds)
                results.append(Result(target, op, conc, calls, elapsed, lat))
                print(
                    f"  {target:<9} {op} c={conc}: {calls / elapsed:,.0f} calls/s", file=sys.stderr
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated in-flight calls")
    parser.add_argument("--targets", default="echo,memstore,sqlite")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
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
            with spawn(command, r"listening on (\S+:\d+)") as address:
                results += run_fast(measure(target, address, concurrencies, args.seconds))
    print()
    print_report(results, baseline_target="echo")


if __name__ == "__main__":
    main()
