"""Support for the artifact-registry authorization matrix (tests/security/test_registry_authz.py):
the callers, a recording client (every call is remembered, so the audit log can be checked
against it), the fixture world and the expected outcomes written from docs/authorization.md.

Nothing here reads server code: levels, membership and the expected status of every cell are
restated from the spec so that the test is an independent oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import Message
from prism.admin.v1 import key_admin_pb2 as key_pb
from prism.admin.v1 import key_admin_pb2_grpc as key_grpc
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as pb_grpc

from server.app import PrismServer
from tests.conformance.backends import SETUPS
from tests.support.harness import error_details, namespaced, running_server

NAMESPACE = "registry"
SERVICE = "/prism.patterns.artifact_registry.v1.ArtifactRegistryService"
ADMIN_SERVICE = "/prism.admin.v1.KeyAdminService"
ACME, GLOBEX, INITECH = "acme", "globex", "initech"
ALICE = "alice@acme"
PUBLIC, PRIVATE, UNLISTED = pb.VISIBILITY_PUBLIC, pb.VISIBILITY_PRIVATE, pb.VISIBILITY_UNLISTED
Vis: TypeAlias = pb.Visibility.ValueType
VISIBILITIES: dict[str, Vis] = {"public": PUBLIC, "private": PRIVATE, "unlisted": UNLISTED}
#: the spec's audit rule: every mutating call, and every denied one
MUTATING = frozenset(
    {
        "CreateArtifact", "UpdateArtifact", "DeleteArtifact", "UndeleteArtifact",
        "PurgeArtifact", "PublishVersion", "DeprecateVersion", "RollbackVersion",
        "RecordDownload", "RecordView", "StarArtifact", "UnstarArtifact", "CreateCollection",
        "AddToCollection", "RemoveFromCollection", "ReorderCollection", "DeleteCollection",
        "ImportPack", "CreateKey",
    }
)  # fmt: skip
DENIED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
HEX_ID = re.compile(r"[0-9a-f]{32}")


class Level(IntEnum):
    """The spec's levels, restated (not imported from server/authz.py)."""

    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3


ROLE_LEVEL = {"viewer": Level.READ, "editor": Level.WRITE, "admin": Level.ADMIN}
ROLE_PROTO = {
    "viewer": key_pb.ROLE_VIEWER,
    "editor": key_pb.ROLE_EDITOR,
    "admin": key_pb.ROLE_ADMIN,
}

#: name → (organization, owner, role); the server admin is the bootstrap key
CALLER_SPECS: dict[str, tuple[str, str, str]] = {
    "acme-admin": (ACME, "admin@acme", "admin"),
    "acme-editor": (ACME, "editor@acme", "editor"),
    "acme-viewer": (ACME, "viewer@acme", "viewer"),
    "alice-editor": (ACME, ALICE, "editor"),
    "alice-viewer": (ACME, ALICE, "viewer"),
    "globex-admin": (GLOBEX, "admin@globex", "admin"),
    "globex-editor": (GLOBEX, "editor@globex", "editor"),
    "globex-viewer": (GLOBEX, "viewer@globex", "viewer"),
    "no-org-viewer": ("", "", "viewer"),
}
OUTSIDERS = ("globex-admin", "globex-editor", "globex-viewer", "no-org-viewer")


@dataclass(frozen=True)
class Caller:
    name: str
    organization: str
    owner: str
    role: str
    secret: str

    @property
    def key_id(self) -> str:
        return self.secret.split("_")[1]

    @property
    def identity(self) -> str:
        return f"key:{self.key_id}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (*namespaced(NAMESPACE), ("authorization", f"Bearer {self.secret}"))

    @property
    def server_admin(self) -> bool:
        return self.role == "admin" and not self.organization

    @property
    def user(self) -> str:
        """Who a star of this key is for: its owner, else `key:<id>`."""
        return self.owner or self.identity

    def member_of(self, organization: str) -> bool:
        return self.server_admin or (bool(self.organization) and organization == self.organization)

    def level_in(self, organization: str) -> Level:
        if self.server_admin:
            return Level.ADMIN
        return ROLE_LEVEL[self.role] if self.member_of(organization) else Level.NONE

    def owns(self, organization: str, owner: str) -> bool:
        return bool(self.owner) and owner == self.owner and self.member_of(organization)

    def sees(self, organization: str, visibility: Vis, deleted: bool = False) -> bool:
        """Visible by id/slug: members see everything (deleted too); others public/unlisted."""
        if self.member_of(organization):
            return True
        return not deleted and visibility in (PUBLIC, UNLISTED)

    def lists(
        self, organization: str, visibility: Vis, asked: Vis = pb.VISIBILITY_UNSPECIFIED
    ) -> bool:
        """In a listing: public, or of the caller's organization; unlisted only when the filter
        asks for it and only for members."""
        if visibility == UNLISTED:
            return asked == UNLISTED and self.member_of(organization)
        return visibility == PUBLIC or self.member_of(organization)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code.name}/{self.reason}" if self.reason else self.code.name


OK = Outcome(grpc.StatusCode.OK)


def not_found(reason: str = "ARTIFACT_NOT_FOUND") -> Outcome:
    return Outcome(grpc.StatusCode.NOT_FOUND, reason)


def denied(reason: str) -> Outcome:
    return Outcome(grpc.StatusCode.PERMISSION_DENIED, reason)


class Need(IntEnum):
    """What an RPC needs on a visible artifact (the spec's table)."""

    VISIBLE = 0
    WRITE = 2
    ADMIN = 3
    #: admin, or write and owner
    OWNER = 4


def permitted(caller: Caller, organization: str, need: Need, owner: str = ALICE) -> Outcome:
    """Permission on something the caller sees: OK, NOT_ORGANIZATION_MEMBER or ROLE_REQUIRED."""
    level = caller.level_in(organization)
    if need is Need.OWNER:
        ok = level >= Level.ADMIN or (level >= Level.WRITE and caller.owns(organization, owner))
    else:
        ok = level >= need
    if ok:
        return OK
    if not caller.member_of(organization):
        return denied("NOT_ORGANIZATION_MEMBER")
    return denied("ROLE_REQUIRED")


@dataclass
class Result:
    outcome: Outcome
    response: Any = None
    error: grpc.aio.AioRpcError | None = None

    def normalized(self, *names: str) -> tuple[str, str, str, list[tuple[str, str]]]:
        """(code, reason, details, ErrorInfo metadata) with ids and the given names blanked:
        what must be equal between an invisible and a nonexistent target."""

        def blank(text: str) -> str:
            for name in names:
                text = text.replace(name, "<name>")
            return HEX_ID.sub("<id>", text)

        if self.error is None:
            return (self.outcome.code.name, "", "", [])
        info, _ = error_details(self.error)
        metadata = sorted((k, blank(v)) for k, v in (info.metadata.items() if info else ()))
        return (self.outcome.code.name, self.outcome.reason, blank(self.error.details() or ""),
                metadata)  # fmt: skip


@dataclass
class Fixture:
    """One artifact of the world every read test shares, created at the module's start."""

    key: str
    organization: str
    visibility: Vis
    deleted: bool
    marker: str
    artifact: pb.Artifact = field(default_factory=pb.Artifact)

    @property
    def latest(self) -> bool:
        return not self.deleted


#: key → (organization, visibility, deleted); every fixture carries tag "fixset", skill
#: "fixskill" and its marker (as slug, in name, description, tags, skills, keywords, source)
WORLD: dict[str, tuple[str, Vis, bool]] = {
    "pub": (ACME, PUBLIC, False),
    "priv": (ACME, PRIVATE, False),
    "unl": (ACME, UNLISTED, False),
    "root": (ACME, PUBLIC, False),  # depends on privdep
    "privdep": (ACME, PRIVATE, False),
    "gonepub": (ACME, PUBLIC, True),
    "gonepriv": (ACME, PRIVATE, True),
    "goneunl": (ACME, UNLISTED, True),
    "gpub": (GLOBEX, PUBLIC, False),
    "gpriv": (GLOBEX, PRIVATE, False),
    "ipriv": (INITECH, PRIVATE, False),
}
#: fixtures whose bytes must never reach another organization through a listing
SECRETS = ("priv", "unl", "gonepriv", "goneunl", "gonepub", "ipriv")
FIXTAG, FIXSKILL = "fixset", "fixskill"


def new_artifact(
    organization: str, slug: str, visibility: Vis, *, marker: str = "", owner: str = ALICE,
    version: str = "1.0.0", deps: tuple[str, ...] = (),
) -> pb.Artifact:  # fmt: skip
    word = marker or slug
    tags = [word, FIXTAG] if marker else []
    skills = [word, FIXSKILL] if marker else []
    return pb.Artifact(
        organization=organization,
        owner=owner,
        name=f"Matrix {word}",
        slug=slug,
        type=pb.ARTIFACT_TYPE_PERSONA,
        version=version,
        source=f"persona {word} {{ version {version} }}",
        visibility=visibility,
        metadata=pb.ArtifactMetadata(
            description=f"the {word} artifact", tags=tags, skills=skills, keywords=[word]
        ),
        dependencies=[
            pb.Dependency(name=d, version_constraint="^1.0.0", kind=pb.DEPENDENCY_KIND_IMPORT)
            for d in deps
        ],
    )


@dataclass
class Deployment:
    """One secured server, its callers, its fixtures and the log of every call made on it."""

    name: str
    server: PrismServer
    channel: grpc.aio.Channel
    callers: dict[str, Caller] = field(default_factory=dict)
    world: dict[str, Fixture] = field(default_factory=dict)
    collections: dict[str, pb.Collection] = field(default_factory=dict)
    #: (identity, full method, status code name, ErrorInfo reason) of every call, in order
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.ArtifactRegistryServiceStub(self.channel)
        self.keys = key_grpc.KeyAdminServiceStub(self.channel)

    @property
    def admin(self) -> Caller:
        return self.callers["server-admin"]

    def slug(self, prefix: str = "f") -> str:
        return f"{prefix}{next(self._serial)}-{secrets.token_hex(3)}"

    async def call(self, caller: Caller, rpc: str, request: Message) -> Result:
        """A unary registry call as `caller`, recorded."""
        return await self._invoke(caller, SERVICE, rpc, request, stream=False)

    async def stream(self, caller: Caller, rpc: str, request: Message) -> Result:
        """A server-streaming registry call read to its end (response: the list), recorded."""
        return await self._invoke(caller, SERVICE, rpc, request, stream=True)

    async def _invoke(
        self, caller: Caller, service: str, rpc: str, request: Message, stream: bool
    ) -> Result:
        stub = self.keys if service == ADMIN_SERVICE else self.stub
        method = getattr(stub, rpc)
        try:
            if stream:
                response: Any = [item async for item in method(request, metadata=caller.metadata)]
            else:
                response = await method(request, metadata=caller.metadata)
            result = Result(OK, response)
        except grpc.aio.AioRpcError as exc:
            info, _ = error_details(exc)
            result = Result(Outcome(exc.code(), info.reason if info else ""), error=exc)
        outcome = result.outcome
        self.calls.append((caller.identity, f"{service}/{rpc}", outcome.code.name, outcome.reason))
        return result

    async def ok(self, caller: Caller, rpc: str, request: Message) -> Any:
        """A call that must succeed; its response."""
        result = await self.call(caller, rpc, request)
        assert result.outcome == OK, f"{caller.name} {rpc}: {result.error}"
        return result.response

    async def create(self, artifact: pb.Artifact, publish: bool = True) -> pb.Artifact:
        """As the server admin (setup for a cell, not part of what is tested)."""
        request = pb.CreateArtifactRequest(artifact=artifact, publish=publish, changelog="c")
        made: pb.Artifact = (await self.ok(self.admin, "CreateArtifact", request)).artifact
        return made

    async def fresh(self, visibility: Vis, state: str = "draft") -> pb.Artifact:
        """A new acme artifact owned by alice@acme: "draft", "published" or "deleted"."""
        made = await self.create(
            new_artifact(ACME, self.slug(), visibility), publish=state == "published"
        )
        if state == "deleted":
            await self.ok(self.admin, "DeleteArtifact", pb.DeleteArtifactRequest(id=made.id))
        return made

    async def make_key(self, name: str, organization: str, owner: str, role: str) -> Caller:
        request = key_pb.CreateKeyRequest(
            name=name, owner=owner, organization=organization, roles=[ROLE_PROTO[role]]
        )
        result = await self._invoke(self.admin, ADMIN_SERVICE, "CreateKey", request, stream=False)
        assert result.outcome == OK, result.error
        return Caller(name, organization, owner, role, result.response.secret_key)

    async def build(self) -> None:
        """Callers, fixtures (downloaded four times each: trending ranks them above anything a
        matrix cell downloads or stars once) and collections."""
        made = await asyncio.gather(*(self.make_key(n, *spec) for n, spec in CALLER_SPECS.items()))
        self.callers.update({c.name: c for c in made})
        tag = secrets.token_hex(3)
        for key, (org, visibility, deleted) in WORLD.items():
            self.world[key] = Fixture(key, org, visibility, deleted, f"mk{key}{tag}")
        slug_of = {k: f.marker for k, f in self.world.items()}

        async def make(fixture: Fixture) -> None:
            deps = (f"{ACME}/{slug_of['privdep']}",) if fixture.key == "root" else ()
            art = new_artifact(fixture.organization, fixture.marker, fixture.visibility,
                               marker=fixture.marker, deps=deps)  # fmt: skip
            fixture.artifact = await self.create(art)
            for _ in range(4):
                request = pb.RecordDownloadRequest(id=fixture.artifact.id)
                await self.ok(self.admin, "RecordDownload", request)
            if fixture.deleted:
                delete = pb.DeleteArtifactRequest(id=fixture.artifact.id)
                await self.ok(self.admin, "DeleteArtifact", delete)
            got = await self.ok(
                self.admin, "GetArtifact",
                pb.GetArtifactRequest(id=fixture.artifact.id, include_deleted=True),
            )  # fmt: skip
            fixture.artifact = got.artifact

        await asyncio.gather(*(make(f) for f in self.world.values() if f.key != "root"))
        await make(self.world["root"])
        for org in (ACME, GLOBEX):
            self.collections[org] = await self.collection(org, [])

    async def collection(self, organization: str, artifact_ids: list[str]) -> pb.Collection:
        """A new collection, made by the server admin."""
        request = pb.CreateCollectionRequest(
            collection=pb.Collection(
                organization=organization, name=self.slug("c"), artifact_ids=artifact_ids
            )
        )
        made: pb.Collection = (await self.ok(self.admin, "CreateCollection", request)).collection
        return made


async def _deploy(kind: str, stack: contextlib.AsyncExitStack, root: Path) -> PrismServer:
    """The embedded default (registry on SQLite), or a registry namespace on PostgreSQL."""
    if kind == "embedded":
        return await stack.enter_async_context(running_server(None, root, auth=True))
    postgres = await stack.enter_async_context(SETUPS["postgres"](root / "postgres"))
    config = {
        "namespaces": [
            {
                "name": NAMESPACE,
                "pattern": "artifact-registry",
                "pattern_version": "v1",
                "slots": {
                    "store": {"backend": "postgres", "config": postgres},
                    "cache": {"backend": "memstore"},
                },
            }
        ]
    }
    return await stack.enter_async_context(running_server(config, root / "server", auth=True))


@contextlib.asynccontextmanager
async def deployment(kind: str, root: Path) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        server = await _deploy(kind, stack, root)
        assert server.bootstrap_key is not None
        channel = grpc.aio.insecure_channel(server.address)
        stack.push_async_callback(channel.close, None)
        dep = Deployment(kind, server, channel)
        dep.callers["server-admin"] = Caller("server-admin", "", "bootstrap", "admin",
                                             server.bootstrap_key)  # fmt: skip
        await dep.build()
        yield dep
