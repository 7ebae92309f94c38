"""The one error mapping: domain errors ⇄ gRPC status with google.rpc details.

It lives in the plugin runtime (not in server/) because both edges use it: the server and the
sidecar map exceptions to statuses the same way, and the sidecar proxy turns a remote status back
into the same domain error so the server re-emits it unchanged. server/errors.py re-exports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from plugins.runtime import errors

DOMAIN = "prism"
DETAILS_KEY = "grpc-status-details-bin"  # rpc_status.GRPC_DETAILS_METADATA_KEY

log = logging.getLogger("prism.errors")


def to_domain_error(exc: BaseException, request_id: str = "") -> errors.PrismError:
    """Any exception → the domain error clients see. Unexpected ones are logged with their
    traceback and become INTERNAL carrying the request id, so the log line can be found."""
    if isinstance(exc, errors.PrismError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return errors.DeadlineExceeded("deadline exceeded while the backend was working")
    log.error("unexpected error (request_id=%s)", request_id, exc_info=exc)
    return errors.Internal(
        f"internal error; quote request id {request_id} when reporting it",
        request_id=request_id,
    )


def status_for(
    exc: BaseException, request_id: str = "", context: Mapping[str, str] | None = None
) -> grpc.Status:
    """The grpc.Status (with ErrorInfo, and BadRequest for INVALID_ARGUMENT) for `exc`.

    `context` (backend, interface, namespace...) fills ErrorInfo metadata keys the error itself
    did not set, so a status relayed from a sidecar keeps what the sidecar said."""
    err = to_domain_error(exc, request_id)
    metadata = dict(context or {})
    metadata.update(err.metadata)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if isinstance(err, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=err.field, description=err.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if isinstance(err, errors.ResourceExhausted) and err.retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_delay * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code = err.code if err.code != grpc.StatusCode.UNKNOWN else grpc.StatusCode.INTERNAL
    status = status_pb2.Status(code=code.value[0], message=err.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _pack(
    message: error_details_pb2.ErrorInfo
    | error_details_pb2.BadRequest
    | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: object,
    fallback: Mapping[str, str] | None = None,
) -> errors.PrismError:
    """A remote status (from a sidecar) → the domain error that produced it: same code, reason
    and ErrorInfo metadata. Statuses without details (e.g. connection refused) keep their code
    with the default reason and `fallback` metadata."""
    reason: str | None = None
    retry_delay: float | None = None
    metadata = dict(fallback or {})
    for key, value in _pairs(trailing_metadata):
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason = info.reason
                metadata.update(info.metadata)
            elif detail.Unpack(retry):
                retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        message = status.message or message
    if code == grpc.StatusCode.UNKNOWN:
        code = grpc.StatusCode.INTERNAL
    err = errors.error_for_code(code, message, reason, metadata)
    if isinstance(err, errors.ResourceExhausted):
        err.retry_delay = retry_delay
    return err


def _pairs(trailing_metadata: object) -> list[tuple[str, str | bytes]]:
    if trailing_metadata is None:
        return []
    return [(str(k), v) for k, v in trailing_metadata]  # type: ignore[attr-defined]
