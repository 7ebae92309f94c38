"""The artifact registry under load: GetArtifact (cached and uncached), GetArtifactBySlug,
CreateArtifact, SearchArtifacts, ListArtifacts and CountArtifacts with concurrent clients, at
several corpus sizes, on the embedded default (SQLite) and on PostgreSQL, against a bare gRPC
echo server in the same run.

    make bench-registry                   # sizes 1k,10k; add --sizes 1000,10000,100000
    .venv/bin/python -m bench.registry --targets sqlite --sizes 1000 --seconds 2

Each target runs twice: `--no-auth` (what the registry costs) and `+auth` (authentication on,
calls made with an editor key of one of the corpus's 50 organizations, so every read checks
visibility and every listing is limited to public artifacts and that organization's; one
artifact in ten is private).

Corpora are bulk-loaded with ImportPack (the registry's own API), then each operation runs
closed-loop for --seconds. "uncached" reads touch every id once, so the L1/L2 caches cannot
answer them; "cached" reads cycle over 100 ids. "list" reads the latest versions by name, 20 a
page, cycling over the first LIST_PAGES pages (a later page follows the token a previous call
got); "count" counts what that listing lists.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import yaml
from prism.admin.v1 import key_admin_pb2 as keys_pb
from prism.admin.v1 import key_admin_pb2_grpc as keys_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as pb_grpc

from bench.common import BIN, Result, closed_loop, run_fast, spawn

WORDS = [
    "code",
    "review",
    "test",
    "deploy",
    "data",
    "chat",
    "voice",
    "vision",
    "plan",
    "write",
    "translate",
    "search",
    "summarize",
    "refactor",
    "debug",
    "security",
    "audit",
    "design",
    "research",
    "sales",
    "support",
    "legal",
    "finance",
    "teach",
]
ROLES = [
    "assistant",
    "reviewer",
    "agent",
    "coach",
    "analyst",
    "writer",
    "planner",
    "bot",
    "expert",
    "tutor",
]
IMPORT_BATCH = 2000
#: "list" cycles over this many pages of the listing: the first one and the ones after it
LIST_PAGES = 5
#: artifacts made by the "create" operation, numbered after any corpus
CREATED = itertools.count(10_000_000)
#: the organization whose editor key the +auth runs use (and where "create" creates)
MEMBER_ORG = "org0"
BOOTSTRAP = re.compile(r"bootstrap admin key .*: (\S+)")
Metadata = tuple[tuple[str, str], ...]


def corpus_artifact(i: int) -> pb.Artifact:
    rng = random.Random(i)
    topic = rng.sample(WORDS, 3)
    name = f"{topic[0].title()} {rng.choice(ROLES).title()} {i}"
    source = f"persona P{i} {{ focus: {' '.join(topic)} }}"
    org = f"org{i % 50}"
    slug = f"{topic[0]}-{i}"
    version = "1.0.0"
    return pb.Artifact(
        id=hashlib.sha256(f"{org}/{slug}@{version}".encode()).hexdigest()[:32],
        organization=org,
        name=name,
        slug=slug,
        type=pb.ARTIFACT_TYPE_PERSONA,
        version=version,
        source=source,
        source_sha256=hashlib.sha256(source.encode()).hexdigest(),
        visibility=pb.VISIBILITY_PRIVATE if i % 10 == 0 else pb.VISIBILITY_PUBLIC,
        state=pb.VERSION_STATE_PUBLISHED,
        metadata=pb.ArtifactMetadata(
            description=f"An {' and '.join(topic)} helper", tags=topic[:2], skills=topic[1:]
        ),
    )


def pack(artifacts: list[pb.Artifact]) -> list[pb.PackChunk]:
    """A valid PCLPack for ImportPack (same digest rule as the server's export)."""
    chunks = [
        pb.PackChunk(
            manifest=pb.PackManifest(
                format="pclpack/1",
                artifacts=[
                    pb.LockedArtifact(
                        id=a.id,
                        name=f"{a.organization}/{a.slug}",
                        version=a.version,
                        source_sha256=a.source_sha256,
                    )
                    for a in artifacts
                ],
            )
        ),
        *(pb.PackChunk(artifact=a) for a in artifacts),
    ]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.SerializeToString(deterministic=True))
    trailer = pb.PackTrailer(pack_sha256=digest.hexdigest(), artifact_count=len(artifacts))
    return [*chunks, pb.PackChunk(trailer=trailer)]


async def load(
    stub: pb_grpc.ArtifactRegistryServiceAsyncStub, start: int, stop: int, admin: Metadata
) -> None:
    for first in range(start, stop, IMPORT_BATCH):
        batch = [corpus_artifact(i) for i in range(first, min(stop, first + IMPORT_BATCH))]
        request = pb.ImportPackRequest(chunks=pack(batch))
        async for event in stub.ImportPack(request, timeout=600, metadata=admin):
            if event.HasField("summary") and event.summary.issues:
                raise RuntimeError(f"import failed: {event.summary.issues[0]}")
        print(f"    loaded {min(stop, first + IMPORT_BATCH)}", file=sys.stderr)


Call = Callable[[int], Awaitable[object]]


def readable(i: int) -> bool:
    """Whether the member key may read corpus artifact i (private ones only of its own org)."""
    return i % 10 != 0 or f"org{i % 50}" == MEMBER_ORG


def operations(
    stub: pb_grpc.ArtifactRegistryServiceAsyncStub, size: int, start_fresh: int, md: Metadata
) -> dict[str, Call]:
    """Reads touch only artifacts the caller may read, so both modes do the same work."""
    fresh = (i for i in itertools.count(start_fresh) if readable(i))
    hot = [corpus_artifact(i).id for i in range(200) if readable(i)][:100]
    slugs = [i for i in range(size) if readable(i)]

    async def uncached(n: int) -> object:
        request = pb.GetArtifactRequest(id=corpus_artifact(next(fresh)).id)
        return await stub.GetArtifact(request, metadata=md)

    async def cached(n: int) -> object:
        return await stub.GetArtifact(pb.GetArtifactRequest(id=hot[n % 100]), metadata=md)

    async def by_slug(n: int) -> object:
        a = corpus_artifact(slugs[n % len(slugs)])
        return await stub.GetArtifactBySlug(
            pb.GetArtifactBySlugRequest(organization=a.organization, slug=a.slug), metadata=md
        )

    async def create(n: int) -> object:
        a = corpus_artifact(next(CREATED))
        a.ClearField("id")
        a.organization = MEMBER_ORG
        return await stub.CreateArtifact(pb.CreateArtifactRequest(artifact=a), metadata=md)

    async def search(n: int) -> object:
        rng = random.Random(n)
        query = f"{rng.choice(WORDS)} {rng.choice(ROLES)}"
        request = pb.SearchArtifactsRequest(query=query, page_size=10)
        return await stub.SearchArtifacts(request, metadata=md)

    listing = pb.ArtifactFilter(latest_only=True)
    #: page k's token, learnt from page k-1's answer (keyset tokens: the same for every call)
    tokens = {0: ""}

    async def list_page(n: int) -> object:
        page = n % LIST_PAGES
        if page not in tokens:
            page = 0
        request = pb.ListArtifactsRequest(filter=listing, page_size=20, page_token=tokens[page])
        response = await stub.ListArtifacts(request, metadata=md)
        if response.next_page_token:
            tokens[page + 1] = response.next_page_token
        return response

    async def count(n: int) -> object:
        return await stub.CountArtifacts(pb.CountArtifactsRequest(filter=listing), metadata=md)

    return {
        "get-uncached": uncached,
        "get-cached": cached,
        "get-by-slug": by_slug,
        "create": create,
        "search": search,
        "list": list_page,
        "count": count,
    }


async def member_key(channel: grpc.aio.Channel, admin: Metadata) -> Metadata:
    """An editor key of MEMBER_ORG, made with the bootstrap key."""
    created = await keys_grpc.KeyAdminServiceStub(channel).CreateKey(
        keys_pb.CreateKeyRequest(
            name="bench", owner="bench", organization=MEMBER_ORG, roles=[keys_pb.ROLE_EDITOR]
        ),
        metadata=admin,
    )
    return (("authorization", f"Bearer {created.secret_key}"),)


async def measure_registry(
    target: str,
    address: str,
    sizes: list[int],
    concurrency: int,
    seconds: float,
    bootstrap_key: str | None,
) -> list[Result]:
    results: list[Result] = []
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.ArtifactRegistryServiceStub(channel)
        admin: Metadata = ()
        member: Metadata = ()
        if bootstrap_key is not None:
            admin = (("authorization", f"Bearer {bootstrap_key}"),)
            member = await member_key(channel, admin)
        loaded = 0
        for size in sizes:
            await load(stub, loaded, size, admin)
            previous, loaded = loaded, size
            # ids below the previous size were read at that size: only new ones are cold
            for name, call in operations(stub, size, previous, member).items():
                # every uncached read is a first touch: no warm-up, at most one pass over the ids
                first_touch = name == "get-uncached"
                calls, elapsed, lat = await closed_loop(
                    call,
                    concurrency,
                    seconds,
                    warmup=0 if first_touch else 0.2,
                    max_calls=sum(map(readable, range(previous, size))) if first_touch else None,
                )
                results.append(Result(f"{target}@{size}", name, concurrency, calls, elapsed, lat))
                print(f"  {target}@{size} {name}: {calls / elapsed:,.0f}/s", file=sys.stderr)
    return results


async def measure_echo(address: str, concurrency: int, seconds: float) -> Result:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_grpc.KeyValueBasicServiceStub(channel)

        async def call(n: int) -> object:
            return await stub.Get(kv.GetRequest(key="k"))

        calls, elapsed, lat = await closed_loop(call, concurrency, seconds)
        return Result("echo", "unary", concurrency, calls, elapsed, lat)


@contextmanager
def prism_server(target: str, tmp: Path, auth: bool) -> Iterator[tuple[str, str | None]]:
    """prism-server with the registry on `target`: the embedded default for sqlite; a throwaway
    PostgreSQL (tests/support/servers.py) for postgres. Yields (address, bootstrap key when
    `auth`)."""
    data = tmp / f"{target}-{auth}"
    with ExitStack() as stack:
        command = [str(BIN / "prism-server"), "--listen", "127.0.0.1:0", "--data-dir", str(data)]
        if not auth:
            command.append("--no-auth")
        if target == "postgres":
            from tests.support.servers import throwaway

            db = stack.enter_context(throwaway("postgres"))
            slot = {"backend": "postgres", "config": {"connection": db.url}}
            config = {
                "namespaces": [
                    {
                        "name": "registry",
                        "pattern": "artifact-registry",
                        "pattern_version": "v1",
                        "slots": {"store": slot, "cache": slot},
                    }
                ]
            }
            path = tmp / "postgres.yaml"
            path.write_text(yaml.safe_dump(config))
            command += ["--config", str(path)]
        printed: list[str] = []
        address = stack.enter_context(spawn(command, r"listening on (\S+:\d+)", before=printed))
        keys = [m.group(1) for line in printed if (m := BOOTSTRAP.search(line))]
        yield address, keys[0] if keys else None


def report(results: list[Result], echo: Result) -> None:
    header = (
        f"{'target@artifacts':<18} {'operation':<13} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7}"
        f" {'p99 ms':>7} {'× echo calls/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in [echo, *results]:
        ratio = r.throughput / echo.throughput
        # a call slower than the window completes in none of it: no latency to show
        latency = " ".join(
            f"{r.percentile(p):7.2f}" if r.latencies_ms else f"{'-':>7}" for p in (50, 95, 99)
        )
        print(f"{r.target:<18} {r.operation:<13} {r.throughput:8.0f} {latency} {ratio:14.2f}")
    print(f"\nbaseline: bare gRPC echo server, {echo.concurrency} concurrent calls, this run")
    by_key = {(r.target, r.operation): r for r in results}
    targets = sorted({r.target.split("@")[0] for r in results})
    sizes = sorted({int(r.target.split("@")[1]) for r in results})
    if len(sizes) > 1:
        print("\nscaling (p50 ms at each corpus size):")
        for target in targets:
            for op in ("get-uncached", "search", "list", "count"):
                cells = [by_key.get((f"{target}@{s}", op)) for s in sizes]
                text = "  ".join(
                    f"{s}: {c.percentile(50):.2f}"
                    for s, c in zip(sizes, cells, strict=True)
                    if c and c.latencies_ms
                )
                print(f"  {target:<9} {op:<13} {text}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--targets", default="sqlite,postgres")
    parser.add_argument("--sizes", default="1000,10000", help="corpus sizes, ascending")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="prism-bench-registry-") as tmp:
        echo_cmd = [sys.executable, "-m", "bench.echo_server"]
        with spawn(echo_cmd, r"listening on (\S+:\d+)") as address:
            echo = run_fast(measure_echo(address, args.concurrency, args.seconds))
        for target in args.targets.split(","):
            for auth in (False, True):
                with prism_server(target, Path(tmp), auth) as (address, key):
                    label = f"{target}+auth" if auth else target
                    results += run_fast(
                        measure_registry(label, address, sizes, args.concurrency, args.seconds, key)
                    )
    print()
    report(results, echo)


if __name__ == "__main__":
    main()
