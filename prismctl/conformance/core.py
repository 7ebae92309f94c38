"""The conformance case library: cases, the target they run against, and assertion helpers.

A case is an async function of a `Target`, registered with `@case(interface_id)`. Cases talk to
the target only over gRPC with the generated stubs, and only under their own unique prefix, so
any number of them can run against one shared server without seeing each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from plugins.runtime.grpc_adapter import NAMESPACE_HEADER
from prismctl.conformance.wait import eventually

CaseFn = Callable[["Target"], Awaitable[None]]
F = TypeVar("F", bound=CaseFn)


class CaseFailure(AssertionError):
    """A broken guarantee; its message is what the report shows."""


@dataclass(frozen=True)
class Case:
    interface: str
    name: str
    fn: CaseFn
    # Other interfaces the case needs besides `interface` (e.g. keyvalue_basic to read back).
    requires: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.interface}.{self.name}"


_CASES: dict[str, Case] = {}


def case(interface: str, *, requires: Iterable[str] = ()) -> Callable[[F], F]:
    """Register a case for `interface`; its name is the function name."""

    def register(fn: F) -> F:
        c = Case(interface, fn.__name__, fn, tuple(requires))
        if c.id in _CASES:
            raise ValueError(f"duplicate conformance case {c.id}")
        _CASES[c.id] = c
        return fn

    return register


def registered() -> dict[str, Case]:
    """The cases registered so far (runner.load_cases imports the case modules)."""
    return dict(_CASES)


class _Namespaced:
    """Adds the namespace header to every call so cases need not pass metadata by hand."""

    def __init__(self, namespace: str) -> None:
        self._pair = (NAMESPACE_HEADER, namespace)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._pair)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first interceptor kind it is an instance of, so each
# call kind needs its own class.
class _NamespaceUnaryUnary(_Namespaced, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _NamespaceUnaryStream(_Namespaced, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


def open_channel(address: str, namespace: str | None = None) -> grpc.aio.Channel:
    """A channel to `address` that sends `namespace` (when given) with every call."""
    interceptors: Any = (
        [_NamespaceUnaryUnary(namespace), _NamespaceUnaryStream(namespace)] if namespace else None
    )
    options = [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


@dataclass
class Target:
    """What a case runs against: a channel (namespace already attached), the interfaces the
    target declares, and a prefix no other case uses."""

    channel: grpc.aio.Channel
    interfaces: frozenset[str]
    prefix: str = field(default_factory=lambda: f"cf-{uuid.uuid4().hex[:12]}-")
    # Channels opened by `extra_channel`, closed by `close`.
    _extra: list[grpc.aio.Channel] = field(default_factory=list)
    address: str | None = None
    namespace: str | None = None

    def key(self, name: str = "") -> str:
        """A key (or collection / queue / topic suffix) under this case's prefix."""
        return self.prefix + name

    def name(self, name: str = "") -> str:
        """An identifier-safe unique name (collections, queues): letters, digits, underscores."""
        return ("cf_" + self.prefix[3:] + name).replace("-", "_")

    def extra_channel(self) -> grpc.aio.Channel:
        """A separate connection (concurrency cases: independent clients, not one multiplexed
        HTTP/2 connection); falls back to the shared channel when the address is unknown."""
        if self.address is None:
            return self.channel
        ch = open_channel(self.address, self.namespace)
        self._extra.append(ch)
        return ch

    async def close(self) -> None:
        for ch in self._extra:
            await ch.close(None)
        self._extra.clear()


def check(condition: object, message: str) -> None:
    """Fail the case with `message` unless `condition` holds."""
    if not condition:
        raise CaseFailure(message)


def equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise CaseFailure(f"{what}: expected {expected!r}, got {actual!r}")


@dataclass(frozen=True)
class StatusInfo:
    """What a failed call told the client, details decoded."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    metadata: dict[str, str]
    fields: tuple[str, ...]

    def __str__(self) -> str:
        extra = f" reason={self.reason}" if self.reason else ""
        if self.fields:
            extra += f" fields={list(self.fields)}"
        return f"{self.code.name}{extra}: {self.message}"


def status_of(error: grpc.aio.AioRpcError) -> StatusInfo:
    """Decode the google.rpc.Status details (ErrorInfo, BadRequest) of a failed call."""
    reason: str | None = None
    metadata: dict[str, str] = {}
    fields: list[str] = []
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
            metadata.update(info.metadata)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return StatusInfo(error.code(), error.details() or "", reason, metadata, tuple(fields))


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode | tuple[grpc.StatusCode, ...],
    what: str,
    *,
    reason: str | None = None,
    field: str | tuple[str, ...] | None = None,
) -> StatusInfo:
    """Await `call` and require it to fail with `code` (one of them, when a tuple), and, when
    given, ErrorInfo `reason` and a BadRequest violation naming `field` (one of them)."""
    codes = code if isinstance(code, tuple) else (code,)
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        info = status_of(exc)
    else:
        raise CaseFailure(f"{what}: expected {_names(codes)}, got success {_short(result)}")
    if info.code not in codes:
        raise CaseFailure(f"{what}: expected {_names(codes)}, got {info}")
    if reason is not None and info.reason != reason:
        raise CaseFailure(f"{what}: expected ErrorInfo reason {reason}, got {info}")
    fields = (field,) if isinstance(field, str) else field
    if fields is not None and not set(fields) & set(info.fields):
        named = " or ".join(repr(f) for f in fields)
        raise CaseFailure(f"{what}: expected a BadRequest violation for field {named}, got {info}")
    return info


async def expect_invalid(
    call: Awaitable[Any], field: str | tuple[str, ...], what: str
) -> StatusInfo:
    """INVALID_ARGUMENT with the offending field named: the one answer to bad input."""
    return await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, what, field=field)


def _names(codes: tuple[grpc.StatusCode, ...]) -> str:
    return "/".join(c.name for c in codes)


def _short(value: object) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


T = TypeVar("T")


async def when_free(open_stream: Callable[[], Awaitable[T]], what: str, timeout: float = 5.0) -> T:  # noqa: ASYNC109
    """Open a stream that is exclusive to a name (a durable, a group consumer), retrying while
    FAILED_PRECONDITION says a just-cancelled stream of that name is still live: the server
    learns of a client's cancellation asynchronously."""

    async def attempt() -> T | None:
        try:
            return await open_stream()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise

    opened: T = await eventually(attempt, timeout=timeout, message=f"{what} free again")
    return opened
