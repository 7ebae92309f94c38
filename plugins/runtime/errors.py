"""Domain errors. Plugins and patterns raise these; server/errors.py maps them to gRPC status.

Each error has a gRPC code, a stable UPPER_SNAKE reason and metadata (backend, interface, key,
field...). Nothing else reaching the edge becomes anything but INTERNAL with a request id.
"""

from __future__ import annotations

import grpc


class PrismError(Exception):
    """Base of every error that has a defined meaning for clients."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in metadata.items() if v is not None}


class InvalidArgument(PrismError):
    """Bad input. `field` names the offending request field (e.g. "key", "page_token")."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self, field: str, description: str, *, reason: str | None = None, **metadata: object
    ) -> None:
        super().__init__(f"{field}: {description}", reason=reason, field=field, **metadata)
        self.field = field
        self.description = description


class NotFound(PrismError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PrismError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(PrismError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(PrismError):
    """Optimistic-concurrency conflicts: revision/etag mismatch, transaction conflict."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unimplemented(PrismError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "INTERFACE_NOT_PROVIDED"


class Unavailable(PrismError):
    """The backend cannot be reached right now; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "BACKEND_UNAVAILABLE"


class DeadlineExceeded(PrismError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(PrismError):
    """Rate limits and size limits. `retry_delay` (seconds) becomes a google.rpc.RetryInfo."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_delay: float | None = None,
        reason: str | None = None,
        **metadata: object,
    ) -> None:
        super().__init__(message, reason=reason, **metadata)
        self.retry_delay = retry_delay


class PermissionDenied(PrismError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(PrismError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Internal(PrismError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class DataLoss(PrismError):
    """Stored data failed an integrity check (e.g. a digest no longer matches)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


_BY_CODE: dict[grpc.StatusCode, type[PrismError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unimplemented,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Internal,
        DataLoss,
    )
}


def error_for_code(
    code: grpc.StatusCode, message: str, reason: str | None, metadata: dict[str, str]
) -> PrismError:
    """Rebuild a domain error from a remote status (sidecar hop), keeping code and reason."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = metadata.pop("field", "request")
        description = message.removeprefix(f"{field}: ")
        return InvalidArgument(field, description, reason=reason, **metadata)
    cls = _BY_CODE.get(code, Internal)
    return cls(message, reason=reason, **metadata)
