"""The one error mapping, both ways: domain error → grpc.Status with ErrorInfo/BadRequest, and a
relayed status → the same domain error (what the sidecar proxy relies on)."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from plugins.runtime import errors
from plugins.runtime.status import DETAILS_KEY, error_from_status, status_for


def unpack(status: grpc.Status) -> status_pb2.Status:
    (key, value), *_ = status.trailing_metadata
    assert key == DETAILS_KEY
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (errors.NotFound("no key", key="k"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (
            errors.Aborted("stale", reason="REVISION_MISMATCH"),
            grpc.StatusCode.ABORTED,
            "REVISION_MISMATCH",
        ),
        (
            errors.AlreadyExists("dup", reason="KEY_EXISTS"),
            grpc.StatusCode.ALREADY_EXISTS,
            "KEY_EXISTS",
        ),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
        (
            errors.ResourceExhausted("slow down"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RESOURCE_EXHAUSTED",
        ),
        (errors.Unimplemented("no"), grpc.StatusCode.UNIMPLEMENTED, "INTERFACE_NOT_PROVIDED"),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    ],
)
def test_domain_errors_map_to_codes_and_reasons(
    error: BaseException, code: grpc.StatusCode, reason: str
) -> None:
    status = status_for(error, "rid", {"backend": "b", "namespace": "n"})
    assert status.code == code
    detail = unpack(status)
    info = error_details_pb2.ErrorInfo()
    assert detail.details[0].Unpack(info)
    assert (info.reason, info.domain) == (reason, "prism")
    assert info.metadata["backend"] == "b" and info.metadata["namespace"] == "n"


def test_invalid_argument_carries_a_field_violation() -> None:
    status = status_for(errors.InvalidArgument("page_token", "malformed page token"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "page_token: malformed page token"
    detail = unpack(status)
    bad = error_details_pb2.BadRequest()
    assert detail.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "page_token"
    assert bad.field_violations[0].description == "malformed page token"


def test_error_metadata_wins_over_context_labels() -> None:
    status = status_for(errors.NotFound("x", namespace="inner"), "", {"namespace": "outer"})
    info = error_details_pb2.ErrorInfo()
    unpack(status).details[0].Unpack(info)
    assert info.metadata["namespace"] == "inner"


def test_unexpected_exception_is_internal_logged_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="prism.errors"):
        status = status_for(KeyError("secret internals"), "req-9")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "req-9" in status.details and "secret" not in status.details
    info = error_details_pb2.ErrorInfo()
    unpack(status).details[0].Unpack(info)
    assert info.metadata["request_id"] == "req-9"
    (record,) = caplog.records
    assert "req-9" in record.getMessage() and record.exc_info is not None


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidArgument("key", "must not be empty", backend="sqlite"),
        errors.Aborted("revision 3 ≠ 4", reason="REVISION_MISMATCH", key="k"),
        errors.FailedPrecondition("tx gone", reason="TRANSACTION_NOT_FOUND"),
        errors.Internal("boom", request_id="r"),
    ],
)
def test_relayed_status_becomes_the_same_domain_error(error: errors.PrismError) -> None:
    status = status_for(error)
    back = error_from_status(status.code, status.details, status.trailing_metadata)
    assert type(back) is type(error)
    assert (back.code, back.reason, back.message) == (error.code, error.reason, error.message)
    assert back.metadata == error.metadata
    assert status_for(back).trailing_metadata == status.trailing_metadata


def test_status_without_details_keeps_code_and_fallback_labels() -> None:
    back = error_from_status(grpc.StatusCode.UNAVAILABLE, "connection refused", (), {"a": "b"})
    assert isinstance(back, errors.Unavailable)
    assert back.reason == "BACKEND_UNAVAILABLE" and back.metadata == {"a": "b"}
    unknown = error_from_status(grpc.StatusCode.UNKNOWN, "?", None)
    assert unknown.code == grpc.StatusCode.INTERNAL
