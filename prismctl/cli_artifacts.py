"""`prismctl artifacts ...`: the artifact registry from the command line, against a running server.

The server address comes from --address, else $PRISM_ADDRESS, else 127.0.0.1:50051; the
namespace from --namespace or $PRISM_NAMESPACE (needed only when several namespaces serve the
registry); the API key from --api-key or $PRISM_API_KEY (sent as `authorization: Bearer <key>`).
Output is a human table or, with --format json, JSON. A rejected request is one line on
stderr and exit 1; a server that cannot be reached, or a file that cannot be read, exit 3.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as pb_grpc

from prismctl.cli_common import EXIT_FINDINGS, EXIT_INTERNAL, EXIT_OK, CliError

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT = 30.0
PACK_MAGIC = b"PCLPACK1"

TYPES = {v.name.removeprefix("ARTIFACT_TYPE_").lower(): v.number for v in
         pb.ArtifactType.DESCRIPTOR.values if v.number}  # fmt: skip
VISIBILITIES = {v.name.removeprefix("VISIBILITY_").lower(): v.number for v in
                pb.Visibility.DESCRIPTOR.values if v.number}  # fmt: skip
SORTS = {
    "name": pb.SORT_FIELD_NAME,
    "created": pb.SORT_FIELD_CREATE_TIME,
    "updated": pb.SORT_FIELD_UPDATE_TIME,
    "downloads": pb.SORT_FIELD_DOWNLOADS,
    "stars": pb.SORT_FIELD_STARS,
    "views": pb.SORT_FIELD_VIEWS,
}


class Client:
    """A blocking stub with the namespace metadata and a deadline on every call; gRPC failures
    become one-line CliErrors."""

    def __init__(
        self,
        args: argparse.Namespace,
        stub: Callable[[grpc.Channel], Any] = pb_grpc.ArtifactRegistryServiceStub,
    ) -> None:
        self.address = args.address or os.environ.get("PRISM_ADDRESS") or DEFAULT_ADDRESS
        namespace = args.namespace or os.environ.get("PRISM_NAMESPACE") or ""
        api_key = args.api_key or os.environ.get("PRISM_API_KEY") or ""
        metadata: list[tuple[str, str]] = []
        if namespace:
            metadata.append(("x-prism-namespace", namespace))
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        self.metadata = tuple(metadata)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = stub(self.channel)

    def call(self, rpc: str, request: Message) -> Any:
        try:
            return getattr(self.stub, rpc)(request, metadata=self.metadata, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def stream(self, rpc: str, request: Message) -> Iterator[Any]:
        try:
            yield from getattr(self.stub, rpc)(request, metadata=self.metadata, timeout=600)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: Any) -> CliError:
        code: grpc.StatusCode = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return CliError(f"{self.address}: {code.name}: {exc.details()}", EXIT_INTERNAL)
        return CliError(f"{code.name}: {exc.details()}", EXIT_FINDINGS)


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _emit(args: argparse.Namespace, message: Message, table: Callable[[], str]) -> int:
    print(json.dumps(_to_json(message), indent=2) if args.format == "json" else table())
    return EXIT_OK


def _rows(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(header), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _summary(artifacts: Iterable[pb.Artifact]) -> str:
    return _rows(
        ["ID", "NAME", "ORG/SLUG", "VERSION", "TYPE", "STATE", "LATEST", "DOWNLOADS", "STARS"],
        [
            (a.id, a.name, f"{a.organization}/{a.slug}", a.version,
             pb.ArtifactType.Name(a.type).removeprefix("ARTIFACT_TYPE_").lower(),
             pb.VersionState.Name(a.state).removeprefix("VERSION_STATE_").lower(),
             "*" if a.is_latest else "", a.stats.downloads, a.stats.stars)
            for a in artifacts
        ],
    )  # fmt: skip


def _detail(a: pb.Artifact) -> str:
    lines = [
        f"{a.organization}/{a.slug}@{a.version}  ({a.name})",
        f"  id:          {a.id}",
        f"  type:        {pb.ArtifactType.Name(a.type).removeprefix('ARTIFACT_TYPE_').lower()}",
        f"  state:       {pb.VersionState.Name(a.state).removeprefix('VERSION_STATE_').lower()}"
        + ("  (latest)" if a.is_latest else ""),
        f"  visibility:  {pb.Visibility.Name(a.visibility).removeprefix('VISIBILITY_').lower()}",
        f"  sha256:      {a.source_sha256}",
    ]
    if a.metadata.description:
        lines.append(f"  description: {a.metadata.description}")
    if a.metadata.tags:
        lines.append(f"  tags:        {', '.join(a.metadata.tags)}")
    if a.metadata.skills:
        lines.append(f"  skills:      {', '.join(a.metadata.skills)}")
    for d in a.dependencies:
        lines.append(f"  depends on:  {d.name} {d.version_constraint}")
    lines.append(f"  stats:       {a.stats.downloads} downloads, {a.stats.stars} stars")
    return "\n".join(lines)


def _choice(value: str, options: dict[str, int], what: str) -> int:
    if value not in options:
        raise CliError(f"unknown {what} '{value}' (one of {', '.join(options)})", 2)
    return options[value]


def _dependency(text: str) -> pb.Dependency:
    name, _, constraint = text.partition("@")
    return pb.Dependency(name=name, version_constraint=constraint or "*")


def _source(args: argparse.Namespace) -> str:
    if args.source_file is None:
        return str(args.source or "")
    try:
        return Path(args.source_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{args.source_file}: cannot read: {exc}", EXIT_INTERNAL) from None


def cmd_create(args: argparse.Namespace, client: Client) -> int:
    artifact = pb.Artifact(
        organization=args.org,
        name=args.name,
        slug=args.slug or "",
        type=_choice(args.type, TYPES, "type"),  # type: ignore[arg-type]
        version=args.version,
        source=_source(args),
        visibility=_choice(args.visibility, VISIBILITIES, "visibility"),  # type: ignore[arg-type]
        metadata=pb.ArtifactMetadata(
            description=args.description or "",
            author=args.author or "",
            tags=args.tag,
            skills=args.skill,
            keywords=args.keyword,
        ),
        dependencies=[_dependency(d) for d in args.dep],
    )
    response = client.call(
        "CreateArtifact",
        pb.CreateArtifactRequest(artifact=artifact, publish=args.publish, changelog=args.changelog),
    )
    return _emit(args, response, lambda: _detail(response.artifact))


def cmd_get(args: argparse.Namespace, client: Client) -> int:
    if args.id:
        response = client.call("GetArtifact", pb.GetArtifactRequest(id=args.id))
    elif args.org and args.slug:
        response = client.call(
            "GetArtifactBySlug",
            pb.GetArtifactBySlugRequest(
                organization=args.org, slug=args.slug, version=args.version or ""
            ),
        )
    else:
        raise CliError("give an ID, or --org and --slug", 2)
    return _emit(args, response, lambda: _detail(response.artifact))


def _filter(args: argparse.Namespace) -> pb.ArtifactFilter:
    return pb.ArtifactFilter(
        organization=args.org or "",
        types=[_choice(t, TYPES, "type") for t in args.type],  # type: ignore[misc]
        tags=args.tag,
        tags_match=pb.LIST_MATCH_ALL if args.all_tags else pb.LIST_MATCH_ANY,
        skills=args.skill,
        author=args.author or "",
        latest_only=not args.all_versions,
    )


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    response = client.call(
        "ListArtifacts",
        pb.ListArtifactsRequest(
            filter=_filter(args),
            order_by=SORTS[args.sort],
            descending=args.desc,
            page_size=args.limit,
            page_token=args.page_token or "",
        ),
    )

    def table() -> str:
        text = _summary(response.artifacts)
        if response.next_page_token:
            text += f"\nmore: --page-token {response.next_page_token}"
        return text

    return _emit(args, response, table)


def cmd_search(args: argparse.Namespace, client: Client) -> int:
    response = client.call(
        "SearchArtifacts",
        pb.SearchArtifactsRequest(query=args.query, filter=_filter(args), page_size=args.limit),
    )

    def table() -> str:
        # ranks, not raw scores: an exact name match outranks by a tier worth ~1e12 points,
        # which says nothing to a reader (--format json keeps the scores)
        lines = []
        for rank, hit in enumerate(response.hits, start=1):
            a = hit.artifact
            lines.append(f"{rank:>3}.  {a.organization}/{a.slug}@{a.version}  {a.name}")
            lines += [f"{'':6}{h.field}: {h.snippet}" for h in hit.highlights]
        return "\n".join(lines) or "no matches"

    return _emit(args, response, table)


def cmd_versions(args: argparse.Namespace, client: Client) -> int:
    response = client.call(
        "ListVersions", pb.ListVersionsRequest(organization=args.org, slug=args.slug)
    )
    return _emit(args, response, lambda: _summary(response.versions))


def _by_id(rpc: str, request: Message) -> Callable[[argparse.Namespace, Client], int]:
    def run(args: argparse.Namespace, client: Client) -> int:
        response = client.call(rpc, request_for(args))
        return _emit(args, response, lambda: _detail(response.artifact))

    def request_for(args: argparse.Namespace) -> Message:
        message = type(request)()
        message.CopyFrom(request)
        for field in ("id", "changelog", "reason"):
            if hasattr(args, field) and field in message.DESCRIPTOR.fields_by_name:
                setattr(message, field, getattr(args, field) or "")
        return message

    return run


def cmd_purge(args: argparse.Namespace, client: Client) -> int:
    response = client.call("PurgeArtifact", pb.PurgeArtifactRequest(id=args.id, force=args.force))
    return _emit(
        args,
        response,
        lambda: f"purged {args.id}"
        + (f" (dependents left dangling: {', '.join(response.dependents)})"
           if response.dependents else ""),
    )  # fmt: skip


def cmd_star(args: argparse.Namespace, client: Client) -> int:
    rpc, request_type = (
        ("UnstarArtifact", pb.UnstarArtifactRequest)
        if args.unstar
        else ("StarArtifact", pb.StarArtifactRequest)
    )
    response = client.call(rpc, request_type(id=args.id, user=args.user))
    return _emit(args, response, lambda: f"{args.id}: {response.stats.stars} stars")


def cmd_resolve(args: argparse.Namespace, client: Client) -> int:
    response = client.call(
        "ResolveDependencies",
        pb.ResolveDependenciesRequest(organization=args.org, slug=args.slug, version=args.version),
    )

    def table() -> str:
        if response.problems:
            return "\n".join(
                f"{p.reason}: {p.name}: {'; '.join(p.constraints) or ' -> '.join(p.path)}"
                for p in response.problems
            )
        return _rows(
            ["NAME", "VERSION", "SHA256"],
            [(e.name, e.version, e.source_sha256[:16]) for e in response.lock],
        )

    _emit(args, response, table)
    return EXIT_FINDINGS if response.problems else EXIT_OK


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()

    def update(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        filled = int(30 * done / total)
        sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def write_pack(out: IO[bytes], chunks: Iterable[pb.PackChunk]) -> int:
    """PCLPack file: magic, then each chunk as a 4-byte big-endian length and its bytes."""
    out.write(PACK_MAGIC)
    count = 0
    for chunk in chunks:
        data = chunk.SerializeToString(deterministic=True)
        out.write(struct.pack(">I", len(data)) + data)
        count += 1
    return count


def read_pack(path: Path) -> list[pb.PackChunk]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}", EXIT_INTERNAL) from None
    if not data.startswith(PACK_MAGIC):
        raise CliError(f"{path}:1:1: not a PCLPack file (bad magic)", EXIT_FINDINGS)
    chunks, offset = [], len(PACK_MAGIC)
    while offset < len(data):
        if offset + 4 > len(data):
            raise CliError(f"{path}: truncated at byte {offset}", EXIT_FINDINGS)
        (size,) = struct.unpack(">I", data[offset : offset + 4])
        body = data[offset + 4 : offset + 4 + size]
        if len(body) != size:
            raise CliError(f"{path}: truncated at byte {offset}", EXIT_FINDINGS)
        try:
            chunks.append(pb.PackChunk.FromString(body))
        except DecodeError:
            raise CliError(f"{path}: corrupt chunk at byte {offset}", EXIT_FINDINGS) from None
        offset += 4 + size
    return chunks


def cmd_export(args: argparse.Namespace, client: Client) -> int:
    progress = Progress("export")
    stream = client.stream(
        "ExportPack", pb.ExportPackRequest(ids=args.ids, include_dependencies=args.with_deps)
    )
    total = 0

    def chunks() -> Iterator[pb.PackChunk]:
        nonlocal total
        for i, response in enumerate(stream):
            chunk = response.chunk
            if chunk.HasField("manifest"):
                total = len(chunk.manifest.artifacts)
            progress.update(max(0, i), total)
            yield chunk

    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tmp.open("wb") as f:
            count = write_pack(f, chunks())
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"{out}: cannot write: {exc.strerror or exc}", EXIT_INTERNAL) from None
    finally:
        progress.close()
    print(f"exported {max(0, count - 2)} artifact(s) to {out}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, client: Client) -> int:
    chunks = read_pack(Path(args.file))
    progress = Progress("import")
    summary = pb.ImportSummary()
    try:
        for event in client.stream(
            "ImportPack", pb.ImportPackRequest(chunks=chunks, dry_run=args.dry_run)
        ):
            if event.HasField("progress"):
                progress.update(event.progress.done, event.progress.total)
            else:
                summary = event.summary
    finally:
        progress.close()
    if args.format == "json":
        print(json.dumps(_to_json(summary), indent=2))
    else:
        verb = "would import" if summary.dry_run else "imported"
        print(f"{verb} {summary.imported}, skipped {summary.skipped}")
        for issue in summary.issues:
            print(f"{args.file}: {issue.artifact}: {issue.message} [{issue.reason}]")
    return EXIT_FINDINGS if summary.issues else EXIT_OK


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server is and who we are: every command talking to a running server has these."""
    p.add_argument(
        "--address", help=f"server HOST:PORT (default $PRISM_ADDRESS or {DEFAULT_ADDRESS})"
    )
    p.add_argument("--namespace", help="namespace (default $PRISM_NAMESPACE)")
    p.add_argument("--api-key", help="API key (default $PRISM_API_KEY)")
    p.add_argument("--format", choices=["table", "json"], default="table")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("artifacts", help="the artifact registry of a running server")
    commands = parser.add_subparsers(dest="artifacts_command", metavar="ACTION", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace, Client], int], help_: str) -> Any:
        p = commands.add_parser(name, help=help_)
        add_connection_arguments(p)
        p.set_defaults(func=lambda args: handler(args, Client(args)))
        return p

    def filters(p: Any) -> None:
        p.add_argument("--org")
        p.add_argument("--type", action="append", default=[], help="repeatable")
        p.add_argument("--tag", action="append", default=[], help="repeatable")
        p.add_argument("--all-tags", action="store_true", help="require every --tag")
        p.add_argument("--skill", action="append", default=[], help="repeatable")
        p.add_argument("--author")
        p.add_argument("--all-versions", action="store_true", help="not only latest versions")
        p.add_argument("--limit", type=int, default=20)

    p = command("create", cmd_create, "create a version (a draft unless --publish)")
    p.add_argument("--org", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--slug")
    p.add_argument("--type", required=True, help=", ".join(TYPES))
    p.add_argument("--version", default="1.0.0")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="PCL source text")
    source.add_argument("--source-file", help="file with the PCL source")
    p.add_argument("--description")
    p.add_argument("--author")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--skill", action="append", default=[])
    p.add_argument("--keyword", action="append", default=[])
    p.add_argument("--dep", action="append", default=[], help="ORG/SLUG@RANGE (repeatable)")
    p.add_argument("--visibility", default="public", help=", ".join(VISIBILITIES))
    p.add_argument("--publish", action="store_true")
    p.add_argument("--changelog", default="")

    p = command("get", cmd_get, "show a version by ID, or by --org/--slug [--version RANGE]")
    p.add_argument("id", nargs="?")
    p.add_argument("--org")
    p.add_argument("--slug")
    p.add_argument("--version")

    p = command("list", cmd_list, "list artifacts")
    filters(p)
    p.add_argument("--sort", choices=list(SORTS), default="name")
    p.add_argument("--desc", action="store_true")
    p.add_argument("--page-token")

    p = command("search", cmd_search, "ranked full-text search")
    p.add_argument("query")
    filters(p)

    p = command("versions", cmd_versions, "versions of a lineage, highest first")
    p.add_argument("--org", required=True)
    p.add_argument("--slug", required=True)

    p = command("publish", _by_id("PublishVersion", pb.PublishVersionRequest()), "publish a draft")
    p.add_argument("id")
    p.add_argument("--changelog", default="")
    p = command("deprecate", _by_id("DeprecateVersion", pb.DeprecateVersionRequest()), "deprecate")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p = command("delete", _by_id("DeleteArtifact", pb.DeleteArtifactRequest()), "soft-delete")
    p.add_argument("id")

    p = command("purge", cmd_purge, "delete for good")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="even if others depend on it")

    p = command("export", cmd_export, "write a PCLPack file")
    p.add_argument("ids", nargs="+")
    p.add_argument("--with-deps", action="store_true", help="include the dependency closure")
    p.add_argument("-o", "--output", required=True)

    p = command("import", cmd_import, "import a PCLPack file (all or nothing)")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true")

    p = command("star", cmd_star, "star (or --unstar) a version for a user")
    p.add_argument("id")
    p.add_argument(
        "--user",
        default="",
        help="who stars (default: the API key's owner; required with an unauthenticated server)",
    )
    p.add_argument("--unstar", action="store_true")

    p = command("resolve", cmd_resolve, "lock the dependency graph of a version")
    p.add_argument("--org", required=True)
    p.add_argument("--slug", required=True)
    p.add_argument("--version", default="")
