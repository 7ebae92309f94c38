"""ArtifactRegistryService over slots. Every method is a contract method (request, ctx) → response
served by the generic gRPC adapter; all data goes through the thin interfaces of the slots."""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from server.authz import SYSTEM, Level, Principal, current_principal
from server.patterns.artifact_registry import model
from server.patterns.artifact_registry.cache import ArtifactCache
from server.patterns.artifact_registry.events import ChangeFeed
from server.patterns.artifact_registry.model import ARTIFACTS, doc_to_artifact
from server.patterns.artifact_registry.resolver import DependencyResolver
from server.patterns.artifact_registry.search import ArtifactSearch
from server.patterns.artifact_registry.store import DocumentStore, Stored
from server.patterns.artifact_registry.versions import Version, parse_range, parse_version

STARS = "stars"
COLLECTIONS = "collections"
LINEAGES = "lineages"
CAS_RETRIES = 20

#: trending: exponential decay with a 3-day half-life, kept as log-sum-exp relative to an epoch
#: so that one sortable number per artifact orders by decayed score at any moment
TREND_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TREND_RATE = math.log(2) / (3 * 86_400)
TREND_WEIGHTS = {"download": 1.0, "star": 3.0}

SORT_FIELDS = {
    pb.SORT_FIELD_UNSPECIFIED: "name",
    pb.SORT_FIELD_NAME: "name",
    pb.SORT_FIELD_CREATE_TIME: "create_time",
    pb.SORT_FIELD_UPDATE_TIME: "update_time",
    pb.SORT_FIELD_DOWNLOADS: "stats.downloads",
    pb.SORT_FIELD_STARS: "stats.stars",
    pb.SORT_FIELD_VIEWS: "stats.views",
}
UPDATABLE = {"name", "source", "metadata", "visibility", "dependencies", "version"}
METADATA_FIELDS = {f.name for f in pb.ArtifactMetadata.DESCRIPTOR.fields}
#: what may change on a published (immutable) version
MUTABLE_WHEN_PUBLISHED = {"visibility"}


class _KeepPin:
    """Marker: a latest-version refresh that leaves any RollbackVersion pin as it is."""


KEEP_PIN = _KeepPin()


def _id(value: str, field: str = "id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return value


def listing_scope(principal: Principal) -> dict[str, Any] | None:
    """What a caller's listings may contain (docs/authorization.md): live public artifacts and
    everything of its own organization; None (no limit) for the system and server admins."""
    if principal.sees_everything:
        return None
    public: dict[str, Any] = {"$and": [{"visibility": "public"}, {"deleted": False}]}
    if not principal.organization:
        return public
    return {"$or": [public, {"organization": principal.organization}]}


def discovery_scope(principal: Principal) -> dict[str, Any]:
    """What tags, skills, trending and related artifacts are drawn from: public artifacts and
    the private ones the caller may list (never unlisted ones)."""
    if principal.sees_everything:
        return {"visibility": {"$ne": "unlisted"}}
    if not principal.organization:
        return {"visibility": "public"}
    own = {"$and": [{"organization": principal.organization}, {"visibility": "private"}]}
    return {"$or": [{"visibility": "public"}, own]}


def artifact_filter(f: pb.ArtifactFilter, *, listing: bool = True) -> dict[str, Any]:
    """ArtifactFilter → the document filter language, limited to what the caller may list.
    Listings hide unlisted artifacts unless the filter asks for that visibility."""
    clauses: list[dict[str, Any]] = []
    scope = listing_scope(current_principal.get())
    if scope is not None:
        clauses.append(scope)
    if f.types:
        names = [model.TYPE_NAMES.get(t) for t in f.types]
        if None in names:
            raise InvalidArgument("filter.types", "contains an unknown type")
        clauses.append({"type": {"$in": names}})
    for field, values, match in (
        ("tags", f.tags, f.tags_match),
        ("skills", f.skills, f.skills_match),
    ):
        if values:
            op = "$all" if match == pb.LIST_MATCH_ALL else "$in"
            clauses.append({f"metadata.{field}": {op: [v.strip().lower() for v in values]}})
    if f.author:
        clauses.append({"metadata.author": f.author})
    if f.organization:
        clauses.append({"organization": f.organization})
    if f.visibility:
        clauses.append({"visibility": model.VISIBILITY_NAMES[f.visibility]})
    elif listing:
        clauses.append({"visibility": {"$ne": "unlisted"}})
    if f.HasField("published"):
        states = ["published", "deprecated"] if f.published else ["draft"]
        clauses.append({"state": {"$in": states}})
    if not f.include_deleted:
        clauses.append({"deleted": False})
    if f.latest_only:
        clauses.append({"is_latest": True})
    if f.min_downloads < 0 or f.min_stars < 0:
        raise InvalidArgument("filter.min_downloads", "must not be negative")
    if f.min_downloads:
        clauses.append({"stats.downloads": {"$gte": f.min_downloads}})
    if f.min_stars:
        clauses.append({"stats.stars": {"$gte": f.min_stars}})
    return {"$and": clauses} if clauses else {}


def _visible(doc: dict[str, Any]) -> bool:
    """Whether the caller may know this version exists: members see their organization's, others
    live public and unlisted ones."""
    if current_principal.get().member_of(doc["organization"]):
        return True
    return doc["visibility"] != "private" and not doc["deleted"]


def _may_edit(doc: dict[str, Any], what: str) -> None:
    """UpdateArtifact and new versions: write access in the artifact's organization."""
    current_principal.get().require(doc["organization"], Level.WRITE, what)


def _may_manage(doc: dict[str, Any], what: str) -> None:
    """Publish, deprecate, roll back, delete, undelete: admin, or an owner with write access."""
    principal = current_principal.get()
    organization = doc["organization"]
    owner_with_write = principal.owns(organization, doc["owner"]) and (
        principal.level_in(organization) >= Level.WRITE
    )
    if not owner_with_write:
        principal.require(organization, Level.ADMIN, what)


def _rule(
    check: Callable[[dict[str, Any], str], None], what: str
) -> Callable[[dict[str, Any]], None]:
    return lambda doc: check(doc, what)


def _may_administer(doc: dict[str, Any], what: str) -> None:
    current_principal.get().require(doc["organization"], Level.ADMIN, what)


def _star_user(requested: str) -> str:
    """Stars are given as the caller: an API key stars for its owner (or `key:<id>`)."""
    principal = current_principal.get()
    user = requested.strip()
    if principal is SYSTEM:
        if not user:
            raise InvalidArgument("user", "is required")
        return user
    if user and user != principal.user:
        raise PermissionDenied(
            f"this API key acts for '{principal.user}', not '{user}'",
            reason="USER_MISMATCH",
            user=principal.user,
        )
    return principal.user


def _star_id(artifact_id: str, user: str) -> str:
    return hashlib.sha256(f"{artifact_id}\0{user}".encode()).hexdigest()[:32]


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class ArtifactRegistry:
    """The pattern's behaviour; slots arrive as contract objects."""

    def __init__(
        self,
        store: DocumentStore,
        cache: ArtifactCache,
        feed: ChangeFeed,
        search: ArtifactSearch,
    ) -> None:
        self.store = store
        self.cache = cache
        self.feed = feed
        self.searcher = search
        self.resolver = DependencyResolver(self.visible_versions)

    # ---- reading -------------------------------------------------------------------------

    async def _load(self, doc_id: str, ctx: CallContext, include_deleted: bool = False) -> Stored:
        """A version by id through the caches, its digest verified; NOT_FOUND when missing or
        (unless asked for) soft-deleted."""
        stored = await self.cache.get(doc_id, ctx)
        if stored is None:
            generation = self.cache.generation(doc_id)
            stored = await self.store.get(ARTIFACTS, doc_id, ctx)
            if stored is None:
                raise NotFound(
                    f"artifact {doc_id} not found", reason="ARTIFACT_NOT_FOUND", id=doc_id
                )
            await self.cache.put(stored, generation, ctx)
        hidden = stored.doc["deleted"] and not include_deleted
        if hidden or not _visible(stored.doc):
            raise NotFound(f"artifact {doc_id} not found", reason="ARTIFACT_NOT_FOUND", id=doc_id)
        self._verify(stored)
        return stored

    @staticmethod
    def _verify(stored: Stored) -> None:
        if model.source_digest(stored.doc["source"]) != stored.doc["source_sha256"]:
            raise DataLoss(
                f"artifact {stored.id}: stored source does not match its SHA-256 digest",
                reason="DIGEST_MISMATCH",
                id=stored.id,
            )

    def _artifact(self, stored: Stored) -> pb.Artifact:
        return doc_to_artifact(stored.id, stored.doc, stored.revision)

    async def _lineage_versions(
        self, organization: str, slug: str, ctx: CallContext, include_deleted: bool = False
    ) -> list[Stored]:
        filter_: dict[str, Any] = {"lineage": model.lineage(organization, slug)}
        if not include_deleted:
            filter_["deleted"] = False
        return [s async for s in self.store.find_all(ARTIFACTS, filter_, ctx)]

    async def visible_versions(
        self, organization: str, slug: str, ctx: CallContext, include_deleted: bool = False
    ) -> list[Stored]:
        """The lineage's versions the caller may see: what resolution and listings use."""
        versions = await self._lineage_versions(organization, slug, ctx, include_deleted)
        return [s for s in versions if _visible(s.doc)]

    async def _resolve_slug(
        self, organization: str, slug: str, version: str, ctx: CallContext, drafts: bool = False
    ) -> Stored:
        model.check_organization(organization, "organization")
        model.check_slug(slug, "slug")
        missing = NotFound(
            f"no version of {organization}/{slug} matches '{version or 'latest'}'",
            reason="ARTIFACT_NOT_FOUND",
            name=f"{organization}/{slug}",
        )
        if not version or Version.is_valid(version):
            if version:
                wanted_id = model.version_id(organization, slug, str(parse_version(version)))
            else:
                record = await self._lineage(organization, slug, ctx)
                if record is None or not record.doc["latest_id"]:
                    raise missing
                wanted_id = record.doc["latest_id"]
            try:
                return await self._load(wanted_id, ctx)
            except NotFound:
                raise missing from None  # hidden or gone: the same answer either way
        wanted = parse_range(version, "version")
        candidates = {
            parse_version(s.doc["version"]): s
            for s in await self.visible_versions(organization, slug, ctx)
            if s.doc["state"] == "published" or (drafts and s.doc["state"] == "draft")
        }
        best = wanted.best(candidates)
        if best is None:
            raise missing
        self._verify(candidates[best])
        return candidates[best]

    # ---- writing -------------------------------------------------------------------------

    async def _written(
        self, stored: Stored, kind: pb.ChangeKind.ValueType, ctx: CallContext
    ) -> None:
        await self.cache.invalidate(stored.id, ctx)
        await self.feed.emit(kind, stored.id, stored.doc, ctx)

    async def _mutate(
        self,
        doc_id: str,
        change: Callable[[dict[str, Any]], None],
        ctx: CallContext,
        expected_revision: int = 0,
        include_deleted: bool = False,
        authorize: Callable[[dict[str, Any]], None] | None = None,
    ) -> Stored:
        """Read-modify-write of one version with the store's revision check; retried on
        conflicts only when the caller gave no expected revision (then every retry re-reads).
        `authorize` sees the current document first and raises if the caller may not change it
        (the read itself already hides what the caller may not see)."""
        for _ in range(CAS_RETRIES):
            await self.cache.invalidate(doc_id, ctx)
            current = await self._load(doc_id, ctx, include_deleted=include_deleted)
            if authorize is not None:
                authorize(current.doc)
            if expected_revision and current.revision != expected_revision:
                raise Aborted(
                    f"artifact {doc_id} is at revision {current.revision}, not {expected_revision}",
                    reason="REVISION_MISMATCH",
                    current_revision=current.revision,
                )
            doc = {**current.doc, "stats": dict(current.doc["stats"])}
            change(doc)
            doc["update_time"] = model.now()
            try:
                stored = await self.store.replace(ARTIFACTS, doc_id, doc, current.revision, ctx)
            except Aborted:
                if expected_revision:
                    raise
                continue
            await self.cache.invalidate(doc_id, ctx)
            return stored
        raise Aborted(f"artifact {doc_id}: too much contention", reason="REVISION_MISMATCH")

    async def _lineage(self, organization: str, slug: str, ctx: CallContext) -> Stored | None:
        """The lineage record: {"lineage", "latest_id", "pinned"} — which version is latest (so
        GetArtifactBySlug is two reads by id) and any RollbackVersion pin."""
        return await self.store.get(LINEAGES, model.version_id(organization, slug, ""), ctx)

    async def _save_lineage(
        self, organization: str, slug: str, record: Stored | None, doc: dict[str, Any],
        ctx: CallContext,
    ) -> None:  # fmt: skip
        """Write the lineage record iff nobody changed it since `record` was read (ABORTED or
        ALREADY_EXISTS otherwise): concurrent refreshes of one lineage serialize here."""
        lineage_id = model.version_id(organization, slug, "")
        if record is None:
            await self.store.insert(LINEAGES, lineage_id, doc, ctx)
        else:
            await self.store.replace(LINEAGES, lineage_id, doc, record.revision, ctx)

    async def _refresh_latest(
        self, organization: str, slug: str, ctx: CallContext, pin: str | _KeepPin | None = KEEP_PIN
    ) -> None:
        """Make exactly one version of the lineage `is_latest`: the pinned one (RollbackVersion)
        if still published, else the highest published (non-deprecated) stable version, else
        the highest published prerelease. `pin` sets (a version) or clears (None) the pin."""
        for _ in range(CAS_RETRIES):
            record = await self._lineage(organization, slug, ctx)
            if isinstance(pin, _KeepPin):
                pinned = record.doc.get("pinned") if record else None
            else:
                pinned = pin
            versions = await self._lineage_versions(organization, slug, ctx)
            published = {
                parse_version(s.doc["version"]): s
                for s in versions
                if s.doc["state"] == "published"
            }
            chosen = next((s for s in published.values() if s.doc["version"] == pinned), None)
            stable = [v for v in published if not v.prerelease]
            if chosen is None and published:
                chosen = published[max(stable or published)]
            doc = {
                "lineage": model.lineage(organization, slug),
                "pinned": pinned,
                "latest_id": chosen.id if chosen else None,
            }
            try:
                await self._save_lineage(organization, slug, record, doc, ctx)
                for stored in versions:
                    want = stored is chosen
                    if stored.doc["is_latest"] != want:
                        flagged = {**stored.doc, "is_latest": want}
                        await self.store.replace(
                            ARTIFACTS, stored.id, flagged, stored.revision, ctx
                        )
                        await self.cache.invalidate(stored.id, ctx)
            except (Aborted, AlreadyExists):
                continue
            return
        raise Aborted(f"{organization}/{slug}: too much contention", reason="REVISION_MISMATCH")

    async def _after_publish(self, organization: str, slug: str, ctx: CallContext) -> None:
        """A new publication ends any RollbackVersion pin and may change the latest version."""
        await self._refresh_latest(organization, slug, ctx, pin=None)

    async def _insert_version(self, doc: dict[str, Any], ctx: CallContext) -> Stored:
        """Store a new version under its (organization, slug, version) id: the store's
        insert-if-absent is what makes that triple unique on every backend."""
        doc_id = model.version_id(doc["organization"], doc["slug"], doc["version"])
        try:
            stored = await self.store.insert(ARTIFACTS, doc_id, doc, ctx)
        except AlreadyExists:
            raise AlreadyExists(
                f"{doc['lineage']}@{doc['version']} already exists",
                reason="ARTIFACT_EXISTS",
                name=doc["lineage"],
                version=doc["version"],
            ) from None
        await self._written(stored, pb.CHANGE_KIND_CREATED, ctx)
        return stored

    async def create_artifact(
        self, request: pb.CreateArtifactRequest, ctx: CallContext
    ) -> pb.CreateArtifactResponse:
        principal = current_principal.get()
        organization = request.artifact.organization
        principal.require(organization, Level.WRITE, "CreateArtifact")
        at = model.now()
        doc = model.new_version_doc(request.artifact, at)
        if not doc["owner"]:
            doc["owner"] = principal.owner
        elif doc["owner"] != principal.owner and principal.level_in(organization) < Level.ADMIN:
            raise PermissionDenied(
                f"only an admin may create an artifact owned by someone else ('{doc['owner']}')",
                reason="OWNER_MISMATCH",
                owner=doc["owner"],
            )
        if request.publish:
            _may_manage(doc, "CreateArtifact with publish")
            doc.update(state="published", publish_time=at, changelog=request.changelog)
        stored = await self._insert_version(doc, ctx)
        if request.publish:
            await self._after_publish(doc["organization"], doc["slug"], ctx)
            stored = await self._load(stored.id, ctx)
        return pb.CreateArtifactResponse(artifact=self._artifact(stored))

    async def get_artifact(
        self, request: pb.GetArtifactRequest, ctx: CallContext
    ) -> pb.GetArtifactResponse:
        stored = await self._load(_id(request.id), ctx, include_deleted=request.include_deleted)
        return pb.GetArtifactResponse(artifact=self._artifact(stored))

    async def get_artifact_by_slug(
        self, request: pb.GetArtifactBySlugRequest, ctx: CallContext
    ) -> pb.GetArtifactBySlugResponse:
        stored = await self._resolve_slug(
            request.organization, request.slug, request.version, ctx, request.include_drafts
        )
        return pb.GetArtifactBySlugResponse(artifact=self._artifact(stored))

    async def update_artifact(
        self, request: pb.UpdateArtifactRequest, ctx: CallContext
    ) -> pb.UpdateArtifactResponse:
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask", "name at least one field to update")
        for path in paths:
            top, _, sub = path.partition(".")
            if top not in UPDATABLE or (sub and (top != "metadata" or sub not in METADATA_FIELDS)):
                raise InvalidArgument("update_mask", f"'{path}' cannot be updated")
        new = request.artifact
        current = await self._load(_id(new.id, "artifact.id"), ctx)
        _may_edit(current.doc, "UpdateArtifact")
        edits = self._edits(current.doc, new, paths)
        if "version" in paths and edits["version"] != current.doc["version"]:
            return await self._new_version(current, edits, ctx)
        if current.doc["state"] != "draft" and set(edits) - MUTABLE_WHEN_PUBLISHED:
            raise FailedPrecondition(
                f"{current.doc['lineage']}@{current.doc['version']} is published and immutable; "
                "change the version to create a new one",
                reason="VERSION_IMMUTABLE",
                id=current.id,
            )

        def apply(doc: dict[str, Any]) -> None:
            doc.update(edits)

        stored = await self._mutate(
            current.id,
            apply,
            ctx,
            request.expected_revision,
            authorize=_rule(_may_edit, "UpdateArtifact"),
        )
        await self.feed.emit(pb.CHANGE_KIND_UPDATED, stored.id, stored.doc, ctx)
        return pb.UpdateArtifactResponse(artifact=self._artifact(stored))

    @staticmethod
    def _edits(doc: dict[str, Any], new: pb.Artifact, paths: list[str]) -> dict[str, Any]:
        """The document fields the masked paths change, validated."""
        edits: dict[str, Any] = {}
        for path in paths:
            top, _, sub = path.partition(".")
            if top == "name":
                name = new.name.strip()
                if not name or len(name) > model.MAX_NAME:
                    raise InvalidArgument("artifact.name", f"must be 1-{model.MAX_NAME} characters")
                edits["name"] = name
            elif top == "source":
                edits["source"] = model.check_source(new.source)
                edits["source_sha256"] = model.source_digest(new.source)
                edits["source_bytes"] = len(new.source.encode("utf-8"))
            elif top == "metadata":
                meta = model.metadata_to_doc(new.metadata)
                base = dict(edits.get("metadata", doc["metadata"]))
                edits["metadata"] = {**base, sub: meta[sub]} if sub else meta
            elif top == "visibility":
                if new.visibility not in model.VISIBILITY_NAMES:
                    raise InvalidArgument("artifact.visibility", "must be set")
                edits["visibility"] = model.VISIBILITY_NAMES[new.visibility]
            elif top == "dependencies":
                edits.update(
                    model.dependency_fields(
                        model.dependencies_to_doc(new.dependencies, doc["organization"])
                    )
                )
            elif top == "version":
                edits["version"] = str(parse_version(new.version, "artifact.version"))
        return edits

    async def _new_version(
        self, current: Stored, edits: dict[str, Any], ctx: CallContext
    ) -> pb.UpdateArtifactResponse:
        at = model.now()
        doc = {
            **current.doc,
            **edits,
            "is_latest": False,
            "state": "draft",
            "changelog": "",
            "publish_time": None,
            "create_time": at,
            "update_time": at,
            "stats": {"downloads": 0, "stars": 0, "views": 0, "last_access_time": None,
                      "trend": None},
        }  # fmt: skip
        stored = await self._insert_version(doc, ctx)
        return pb.UpdateArtifactResponse(artifact=self._artifact(stored), created_version=True)

    async def delete_artifact(
        self, request: pb.DeleteArtifactRequest, ctx: CallContext
    ) -> pb.DeleteArtifactResponse:
        def soft_delete(doc: dict[str, Any]) -> None:
            doc.update(deleted=True, delete_time=model.now(), is_latest=False)

        stored = await self._mutate(
            _id(request.id), soft_delete, ctx, request.expected_revision,
            authorize=_rule(_may_manage, "DeleteArtifact"),
        )  # fmt: skip
        await self.feed.emit(pb.CHANGE_KIND_DELETED, stored.id, stored.doc, ctx)
        await self._refresh_latest(stored.doc["organization"], stored.doc["slug"], ctx)
        return pb.DeleteArtifactResponse(artifact=self._artifact(await self._reload(stored, ctx)))

    async def undelete_artifact(
        self, request: pb.UndeleteArtifactRequest, ctx: CallContext
    ) -> pb.UndeleteArtifactResponse:
        def restore(doc: dict[str, Any]) -> None:
            doc.update(deleted=False, delete_time=None)

        stored = await self._mutate(
            _id(request.id), restore, ctx, include_deleted=True,
            authorize=_rule(_may_manage, "UndeleteArtifact"),
        )  # fmt: skip
        await self.feed.emit(pb.CHANGE_KIND_UNDELETED, stored.id, stored.doc, ctx)
        await self._refresh_latest(stored.doc["organization"], stored.doc["slug"], ctx)
        return pb.UndeleteArtifactResponse(artifact=self._artifact(await self._reload(stored, ctx)))

    async def _reload(self, stored: Stored, ctx: CallContext) -> Stored:
        return await self._load(stored.id, ctx, include_deleted=True)

    async def dependents(self, stored: Stored, ctx: CallContext) -> list[str]:
        """Ids of live versions the caller may see whose dependency on this lineage this version
        satisfies. Hidden ones are left out, not counted: another organization's private
        artifact must not show, even as a number (to it, a purge is a dependency gone missing)."""
        version = parse_version(stored.doc["version"])
        result = []
        filter_: dict[str, Any] = {"dependency_names": stored.doc["lineage"], "deleted": False}
        scope = listing_scope(current_principal.get())
        async for other in self.store.find_all(
            ARTIFACTS, filter_ if scope is None else {"$and": [filter_, scope]}, ctx
        ):
            for dep in other.doc["dependencies"]:
                if dep["name"] == stored.doc["lineage"] and parse_range(dep["constraint"]).matches(
                    version
                ):
                    result.append(other.id)
                    break
        return result

    async def purge_artifact(
        self, request: pb.PurgeArtifactRequest, ctx: CallContext
    ) -> pb.PurgeArtifactResponse:
        stored = await self._load(_id(request.id), ctx, include_deleted=True)
        _may_administer(stored.doc, "PurgeArtifact")
        dependents = await self.dependents(stored, ctx)
        if dependents and not request.force:
            raise FailedPrecondition(
                f"{len(dependents)} artifact(s) depend on {stored.doc['lineage']}@"
                f"{stored.doc['version']}: {', '.join(dependents)}; purge with force to proceed",
                reason="HAS_DEPENDENTS",
                id=stored.id,
                dependents=",".join(dependents),
            )
        await self.store.delete(ARTIFACTS, stored.id, ctx)
        async for star in self.store.find_all(STARS, {"artifact_id": stored.id}, ctx):
            await self.store.delete(STARS, star.id, ctx)
        await self._written(stored, pb.CHANGE_KIND_PURGED, ctx)
        await self._refresh_latest(stored.doc["organization"], stored.doc["slug"], ctx)
        return pb.PurgeArtifactResponse(dependents=dependents)

    # ---- listing and search ----------------------------------------------------------------

    async def list_artifacts(
        self, request: pb.ListArtifactsRequest, ctx: CallContext
    ) -> pb.ListArtifactsResponse:
        field = SORT_FIELDS.get(request.order_by)
        if field is None:
            raise InvalidArgument("order_by", "unknown sort field")
        page, token = await self.store.find(
            ARTIFACTS,
            artifact_filter(request.filter),
            ctx,
            sort=[(field, request.descending)],
            page_size=validation.page_size(request.page_size),
            page_token=request.page_token,
        )
        return pb.ListArtifactsResponse(
            artifacts=[self._artifact(s) for s in page], next_page_token=token
        )

    async def count_artifacts(
        self, request: pb.CountArtifactsRequest, ctx: CallContext
    ) -> pb.CountArtifactsResponse:
        count = await self.store.count(ARTIFACTS, artifact_filter(request.filter), ctx)
        return pb.CountArtifactsResponse(count=count)

    async def search_artifacts(
        self, request: pb.SearchArtifactsRequest, ctx: CallContext
    ) -> pb.SearchArtifactsResponse:
        filter_ = artifact_filter(request.filter)
        filter_.setdefault("$and", []).append({"is_latest": True})
        hits, token = await self.searcher.search(
            request.query,
            filter_,
            ctx,
            validation.page_size(request.page_size),
            request.page_token,
        )
        return pb.SearchArtifactsResponse(
            hits=[
                pb.SearchHit(
                    artifact=self._artifact(stored),
                    score=score,
                    highlights=[pb.Highlight(field=f, snippet=s) for f, s in highlights],
                )
                for stored, score, highlights in hits
            ],
            next_page_token=token,
        )

    # ---- versions ------------------------------------------------------------------------

    async def list_versions(
        self, request: pb.ListVersionsRequest, ctx: CallContext
    ) -> pb.ListVersionsResponse:
        model.check_organization(request.organization, "organization")
        model.check_slug(request.slug, "slug")
        size = validation.page_size(request.page_size)
        scope = model.lineage(request.organization, request.slug)
        after = validation.decode_page_token(request.page_token, "versions", scope)
        versions = sorted(
            await self.visible_versions(
                request.organization, request.slug, ctx, request.include_deleted
            ),
            key=lambda s: parse_version(s.doc["version"]),
            reverse=True,
        )
        if after is not None:
            bound = parse_version(str(after), "page_token")
            versions = [s for s in versions if parse_version(s.doc["version"]) < bound]
        page = versions[:size]
        token = (
            validation.encode_page_token("versions", scope, page[-1].doc["version"])
            if len(versions) > size
            else ""
        )
        return pb.ListVersionsResponse(
            versions=[self._artifact(s) for s in page], next_page_token=token
        )

    async def get_version(
        self, request: pb.GetVersionRequest, ctx: CallContext
    ) -> pb.GetVersionResponse:
        model.check_organization(request.organization, "organization")
        model.check_slug(request.slug, "slug")
        version = str(parse_version(request.version))
        stored = await self._load(
            model.version_id(request.organization, request.slug, version), ctx
        )
        return pb.GetVersionResponse(artifact=self._artifact(stored))

    async def publish_version(
        self, request: pb.PublishVersionRequest, ctx: CallContext
    ) -> pb.PublishVersionResponse:
        def publish(doc: dict[str, Any]) -> None:
            if doc["state"] != "draft":
                raise FailedPrecondition(
                    f"{doc['lineage']}@{doc['version']} is already {doc['state']}",
                    reason="VERSION_IMMUTABLE",
                )
            doc.update(state="published", publish_time=model.now(), changelog=request.changelog)

        stored = await self._mutate(
            _id(request.id), publish, ctx, request.expected_revision,
            authorize=_rule(_may_manage, "PublishVersion"),
        )  # fmt: skip
        await self.feed.emit(pb.CHANGE_KIND_PUBLISHED, stored.id, stored.doc, ctx)
        await self._after_publish(stored.doc["organization"], stored.doc["slug"], ctx)
        return pb.PublishVersionResponse(artifact=self._artifact(await self._reload(stored, ctx)))

    async def deprecate_version(
        self, request: pb.DeprecateVersionRequest, ctx: CallContext
    ) -> pb.DeprecateVersionResponse:
        def deprecate(doc: dict[str, Any]) -> None:
            if doc["state"] != "published":
                raise FailedPrecondition(
                    f"only published versions can be deprecated ({doc['state']})",
                    reason="NOT_PUBLISHED",
                )
            doc.update(state="deprecated", deprecation_reason=request.reason)

        stored = await self._mutate(
            _id(request.id), deprecate, ctx, authorize=_rule(_may_manage, "DeprecateVersion")
        )
        await self.feed.emit(pb.CHANGE_KIND_DEPRECATED, stored.id, stored.doc, ctx)
        await self._refresh_latest(stored.doc["organization"], stored.doc["slug"], ctx)
        return pb.DeprecateVersionResponse(artifact=self._artifact(await self._reload(stored, ctx)))

    async def rollback_version(
        self, request: pb.RollbackVersionRequest, ctx: CallContext
    ) -> pb.RollbackVersionResponse:
        model.check_organization(request.organization, "organization")
        model.check_slug(request.slug, "slug")
        version = str(parse_version(request.version))
        target = await self._load(
            model.version_id(request.organization, request.slug, version), ctx
        )
        _may_manage(target.doc, "RollbackVersion")
        if target.doc["state"] != "published":
            raise FailedPrecondition(
                f"{target.doc['lineage']}@{version} is {target.doc['state']}, not published",
                reason="NOT_PUBLISHED",
            )
        await self._refresh_latest(request.organization, request.slug, ctx, pin=version)
        return pb.RollbackVersionResponse(artifact=self._artifact(await self._reload(target, ctx)))

    async def resolve_dependencies(
        self, request: pb.ResolveDependenciesRequest, ctx: CallContext
    ) -> pb.ResolveDependenciesResponse:
        root = await self._resolve_slug(request.organization, request.slug, request.version, ctx)
        lock, problems = await self.resolver.resolve(root, ctx)
        return pb.ResolveDependenciesResponse(
            lock=[] if problems else [
                pb.LockedArtifact(
                    id=s.id,
                    name=s.doc["lineage"],
                    version=s.doc["version"],
                    source_sha256=s.doc["source_sha256"],
                )
                for s in lock
            ],
            problems=problems,
        )  # fmt: skip

    # ---- discovery ------------------------------------------------------------------------

    async def _counts(
        self, field: str, organization: str, page_size: int, page_token: str, ctx: CallContext
    ) -> tuple[list[pb.TagCount], str]:
        clauses: list[dict[str, Any]] = [
            {"is_latest": True},
            {"deleted": False},
            discovery_scope(current_principal.get()),
        ]
        if organization:
            clauses.append({"organization": organization})
        filter_ = {"$and": clauses}
        groups, token = await self.store.aggregate(
            ARTIFACTS,
            filter_,
            f"metadata.{field}",
            ctx,
            unwind=True,
            page_size=validation.page_size(page_size),
            page_token=page_token,
        )
        return [pb.TagCount(name=str(k), count=n) for k, n, _ in groups if k is not None], token

    async def list_tags(self, request: pb.ListTagsRequest, ctx: CallContext) -> pb.ListTagsResponse:
        tags, token = await self._counts(
            "tags", request.organization, request.page_size, request.page_token, ctx
        )
        return pb.ListTagsResponse(tags=tags, next_page_token=token)

    async def list_skills(
        self, request: pb.ListSkillsRequest, ctx: CallContext
    ) -> pb.ListSkillsResponse:
        skills, token = await self._counts(
            "skills", request.organization, request.page_size, request.page_token, ctx
        )
        return pb.ListSkillsResponse(skills=skills, next_page_token=token)

    async def get_trending(
        self, request: pb.GetTrendingRequest, ctx: CallContext
    ) -> pb.GetTrendingResponse:
        limit = request.limit or 10
        if not 0 < limit <= 100:
            raise InvalidArgument("limit", "must be between 1 and 100")
        filter_ = artifact_filter(pb.ArtifactFilter(types=request.types, latest_only=True))
        filter_["$and"].append(discovery_scope(current_principal.get()))
        filter_["$and"].append({"stats.trend": {"$exists": True}})
        filter_["$and"].append({"stats.trend": {"$ne": None}})
        page, _ = await self.store.find(
            ARTIFACTS, filter_, ctx, sort=[("stats.trend", True)], page_size=limit
        )
        decay = TREND_RATE * (model.now() - TREND_EPOCH)
        return pb.GetTrendingResponse(
            artifacts=[
                pb.ScoredArtifact(
                    artifact=self._artifact(s), score=math.exp(s.doc["stats"]["trend"] - decay)
                )
                for s in page
            ]
        )

    async def get_related(
        self, request: pb.GetRelatedRequest, ctx: CallContext
    ) -> pb.GetRelatedResponse:
        limit = request.limit or 10
        if not 0 < limit <= 100:
            raise InvalidArgument("limit", "must be between 1 and 100")
        base = await self._load(_id(request.id), ctx)
        tags = set(base.doc["metadata"]["tags"])
        skills = set(base.doc["metadata"]["skills"])
        if not tags and not skills:
            return pb.GetRelatedResponse()
        shared: list[dict[str, Any]] = []
        if tags:
            shared.append({"metadata.tags": {"$in": sorted(tags)}})
        if skills:
            shared.append({"metadata.skills": {"$in": sorted(skills)}})
        filter_ = {
            "$and": [
                {"$or": shared},
                {"is_latest": True},
                {"deleted": False},
                discovery_scope(current_principal.get()),
                {"lineage": {"$ne": base.doc["lineage"]}},
            ]
        }
        scored = []
        async for other in self.store.find_all(ARTIFACTS, filter_, ctx, limit=2000):
            meta = other.doc["metadata"]
            score = 2.0 * len(skills & set(meta["skills"])) + len(tags & set(meta["tags"]))
            scored.append((score, other.id, other))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return pb.GetRelatedResponse(
            artifacts=[
                pb.ScoredArtifact(artifact=self._artifact(s), score=score)
                for score, _, s in scored[:limit]
            ]
        )

    def _bump(self, counter: str, trend: str | None) -> Callable[[dict[str, Any]], None]:
        def change(doc: dict[str, Any]) -> None:
            at = model.now()
            stats = doc["stats"]
            stats[counter] += 1
            stats["last_access_time"] = at
            if trend:
                point = math.log(TREND_WEIGHTS[trend]) + TREND_RATE * (at - TREND_EPOCH)
                old = stats.get("trend")
                stats["trend"] = (
                    point
                    if old is None
                    else float(max(old, point) + math.log1p(math.exp(-abs(old - point))))
                )

        return change

    async def record_download(
        self, request: pb.RecordDownloadRequest, ctx: CallContext
    ) -> pb.RecordDownloadResponse:
        stored = await self._mutate(_id(request.id), self._bump("downloads", "download"), ctx)
        return pb.RecordDownloadResponse(stats=self._artifact(stored).stats)

    async def record_view(
        self, request: pb.RecordViewRequest, ctx: CallContext
    ) -> pb.RecordViewResponse:
        stored = await self._mutate(_id(request.id), self._bump("views", None), ctx)
        return pb.RecordViewResponse(stats=self._artifact(stored).stats)

    async def _recount_stars(self, artifact_id: str, added: bool, ctx: CallContext) -> Stored:
        stars = await self.store.count(STARS, {"artifact_id": artifact_id}, ctx)

        def change(doc: dict[str, Any]) -> None:
            doc["stats"]["stars"] = stars
            if added:
                self._bump("views", "star")(doc)
                doc["stats"]["views"] -= 1  # _bump counts a view; a star is not one

        return await self._mutate(artifact_id, change, ctx)

    async def star_artifact(
        self, request: pb.StarArtifactRequest, ctx: CallContext
    ) -> pb.StarArtifactResponse:
        stored = await self._load(_id(request.id), ctx)
        user = _star_user(request.user)
        try:
            await self.store.insert(
                STARS,
                _star_id(stored.id, user),
                {"artifact_id": stored.id, "user": user, "time": model.now()},
                ctx,
            )
            added = True
        except AlreadyExists:
            added = False
        stored = await self._recount_stars(stored.id, added, ctx)
        return pb.StarArtifactResponse(stats=self._artifact(stored).stats)

    async def unstar_artifact(
        self, request: pb.UnstarArtifactRequest, ctx: CallContext
    ) -> pb.UnstarArtifactResponse:
        stored = await self._load(_id(request.id), ctx)
        user = _star_user(request.user)
        await self.store.delete(STARS, _star_id(stored.id, user), ctx)
        stored = await self._recount_stars(stored.id, False, ctx)
        return pb.UnstarArtifactResponse(stats=self._artifact(stored).stats)

    async def list_stargazers(
        self, request: pb.ListStargazersRequest, ctx: CallContext
    ) -> pb.ListStargazersResponse:
        await self._load(_id(request.id), ctx)
        page, token = await self.store.find(
            STARS,
            {"artifact_id": request.id},
            ctx,
            sort=[("user", False)],
            page_size=validation.page_size(request.page_size),
            page_token=request.page_token,
        )
        return pb.ListStargazersResponse(users=[s.doc["user"] for s in page], next_page_token=token)

    # ---- collections ----------------------------------------------------------------------

    def _collection(self, stored: Stored) -> pb.Collection:
        doc = stored.doc
        return pb.Collection(
            id=stored.id,
            organization=doc["organization"],
            name=doc["name"],
            description=doc["description"],
            artifact_ids=doc["artifact_ids"],
            revision=stored.revision,
            create_time=_ts(doc["create_time"]),
            update_time=_ts(doc["update_time"]),
        )

    async def _load_collection(
        self,
        collection_id: str,
        ctx: CallContext,
        needed: Level = Level.READ,
        what: str = "",
        field: str = "collection_id",
    ) -> Stored:
        """A collection of the caller's organization (NOT_FOUND for others': collections are
        private to their organization), checked for the `needed` level."""
        stored = await self.store.get(COLLECTIONS, _id(collection_id, field), ctx)
        principal = current_principal.get()
        if stored is not None and principal.member_of(stored.doc["organization"]):
            principal.require(stored.doc["organization"], needed, what)
        else:
            raise NotFound(
                f"collection {collection_id} not found",
                reason="COLLECTION_NOT_FOUND",
                id=collection_id,
            )
        return stored

    async def _edit_collection(
        self,
        collection_id: str,
        change: Callable[[list[str]], list[str]],
        ctx: CallContext,
        what: str,
    ) -> pb.Collection:
        for _ in range(CAS_RETRIES):
            current = await self._load_collection(collection_id, ctx, Level.WRITE, what)
            doc = {
                **current.doc,
                "artifact_ids": change(list(current.doc["artifact_ids"])),
                "update_time": model.now(),
            }
            try:
                stored = await self.store.replace(
                    COLLECTIONS, current.id, doc, current.revision, ctx
                )
            except Aborted:
                continue
            return self._collection(stored)
        raise Aborted(f"collection {collection_id}: too much contention")

    async def create_collection(
        self, request: pb.CreateCollectionRequest, ctx: CallContext
    ) -> pb.CreateCollectionResponse:
        c = request.collection
        current_principal.get().require(c.organization, Level.WRITE, "CreateCollection")
        model.check_organization(c.organization, "collection.organization")
        if not c.name.strip():
            raise InvalidArgument("collection.name", "is required")
        for i, artifact_id in enumerate(c.artifact_ids):
            await self._load(_id(artifact_id, f"collection.artifact_ids[{i}]"), ctx)
        if len(set(c.artifact_ids)) != len(c.artifact_ids):
            raise InvalidArgument("collection.artifact_ids", "contains duplicates")
        at = model.now()
        doc = {
            "organization": c.organization,
            "name": c.name.strip(),
            "description": c.description,
            "artifact_ids": list(c.artifact_ids),
            "create_time": at,
            "update_time": at,
        }
        stored = await self.store.insert(COLLECTIONS, uuid.uuid4().hex, doc, ctx)
        return pb.CreateCollectionResponse(collection=self._collection(stored))

    async def get_collection(
        self, request: pb.GetCollectionRequest, ctx: CallContext
    ) -> pb.GetCollectionResponse:
        return pb.GetCollectionResponse(
            collection=self._collection(await self._load_collection(request.id, ctx, field="id"))
        )

    async def list_collections(
        self, request: pb.ListCollectionsRequest, ctx: CallContext
    ) -> pb.ListCollectionsResponse:
        clauses: list[dict[str, Any]] = []
        if request.organization:
            organization = model.check_organization(request.organization, "organization")
            clauses.append({"organization": organization})
        principal = current_principal.get()
        if not principal.sees_everything:
            # collections are private to their organization: only the caller's are listed
            clauses.append({"organization": principal.organization})
        filter_ = {"$and": clauses} if clauses else {}
        page, token = await self.store.find(
            COLLECTIONS,
            filter_,
            ctx,
            sort=[("name", False)],
            page_size=validation.page_size(request.page_size),
            page_token=request.page_token,
        )
        return pb.ListCollectionsResponse(
            collections=[self._collection(s) for s in page], next_page_token=token
        )

    async def add_to_collection(
        self, request: pb.AddToCollectionRequest, ctx: CallContext
    ) -> pb.AddToCollectionResponse:
        await self._load_collection(request.collection_id, ctx)
        artifact_id = (await self._load(_id(request.artifact_id, "artifact_id"), ctx)).id

        def add(ids: list[str]) -> list[str]:
            if artifact_id in ids:
                raise AlreadyExists(
                    f"artifact {artifact_id} is already in the collection", reason="ALREADY_MEMBER"
                )
            position = len(ids) if request.position < 0 else min(request.position, len(ids))
            return [*ids[:position], artifact_id, *ids[position:]]

        collection = await self._edit_collection(request.collection_id, add, ctx, "AddToCollection")
        return pb.AddToCollectionResponse(collection=collection)

    async def remove_from_collection(
        self, request: pb.RemoveFromCollectionRequest, ctx: CallContext
    ) -> pb.RemoveFromCollectionResponse:
        def remove(ids: list[str]) -> list[str]:
            if request.artifact_id not in ids:
                raise NotFound(
                    f"artifact {request.artifact_id} is not in the collection",
                    reason="NOT_A_MEMBER",
                )
            return [i for i in ids if i != request.artifact_id]

        collection = await self._edit_collection(
            request.collection_id, remove, ctx, "RemoveFromCollection"
        )
        return pb.RemoveFromCollectionResponse(collection=collection)

    async def reorder_collection(
        self, request: pb.ReorderCollectionRequest, ctx: CallContext
    ) -> pb.ReorderCollectionResponse:
        def reorder(ids: list[str]) -> list[str]:
            wanted = list(request.artifact_ids)
            if sorted(wanted) != sorted(ids):
                raise InvalidArgument(
                    "artifact_ids", "must be a permutation of the collection's artifacts"
                )
            return wanted

        collection = await self._edit_collection(
            request.collection_id, reorder, ctx, "ReorderCollection"
        )
        return pb.ReorderCollectionResponse(collection=collection)

    async def delete_collection(
        self, request: pb.DeleteCollectionRequest, ctx: CallContext
    ) -> pb.DeleteCollectionResponse:
        await self._load_collection(request.id, ctx, Level.ADMIN, "DeleteCollection", "id")
        if not await self.store.delete(COLLECTIONS, _id(request.id), ctx):
            raise NotFound(f"collection {request.id} not found", reason="COLLECTION_NOT_FOUND")
        return pb.DeleteCollectionResponse()

    # ---- packs, watch, stats --------------------------------------------------------------

    def export_pack(
        self, request: pb.ExportPackRequest, ctx: CallContext
    ) -> AsyncIterator[pb.ExportPackResponse]:
        from server.patterns.artifact_registry.packs import export_pack

        return export_pack(self, request, ctx)

    def import_pack(
        self, request: pb.ImportPackRequest, ctx: CallContext
    ) -> AsyncIterator[pb.ImportPackResponse]:
        from server.patterns.artifact_registry.packs import import_pack

        return import_pack(self, request, ctx)

    def watch_artifacts(
        self, request: pb.WatchArtifactsRequest, ctx: CallContext
    ) -> AsyncIterator[pb.WatchArtifactsResponse]:
        return self.feed.watch(request, ctx)

    async def get_stats(self, request: pb.GetStatsRequest, ctx: CallContext) -> pb.GetStatsResponse:
        scope = listing_scope(current_principal.get())
        live: dict[str, Any] = (
            {"deleted": False} if scope is None else {"$and": [scope, {"deleted": False}]}
        )
        gone: dict[str, Any] = (
            {"deleted": True} if scope is None else {"$and": [scope, {"deleted": True}]}
        )
        by: dict[str, dict[str, int]] = {}
        storage = 0
        for field in ("type", "visibility", "organization"):
            groups, _ = await self.store.aggregate(
                ARTIFACTS, live, field, ctx, sum_field="source_bytes", page_size=1000
            )
            by[field] = {str(k): n for k, n, _ in groups}
            if field == "type":
                storage = int(sum(s or 0 for _, _, s in groups))
        total, deleted = await asyncio.gather(
            self.store.count(ARTIFACTS, live, ctx),
            self.store.count(ARTIFACTS, gone, ctx),
        )
        return pb.GetStatsResponse(
            total_artifacts=total,
            by_type=by["type"],
            by_visibility=by["visibility"],
            by_organization=by["organization"],
            storage_bytes=storage,
            cache_hit_rate=self.cache.hit_rate,
            deleted_artifacts=deleted,
        )
