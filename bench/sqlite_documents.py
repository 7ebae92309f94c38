"""SQLite document queries and search at growing collection sizes, through the plugin directly.

    .venv/bin/python -m bench.sqlite_documents --docs 1000,10000,100000

Each size gets a fresh file loaded with registry-shaped documents (through the plugin's Insert)
and the value indexes the artifact-registry pattern creates. Every operation runs closed-loop
twice: from one caller (latency: p50/p99 of a call that waits for nothing else) and from
`--clients` concurrent callers (throughput, and p50 under that load). Ratios are against a
baseline measured the same way in the same run on the same file: a raw sqlite3 primary-key
SELECT from a thread pool shaped like the plugin's readers. Find-by-lineage and Count on an
indexed field should stay roughly flat across sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prism.interfaces.document.v1 import document_basic_pb2 as basic_pb
from prism.interfaces.document.v1 import document_indexing_pb2 as index_pb
from prism.interfaces.document.v1 import document_query_pb2 as query_pb
from prism.interfaces.document.v1 import document_search_pb2 as search_pb

from bench.common import Result, run_fast
from plugins.runtime.context import CallContext
from plugins.sqlite import SqlitePlugin
from server.patterns.artifact_registry import INDEXES
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.search import FIELDS

NAMESPACE = "default"
VERSIONS_PER_LINEAGE = 3
TYPES = ["persona", "team", "workflow", "skill"]
VISIBILITY = ["public", "public", "private", "unlisted"]
#: a document has topic word i % 10 in its description and kind word (i // 10) % 10 in its
#: name, so a query naming one of each matches 1% of the documents
SEARCH_QUERY = "topic3 kind7"
LIST_FILTER = {
    "$and": [{"visibility": {"$ne": "unlisted"}}, {"deleted": False}, {"is_latest": True}]
}
VOCABULARY = [f"w{i}" for i in range(2000)]
TAGS = [f"tag{i}" for i in range(200)]
LOAD_CONCURRENCY = 256
WARMUP_SECONDS = 0.3


def document(i: int, rng: random.Random) -> dict[str, Any]:
    lineage = i // VERSIONS_PER_LINEAGE
    version = i % VERSIONS_PER_LINEAGE
    words = " ".join(rng.choices(VOCABULARY, k=20))
    return {
        "organization": f"org{lineage % 50}",
        "lineage": f"lineage-{lineage}",
        "name": f"artifact {lineage} kind{(i // 10) % 10}",
        "slug": f"artifact-{lineage}",
        "type": TYPES[lineage % len(TYPES)],
        "version": f"1.{version}.0",
        "is_latest": version == VERSIONS_PER_LINEAGE - 1,
        "deleted": rng.random() < 0.05,
        "visibility": VISIBILITY[lineage % len(VISIBILITY)],
        "metadata": {
            "tags": rng.sample(TAGS, 3),
            "skills": rng.sample(TAGS, 2),
            "description": f"{words} topic{i % 10}",
        },
        "stats": {"downloads": rng.randint(0, 10_000), "trend": rng.random()},
        "source": f"https://example.org/{lineage}",
    }


async def load(plugin: SqlitePlugin, count: int, ctx: CallContext) -> None:
    for name, paths in INDEXES.items():
        await plugin.documents.create_index(
            index_pb.CreateIndexRequest(
                collection=ARTIFACTS,
                index=index_pb.Index(
                    name=name,
                    fields=[index_pb.IndexField(path=p) for p in paths],
                    kind=index_pb.INDEX_KIND_VALUE,
                ),
            ),
            ctx,
        )
    rng = random.Random(count)
    for start in range(0, count, LOAD_CONCURRENCY):
        await asyncio.gather(
            *(
                plugin.documents.insert(
                    basic_pb.InsertRequest(
                        collection=ARTIFACTS, id=f"doc{i:07d}", json=json.dumps(document(i, rng))
                    ),
                    ctx,
                )
                for i in range(start, min(count, start + LOAD_CONCURRENCY))
            )
        )


class RawReader:
    """The baseline: a primary-key SELECT on the same file, from a pool shaped like the
    plugin's readers (one connection per thread, autocommit reads)."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.local = threading.local()
        self.conns: list[sqlite3.Connection] = []

    def _get(self, doc_id: str) -> Any:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False)
            self.local.conn = conn
            self.conns.append(conn)
        return conn.execute(
            "SELECT body FROM docs WHERE ns = ? AND collection = ? AND id = ?",
            (NAMESPACE, ARTIFACTS, doc_id),
        ).fetchone()

    async def get(self, doc_id: str) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._get, doc_id)

    def close(self) -> None:
        self.pool.shutdown()
        for conn in self.conns:
            conn.close()


def operations(
    plugin: SqlitePlugin, raw: RawReader, count: int, ctx: CallContext
) -> dict[str, Callable[[int], Awaitable[object]]]:
    docs = plugin.documents
    lineages = count // VERSIONS_PER_LINEAGE

    def lineage(n: int) -> str:
        return f"lineage-{(n * 7919) % lineages}"

    search_fields = [search_pb.SearchField(path=p, weight=w) for p, w in FIELDS]
    return {
        "baseline": lambda n: raw.get(f"doc{(n * 7919) % count:07d}"),
        "find_lineage": lambda n: docs.find(
            query_pb.FindRequest(
                collection=ARTIFACTS,
                filter=json.dumps({"lineage": lineage(n), "deleted": False}),
                page_size=20,
            ),
            ctx,
        ),
        "find_list": lambda n: docs.find(
            query_pb.FindRequest(
                collection=ARTIFACTS,
                filter=json.dumps(LIST_FILTER),
                sort=[query_pb.SortField(field="name")],
                page_size=20,
            ),
            ctx,
        ),
        "count": lambda n: docs.count(
            query_pb.CountRequest(collection=ARTIFACTS, filter=json.dumps({"lineage": lineage(n)})),
            ctx,
        ),
        "aggregate": lambda n: docs.aggregate(
            query_pb.AggregateRequest(
                collection=ARTIFACTS,
                filter=json.dumps({"deleted": False}),
                group_by="metadata.tags",
                unwind=True,
                page_size=20,
            ),
            ctx,
        ),
        "search": lambda n: docs.search(
            search_pb.SearchRequest(
                collection=ARTIFACTS,
                query=SEARCH_QUERY,
                fields=search_fields,
                filter=json.dumps(LIST_FILTER),
                page_size=20,
            ),
            ctx,
        ),
    }


async def saturate(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    seconds: float,
    drained: Callable[[], Awaitable[object]],
) -> list[float]:
    """Latencies (ms) of the calls that complete within `seconds` after a warm-up, while
    `concurrency` callers issue calls back to back. A call counts when it completes in the
    window whenever it started, so calls queued behind the warm-up do not skew the rate; at the
    end the callers are cancelled (calls still queued for a worker thread never run) and
    `drained` waits for the ones already running, so the next measurement starts on idle threads.
    """
    window_start = time.perf_counter() + WARMUP_SECONDS
    window_end = window_start + seconds
    latencies: list[float] = []

    async def caller(worker: int) -> None:
        n = worker
        while True:
            began = time.perf_counter()
            await call(n)
            done = time.perf_counter()
            if window_start <= done <= window_end:
                latencies.append((done - began) * 1000)
            n += concurrency

    callers = [asyncio.ensure_future(caller(w)) for w in range(concurrency)]
    await asyncio.sleep(WARMUP_SECONDS + seconds)
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await drained()
    return latencies


async def measure(count: int, clients: int, seconds: float, only: set[str] | None) -> list[Result]:
    ctx = CallContext(namespace=NAMESPACE)
    results = []
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
        plugin = SqlitePlugin({}, data_dir=Path(tmp))
        await plugin.start()
        raw = RawReader(plugin.path, threads=plugin.db.readers)

        async def drained() -> None:
            await plugin.db.read(lambda conn: None)
            await asyncio.get_running_loop().run_in_executor(raw.pool, lambda: None)

        try:
            began = time.perf_counter()
            await load(plugin, count, ctx)
            print(f"loaded {count} documents in {time.perf_counter() - began:.1f} s", flush=True)
            for name, call in operations(plugin, raw, count, ctx).items():
                if only is not None and name != "baseline" and name not in only:
                    continue
                for concurrency in (1, clients):
                    latencies = await saturate(call, concurrency, seconds, drained)
                    result = Result(
                        str(count), name, concurrency, len(latencies), seconds, latencies
                    )
                    results.append(result)
                print(f"  {name}: {results[-1].throughput:.1f} calls/s", flush=True)
        finally:
            raw.close()
            await plugin.close()
    return results


def report(results: list[Result], clients: int) -> None:
    """Per size and operation: latency from one caller, throughput and p50 from `clients`
    callers, ratios against that size's baseline, and the one-caller p50 against the smallest
    size (1.0 = flat)."""
    runs = {(r.target, r.operation, r.concurrency): r for r in results}
    sizes = list(dict.fromkeys(r.target for r in results))
    names = list(dict.fromkeys(r.operation for r in results))
    header = (
        f"{'docs':>7} {'operation':<13} {'p50 ms':>8} {'p99 ms':>8} {'× base':>7}"
        f" {'× smallest':>10} | {'calls/s @' + str(clients):>12} {'÷ base':>7} {'p50 ms':>9}"
    )
    print(f"{'one caller':>47} | {clients} concurrent callers")
    print(header)
    print("-" * len(header))
    for name in names:
        for size in sizes:
            one, many = runs.get((size, name, 1)), runs.get((size, name, clients))
            if one is None or many is None:
                continue
            if not one.latencies_ms or not many.latencies_ms:
                print(f"{size:>7} {name:<13} no call completed within the window (raise --seconds)")
                continue
            base_one, base_many = runs[(size, "baseline", 1)], runs[(size, "baseline", clients)]
            smallest = runs[(sizes[0], name, 1)]
            print(
                f"{size:>7} {name:<13} {one.percentile(50):8.2f} {one.percentile(99):8.2f}"
                f" {one.percentile(50) / base_one.percentile(50):7.1f}"
                f" {one.percentile(50) / smallest.percentile(50):10.2f} |"
                f" {many.throughput:12.1f} {many.throughput / base_many.throughput:7.4f}"
                f" {many.percentile(50):9.1f}"
            )
    print(
        "\nbaseline: raw sqlite3 primary-key SELECT on the same file from a pool of the plugin's"
        " reader-thread count, measured the same way"
    )


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    results: list[Result] = []
    for count in (int(n) for n in args.docs.split(",")):
        results += await measure(count, args.clients, args.seconds, only)
    report(results, args.clients)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default="1000,10000,100000", help="comma-separated sizes")
    parser.add_argument("--clients", type=int, default=64, help="concurrent callers")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per operation")
    parser.add_argument("--only", default="", help="comma-separated operations (default: all)")
    run_fast(main(parser.parse_args()))
