"""`prismctl keys create|list|revoke`: API keys of a running server (same --address/--namespace/
--api-key as `prismctl artifacts`; needs an admin key: a server admin key (no organization)
manages every key, an organization's admin key only that organization's, and sees no other).
`create` prints the new key once; the server keeps only a hash of it. Exit 1 when the server
rejects the request, 2 for bad flags, 3 when it cannot be reached."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC
from typing import Any

from google.protobuf import timestamp_pb2
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc

from prismctl.cli_artifacts import Client, _emit, _rows, add_connection_arguments
from prismctl.cli_audit import parse_time

ROLES = {
    name.removeprefix("ROLE_").lower(): pb.Role.Value(name)
    for name, _ in pb.Role.items()
    if name != "ROLE_UNSPECIFIED"
}


def _when(stamp: timestamp_pb2.Timestamp, present: bool) -> str:
    return stamp.ToDatetime(UTC).isoformat(timespec="seconds") if present else "-"


def _key_rows(keys: list[pb.ApiKey]) -> str:
    header = ("ID", "NAME", "OWNER", "ORG", "ROLES", "EXPIRES", "REVOKED", "LAST USED")
    return _rows(
        header,
        (
            (k.id, k.name, k.owner or "-", k.organization or "-",
             ",".join(pb.Role.Name(r).removeprefix("ROLE_").lower() for r in k.roles),
             _when(k.expire_time, k.HasField("expire_time")),
             _when(k.revoke_time, k.HasField("revoke_time")),
             _when(k.last_used_time, k.HasField("last_used_time")))
            for k in keys
        ),
    )  # fmt: skip


def _client(args: argparse.Namespace) -> Client:
    return Client(args, pb_grpc.KeyAdminServiceStub)


def _create(args: argparse.Namespace) -> int:
    request = pb.CreateKeyRequest(
        name=args.name,
        owner=args.owner or "",
        organization=args.org or "",
        roles=[ROLES[r] for r in args.role or ["viewer"]],
        scopes=args.scope,
    )
    if args.expires:
        request.expire_time.CopyFrom(parse_time("--expires", args.expires, ahead=True))
    made: pb.CreateKeyResponse = _client(args).call("CreateKey", request)
    return _emit(
        args,
        made,
        lambda: f"{_key_rows([made.key])}\n\nAPI key (shown once, store it now): {made.secret_key}",
    )


def _list(args: argparse.Namespace) -> int:
    client = _client(args)
    request = pb.ListKeysRequest(page_size=1000, include_revoked=args.include_revoked)
    listing = pb.ListKeysResponse()
    while True:
        page: pb.ListKeysResponse = client.call("ListKeys", request)
        listing.keys.extend(page.keys)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    return _emit(args, listing, lambda: _key_rows(list(listing.keys)))


def _revoke(args: argparse.Namespace) -> int:
    done: pb.RevokeKeyResponse = _client(args).call("RevokeKey", pb.RevokeKeyRequest(id=args.id))
    return _emit(args, done, lambda: f"revoked {done.key.id} ({done.key.name})")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("keys", help="API keys of a running server (admin key)")
    commands = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = commands.add_parser(name, help=help_)
        add_connection_arguments(p)
        p.set_defaults(func=handler)
        return p

    create = command("create", _create, "make a key and print it (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--owner")
    create.add_argument(
        "--org", help="organization (an organization admin key may only name its own)"
    )
    create.add_argument(
        "--role", action="append", choices=sorted(ROLES), help="repeatable (default viewer)"
    )
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        help="limit the key to a namespace: NAME or NAME:read|write|admin; prism-admin for key "
        "administration (repeatable; none: every namespace)",
    )
    create.add_argument(
        "--expires", help="ISO 8601 time or a duration from now (30d); default: never"
    )
    listing = command("list", _list, "list keys (never their secrets)")
    listing.add_argument("--include-revoked", action="store_true")
    revoke = command("revoke", _revoke, "revoke a key for good")
    revoke.add_argument("id", help="key id (the middle part of prism_<id>_<secret>)")
