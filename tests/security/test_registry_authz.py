"""The authorization matrix of the artifact registry (docs/authorization.md is the oracle), with
auth on, on the embedded default (SQLite) and on PostgreSQL: every RPC × every caller (server
admin; acme admin/editor/viewer and alice@acme as editor and viewer; globex admin/editor/viewer;
a key of no organization) × every visibility, each cell asserting the exact status and ErrorInfo
reason; the exact visible set of every listing; a brute leak check of everything an outsider can
list; WatchArtifacts; and the audit log holding exactly the mutating and denied calls made.

Where the spec leaves room, this test reads it so (change both together if the spec says more):
* a server admin is a member of every organization: listings show it everyone's private ones;
* unlisted artifacts never count in ListTags/ListSkills/GetTrending/GetRelated (not even for
  members); ListArtifacts/Count/Search show the own organization's only when the filter asks
  for VISIBILITY_UNLISTED; GetStats counts the own organization's;
* ListVersions of a hidden lineage answers as for a nonexistent one: OK and empty;
* AddToCollection checks the collection's visibility, then the artifact's, then write;
* CreateArtifact checks membership and write before OWNER_MISMATCH; USER_MISMATCH applies to
  server admins too."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from prism.admin.v1 import key_admin_pb2 as key_pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from tests.security.registry_matrix import (
    ACME,
    DENIED,
    FIXSKILL,
    FIXTAG,
    GLOBEX,
    INITECH,
    MUTATING,
    OK,
    OUTSIDERS,
    PRIVATE,
    PUBLIC,
    SECRETS,
    UNLISTED,
    VISIBILITIES,
    Caller,
    Deployment,
    Fixture,
    Level,
    Need,
    Outcome,
    Result,
    Vis,
    denied,
    deployment,
    new_artifact,
    not_found,
    permitted,
)
from tests.support.harness import error_details
from tests.support.wait import eventually

NOT_FOUND = grpc.StatusCode.NOT_FOUND
#: the read fixture of each visibility, live and soft-deleted
LIVE = {PUBLIC: "pub", PRIVATE: "priv", UNLISTED: "unl"}
GONE = {PUBLIC: "gonepub", PRIVATE: "gonepriv", UNLISTED: "goneunl"}
STRANGER = "mallory@elsewhere"


@pytest_asyncio.fixture(scope="module", params=["embedded", "postgres"])
async def dep(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    kind: str = request.param
    async with deployment(kind, tmp_path_factory.mktemp(f"authz-{kind}")) as made:
        yield made


# ---- listings: the exact visible set ------------------------------------------------------


def in_filter(f: Fixture, flt: pb.ArtifactFilter, caller: Caller) -> bool:
    """Whether ListArtifacts(flt) by `caller` lists fixture `f` (the fixtures' tag is in flt)."""
    if flt.visibility and f.visibility != flt.visibility:
        return False
    if flt.organization and f.organization != flt.organization:
        return False
    if flt.latest_only and not f.latest:
        return False
    if f.deleted and not (flt.include_deleted and caller.member_of(f.organization)):
        return False
    return caller.lists(f.organization, f.visibility, flt.visibility)


def listed_in_discovery(f: Fixture, caller: Caller) -> bool:
    """Tags, skills, trending, related: latest live versions listed without a filter."""
    return f.latest and caller.lists(f.organization, f.visibility)


FILTERS: list[dict[str, Any]] = [
    {},
    *({"visibility": v} for v in VISIBILITIES.values()),
    *({"organization": o} for o in (ACME, GLOBEX, INITECH)),
    {"include_deleted": True},
    {"latest_only": True},
    {"organization": ACME, "visibility": PRIVATE, "include_deleted": True},
    {"organization": ACME, "visibility": UNLISTED, "include_deleted": True},
    {"published": True, "include_deleted": True},
]


async def all_pages(
    dep: Deployment, caller: Caller, rpc: str, request: Any, items: str
) -> list[Any]:
    """Every item of a paginated listing."""
    found: list[Any] = []
    while True:
        page = await dep.ok(caller, rpc, request)
        found.extend(getattr(page, items))
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token


async def check_listings(dep: Deployment, caller: Caller) -> list[str]:
    problems: list[str] = []
    by_id = {f.artifact.id: f for f in dep.world.values()}
    for flt in FILTERS:
        f = pb.ArtifactFilter(tags=[FIXTAG], **flt)
        want = {x.key for x in dep.world.values() if in_filter(x, f, caller)}
        listed = await all_pages(
            dep,
            caller,
            "ListArtifacts",
            pb.ListArtifactsRequest(filter=f, page_size=7),
            "artifacts",
        )
        got = {by_id[a.id].key for a in listed if a.id in by_id}
        if got != want or len(listed) != len(want):
            problems.append(
                f"ListArtifacts({flt}) as {caller.name}: {sorted(got)}, want {sorted(want)}"
            )
        count = (await dep.ok(caller, "CountArtifacts", pb.CountArtifactsRequest(filter=f))).count
        if count != len(want):
            problems.append(f"CountArtifacts({flt}) as {caller.name}: {count}, want {len(want)}")
        searched = await all_pages(dep, caller, "SearchArtifacts", pb.SearchArtifactsRequest(
            query="artifact", filter=f, page_size=5), "hits")  # fmt: skip
        want_latest = {k for k in want if dep.world[k].latest}
        got = {by_id[h.artifact.id].key for h in searched if h.artifact.id in by_id}
        if got != want_latest or len(searched) != len(want_latest):
            problems.append(f"SearchArtifacts({flt}) as {caller.name}: {sorted(got)}, "
                            f"want {sorted(want_latest)}")  # fmt: skip
    for x in dep.world.values():  # a marker finds its artifact exactly when it is listed
        hits = (await dep.ok(caller, "SearchArtifacts",
                             pb.SearchArtifactsRequest(query=x.marker))).hits  # fmt: skip
        want_hit = listed_in_discovery(x, caller)
        if [h.artifact.id for h in hits] != ([x.artifact.id] if want_hit else []):
            problems.append(f"SearchArtifacts({x.key} marker) as {caller.name}: "
                            f"{[h.artifact.slug for h in hits]}")  # fmt: skip
    discovered = {f.key for f in dep.world.values() if listed_in_discovery(f, caller)}
    for rpc, items, common in (("ListTags", "tags", FIXTAG), ("ListSkills", "skills", FIXSKILL)):
        for org in ("", ACME, GLOBEX, INITECH):
            request = (pb.ListTagsRequest if rpc == "ListTags" else pb.ListSkillsRequest)(
                organization=org, page_size=50
            )
            counts = {t.name: t.count for t in await all_pages(dep, caller, rpc, request, items)}
            scope = {k for k in discovered if org in ("", dep.world[k].organization)}
            want_counts = {dep.world[k].marker: 1 for k in scope}
            if scope:
                want_counts[common] = len(scope)
            got_counts = {n: c for n, c in counts.items()
                          if n == common or n.startswith("mk")}  # fmt: skip
            if got_counts != want_counts:
                problems.append(
                    f"{rpc}({org!r}) as {caller.name}: {got_counts}, want {want_counts}"
                )
    trending = (await dep.ok(caller, "GetTrending", pb.GetTrendingRequest(limit=100))).artifacts
    got = {by_id[s.artifact.id].key for s in trending if s.artifact.id in by_id}
    if got != discovered:
        problems.append(f"GetTrending as {caller.name}: {sorted(got)}, want {sorted(discovered)}")
    for base in ("pub", "unl", "priv"):
        if not caller.sees(ACME, dep.world[base].visibility):
            continue
        related = await dep.ok(
            caller, "GetRelated", pb.GetRelatedRequest(id=dep.world[base].artifact.id, limit=100)
        )
        got = {by_id[s.artifact.id].key for s in related.artifacts if s.artifact.id in by_id}
        want = discovered - {base}
        if got != want:
            problems.append(
                f"GetRelated({base}) as {caller.name}: {sorted(got)}, want {sorted(want)}"
            )
    return problems


async def test_listings_show_exactly_the_visible_set(dep: Deployment) -> None:
    await run_cells([check_listings(dep, caller) for caller in dep.callers.values()])


async def count(dep: Deployment, caller: Caller, **flt: Any) -> int:
    request = pb.CountArtifactsRequest(filter=pb.ArtifactFilter(**flt))
    return int((await dep.ok(caller, "CountArtifacts", request)).count)


async def check_stats(dep: Deployment, caller: Caller) -> list[str]:
    """GetStats covers what the caller may list: public, plus everything of its organization
    (own unlisted included), and its numbers agree with CountArtifacts."""
    stats = await dep.ok(caller, "GetStats", pb.GetStatsRequest())
    listed = await all_pages(
        dep, caller, "ListArtifacts", pb.ListArtifactsRequest(page_size=1000), "artifacts"
    )
    unlisted = await all_pages(dep, caller, "ListArtifacts", pb.ListArtifactsRequest(
        filter=pb.ArtifactFilter(visibility=UNLISTED), page_size=1000), "artifacts")  # fmt: skip
    live = listed + unlisted
    want: dict[str, Any] = {
        "total": len(live),
        "deleted": await count(dep, caller, include_deleted=True) - len(listed)
        + await count(dep, caller, include_deleted=True, visibility=UNLISTED) - len(unlisted),
        "storage": sum(len(a.source.encode()) for a in live),
        "visibility": {n: v for n, v in Counter(
            pb.Visibility.Name(a.visibility).removeprefix("VISIBILITY_").lower()
            for a in live).items()},
        "organization": dict(Counter(a.organization for a in live)),
    }  # fmt: skip
    got = {
        "total": stats.total_artifacts,
        "deleted": stats.deleted_artifacts,
        "storage": stats.storage_bytes,
        "visibility": {k: v for k, v in stats.by_visibility.items() if v},
        "organization": {k: v for k, v in stats.by_organization.items() if v},
    }
    if not caller.member_of(INITECH) and INITECH in stats.by_organization:
        return [f"GetStats as {caller.name} names {INITECH}, which has nothing public"]
    return [] if got == want else [f"GetStats as {caller.name}: {got}, want {want}"]


async def test_stats_count_only_what_the_caller_may_list(dep: Deployment) -> None:
    await run_cells([check_stats(dep, caller) for caller in dep.callers.values()])


# ---- brute leak check ---------------------------------------------------------------------


def leak_requests(dep: Deployment) -> list[tuple[str, Any]]:
    """Every listing-like request an outsider could try to uncover acme's hidden artifacts."""
    hidden = [dep.world[k] for k in SECRETS]
    filters = [pb.ArtifactFilter(**flt) for flt in FILTERS]
    filters += [pb.ArtifactFilter(tags=[f.marker]) for f in hidden]
    filters += [pb.ArtifactFilter(skills=[f.marker], include_deleted=True) for f in hidden]
    filters += [pb.ArtifactFilter(organization=ACME, visibility=v, include_deleted=True,
                                  latest_only=latest)
                for v in VISIBILITIES.values() for latest in (False, True)]  # fmt: skip
    requests: list[tuple[str, Any]] = []
    for flt in filters:
        requests.append(("ListArtifacts", pb.ListArtifactsRequest(filter=flt, page_size=1000)))
        requests.append(("CountArtifacts", pb.CountArtifactsRequest(filter=flt)))
        requests.append(
            (
                "SearchArtifacts",
                pb.SearchArtifactsRequest(query="artifact", filter=flt, page_size=1000),
            )
        )
    for f in hidden:
        for query in (f.marker, f"{f.marker} artifact", f.artifact.slug, f.artifact.id):
            for flt in (
                pb.ArtifactFilter(),
                pb.ArtifactFilter(organization=ACME, visibility=f.visibility, include_deleted=True),
            ):
                requests.append(
                    ("SearchArtifacts", pb.SearchArtifactsRequest(query=query, filter=flt))
                )
    for org in ("", ACME, INITECH):
        requests.append(("ListTags", pb.ListTagsRequest(organization=org, page_size=1000)))
        requests.append(("ListSkills", pb.ListSkillsRequest(organization=org, page_size=1000)))
        requests.append(
            ("ListCollections", pb.ListCollectionsRequest(organization=org, page_size=1000))
        )
    requests.append(("GetTrending", pb.GetTrendingRequest(limit=100)))
    requests += [("GetTrending", pb.GetTrendingRequest(types=[t], limit=100))
                 for t in (pb.ARTIFACT_TYPE_PERSONA, pb.ARTIFACT_TYPE_SKILL)]  # fmt: skip
    requests += [("GetRelated", pb.GetRelatedRequest(id=dep.world[k].artifact.id, limit=100))
                 for k in ("pub", "unl", "root", "gpub")]  # fmt: skip
    requests.append(("GetStats", pb.GetStatsRequest()))
    return requests


async def check_leaks(dep: Deployment, caller: Caller) -> list[str]:
    hidden = [dep.world[k] for k in SECRETS]
    needles = [(f.key, n.encode()) for f in hidden for n in (f.marker, f.artifact.id)]
    problems: list[str] = []
    for rpc, request in leak_requests(dep):
        response = await dep.ok(caller, rpc, request)
        data = response.SerializeToString()
        for key, needle in needles:
            if needle in data:
                problems.append(f"{rpc}({request}) as {caller.name} leaks {key}")
        if rpc == "ListArtifacts":
            counted = await dep.ok(caller, "CountArtifacts",
                                   pb.CountArtifactsRequest(filter=request.filter))  # fmt: skip
            if counted.count != len(response.artifacts):
                problems.append(f"CountArtifacts({request.filter}) as {caller.name}: "
                                f"{counted.count} != {len(response.artifacts)} listed")  # fmt: skip
        if rpc in ("ListTags", "ListSkills"):
            names = {t.name for t in getattr(response, rpc[4:].lower())}
            leaked = names & {f.marker for f in hidden}
            if leaked:
                problems.append(f"{rpc} as {caller.name} counts hidden {leaked}")
    return problems


async def test_outsiders_learn_nothing_from_listings(dep: Deployment) -> None:
    await run_cells([check_leaks(dep, dep.callers[name]) for name in OUTSIDERS])


# ---- watching -------------------------------------------------------------------------------


async def watched(dep: Deployment, caller: Caller, sentinel_slug: str, started: asyncio.Event,
                  organization: str) -> list[pb.ArtifactChange]:  # fmt: skip
    """Changes a watcher of `caller` receives up to the sentinel's creation."""
    changes: list[pb.ArtifactChange] = []
    call = dep.stub.WatchArtifacts(pb.WatchArtifactsRequest(organization=organization),
                                   metadata=caller.metadata)  # fmt: skip
    try:
        async for event in call:
            if event.HasField("started"):
                started.set()
                continue
            changes.append(event.change)
            if event.change.slug == sentinel_slug:
                return changes
    finally:
        call.cancel()
    return changes


async def test_watch_shows_only_visible_changes(dep: Deployment) -> None:
    sentinel = dep.slug("sentinel")
    watchers = [(c, org) for c in dep.callers.values() for org in ("", ACME)]
    events = [asyncio.Event() for _ in watchers]
    tasks = [asyncio.ensure_future(watched(dep, c, sentinel, e, org))
             for (c, org), e in zip(watchers, events, strict=True)]  # fmt: skip
    hidden = {}
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
        for visibility in (PRIVATE, UNLISTED):
            made = await dep.fresh(visibility, "draft")
            await dep.ok(dep.admin, "PublishVersion", pb.PublishVersionRequest(id=made.id))
            await dep.ok(dep.admin, "DeleteArtifact", pb.DeleteArtifactRequest(id=made.id))
            hidden[made.slug] = visibility
        public = await dep.fresh(PUBLIC, "draft")
        await dep.ok(dep.admin, "PublishVersion", pb.PublishVersionRequest(id=public.id))
        await dep.create(new_artifact(ACME, sentinel, PUBLIC))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    finally:
        for task in tasks:
            task.cancel()
    problems = []
    for (caller, org), changes in zip(watchers, results, strict=True):
        slugs = Counter(c.slug for c in changes)
        for slug, visibility in hidden.items():
            want = 3 if caller.member_of(ACME) else 0  # created, published, deleted
            if slugs[slug] != want:
                name = pb.Visibility.Name(visibility)
                problems.append(
                    f"watch({org!r}) as {caller.name}: {slugs[slug]} {name} events, want {want}"
                )
        if slugs[public.slug] != 2 or slugs[sentinel] != 1:
            problems.append(f"watch({org!r}) as {caller.name}: public events {dict(slugs)}")
    assert not problems, "\n".join(problems)


# ---- the matrix of RPCs acting on one artifact ----------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One RPC (or RPC variant) acting on an artifact of acme owned by alice@acme."""

    rpc: str
    need: Need
    #: None: the shared read fixture; "draft" / "published" / "deleted": a fresh artifact
    state: str | None
    build: Callable[[pb.Artifact, Caller], Message]
    #: the target is soft-deleted (visible to members only)
    deleted: bool = False
    #: `user` names somebody else: USER_MISMATCH once the artifact is visible
    other_user: bool = False
    stream: bool = False
    #: an invisible target answers as a nonexistent one does: OK and empty (ListVersions)
    empty_when_hidden: bool = False


def _mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


RULES: dict[str, Rule] = {
    "GetArtifact": Rule("GetArtifact", Need.VISIBLE, None,
                        lambda a, c: pb.GetArtifactRequest(id=a.id)),
    "GetArtifact+include_deleted": Rule(
        "GetArtifact", Need.VISIBLE, None,
        lambda a, c: pb.GetArtifactRequest(id=a.id, include_deleted=True), deleted=True),
    "GetArtifactBySlug": Rule("GetArtifactBySlug", Need.VISIBLE, None,
                              lambda a, c: pb.GetArtifactBySlugRequest(
                                  organization=a.organization, slug=a.slug)),
    "GetArtifactBySlug+range": Rule("GetArtifactBySlug", Need.VISIBLE, None,
                                    lambda a, c: pb.GetArtifactBySlugRequest(
                                        organization=a.organization, slug=a.slug,
                                        version="^1.0.0", include_drafts=True)),
    "GetArtifactBySlug+version": Rule("GetArtifactBySlug", Need.VISIBLE, None,
                                      lambda a, c: pb.GetArtifactBySlugRequest(
                                          organization=a.organization, slug=a.slug,
                                          version=a.version)),
    "GetVersion": Rule("GetVersion", Need.VISIBLE, None,
                       lambda a, c: pb.GetVersionRequest(
                           organization=a.organization, slug=a.slug, version=a.version)),
    "ListVersions": Rule("ListVersions", Need.VISIBLE, None,
                         lambda a, c: pb.ListVersionsRequest(
                             organization=a.organization, slug=a.slug),
                         empty_when_hidden=True),
    "ListVersions+include_deleted": Rule(
        "ListVersions", Need.VISIBLE, None,
        lambda a, c: pb.ListVersionsRequest(
            organization=a.organization, slug=a.slug, include_deleted=True),
        deleted=True, empty_when_hidden=True),
    "ListStargazers": Rule("ListStargazers", Need.VISIBLE, None,
                           lambda a, c: pb.ListStargazersRequest(id=a.id)),
    "ResolveDependencies": Rule("ResolveDependencies", Need.VISIBLE, None,
                                lambda a, c: pb.ResolveDependenciesRequest(
                                    organization=a.organization, slug=a.slug)),
    "GetRelated": Rule("GetRelated", Need.VISIBLE, None,
                       lambda a, c: pb.GetRelatedRequest(id=a.id, limit=100)),
    "ExportPack": Rule("ExportPack", Need.VISIBLE, None,
                       lambda a, c: pb.ExportPackRequest(ids=[a.id]), stream=True),
    "UpdateArtifact": Rule(
        "UpdateArtifact", Need.WRITE, "draft",
        lambda a, c: pb.UpdateArtifactRequest(
            artifact=pb.Artifact(id=a.id, metadata=pb.ArtifactMetadata(description="edited")),
            update_mask=_mask("metadata.description"))),
    "UpdateArtifact+version": Rule(
        "UpdateArtifact", Need.WRITE, "published",
        lambda a, c: pb.UpdateArtifactRequest(
            artifact=pb.Artifact(id=a.id, version="2.0.0"), update_mask=_mask("version"))),
    "PublishVersion": Rule("PublishVersion", Need.OWNER, "draft",
                           lambda a, c: pb.PublishVersionRequest(id=a.id, changelog="go")),
    "DeprecateVersion": Rule("DeprecateVersion", Need.OWNER, "published",
                             lambda a, c: pb.DeprecateVersionRequest(id=a.id, reason="old")),
    "RollbackVersion": Rule("RollbackVersion", Need.OWNER, "published",
                            lambda a, c: pb.RollbackVersionRequest(
                                organization=a.organization, slug=a.slug, version=a.version)),
    "DeleteArtifact": Rule("DeleteArtifact", Need.OWNER, "draft",
                           lambda a, c: pb.DeleteArtifactRequest(id=a.id)),
    "UndeleteArtifact": Rule("UndeleteArtifact", Need.OWNER, "deleted",
                             lambda a, c: pb.UndeleteArtifactRequest(id=a.id), deleted=True),
    "PurgeArtifact": Rule("PurgeArtifact", Need.ADMIN, "draft",
                          lambda a, c: pb.PurgeArtifactRequest(id=a.id)),
    "PurgeArtifact+deleted": Rule("PurgeArtifact", Need.ADMIN, "deleted",
                                  lambda a, c: pb.PurgeArtifactRequest(id=a.id), deleted=True),
    "RecordDownload": Rule("RecordDownload", Need.VISIBLE, "published",
                           lambda a, c: pb.RecordDownloadRequest(id=a.id)),
    "RecordView": Rule("RecordView", Need.VISIBLE, "published",
                       lambda a, c: pb.RecordViewRequest(id=a.id)),
    "StarArtifact": Rule("StarArtifact", Need.VISIBLE, "published",
                         lambda a, c: pb.StarArtifactRequest(id=a.id)),
    "StarArtifact+own-user": Rule("StarArtifact", Need.VISIBLE, "published",
                                  lambda a, c: pb.StarArtifactRequest(id=a.id, user=c.user)),
    "StarArtifact+other-user": Rule(
        "StarArtifact", Need.VISIBLE, "published",
        lambda a, c: pb.StarArtifactRequest(id=a.id, user=STRANGER), other_user=True),
    "UnstarArtifact": Rule("UnstarArtifact", Need.VISIBLE, "published",
                           lambda a, c: pb.UnstarArtifactRequest(id=a.id)),
    "UnstarArtifact+other-user": Rule(
        "UnstarArtifact", Need.VISIBLE, "published",
        lambda a, c: pb.UnstarArtifactRequest(id=a.id, user=STRANGER), other_user=True),
}  # fmt: skip


#: what a successful read answered about: it must be the target and nothing else
SHOWN: dict[str, Callable[[Any], list[str]]] = {
    "GetArtifact": lambda r: [r.artifact.id],
    "GetArtifactBySlug": lambda r: [r.artifact.id],
    "GetVersion": lambda r: [r.artifact.id],
    "ListVersions": lambda r: [v.id for v in r.versions],
    "ExportPack": lambda r: [c.chunk.artifact.id for c in r if c.chunk.HasField("artifact")],
}


def expected(rule: Rule, caller: Caller, visibility: Vis) -> Outcome:
    """The spec: visibility first (NOT_FOUND), then USER_MISMATCH, then permission."""
    if not caller.sees(ACME, visibility, deleted=rule.deleted):
        return OK if rule.empty_when_hidden else not_found()
    if rule.other_user:
        return denied("USER_MISMATCH")
    return permitted(caller, ACME, rule.need)


def describe(result: Result) -> str:
    if result.error is None:
        return "OK"
    return f"{result.outcome}: {result.error.details()}"


async def same_as_missing(
    dep: Deployment, caller: Caller, rpc: str, result: Result, target: pb.Artifact,
    build: Callable[[pb.Artifact, Caller], Message], stream: bool = False,
) -> str | None:  # fmt: skip
    """An invisible target must answer exactly as a nonexistent one (ids and names blanked)."""
    missing = pb.Artifact(
        id=secrets.token_hex(16),
        organization=target.organization,
        slug=f"missing-{secrets.token_hex(4)}",
        version=target.version,
    )
    other = await (dep.stream if stream else dep.call)(caller, rpc, build(missing, caller))
    hidden, absent = result.normalized(target.slug), other.normalized(missing.slug)
    if hidden != absent:
        return f"hidden answers {hidden}, nonexistent answers {absent}"
    return None


async def check_cell(dep: Deployment, label: str, caller: Caller, visibility: Vis) -> list[str]:
    rule = RULES[label]
    if rule.state is None:
        target = dep.world[(GONE if rule.deleted else LIVE)[visibility]].artifact
    else:
        target = await dep.fresh(visibility, rule.state)
    call = dep.stream if rule.stream else dep.call
    result = await call(caller, rule.rpc, rule.build(target, caller))
    want = expected(rule, caller, visibility)
    where = f"{label} as {caller.name} on {pb.Visibility.Name(visibility)}"
    if result.outcome != want:
        return [f"{where}: want {want}, got {describe(result)}"]
    problems: list[str] = []
    hidden = not caller.sees(ACME, visibility, deleted=rule.deleted)
    if want.code == NOT_FOUND or (rule.empty_when_hidden and hidden):
        if rule.empty_when_hidden and list(result.response.versions):
            problems.append(f"{where}: hidden versions listed")
        mismatch = await same_as_missing(dep, caller, rule.rpc, result, target, rule.build,
                                         rule.stream)  # fmt: skip
        if mismatch:
            problems.append(f"{where}: {mismatch}")
    elif want.reason == "ROLE_REQUIRED" and rule.need in (Need.WRITE, Need.ADMIN):
        assert result.error is not None
        info, _ = error_details(result.error)
        meta = dict(info.metadata) if info else {}
        need = Level(int(rule.need)).name.lower()
        have = caller.level_in(ACME).name.lower()
        if (meta.get("required"), meta.get("level")) != (need, have):
            problems.append(f"{where}: ROLE_REQUIRED metadata {meta}, want {need}/{have}")
    elif want == OK and rule.rpc in SHOWN and SHOWN[rule.rpc](result.response) != [target.id]:
        problems.append(f"{where}: answered about {SHOWN[rule.rpc](result.response)}")
    elif want == OK and rule.rpc == "StarArtifact":
        users = (await dep.ok(dep.admin, "ListStargazers",
                              pb.ListStargazersRequest(id=target.id))).users  # fmt: skip
        if list(users) != [caller.user]:
            problems.append(f"{where}: stargazers {list(users)}, want [{caller.user}]")
    return problems


async def run_cells(cells: list[Any]) -> None:
    """Run cell coroutines concurrently; fail with every mismatch listed."""
    problems = [p for found in await asyncio.gather(*cells) for p in found]
    assert not problems, f"{len(problems)} cell(s) wrong:\n" + "\n".join(sorted(problems))


@pytest.mark.parametrize("label", list(RULES))
async def test_artifact_rpc_matrix(dep: Deployment, label: str) -> None:
    await run_cells(
        [
            check_cell(dep, label, caller, visibility)
            for caller in dep.callers.values()
            for visibility in VISIBILITIES.values()
        ]
    )


# ---- creating ----------------------------------------------------------------------------


async def check_create(
    dep: Deployment, caller: Caller, artifact: pb.Artifact, want: Outcome, where: str
) -> list[str]:
    result = await dep.call(caller, "CreateArtifact", pb.CreateArtifactRequest(artifact=artifact))
    if result.outcome != want:
        return [f"{where} as {caller.name}: want {want}, got {describe(result)}"]
    if want == OK and result.response.artifact.owner != (artifact.owner or caller.owner):
        return [f"{where} as {caller.name}: owner {result.response.artifact.owner!r}"]
    return []


async def test_create_artifact(dep: Deployment) -> None:
    taken = dep.world["priv"].artifact
    cells = []
    for caller in dep.callers.values():
        for name, visibility in VISIBILITIES.items():
            for org in (ACME, GLOBEX):
                art = new_artifact(org, dep.slug(), visibility, owner="")
                want = permitted(caller, org, Need.WRITE)
                cells.append(check_create(dep, caller, art, want, f"create {name} in {org}"))
        # naming another owner needs admin (after write); naming oneself is fine
        for owner in ("someone@acme", caller.owner):
            art = new_artifact(ACME, dep.slug(), PUBLIC, owner=owner)
            want = permitted(caller, ACME, Need.WRITE)
            if (
                want == OK
                and owner
                and owner != caller.owner
                and caller.level_in(ACME) < Level.ADMIN
            ):
                want = denied("OWNER_MISMATCH")
            cells.append(check_create(dep, caller, art, want, f"create owned by {owner!r}"))
        # a slug taken by a private artifact of acme: outsiders learn nothing
        if caller.level_in(ACME) >= Level.WRITE or not caller.member_of(ACME):
            clash = new_artifact(ACME, taken.slug, PRIVATE, owner="")
            want = (Outcome(grpc.StatusCode.ALREADY_EXISTS, "ARTIFACT_EXISTS")
                    if caller.member_of(ACME) else denied("NOT_ORGANIZATION_MEMBER"))  # fmt: skip
            cells.append(check_create(dep, caller, clash, want, "create over a private slug"))
        if not caller.member_of(ACME):  # checked before anything else about the request
            bad = new_artifact(ACME, dep.slug(), PUBLIC, owner="", version="not-semver")
            cells.append(check_create(dep, caller, bad, denied("NOT_ORGANIZATION_MEMBER"),
                                      "create an invalid artifact in acme"))  # fmt: skip
    await run_cells(cells)


# ---- collections -------------------------------------------------------------------------


def home(caller: Caller) -> str:
    """The organization whose collections a caller works on (acme for the key of none)."""
    return caller.organization or ACME


COLLECTION_NEEDS = {
    "AddToCollection": Need.WRITE,
    "RemoveFromCollection": Need.WRITE,
    "ReorderCollection": Need.WRITE,
    "DeleteCollection": Need.ADMIN,
}


#: what a collection holds after a successful edit (before, artifact id)
AFTER: dict[str, Callable[[list[str], str], list[str]]] = {
    "AddToCollection": lambda ids, a: [*ids, a],
    "RemoveFromCollection": lambda ids, a: [i for i in ids if i != a],
    "ReorderCollection": lambda ids, a: list(reversed(ids)),
}


def collection_request(rpc: str, coll: pb.Collection, artifact_id: str) -> Message:
    if rpc == "AddToCollection":
        return pb.AddToCollectionRequest(collection_id=coll.id, artifact_id=artifact_id,
                                         position=-1)  # fmt: skip
    if rpc == "RemoveFromCollection":
        return pb.RemoveFromCollectionRequest(collection_id=coll.id, artifact_id=artifact_id)
    if rpc == "ReorderCollection":
        order = list(reversed(coll.artifact_ids))
        return pb.ReorderCollectionRequest(collection_id=coll.id, artifact_ids=order)
    return pb.DeleteCollectionRequest(id=coll.id)


async def check_collection_cell(
    dep: Deployment, rpc: str, caller: Caller, org: str, visibility: Vis
) -> list[str]:
    """`rpc` as `caller` on a fresh collection of `org`; AddToCollection adds the fixture of
    `visibility`, the others act on a collection already holding acme's public fixtures."""
    pub, added = dep.world["pub"].artifact, dep.world[LIVE[visibility]].artifact
    adding = rpc == "AddToCollection"
    coll = await dep.collection(org, [] if adding else [pub.id, dep.world["root"].artifact.id])
    artifact_id = added.id if adding else pub.id
    result = await dep.call(caller, rpc, collection_request(rpc, coll, artifact_id))
    if not caller.member_of(org):
        want = not_found("COLLECTION_NOT_FOUND")
    elif adding and not caller.sees(ACME, visibility):
        want = not_found()
    else:
        want = permitted(caller, org, COLLECTION_NEEDS[rpc])
    where = f"{rpc} as {caller.name} on a {org} collection ({pb.Visibility.Name(visibility)})"
    if result.outcome != want:
        return [f"{where}: want {want}, got {describe(result)}"]
    if want.code == NOT_FOUND:  # answered as for a nonexistent collection / artifact
        if want.reason == "COLLECTION_NOT_FOUND":
            ghost = pb.Collection(id=secrets.token_hex(16), artifact_ids=list(coll.artifact_ids))
            again = collection_request(rpc, ghost, artifact_id)
        else:
            again = collection_request(rpc, coll, secrets.token_hex(16))
        other = await dep.call(caller, rpc, again)
        if result.normalized() != other.normalized():
            return [f"{where}: hidden {result.normalized()} != missing {other.normalized()}"]
    elif want == OK and rpc in AFTER:
        after = list(result.response.collection.artifact_ids)
        if after != AFTER[rpc](list(coll.artifact_ids), artifact_id):
            return [f"{where}: collection holds {after}"]
    return []


@pytest.mark.parametrize("rpc", list(COLLECTION_NEEDS))
async def test_collection_writes(dep: Deployment, rpc: str) -> None:
    visibilities = list(VISIBILITIES.values()) if rpc == "AddToCollection" else [PUBLIC]
    cells = [
        check_collection_cell(dep, rpc, caller, org, visibility)
        for caller in dep.callers.values()
        for org in {home(caller), ACME}
        for visibility in visibilities
    ]
    await run_cells(cells)


async def test_collection_reads_and_create(dep: Deployment) -> None:
    problems: list[str] = []
    acme, globex = dep.collections[ACME], dep.collections[GLOBEX]
    ghost = secrets.token_hex(16)
    for caller in dep.callers.values():
        # create: write in the collection's organization
        for org in (ACME, GLOBEX):
            made = await dep.call(caller, "CreateCollection", pb.CreateCollectionRequest(
                collection=pb.Collection(organization=org, name=dep.slug("c"))))  # fmt: skip
            want = permitted(caller, org, Need.WRITE)
            if made.outcome != want:
                problems.append(f"CreateCollection in {org} as {caller.name}: want {want}, "
                                f"got {describe(made)}")  # fmt: skip
        # with artifacts: each must be visible (asked of writers only: no ordering question)
        if permitted(caller, home(caller), Need.WRITE) == OK:
            private = dep.world["priv"].artifact.id
            made = await dep.call(caller, "CreateCollection", pb.CreateCollectionRequest(
                collection=pb.Collection(organization=home(caller), name=dep.slug("c"),
                                         artifact_ids=[private])))  # fmt: skip
            want = OK if caller.sees(ACME, PRIVATE) else not_found()
            if made.outcome != want:
                problems.append(f"CreateCollection with acme's private artifact as "
                                f"{caller.name}: want {want}, got {describe(made)}")  # fmt: skip
        # get: members only; an outsider sees what a nonexistent id shows
        for coll in (acme, globex):
            got = await dep.call(caller, "GetCollection", pb.GetCollectionRequest(id=coll.id))
            want = OK if caller.member_of(coll.organization) else not_found("COLLECTION_NOT_FOUND")
            if got.outcome != want:
                problems.append(f"GetCollection {coll.organization} as {caller.name}: "
                                f"want {want}, got {describe(got)}")  # fmt: skip
            elif want != OK:
                missing = await dep.call(caller, "GetCollection", pb.GetCollectionRequest(id=ghost))
                if got.normalized() != missing.normalized():
                    problems.append(f"GetCollection hidden {got.normalized()} != "
                                    f"missing {missing.normalized()}")  # fmt: skip
        # list: only the caller's organization's, whatever is asked for
        for asked in ("", ACME, GLOBEX):
            listed = await dep.ok(
                caller,
                "ListCollections",
                pb.ListCollectionsRequest(organization=asked, page_size=1000),
            )
            orgs = {c.organization for c in listed.collections}
            ids = {c.id for c in listed.collections}
            allowed = {o for o in (ACME, GLOBEX) if caller.member_of(o) and asked in ("", o)}
            if not caller.server_admin and not orgs <= allowed:
                problems.append(f"ListCollections({asked!r}) as {caller.name} shows {orgs}")
            want_ids = {dep.collections[o].id for o in allowed}
            if want_ids - ids:
                problems.append(
                    f"ListCollections({asked!r}) as {caller.name} misses {want_ids - ids}"
                )
    assert not problems, "\n".join(problems)


# ---- packs --------------------------------------------------------------------------------


async def pack_of(dep: Deployment, orgs: tuple[str, ...]) -> list[pb.PackChunk]:
    """A valid pack naming `orgs` whose artifacts do not exist (exported, then purged)."""
    made = [await dep.create(new_artifact(o, dep.slug("p"), PUBLIC)) for o in orgs]
    exported = await dep.stream(dep.admin, "ExportPack",
                                pb.ExportPackRequest(ids=[a.id for a in made]))  # fmt: skip
    assert exported.outcome == OK, exported.error
    for a in made:
        await dep.ok(dep.admin, "PurgeArtifact", pb.PurgeArtifactRequest(id=a.id, force=True))
    return [r.chunk for r in exported.response]


async def check_import(
    dep: Deployment, caller: Caller, orgs: tuple[str, ...], dry: bool
) -> list[str]:
    chunks = await pack_of(dep, orgs)
    result = await dep.stream(
        caller, "ImportPack", pb.ImportPackRequest(chunks=chunks, dry_run=dry)
    )
    want = OK
    for org in orgs:  # admin in every organization the pack names
        verdict = permitted(caller, org, Need.ADMIN)
        if verdict != OK:
            want = verdict
            break
    where = f"ImportPack({'+'.join(orgs)}, dry_run={dry}) as {caller.name}"
    if result.outcome != want:
        return [f"{where}: want {want}, got {describe(result)}"]
    if want == OK:
        summary = result.response[-1].summary
        if summary.issues or summary.imported != (0 if dry else len(orgs)):
            return [f"{where}: summary {summary}"]
    return []


async def test_import_pack(dep: Deployment) -> None:
    await run_cells(
        [
            check_import(dep, caller, orgs, dry)
            for caller in dep.callers.values()
            for orgs in ((ACME,), (GLOBEX,), (ACME, GLOBEX))
            for dry in (False, True)
        ]
    )


async def test_export_and_resolve_treat_hidden_dependencies_as_missing(dep: Deployment) -> None:
    root, privdep = dep.world["root"].artifact, dep.world["privdep"].artifact
    problems = []
    unresolvable = Outcome(grpc.StatusCode.FAILED_PRECONDITION, "UNRESOLVABLE_DEPENDENCIES")
    for caller in dep.callers.values():
        sees_dep = caller.member_of(ACME)
        exported = await dep.stream(
            caller, "ExportPack", pb.ExportPackRequest(ids=[root.id], include_dependencies=True)
        )
        if not sees_dep:
            # exactly as for a dependency that does not exist: the pack would not import
            if exported.outcome != unresolvable:
                problems.append(f"ExportPack+deps as {caller.name}: {describe(exported)}")
            elif exported.error is not None and privdep.id in (exported.error.details() or ""):
                problems.append(f"ExportPack+deps as {caller.name} names the private id")
        elif exported.outcome != OK:
            problems.append(f"ExportPack+deps as {caller.name}: {describe(exported)}")
        else:
            ids = [r.chunk.artifact.id for r in exported.response if r.chunk.HasField("artifact")]
            listed = [a.id for a in exported.response[0].chunk.manifest.artifacts]
            want = {root.id, privdep.id}
            if set(ids) != want or set(listed) != want:
                problems.append(f"ExportPack+deps as {caller.name}: {ids}, want {want}")
        resolved = await dep.call(caller, "ResolveDependencies", pb.ResolveDependenciesRequest(
            organization=ACME, slug=root.slug))  # fmt: skip
        if resolved.outcome != OK:
            problems.append(f"ResolveDependencies as {caller.name}: {describe(resolved)}")
            continue
        got = resolved.response
        dep_name = f"{ACME}/{privdep.slug}"
        if sees_dep:
            if got.problems or {lock.id for lock in got.lock} != {root.id, privdep.id}:
                problems.append(f"ResolveDependencies as {caller.name}: {got}")
        elif list(got.lock) or [(p.reason, p.name) for p in got.problems] != [
            ("MISSING", dep_name)
        ]:
            problems.append(f"ResolveDependencies as {caller.name}: {got}")
        elif privdep.id.encode() in got.SerializeToString():
            problems.append(f"ResolveDependencies as {caller.name} shows the private id")
    assert not problems, "\n".join(problems)


# ---- audit -----------------------------------------------------------------------------------


async def audited(dep: Deployment, caller: Caller) -> Counter[tuple[str, str, str]]:
    entries: Counter[tuple[str, str, str]] = Counter()
    request = key_pb.QueryAuditRequest(identity=caller.identity, page_size=1000)
    admin_md = dep.admin.metadata
    while True:
        page = await dep.keys.QueryAudit(request, metadata=admin_md)
        entries.update((e.method, e.outcome, e.reason) for e in page.entries)
        if not page.next_page_token:
            return entries
        request.page_token = page.next_page_token


async def test_audit_has_every_mutating_and_denied_call(dep: Deployment) -> None:
    """Runs last: the audit log must hold, per caller, exactly the calls this module made that
    mutate or were denied (QueryAudit itself only reads and succeeds: not audited)."""

    def recorded(caller: Caller) -> Counter[tuple[str, str, str]]:
        return Counter(
            (method, outcome, reason)
            for identity, method, outcome, reason in dep.calls
            if identity == caller.identity
            and (method.rpartition("/")[2] in MUTATING or outcome in DENIED)
        )

    async def matches() -> list[str]:
        wrong = []
        for caller in dep.callers.values():
            want, got = recorded(caller), await audited(dep, caller)
            if want != got:
                wrong.append(f"{caller.name}: missing {want - got}, unexpected {got - want}")
        return wrong

    async def settled() -> bool:
        return not await matches()

    assert recorded(dep.admin), "the setup's mutations are recorded"
    try:
        await eventually(settled, timeout=10, interval=0.2)
    except TimeoutError:
        pytest.fail("\n".join(await matches()), pytrace=False)


async def test_purge_counts_only_dependents_the_purger_may_see(dep: Deployment) -> None:
    """A private artifact of another organization depending on acme's public one neither stops
    its purge nor shows in the refusal or the answer: to its owner, the dependency went
    missing, as if it had never existed."""
    lib = await dep.create(new_artifact(ACME, dep.slug("lib"), PUBLIC))
    lineage = f"{ACME}/{lib.slug}"
    hidden = await dep.create(new_artifact(GLOBEX, dep.slug("app"), PRIVATE, deps=(lineage,)))
    acme_admin = dep.callers["acme-admin"]
    purged = await dep.ok(acme_admin, "PurgeArtifact", pb.PurgeArtifactRequest(id=lib.id))
    assert list(purged.dependents) == []

    lib = await dep.create(new_artifact(ACME, dep.slug("lib"), PUBLIC))
    lineage = f"{ACME}/{lib.slug}"
    hidden = await dep.create(new_artifact(GLOBEX, dep.slug("app"), PRIVATE, deps=(lineage,)))
    seen = await dep.create(new_artifact(ACME, dep.slug("app"), PRIVATE, deps=(lineage,)))
    refused = await dep.call(acme_admin, "PurgeArtifact", pb.PurgeArtifactRequest(id=lib.id))
    assert refused.outcome == Outcome(grpc.StatusCode.FAILED_PRECONDITION, "HAS_DEPENDENTS")
    assert refused.error is not None and "1 artifact(s)" in (refused.error.details() or "")
    assert hidden.id not in (refused.error.details() or "")
    forced = pb.PurgeArtifactRequest(id=lib.id, force=True)
    assert list((await dep.ok(acme_admin, "PurgeArtifact", forced)).dependents) == [seen.id]
