"""`prismctl audit`: the server's audit log (every mutating and every denied call), newest
first, against a running server (same --address/--namespace/--api-key as `prismctl artifacts`;
needs a server admin key: admin role, no organization). Exit 1 when the server rejects the
query, 2 for bad flags, 3 when it cannot be reached."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc

from prismctl.cli_artifacts import Client, _rows, _to_json, add_connection_arguments
from prismctl.cli_common import EXIT_OK, EXIT_USAGE, CliError

DURATION = re.compile(r"(\d+)([smhdw])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(flag: str, text: str, *, ahead: bool = False) -> timestamp_pb2.Timestamp:
    """An ISO 8601 time (UTC unless it says otherwise), or a duration like `15m`, `2h`, `7d`
    counted back from now (forward with `ahead`, for expiry)."""
    match = DURATION.fullmatch(text.strip())
    if match is not None:
        delta = timedelta(**{UNITS[match[2]]: int(match[1])})
        when = datetime.now(UTC) + (delta if ahead else -delta)
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise CliError(
                f"{flag} {text!r}: expected an ISO 8601 time (2026-01-31T12:00:00) or a "
                "duration like 15m, 2h, 7d",
                EXIT_USAGE,
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _query(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError(f"--limit {args.limit}: must be at least 1", EXIT_USAGE)
    request = pb.QueryAuditRequest(
        identity=args.identity or "", method=args.method or "", outcome=args.outcome or ""
    )
    if args.since:
        request.start_time.CopyFrom(parse_time("--since", args.since))
    if args.until:
        request.end_time.CopyFrom(parse_time("--until", args.until))
    client = Client(args, pb_grpc.KeyAdminServiceStub)
    entries: list[pb.AuditEntry] = []
    while len(entries) < args.limit:
        request.page_size = min(args.limit - len(entries), 1000)
        page: pb.QueryAuditResponse = client.call("QueryAudit", request)
        entries.extend(page.entries)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.format == "json":
        print(json.dumps([_to_json(e) for e in entries], indent=2))
        return EXIT_OK
    rows = [
        (e.time.ToDatetime(UTC).isoformat(timespec="milliseconds"), e.identity, e.outcome,
         e.reason or "-", e.method.lstrip("/"), e.namespace or "-", e.resource or "-", e.peer)
        for e in entries
    ]  # fmt: skip
    header = ("TIME", "IDENTITY", "OUTCOME", "REASON", "METHOD", "NAMESPACE", "RESOURCE", "PEER")
    print(_rows(header, rows))
    return EXIT_OK


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("audit", help="the audit log of a running server (server admin key)")
    add_connection_arguments(p)
    p.add_argument("--identity", help="exact identity, e.g. key:0123456789abcdef or anonymous")
    p.add_argument("--method", help="/pkg.Service/Method, or Service/Method without the package")
    p.add_argument("--outcome", help="status code name, e.g. OK, UNAUTHENTICATED")
    p.add_argument("--since", help="ISO 8601 time or a duration back from now (15m, 2h, 7d)")
    p.add_argument("--until", help="ISO 8601 time or a duration back from now")
    p.add_argument("--limit", type=int, default=100, help="at most this many entries (100)")
    p.set_defaults(func=_query)
