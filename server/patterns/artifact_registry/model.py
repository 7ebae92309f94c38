"""Artifacts as stored documents: validation, ids, slugs, digests and the proto ↔ JSON mapping.

A stored version is one document in the store slot's `artifacts` collection. Its id is derived
from (organization, slug, version), so the store's own insert-if-absent enforces uniqueness on
every backend and an exported pack re-imports under the same ids.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.errors import InvalidArgument
from prismctl.config import ORGANIZATION
from server.patterns.artifact_registry.versions import parse_range, parse_version

ARTIFACTS = "artifacts"

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_SOURCE_BYTES = 1024 * 1024
MAX_NAME = 200
MAX_LIST = 64

TYPE_NAMES = {
    value.number: value.name.removeprefix("ARTIFACT_TYPE_").lower()
    for value in pb.ArtifactType.DESCRIPTOR.values
    if value.number
}
VISIBILITY_NAMES = {
    value.number: value.name.removeprefix("VISIBILITY_").lower()
    for value in pb.Visibility.DESCRIPTOR.values
    if value.number
}
KIND_NAMES = {
    value.number: value.name.removeprefix("DEPENDENCY_KIND_").lower()
    for value in pb.DependencyKind.DESCRIPTOR.values
    if value.number
}
STATE_NAMES = {
    pb.VERSION_STATE_DRAFT: "draft",
    pb.VERSION_STATE_PUBLISHED: "published",
    pb.VERSION_STATE_DEPRECATED: "deprecated",
}


def now() -> float:
    return time.time()


def version_id(organization: str, slug: str, version: str) -> str:
    """Stable id of one version: the same triple always gets the same id."""
    digest = hashlib.sha256(f"{organization}/{slug}@{version}".encode()).hexdigest()
    return digest[:32]


def lineage(organization: str, slug: str) -> str:
    return f"{organization}/{slug}"


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def slugify(name: str) -> str:
    """ "Code Reviewer (v2)!" → "code-reviewer-v2"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:100]


def check_organization(value: str, field: str) -> str:
    if not ORGANIZATION.fullmatch(value):
        raise InvalidArgument(field, "must be 1-64 characters of a-z, 0-9 and inner '-'")
    return value


def check_slug(value: str, field: str) -> str:
    if not value or len(value) > 100 or not _SLUG.fullmatch(value):
        raise InvalidArgument(field, "must be lowercase words of a-z0-9 joined by '-'")
    return value


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _string_list(values: Any, field: str) -> list[str]:
    result: list[str] = []
    for i, value in enumerate(values):
        text = str(value).strip().lower()
        if not text or len(text) > 64:
            raise InvalidArgument(f"{field}[{i}]", "must be 1-64 characters")
        if text not in result:
            result.append(text)
    if len(result) > MAX_LIST:
        raise InvalidArgument(field, f"at most {MAX_LIST} entries")
    return result


def metadata_to_doc(meta: pb.ArtifactMetadata, field: str = "artifact.metadata") -> dict[str, Any]:
    if meta.author_email and not _EMAIL.fullmatch(meta.author_email):
        raise InvalidArgument(f"{field}.author_email", "is not an email address")
    return {
        "description": meta.description,
        "author": meta.author,
        "author_email": meta.author_email,
        "license": meta.license,
        "repository": meta.repository,
        "homepage": meta.homepage,
        "tags": _string_list(meta.tags, f"{field}.tags"),
        "skills": _string_list(meta.skills, f"{field}.skills"),
        "keywords": _string_list(meta.keywords, f"{field}.keywords"),
        "custom": json_format.MessageToDict(meta.custom) if meta.HasField("custom") else {},
    }


def dependencies_to_doc(
    deps: Any, organization: str, field: str = "artifact.dependencies"
) -> list[dict[str, Any]]:
    result = []
    for i, dep in enumerate(deps):
        name = dep.name if "/" in dep.name else f"{organization}/{dep.name}"
        org, _, slug = name.partition("/")
        check_organization(org, f"{field}[{i}].name")
        check_slug(slug, f"{field}[{i}].name")
        constraint = dep.version_constraint or "*"
        parse_range(constraint, f"{field}[{i}].version_constraint")
        result.append(
            {"name": name, "constraint": constraint, "kind": KIND_NAMES.get(dep.kind, "import")}
        )
    return result


def check_source(source: str, field: str = "artifact.source") -> str:
    if not source.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise InvalidArgument(field, f"larger than {MAX_SOURCE_BYTES} bytes")
    return source


def new_version_doc(artifact: pb.Artifact, at: float) -> dict[str, Any]:
    """Validate a client-supplied artifact and build the document of a new draft version."""
    organization = check_organization(artifact.organization, "artifact.organization")
    name = artifact.name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidArgument("artifact.name", f"must be 1-{MAX_NAME} characters")
    slug = check_slug(artifact.slug or slugify(name), "artifact.slug")
    if artifact.type not in TYPE_NAMES:
        raise InvalidArgument("artifact.type", "must be set (persona, team, workflow, ...)")
    version = str(parse_version(artifact.version or "1.0.0", "artifact.version"))
    source = check_source(artifact.source)
    visibility = VISIBILITY_NAMES.get(artifact.visibility, "private")
    return {
        "organization": organization,
        "owner": artifact.owner,
        "name": name,
        "slug": slug,
        "lineage": lineage(organization, slug),
        "type": TYPE_NAMES[artifact.type],
        "version": version,
        "is_latest": False,
        "source": source,
        "source_sha256": source_digest(source),
        "source_bytes": len(source.encode("utf-8")),
        "metadata": metadata_to_doc(artifact.metadata),
        "visibility": visibility,
        "stats": {"downloads": 0, "stars": 0, "views": 0, "last_access_time": None, "trend": None},
        "create_time": at,
        "update_time": at,
        "publish_time": None,
        "delete_time": None,
        "deleted": False,
        "state": "draft",
        "changelog": "",
        **dependency_fields(dependencies_to_doc(artifact.dependencies, organization)),
    }


def dependency_fields(dependencies: list[dict[str, Any]]) -> dict[str, Any]:
    """The dependencies and, beside them, their names as a flat list: filters match elements of
    an array of strings, not fields of objects inside an array."""
    return {"dependencies": dependencies, "dependency_names": [d["name"] for d in dependencies]}


def doc_to_artifact(doc_id: str, doc: dict[str, Any], revision: int) -> pb.Artifact:
    meta = doc["metadata"]
    custom = Struct()
    custom.update(meta.get("custom") or {})
    stats = doc["stats"]
    artifact = pb.Artifact(
        id=doc_id,
        organization=doc["organization"],
        owner=doc["owner"],
        name=doc["name"],
        slug=doc["slug"],
        type=pb.ArtifactType.Value(f"ARTIFACT_TYPE_{doc['type'].upper()}"),
        version=doc["version"],
        is_latest=doc["is_latest"],
        source=doc["source"],
        metadata=pb.ArtifactMetadata(
            description=meta["description"],
            author=meta["author"],
            author_email=meta["author_email"],
            license=meta["license"],
            repository=meta["repository"],
            homepage=meta["homepage"],
            tags=meta["tags"],
            skills=meta["skills"],
            keywords=meta["keywords"],
            custom=custom,
        ),
        visibility=pb.Visibility.Value(f"VISIBILITY_{doc['visibility'].upper()}"),
        stats=pb.ArtifactStats(
            downloads=stats["downloads"],
            stars=stats["stars"],
            views=stats["views"],
            last_access_time=_timestamp(stats.get("last_access_time")),
        ),
        create_time=_timestamp(doc["create_time"]),
        update_time=_timestamp(doc["update_time"]),
        publish_time=_timestamp(doc.get("publish_time")),
        delete_time=_timestamp(doc.get("delete_time")),
        source_sha256=doc["source_sha256"],
        dependencies=[
            pb.Dependency(
                name=d["name"],
                version_constraint=d["constraint"],
                kind=pb.DependencyKind.Value(f"DEPENDENCY_KIND_{d['kind'].upper()}"),
            )
            for d in doc["dependencies"]
        ],
        state=pb.VersionState.Value(f"VERSION_STATE_{doc['state'].upper()}"),
        changelog=doc.get("changelog", ""),
        revision=revision,
    )
    return artifact
