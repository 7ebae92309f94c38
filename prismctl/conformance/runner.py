"""Running the case library against an address and summarising the outcome as a matrix."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from prism.plugin.v1 import plugin_pb2
from prism.plugin.v1.plugin_pb2_grpc import PluginServiceStub

from plugins.runtime.interfaces import catalog
from prismctl.conformance import core
from prismctl.conformance.core import Case, CaseFailure, Target, open_channel

CASE_TIMEOUT = 60.0
UNIMPLEMENTED = "unimplemented"
_MODELS = ("keyvalue_", "document_", "queue_", "pubsub_", "stream_")


def load_cases() -> dict[str, Case]:
    """Import every case module (one per interface) and return the registered cases."""
    import prismctl.conformance as package

    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name.startswith(_MODELS):
            importlib.import_module(f"{package.__name__}.{mod.name}")
    return core.registered()


def cases_for(interfaces: Iterable[str]) -> list[Case]:
    """The cases that run when a target declares `interfaces`, in a stable order."""
    declared = set(interfaces)
    return [
        c for c in load_cases().values() if c.interface in declared and set(c.requires) <= declared
    ]


def undeclared(interfaces: Iterable[str]) -> list[str]:
    """Catalog interfaces outside `interfaces`: each must answer UNIMPLEMENTED."""
    declared = set(interfaces)
    return sorted(i for i in catalog() if i not in declared)


def unknown(interfaces: Iterable[str]) -> list[str]:
    return sorted(set(interfaces) - set(catalog()))


async def check_unimplemented(channel: grpc.aio.Channel, interface: str) -> None:
    """Call the first RPC of `interface` with an empty request; anything but UNIMPLEMENTED means
    the target serves an interface it does not declare."""
    service = catalog()[interface].service
    method = service.methods[0]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(
                path,
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )(request_cls(), timeout=10)
            async for _ in call:
                break
            call.cancel()
        else:
            await channel.unary_unary(
                path,
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )(request_cls(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return
        raise CaseFailure(
            f"{path} (undeclared) answered {core.status_of(exc)}, expected UNIMPLEMENTED"
        ) from exc
    raise CaseFailure(f"{path} (undeclared) answered OK, expected UNIMPLEMENTED")


async def run_case(
    case: Case,
    channel: grpc.aio.Channel,
    interfaces: Iterable[str],
    address: str | None = None,
    namespace: str | None = None,
) -> None:
    """Run one case on a fresh prefix; raises CaseFailure (or the unexpected error)."""
    target = Target(channel, frozenset(interfaces), address=address, namespace=namespace)
    try:
        await asyncio.wait_for(case.fn(target), CASE_TIMEOUT)
    except TimeoutError as exc:
        raise CaseFailure(f"{exc}" if str(exc) else f"timed out after {CASE_TIMEOUT}s") from exc
    except grpc.aio.AioRpcError as exc:
        raise CaseFailure(f"unexpected {core.status_of(exc)}") from exc
    finally:
        await target.close()


@dataclass
class Result:
    interface: str
    case: str
    passed: bool
    message: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    target: str
    namespace: str | None
    declared: list[str]
    results: list[Result] = field(default_factory=list)
    # Problems that are not a single case: unknown interface ids, Describe disagreeing...
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.passed for r in self.results)

    def matrix(self) -> dict[str, dict[str, Any]]:
        """interface → {passed, failed, failures: [(case, message)]}."""
        rows: dict[str, dict[str, Any]] = {}
        for r in self.results:
            row = rows.setdefault(r.interface, {"passed": 0, "failed": 0, "failures": []})
            row["passed" if r.passed else "failed"] += 1
            if not r.passed:
                row["failures"].append({"case": r.case, "message": r.message})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "target": self.target,
            "namespace": self.namespace,
            "declared": self.declared,
            "ok": self.ok,
            "errors": self.errors,
            "matrix": self.matrix(),
            "results": [asdict(r) for r in self.results],
        }

    def to_text(self) -> str:
        lines = [
            f"conformance of {self.target}"
            + (f" (namespace {self.namespace})" if self.namespace else "")
        ]
        rows = self.matrix()
        width = max([len(i) for i in rows] + [9])
        for interface, row in sorted(rows.items()):
            mark = "✓" if not row["failed"] else "✗"
            kind = "undeclared" if interface == UNIMPLEMENTED else "declared"
            lines.append(
                f"  {mark} {interface:<{width}}  {row['passed']:>3} passed  "
                f"{row['failed']:>3} failed  ({kind})"
            )
            for failure in row["failures"]:
                lines.append(f"      ✗ {failure['case']}: {failure['message']}")
        lines.extend(f"  error: {e}" for e in self.errors)
        total = len(self.results)
        failed = sum(not r.passed for r in self.results)
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {total - failed}/{total} checks passed")
        return "\n".join(lines)


async def _timed(interface: str, name: str, check: Any) -> Result:
    start = time.monotonic()
    try:
        await check
    except CaseFailure as exc:
        return Result(interface, name, False, str(exc), time.monotonic() - start)
    except Exception as exc:  # a broken target must not stop the other checks
        detail = traceback.format_exception_only(exc)[-1].strip()
        return Result(interface, name, False, f"error: {detail}", time.monotonic() - start)
    return Result(interface, name, True, "", time.monotonic() - start)


async def describe(address: str) -> list[str] | None:
    """The interface ids the target's PluginService.Describe reports, or None when it serves
    no PluginService."""
    async with open_channel(address) as channel:
        try:
            response: plugin_pb2.DescribeResponse = await PluginServiceStub(channel).Describe(
                plugin_pb2.DescribeRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
    return sorted(i.id for i in response.interfaces)


async def run(
    target_address: str,
    interfaces: Iterable[str],
    namespace: str | None = None,
    parallel: int = 4,
) -> Report:
    """Run every case of the declared `interfaces` and the UNIMPLEMENTED check of every other
    catalog interface against `target_address`; cases run `parallel` at a time."""
    declared = sorted(set(interfaces))
    report = Report(target_address, namespace, declared)
    report.errors.extend(f"unknown interface {i!r} (not in the catalog)" for i in unknown(declared))
    gate = asyncio.Semaphore(parallel)
    async with open_channel(target_address, namespace) as channel:

        async def one(interface: str, name: str, check: Any) -> Result:
            async with gate:
                return await _timed(interface, name, check)

        jobs = [
            one(
                c.interface,
                c.name,
                run_case(c, channel, declared, target_address, namespace),
            )
            for c in cases_for(declared)
        ]
        jobs += [
            one(UNIMPLEMENTED, i, check_unimplemented(channel, i)) for i in undeclared(declared)
        ]
        report.results = list(await asyncio.gather(*jobs))
    return report
