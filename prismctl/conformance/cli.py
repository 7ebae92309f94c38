"""`prismctl conformance --target HOST:PORT [--backend NAME | --interfaces a,b] [--namespace NS]
[--format text|json]`: run the conformance suite against any server or sidecar.

Exit codes: 0 all green, 1 a failing case or an undeclared-but-served interface, 2 usage (no
way to know what the target declares, unknown backend), 3 target unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from prismctl.conformance.core import open_channel
from prismctl.conformance.runner import describe, run
from prismctl.registry import load_registry

CONNECT_TIMEOUT = 10.0


def register(subparsers: Any) -> None:
    """Add the `conformance` subcommand (prismctl/main.py calls this)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "conformance",
        help="run the black-box conformance suite against a server or sidecar",
        description="Run every case of the declared interfaces, and check that every other "
        "catalog interface answers UNIMPLEMENTED.",
    )
    parser.add_argument("--target", required=True, metavar="HOST:PORT", help="address to test")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--backend", metavar="NAME", help="declared = the backend's registry row")
    which.add_argument(
        "--interfaces", metavar="A,B,...", help="declared = this comma-separated list"
    )
    parser.add_argument("--namespace", metavar="NS", help="sent as x-prism-namespace")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="cases run at a time (default 4)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up when the target is unreachable this long (default {CONNECT_TIMEOUT:g})",
    )
    parser.set_defaults(func=command)


def _fail(message: str, code: int) -> int:
    print(f"prismctl conformance: {message}", file=sys.stderr)
    return code


def _declared_from_registry(backend: str, root: Path | None) -> list[str] | str:
    registry = load_registry(root)
    spec = registry.backends.get(backend)
    if spec is None:
        known = ", ".join(sorted(registry.backends)) or "none"
        return f"--backend: unknown backend {backend!r} (known: {known})"
    return list(spec.implements)


async def _reachable(address: str, wait: float) -> bool:
    async with open_channel(address) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), wait)
        except TimeoutError:
            return False
    return True


async def _main(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        return _fail(f"--parallel: must be at least 1, got {args.parallel}", 2)
    if not await _reachable(args.target, args.connect_timeout):
        return _fail(f"--target {args.target}: cannot connect within {args.connect_timeout:g}s", 3)
    if args.backend:
        declared = _declared_from_registry(args.backend, getattr(args, "registry", None))
        if isinstance(declared, str):
            return _fail(declared, 2)
    elif args.interfaces is not None:
        declared = [i.strip() for i in args.interfaces.split(",") if i.strip()]
        if not declared:
            return _fail("--interfaces: empty list", 2)
    else:
        try:
            described = await describe(args.target)
        except grpc.aio.AioRpcError as exc:
            return _fail(f"--target {args.target}: Describe failed: {exc.code().name}", 3)
        if described is None:
            return _fail(
                f"--target {args.target} serves no PluginService.Describe; "
                "say what it declares with --backend NAME or --interfaces A,B",
                2,
            )
        declared = described
    report = await run(args.target, declared, namespace=args.namespace, parallel=args.parallel)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.to_text())
    return 0 if report.ok else 1


def command(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
