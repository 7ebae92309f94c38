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
from typing import Any, TypeAlias

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
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class RequestLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps unary and server-streaming handlers (wrappers cached per method, since the
    interceptor runs on every call and must stay cheap next to a ~150 µs RPC)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

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
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(method: str, handler: Handler) -> Handler:
    if handler.unary_unary is not None:
        inner: Any = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            started, namespace, request_id = _begin(context)
            # in the trailers, which leave with the status: echoing it in the initial metadata
            # would cost a send of its own on every call (a fifth of a memstore Get's CPU)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            failed: BaseException | None = None
            try:
                return await inner(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                _finish(method, namespace, context, started, failed)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream: Any = handler.unary_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started, namespace, request_id = _begin(context)
            # before the first message: a stream's client can log the id while it reads
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            failed: BaseException | None = None
            try:
                # closed here, not whenever the garbage collector gets to it: a cancelled call
                # must end the plugin's stream (and free what it holds) right away
                async with contextlib.aclosing(inner_stream(request, context)) as items:
                    async for item in items:
                        yield item
            except BaseException as exc:
                failed = exc
                raise
            finally:
                _finish(method, namespace, context, started, failed)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _begin(context: Context) -> tuple[float, str, str]:
    """(start time, namespace header, request id). Every RPC runs in its own asyncio task,
    hence its own copy of the context: the request id set here is seen by that call alone and
    needs no reset."""
    headers = call_headers(context)
    request_id = headers.request_id or new_request_id()
    current_request_id.set(request_id)
    return time.perf_counter(), headers.namespace, request_id


def _finish(
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
