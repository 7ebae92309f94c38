"""`prismctl conformance` as a real subprocess against real servers: exit codes, the matrix,
JSON output, and the undeclared-but-served check."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from prismctl.registry import load_registry
from tests.support.harness import running_server, running_sidecar
from tests.support.servers import free_port

PRISMCTL = str(Path(sys.executable).parent / "prismctl")
NAMESPACE = "clitest"
PUBSUB = ["pubsub_basic", "pubsub_wildcards"]


async def prismctl(*args: str) -> tuple[int, str, str]:
    """Run the installed console script without blocking the loop the servers run on."""
    proc = await asyncio.create_subprocess_exec(
        PRISMCTL,
        "conformance",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture(scope="module")
async def pubsub_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A server exposing exactly memstore's two PubSub interfaces."""
    config = {
        "namespaces": [
            {
                "name": NAMESPACE,
                "pattern": "direct",
                "pattern_version": "v1",
                "slots": {"pubsub": {"backend": "memstore", "interfaces": PUBSUB}},
            }
        ]
    }
    async with running_server(config, tmp_path_factory.mktemp("cli-server")) as server:
        yield server.address


async def test_all_green_exits_zero(pubsub_server: str) -> None:
    code, out, err = await prismctl(
        "--target", pubsub_server, "--interfaces", ",".join(PUBSUB), "--namespace", NAMESPACE
    )
    assert (code, err) == (0, ""), out
    assert "✓ pubsub_basic" in out and "✓ pubsub_wildcards" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS:")


async def test_undeclared_but_served_fails(pubsub_server: str) -> None:
    code, out, _ = await prismctl(
        "--target", pubsub_server, "--interfaces", "pubsub_basic", "--namespace", NAMESPACE
    )
    assert code == 1
    failures = [line for line in out.splitlines() if "(undeclared) answered" in line]
    assert len(failures) == 1 and "PubSubWildcardsService" in failures[0], out


async def test_json_report(pubsub_server: str) -> None:
    code, out, _ = await prismctl(
        "--target",
        pubsub_server,
        "--interfaces",
        ",".join(PUBSUB),
        "--namespace",
        NAMESPACE,
        "--format",
        "json",
    )
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert report["declared"] == PUBSUB
    assert report["matrix"]["pubsub_basic"]["failed"] == 0
    assert report["matrix"]["pubsub_basic"]["passed"] >= 3
    assert report["matrix"]["unimplemented"]["passed"] == len(report["results"]) - sum(
        report["matrix"][i]["passed"] for i in PUBSUB
    )


async def test_declared_from_describe(tmp_path: Path) -> None:
    """With neither --backend nor --interfaces, a sidecar's Describe says what is declared."""
    async with running_sidecar("memstore", None, tmp_path) as address:
        code, out, _ = await prismctl("--target", address, "--format", "json")
    report = json.loads(out)
    assert report["declared"] == sorted(load_registry().backends["memstore"].implements)
    assert code == (0 if report["ok"] else 1)


async def test_no_describe_is_usage_error(pubsub_server: str) -> None:
    code, out, err = await prismctl("--target", pubsub_server)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "--backend NAME or --interfaces" in err


async def test_unreachable_target(pubsub_server: str) -> None:
    port = free_port()
    code, out, err = await prismctl(
        "--target", f"127.0.0.1:{port}", "--interfaces", "pubsub_basic", "--connect-timeout", "1"
    )
    assert (code, out) == (3, "")
    assert (
        err.strip() == f"prismctl conformance: --target 127.0.0.1:{port}: cannot connect within 1s"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "--backend: unknown backend 'nope'"),
        (["--interfaces", " , "], "--interfaces: empty list"),
        (["--parallel", "0", "--interfaces", "pubsub_basic"], "--parallel: must be at least 1"),
    ],
)
async def test_usage_errors(pubsub_server: str, args: list[str], message: str) -> None:
    code, out, err = await prismctl("--target", pubsub_server, *args)
    assert (code, out) == (2, "")
    assert message in err and err.count("\n") == 1
