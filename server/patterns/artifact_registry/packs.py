"""PCLPack export and import.

A pack is a stream of chunks: a manifest (format "pclpack/1" and the lock entries), one chunk per
artifact version (dependencies before dependents) and a trailer holding the SHA-256 over the
deterministic serialization of every earlier chunk. Import checks the pack digest, every source
digest and every dependency before it writes anything, writes in dependency order, and undoes
its own writes if one fails: all or nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, InvalidArgument, PrismError
from server.authz import Level, current_principal
from server.patterns.artifact_registry import model
from server.patterns.artifact_registry.model import ARTIFACTS
from server.patterns.artifact_registry.store import Stored
from server.patterns.artifact_registry.versions import parse_range, parse_version

if TYPE_CHECKING:
    from server.patterns.artifact_registry.service import ArtifactRegistry

FORMAT = "pclpack/1"
MAX_PACK_ARTIFACTS = 10_000


def _chunk_bytes(chunk: pb.PackChunk) -> bytes:
    return chunk.SerializeToString(deterministic=True)


def _portable(artifact: pb.Artifact) -> pb.Artifact:
    """What travels in a pack: the artifact without this registry's local state."""
    copy = pb.Artifact()
    copy.CopyFrom(artifact)
    for field in ("stats", "revision", "is_latest", "delete_time"):
        copy.ClearField(field)
    return copy


async def export_pack(
    registry: ArtifactRegistry, request: pb.ExportPackRequest, ctx: CallContext
) -> AsyncIterator[pb.ExportPackResponse]:
    if not request.ids:
        raise InvalidArgument("ids", "name at least one artifact")
    selected: dict[str, Stored] = {}
    for i, artifact_id in enumerate(request.ids):
        if not artifact_id:
            raise InvalidArgument(f"ids[{i}]", "is empty")
        root = await registry._load(artifact_id, ctx)
        if request.include_dependencies:
            lock, problems = await registry.resolver.resolve(root, ctx)
            if problems:
                first = problems[0]
                raise FailedPrecondition(
                    f"cannot resolve the dependencies of {root.doc['lineage']}: "
                    f"{first.reason} {first.name} ({'; '.join(first.constraints or first.path)})",
                    reason="UNRESOLVABLE_DEPENDENCIES",
                )
            for stored in lock:
                selected.setdefault(stored.id, stored)
        else:
            selected.setdefault(root.id, root)
    digest = hashlib.sha256()
    manifest = pb.PackChunk(
        manifest=pb.PackManifest(
            format=FORMAT,
            create_time=model._timestamp(model.now()),
            artifacts=[
                pb.LockedArtifact(
                    id=s.id,
                    name=s.doc["lineage"],
                    version=s.doc["version"],
                    source_sha256=s.doc["source_sha256"],
                )
                for s in selected.values()
            ],
        )
    )
    digest.update(_chunk_bytes(manifest))
    yield pb.ExportPackResponse(chunk=manifest)
    for stored in selected.values():
        chunk = pb.PackChunk(artifact=_portable(registry._artifact(stored)))
        digest.update(_chunk_bytes(chunk))
        yield pb.ExportPackResponse(chunk=chunk)
    trailer = pb.PackTrailer(pack_sha256=digest.hexdigest(), artifact_count=len(selected))
    yield pb.ExportPackResponse(chunk=pb.PackChunk(trailer=trailer))


def _label(artifact: pb.Artifact) -> str:
    return f"{artifact.organization}/{artifact.slug}@{artifact.version}"


def _structure(chunks: list[pb.PackChunk]) -> tuple[pb.PackManifest, list[pb.Artifact]]:
    """Manifest, artifacts and trailer in their places, and the pack digest right."""
    if len(chunks) < 2 or chunks[0].WhichOneof("chunk") != "manifest":
        raise InvalidArgument("chunks", "a pack starts with its manifest")
    if chunks[-1].WhichOneof("chunk") != "trailer":
        raise InvalidArgument("chunks", "a pack ends with its trailer")
    manifest = chunks[0].manifest
    if manifest.format != FORMAT:
        raise InvalidArgument(
            "chunks[0].manifest.format", f"unsupported pack format '{manifest.format}'"
        )
    artifacts = []
    for i, chunk in enumerate(chunks[1:-1], start=1):
        if chunk.WhichOneof("chunk") != "artifact":
            raise InvalidArgument(f"chunks[{i}]", "expected an artifact chunk")
        artifacts.append(chunk.artifact)
    if len(artifacts) > MAX_PACK_ARTIFACTS:
        raise InvalidArgument("chunks", f"more than {MAX_PACK_ARTIFACTS} artifacts")
    digest = hashlib.sha256()
    for chunk in chunks[:-1]:
        digest.update(_chunk_bytes(chunk))
    trailer = chunks[-1].trailer
    if digest.hexdigest() != trailer.pack_sha256 or trailer.artifact_count != len(artifacts):
        raise InvalidArgument(
            "chunks", "the pack digest does not match its contents (tampered or truncated)"
        )
    listed = [(a.id, a.source_sha256) for a in manifest.artifacts]
    if listed != [(a.id, a.source_sha256) for a in artifacts]:
        raise InvalidArgument(
            "chunks[0].manifest", "the manifest does not list the pack's artifacts"
        )
    return manifest, artifacts


def _document(artifact: pb.Artifact) -> dict[str, Any]:
    """The stored document of an imported version, keeping its life-cycle state and times."""
    created = (
        artifact.create_time.ToNanoseconds() / 1e9
        if artifact.HasField("create_time")
        else model.now()
    )
    doc = model.new_version_doc(artifact, created)
    doc["state"] = model.STATE_NAMES.get(artifact.state, "draft")
    if artifact.HasField("update_time"):
        doc["update_time"] = artifact.update_time.ToNanoseconds() / 1e9
    if doc["state"] != "draft":
        doc["publish_time"] = (
            artifact.publish_time.ToNanoseconds() / 1e9
            if artifact.HasField("publish_time")
            else created
        )
        doc["changelog"] = artifact.changelog
    return doc


async def import_pack(
    registry: ArtifactRegistry, request: pb.ImportPackRequest, ctx: CallContext
) -> AsyncIterator[pb.ImportPackResponse]:
    _, artifacts = _structure(list(request.chunks))
    principal = current_principal.get()
    for organization in sorted({a.organization for a in artifacts}):
        # before anything else, so a pack learns nothing about organizations it may not write
        principal.require(organization, Level.ADMIN, "ImportPack")
    issues: list[pb.ImportIssue] = []
    plan: list[tuple[pb.Artifact, dict[str, Any], Stored | None]] = []
    in_pack: dict[str, list[str]] = {}
    for artifact in artifacts:
        label = _label(artifact)
        try:
            doc = _document(artifact)
        except InvalidArgument as exc:
            issues.append(pb.ImportIssue(artifact=label, reason="INVALID", message=str(exc)))
            continue
        if model.source_digest(artifact.source) != artifact.source_sha256:
            issues.append(
                pb.ImportIssue(
                    artifact=label,
                    reason="DIGEST_MISMATCH",
                    message="the source does not match its SHA-256 digest",
                )
            )
            continue
        expected_id = model.version_id(doc["organization"], doc["slug"], doc["version"])
        if artifact.id != expected_id:
            issues.append(
                pb.ImportIssue(artifact=label, reason="INVALID", message="id does not match")
            )
            continue
        existing = await registry.store.get(ARTIFACTS, expected_id, ctx)
        replace_draft = (
            existing is not None and request.overwrite_drafts and existing.doc["state"] == "draft"
        )
        if existing is not None and not replace_draft:
            if existing.doc["source_sha256"] != doc["source_sha256"]:
                issues.append(
                    pb.ImportIssue(
                        artifact=label,
                        reason="ALREADY_EXISTS",
                        message="this version exists here with a different source",
                    )
                )
            continue  # identical version already here: skipped
        plan.append((artifact, doc, existing if replace_draft else None))
        in_pack.setdefault(doc["lineage"], []).append(doc["version"])
    for artifact, doc, _ in plan:
        for dep in doc["dependencies"]:
            wanted = parse_range(dep["constraint"])
            if any(wanted.matches(parse_version(v)) for v in in_pack.get(dep["name"], [])):
                continue
            org, _, slug = dep["name"].partition("/")
            here = await registry.visible_versions(org, slug, ctx)
            if not any(
                s.doc["state"] == "published" and wanted.matches(parse_version(s.doc["version"]))
                for s in here
            ):
                issues.append(
                    pb.ImportIssue(
                        artifact=_label(artifact),
                        reason="MISSING_DEPENDENCY",
                        message=(
                            f"nothing in the pack or registry satisfies "
                            f"{dep['name']} {dep['constraint']}"
                        ),
                    )
                )
    skipped = len(artifacts) - len(plan)
    if issues or request.dry_run:
        yield pb.ImportPackResponse(
            summary=pb.ImportSummary(
                imported=0, skipped=skipped, issues=issues, dry_run=request.dry_run
            )
        )
        return
    ordered = _dependency_order(plan)
    written: list[tuple[str, Stored | None]] = []
    try:
        for done, (artifact, doc, existing) in enumerate(ordered, start=1):
            doc_id = artifact.id
            if existing is None:
                await registry.store.insert(ARTIFACTS, doc_id, doc, ctx)
            else:
                await registry.store.replace(ARTIFACTS, doc_id, doc, existing.revision, ctx)
            written.append((doc_id, existing))
            await registry.cache.invalidate(doc_id, ctx)
            yield pb.ImportPackResponse(
                progress=pb.ImportProgress(done=done, total=len(ordered), artifact=_label(artifact))
            )
    except PrismError:
        for doc_id, previous in reversed(written):
            if previous is None:
                await registry.store.delete(ARTIFACTS, doc_id, ctx)
            else:
                current = await registry.store.get(ARTIFACTS, doc_id, ctx)
                if current is not None:
                    await registry.store.replace(
                        ARTIFACTS, doc_id, previous.doc, current.revision, ctx
                    )
            await registry.cache.invalidate(doc_id, ctx)
        raise
    lineages = {(doc["organization"], doc["slug"]) for _, doc, _ in ordered}
    for organization, slug in sorted(lineages):
        await registry._refresh_latest(organization, slug, ctx)
    for artifact, doc, _ in ordered:
        await registry.feed.emit(pb.CHANGE_KIND_CREATED, artifact.id, doc, ctx)
    yield pb.ImportPackResponse(
        summary=pb.ImportSummary(imported=len(ordered), skipped=skipped, dry_run=False)
    )


def _dependency_order(
    plan: list[tuple[pb.Artifact, dict[str, Any], Stored | None]],
) -> list[tuple[pb.Artifact, dict[str, Any], Stored | None]]:
    """Versions whose dependencies are in the pack come after them (cycles keep pack order)."""
    by_lineage: dict[str, list[int]] = {}
    for i, (_, doc, _) in enumerate(plan):
        by_lineage.setdefault(doc["lineage"], []).append(i)
    ordered: list[int] = []
    state: dict[int, int] = {}

    def visit(i: int) -> None:
        if state.get(i):
            return
        state[i] = 1
        for dep in plan[i][1]["dependencies"]:
            for j in by_lineage.get(dep["name"], []):
                visit(j)
        ordered.append(i)

    for i in range(len(plan)):
        visit(i)
    return [plan[i] for i in ordered]
