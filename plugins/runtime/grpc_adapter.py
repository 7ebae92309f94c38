"""Two generic adapters between contract objects and gRPC, driven only by service descriptors.

`service_handler` serves any contract object over gRPC (the server routes per namespace through
the resolver; the sidecar resolves to its one plugin). `ContractProxy` turns a channel to a
sidecar back into a contract object, so patterns and the router cannot tell in-process from
sidecar. No code here knows any particular interface.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.message_factory import GetMessageClass

from plugins.runtime.context import CallContext
from plugins.runtime.interfaces import InterfaceInfo, method_name
from plugins.runtime.status import error_from_status, status_for

NAMESPACE_HEADER = "x-prism-namespace"
REQUEST_ID_HEADER = "x-request-id"
AUTH_HEADER = "authorization"

#: Request id of the call being handled; set by the request-id interceptor so the id it echoes
#: is the one errors and logs carry.
current_request_id: ContextVar[str] = ContextVar("prism_request_id", default="")


@dataclass(frozen=True, slots=True)
class CallHeaders:
    """The metadata Prism itself reads from a call ("" / None when absent)."""

    namespace: str
    request_id: str
    authorization: str | None


#: (the call's servicer context, its parsed headers): parsed once per call and shared by the
#: interceptors and the adapter, since every invocation_metadata() rebuilds the whole tuple
_headers: ContextVar[tuple[object, CallHeaders] | None] = ContextVar("prism_headers", default=None)


def call_headers(context: grpc.aio.ServicerContext[Any, Any]) -> CallHeaders:
    """The call's headers, parsed on first use. Keyed by the context object, so a task that
    inherited another call's context variables never reads that call's headers. A repeated
    namespace or request id: the last one counts; a repeated authorization: the first."""
    parsed = _headers.get()
    if parsed is not None and parsed[0] is context:
        return parsed[1]
    namespace = request_id = ""
    authorization: str | None = None
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == NAMESPACE_HEADER:
            namespace = value
        elif key == REQUEST_ID_HEADER:
            request_id = value
        elif key == AUTH_HEADER and authorization is None:
            authorization = value
    headers = CallHeaders(namespace, request_id, authorization)
    _headers.set((context, headers))
    return headers


#: (call context, namespace the call was routed to): what the audit log records
_routed: ContextVar[tuple[object, str] | None] = ContextVar("prism_routed", default=None)


def routed_namespace(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The namespace this call was routed to ("" before routing or when it never was): the
    one that served it, also when the client named none."""
    routed = _routed.get()
    return routed[1] if routed is not None and routed[0] is context else ""


def new_request_id() -> str:
    """32 random hex characters (what uuid4().hex looked like, at a fifth of its cost)."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Target:
    """Where one call goes: the namespace it acts in, the contract object, and ErrorInfo labels
    (backend, interface, namespace) describing it."""

    namespace: str
    impl: object
    labels: Mapping[str, str] = field(default_factory=dict)


#: requested namespace ("" when the client sent none) → Target; raises PrismError to refuse.
Resolver = Callable[[str], Target]

#: ErrorInfo labels when the resolver itself refused (its error carries its own metadata)
_NO_LABELS: Mapping[str, str] = {}


def message_classes(
    method: _descriptor.MethodDescriptor,
) -> tuple[type[_message.Message], type[_message.Message]]:
    return GetMessageClass(method.input_type), GetMessageClass(method.output_type)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: BaseException,
    request_id: str,
    labels: Mapping[str, str],
) -> None:
    """End the call with the status the one error mapping gives `exc`."""
    aio_context: Any = context  # grpc-stubs predates ServicerContext.abort_with_status
    status: Any = status_for(exc, request_id, labels)
    if request_id:
        # the status's trailers replace any set before: the request id must ride along
        echoed = (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id))
        status = type(status)(status.code, status.details, echoed)
    await aio_context.abort_with_status(status)


def _prepare(
    context: grpc.aio.ServicerContext[Any, Any], resolve: Resolver
) -> tuple[CallContext, Target]:
    """The call's CallContext and target; the request id is the interceptor's if set, else the
    client's, else a fresh one."""
    headers = call_headers(context)
    target = resolve(headers.namespace)
    _routed.set((context, target.namespace))
    request_id = current_request_id.get() or headers.request_id or new_request_id()
    ctx = CallContext.with_timeout(target.namespace, context.time_remaining(), request_id)
    return ctx, target


def _unary_handler(
    method: _descriptor.MethodDescriptor, resolve: Resolver
) -> grpc.RpcMethodHandler[Any, Any]:
    name = method_name(method.name)

    async def handle(request: _message.Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request_id, labels = "", _NO_LABELS
        try:
            ctx, target = _prepare(context, resolve)
            request_id, labels = ctx.request_id, target.labels
            async with asyncio.timeout(ctx.time_remaining()):
                return await getattr(target.impl, name)(request, ctx)
        except Exception as exc:
            await abort(context, exc, request_id or current_request_id.get(), labels)

    req, resp = message_classes(method)
    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


def _stream_handler(
    method: _descriptor.MethodDescriptor, resolve: Resolver
) -> grpc.RpcMethodHandler[Any, Any]:
    name = method_name(method.name)

    async def handle(
        request: _message.Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        request_id, labels = "", _NO_LABELS
        try:
            ctx, target = _prepare(context, resolve)
            request_id, labels = ctx.request_id, target.labels
            async for item in getattr(target.impl, name)(request, ctx):
                yield item
        except Exception as exc:
            await abort(context, exc, request_id or current_request_id.get(), labels)

    req, resp = message_classes(method)
    return grpc.unary_stream_rpc_method_handler(
        handle, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


def service_handler(
    service: _descriptor.ServiceDescriptor, resolve: Resolver
) -> grpc.GenericRpcHandler[Any, Any]:
    """A handler serving every RPC of `service` by calling the contract method (snake_case of
    the RPC) of the object `resolve` picks for the call's namespace."""
    return method_routed_handler(service, lambda _method: resolve)


def method_routed_handler(
    service: _descriptor.ServiceDescriptor,
    resolver_for: Callable[[_descriptor.MethodDescriptor], Resolver],
) -> grpc.GenericRpcHandler[Any, Any]:
    """`service_handler` with a resolver of each RPC's own, built once here, so whatever a
    resolver decides per method (the server's access level) costs nothing per call."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}/{method.name}: client streaming unsupported")
        build = _stream_handler if method.server_streaming else _unary_handler
        handlers[method.name] = build(method, resolver_for(method))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class ContractProxy:
    """A contract object whose methods call a sidecar serving the same interface.

    Each method sends the namespace and request id as metadata and the remaining deadline as
    timeout, and turns a failed call back into the domain error the sidecar raised (code, reason
    and ErrorInfo metadata preserved); a sidecar that cannot be reached becomes Unavailable."""

    def __init__(
        self, info: InterfaceInfo, channel: grpc.aio.Channel, labels: Mapping[str, str]
    ) -> None:
        self.interface = info
        self.labels = dict(labels)
        for method in info.service.methods:
            path = f"/{info.service_name}/{method.name}"
            req, resp = message_classes(method)
            if method.server_streaming:
                stream = channel.unary_stream(
                    path,
                    request_serializer=req.SerializeToString,
                    response_deserializer=resp.FromString,
                )
                setattr(self, method_name(method.name), self._streaming(stream))
            else:
                unary = channel.unary_unary(
                    path,
                    request_serializer=req.SerializeToString,
                    response_deserializer=resp.FromString,
                )
                setattr(self, method_name(method.name), self._unary(unary))

    def _unary(
        self, stub: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    ) -> Callable[[_message.Message, CallContext], Awaitable[Any]]:
        async def call(request: _message.Message, ctx: CallContext) -> Any:
            try:
                return await stub(request, metadata=_outbound(ctx), timeout=ctx.time_remaining())
            except grpc.aio.AioRpcError as exc:
                raise self._domain_error(exc) from None

        return call

    def _streaming(
        self, stub: grpc.aio.UnaryStreamMultiCallable[Any, Any]
    ) -> Callable[[_message.Message, CallContext], AsyncIterator[Any]]:
        async def call(request: _message.Message, ctx: CallContext) -> AsyncIterator[Any]:
            stream = stub(request, metadata=_outbound(ctx), timeout=ctx.time_remaining())
            try:
                async for item in stream:
                    yield item
            except grpc.aio.AioRpcError as exc:
                raise self._domain_error(exc) from None
            finally:
                stream.cancel()

        return call

    def _domain_error(self, exc: grpc.aio.AioRpcError) -> Exception:
        return error_from_status(
            exc.code(), exc.details() or "", exc.trailing_metadata(), self.labels
        )


def _outbound(ctx: CallContext) -> tuple[tuple[str, str], ...]:
    return ((NAMESPACE_HEADER, ctx.namespace), (REQUEST_ID_HEADER, ctx.request_id))
