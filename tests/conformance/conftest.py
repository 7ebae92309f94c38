"""Conformance suite wiring: one server (in-process, or in front of a `prism-plugin` sidecar)
per available backend and mode for the whole session, and a backend × interface summary."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from prismctl.conformance.core import open_channel
from prismctl.registry import BackendSpec, load_registry
from tests.conformance.backends import SETUPS
from tests.support.harness import running_server, running_sidecar

NAMESPACE = "conformance"
MODES = ("inprocess", "sidecar")
SLOTS = ("keyvalue", "document", "queue", "pubsub", "stream")


@dataclass(frozen=True)
class Deployment:
    backend: str
    mode: str
    declared: tuple[str, ...]
    address: str
    channel: grpc.aio.Channel


def available_backends() -> list[BackendSpec]:
    return [b for b in load_registry().backends.values() if b.status == "available"]


def direct_config(backend: BackendSpec, slot: dict[str, Any]) -> dict[str, Any]:
    """Pattern `direct` with one slot per model the backend implements, all its interfaces."""
    slots: dict[str, Any] = {}
    for model in SLOTS:
        interfaces = [i for i in backend.implements if i.split("_", 1)[0] == model]
        if interfaces:
            slots[model] = {"backend": backend.name, "interfaces": interfaces, **slot}
    return {
        "namespaces": [
            {"name": NAMESPACE, "pattern": "direct", "pattern_version": "v1", "slots": slots}
        ]
    }


class Deployments:
    """Starts the server (and sidecar) of one backend × mode at a time, reused by every test of
    that pair; tests are ordered by pair (pytest_collection_modifyitems) so each starts once."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self._key: tuple[str, str] | None = None
        self._current: Deployment | None = None
        self._stack = contextlib.AsyncExitStack()
        self._failed: dict[tuple[str, str], str] = {}

    async def get(self, backend_name: str, mode: str) -> Deployment:
        key = (backend_name, mode)
        if key in self._failed:
            pytest.fail(self._failed[key], pytrace=False)
        if self._key == key and self._current is not None:
            return self._current
        await self.close()
        try:
            self._current = await self._start(backend_name, mode)
        except Exception as exc:
            await self.close()
            self._failed[key] = f"{backend_name} ({mode}) did not start: {exc}"
            pytest.fail(self._failed[key], pytrace=False)
        self._key = key
        return self._current

    async def _start(self, backend_name: str, mode: str) -> Deployment:
        backend = load_registry().backends[backend_name]
        setup = SETUPS.get(backend_name)
        if setup is None:
            raise LookupError(
                f"backend {backend_name!r} is available in the registry but has no entry in "
                "tests/conformance/backends.py SETUPS: add one (an async context manager "
                "yielding its slot config)"
            )
        root = self._tmp.mktemp(f"conformance-{backend_name}-{mode}")
        stack = self._stack
        config = await stack.enter_async_context(setup(root))
        if mode == "sidecar":
            address = await stack.enter_async_context(
                running_sidecar(backend_name, config, root / "sidecar")
            )
            slot: dict[str, Any] = {"address": address}
        else:
            slot = {"config": config}
        server = await stack.enter_async_context(
            running_server(direct_config(backend, slot), root / "server")
        )
        channel = await stack.enter_async_context(open_channel(server.address, NAMESPACE))
        return Deployment(backend_name, mode, tuple(backend.implements), server.address, channel)

    async def close(self) -> None:
        self._key = self._current = None
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()


@pytest_asyncio.fixture(scope="session")
async def deployments(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployments]:
    manager = Deployments(tmp_path_factory)
    try:
        yield manager
    finally:
        await manager.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the conformance checks by backend × mode, so each pair's server starts once; the
    checks keep the slots they had, so no other test moves."""

    def pair(item: pytest.Item) -> tuple[str, str] | None:
        callspec = getattr(item, "callspec", None)
        check = callspec.params.get("check") if callspec is not None else None
        return (check[0], check[1]) if isinstance(check, tuple) else None

    slots = [n for n, item in enumerate(items) if pair(item) is not None]
    ordered = sorted((items[n] for n in slots), key=lambda item: pair(item) or ("", ""))
    for n, item in zip(slots, ordered, strict=True):
        items[n] = item


# (backend, mode, interface) → outcome counts, for the terminal summary.
_MATRIX: dict[tuple[str, str, str], dict[str, int]] = defaultdict(
    lambda: {"passed": 0, "failed": 0}
)
KEY = "conformance"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cell = dict(report.user_properties).get(KEY)
    if not isinstance(cell, tuple) or report.when != "call" or report.skipped:
        return
    _MATRIX[cell]["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _MATRIX:
        return
    write = terminalreporter.write_line
    terminalreporter.section("conformance: backend × interface")
    for (backend, mode, interface), counts in sorted(_MATRIX.items()):
        mark = "✓" if not counts["failed"] else "✗"
        write(
            f"{mark} {backend:<9} {mode:<9} {interface:<24} "
            f"{counts['passed']:>3} passed {counts['failed']:>3} failed"
        )
