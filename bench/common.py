"""Shared benchmark machinery: subprocess servers, a closed-loop gRPC load driver, a report."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def run_fast(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when installed (the fastest loop for grpc.aio here)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@contextmanager
def spawn(
    args: Sequence[str],
    ready: str,
    env: dict[str, str] | None = None,
    before: list[str] | None = None,
) -> Iterator[str]:
    """Start a server process and yield the HOST:PORT it announces on stdout in a line matching
    `ready` (a regex with one group for the address); stop it with SIGTERM afterwards. The lines
    printed before that one are appended to `before` when given."""
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            match = re.search(ready, line)
            if match:
                break
            if before is not None:
                before.append(line)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args[0]} did not announce its address")
        else:
            raise RuntimeError(f"{args[0]} exited with {proc.wait()} before listening")
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Result:
    target: str
    operation: str
    concurrency: int
    calls: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def closed_loop(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    seconds: float,
    warmup: float = 0.5,
    max_calls: int | None = None,
) -> tuple[int, float, list[float]]:
    """`concurrency` workers issue `call(n)` back to back for `warmup + seconds` (or until
    `max_calls` calls were issued). A call counts when it completes inside the measured window,
    whenever it started, so slow calls in flight at the window's edges are not lost. Returns
    (counted calls, window length in seconds, their latencies in ms)."""
    latencies: list[float] = []
    issued = 0
    measure_from = time.perf_counter() + warmup
    stop_at = measure_from + seconds
    last_done = measure_from

    async def worker(wid: int) -> None:
        nonlocal issued, last_done
        while max_calls is None or issued < max_calls:
            began = time.perf_counter()
            if began >= stop_at:
                return
            issued += 1
            await call(issued * 1000 + wid)
            done = time.perf_counter()
            if measure_from <= done <= stop_at:
                latencies.append((done - began) * 1000)
                last_done = max(last_done, done)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    window = seconds if max_calls is None else min(seconds, last_done - measure_from)
    return len(latencies), max(window, 1e-9), latencies


def print_report(results: list[Result], baseline_target: str) -> None:
    """One row per run, with throughput and p50/p99 ratios against the baseline run of the same
    operation and concurrency."""
    base = {(r.operation, r.concurrency): r for r in results if r.target == baseline_target}
    header = (
        f"{'target':<10} {'op':<5} {'conc':>4} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'× base calls/s':>14} {'× base p50':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        b = base.get((r.operation, r.concurrency))
        ratio = f"{r.throughput / b.throughput:14.2f}" if b else f"{'-':>14}"
        p50_ratio = f"{r.percentile(50) / b.percentile(50):10.2f}" if b else f"{'-':>10}"
        print(
            f"{r.target:<10} {r.operation:<5} {r.concurrency:>4} {r.throughput:9.0f}"
            f" {r.percentile(50):7.3f} {r.percentile(99):7.3f} {ratio} {p50_ratio}"
        )
    print(
        f"\nbaseline: {baseline_target}, measured with the same client and concurrency in this run"
    )
