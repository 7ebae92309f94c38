"""Server interceptor shared by prism-server and prism-plugin: request ids and access logs.

Every call gets a request id (the client's `x-request-id`, or a fresh one), echoed as
`x-request-id` in the trailing metadata of a unary call (success or error) and in the initial
metadata of a server stream, and visible to handlers through `grpc_adapter.current_request_id`,
so the id in an INTERNAL error, the access log line and the client's view agree. One JSON line
per call goes to the `prism.access` logger at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar

import grpc
import grpc.aio

from plugins.runtime.grpc_adapter import (
    REQUEST_ID_HEADER,
    call_headers,
    current_request_id,
    new_request_id,
)

access_log = logging.getLogger("prism.access")
#: one encoder for every line: json.dumps with separators builds a new encoder per call
_encode_line = json.JSONEncoder(separators=(",", ":")).encode

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
State = TypeVar("State")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class HookedInterceptor(grpc.aio.ServerInterceptor, Generic[State]):  # type: ignore[type-arg]
    """Base of the server's interceptors: hooks around unary and server-streaming handlers,
    with the wrapper built once per method (an interceptor runs on every call and must stay
    cheap next to a ~150 µs RPC).

    Per call: `start` (before anything; its result is the call's state), `admit` (may refuse
    the call by aborting it), the handler, then `finish` with how the call ended; `finish` runs
    also when `admit` refused."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def applies(self, method: str) -> bool:
        """Whether this interceptor wraps `method` at all (asked once per method)."""
        return True

    def start(self, method: str, request: Any, context: Context, streaming: bool) -> State:
        raise NotImplementedError

    async def admit(self, method: str, context: Context, state: State) -> None:
        """Refuse the call by aborting it; the default admits every call."""

    def finish(
        self,
        method: str,
        request: Any,
        context: Context,
        state: State,
        failed: BaseException | None,
    ) -> None:
        """After the call, however it ended; the default does nothing."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            wrapped = self._wrap(method, handler) if self.applies(method) else handler
            cached = (handler, wrapped)
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, method: str, handler: Handler) -> Handler:
        start, admit, finish = self.start, self.admit, self.finish
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                state = start(method, request, context, False)
                failed: BaseException | None = None
                try:
                    await admit(method, context, state)
                    return await inner(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    finish(method, request, context, state, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                state = start(method, request, context, True)
                failed: BaseException | None = None
                try:
                    await admit(method, context, state)
                    # closed here, not whenever the garbage collector gets to it: a cancelled
                    # call must end the plugin's stream (and free what it holds) right away
                    async with contextlib.aclosing(inner_stream(request, context)) as items:
                        async for item in items:
                            yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    finish(method, request, context, state, failed)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _Call(NamedTuple):
    started: float
    namespace: str
    #: the request id to send in the initial metadata ("" for unary calls: theirs leaves with
    #: the trailers)
    id_up_front: str


class RequestLogInterceptor(HookedInterceptor[_Call]):
    """Request ids and the access log line of every call."""

    def start(self, method: str, request: Any, context: Context, streaming: bool) -> _Call:
        """Every RPC runs in its own asyncio task, hence its own copy of the context: the
        request id set here is seen by that call alone and needs no reset."""
        headers = call_headers(context)
        request_id = headers.request_id or new_request_id()
        current_request_id.set(request_id)
        if not streaming:
            # in the trailers, which leave with the status: echoing it in the initial metadata
            # would cost a send of its own on every call (a fifth of a memstore Get's CPU)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return _Call(time.perf_counter(), headers.namespace, request_id if streaming else "")

    async def admit(self, method: str, context: Context, state: _Call) -> None:
        if state.id_up_front:  # a stream's reader can log its id while it reads
            await context.send_initial_metadata(((REQUEST_ID_HEADER, state.id_up_front),))

    def finish(
        self,
        method: str,
        request: Any,
        context: Context,
        state: _Call,
        failed: BaseException | None,
    ) -> None:
        _log_call(method, state.namespace, context, state.started, failed)


def _log_call(
    method: str, namespace: str, context: Context, started: float, failed: BaseException | None
) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    code = context.code() if failed is not None else None
    if code is None:
        if failed is None:
            code = grpc.StatusCode.OK
        elif isinstance(failed, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.INTERNAL
    access_log.info(
        _encode_line(
            {
                "method": method,
                "namespace": namespace,
                "code": code.name if isinstance(code, grpc.StatusCode) else str(code),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": current_request_id.get(),
            }
        )
    )
