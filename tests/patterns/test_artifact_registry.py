"""The artifact-registry pattern, black-box over gRPC, on every backend combination of
tests/patterns/conftest.py. Each test works in its own organization."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from tests.patterns.conftest import Registry
from tests.support.harness import error_details

PERSONA = pb.ARTIFACT_TYPE_PERSONA
PUBLIC = pb.VISIBILITY_PUBLIC


def artifact(org: str, name: str, version: str = "1.0.0", **kw: Any) -> pb.Artifact:
    meta = kw.pop("metadata", {})
    deps = kw.pop("deps", {})
    return pb.Artifact(
        organization=org,
        name=name,
        type=kw.pop("type", PERSONA),
        version=version,
        source=kw.pop("source", f"persona {name.replace(' ', '')} {{ version {version} }}"),
        visibility=kw.pop("visibility", PUBLIC),
        metadata=pb.ArtifactMetadata(**meta),
        dependencies=[
            pb.Dependency(name=n, version_constraint=c, kind=pb.DEPENDENCY_KIND_IMPORT)
            for n, c in deps.items()
        ],
        **kw,
    )


async def create(reg: Registry, art: pb.Artifact, publish: bool = True) -> pb.Artifact:
    response = await reg.stub.CreateArtifact(
        pb.CreateArtifactRequest(artifact=art, publish=publish, changelog="initial")
    )
    return response.artifact


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def assert_invalid(call: Any, field: str) -> None:
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    _, bad = error_details(err)
    assert bad is not None and [v.field for v in bad.field_violations] == [field]


async def test_create_get_and_slug(registry: Registry) -> None:
    org = registry.org()
    draft = await create(registry, artifact(org, "Code Reviewer (v2)!"), publish=False)
    assert draft.slug == "code-reviewer-v2"
    assert draft.state == pb.VERSION_STATE_DRAFT and not draft.is_latest
    assert len(draft.source_sha256) == 64 and draft.revision > 0
    got = (await registry.stub.GetArtifact(pb.GetArtifactRequest(id=draft.id))).artifact
    assert got == draft
    # no published version yet: "latest" does not exist, an exact version does
    err = await rpc_error(
        registry.stub.GetArtifactBySlug(
            pb.GetArtifactBySlugRequest(organization=org, slug=draft.slug)
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    exact = await registry.stub.GetArtifactBySlug(
        pb.GetArtifactBySlugRequest(organization=org, slug=draft.slug, version="1.0.0")
    )
    assert exact.artifact.id == draft.id
    published = await registry.stub.PublishVersion(
        pb.PublishVersionRequest(id=draft.id, changelog="ship it")
    )
    assert published.artifact.state == pb.VERSION_STATE_PUBLISHED
    assert published.artifact.is_latest and published.artifact.changelog == "ship it"
    latest = await registry.stub.GetArtifactBySlug(
        pb.GetArtifactBySlugRequest(organization=org, slug=draft.slug)
    )
    assert latest.artifact.id == draft.id


async def test_invalid_input_names_the_field(registry: Registry) -> None:
    org = registry.org()
    s = registry.stub
    await assert_invalid(
        s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact(org, "A", "1.0"))),
        "artifact.version",
    )
    await assert_invalid(
        s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact(org, "A", "v1.x.0"))),
        "artifact.version",
    )
    await assert_invalid(
        s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact("Bad Org", "A"))),
        "artifact.organization",
    )
    await assert_invalid(
        s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact(org, "A", source=" "))),
        "artifact.source",
    )
    await assert_invalid(
        s.CreateArtifact(
            pb.CreateArtifactRequest(artifact=artifact(org, "A", type=pb.ARTIFACT_TYPE_UNSPECIFIED))
        ),
        "artifact.type",
    )
    await assert_invalid(
        s.CreateArtifact(
            pb.CreateArtifactRequest(
                artifact=artifact(org, "A", metadata={"author_email": "not-an-email"})
            )
        ),
        "artifact.metadata.author_email",
    )
    await assert_invalid(
        s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact(org, "A", deps={"b": "^^1"}))),
        "artifact.dependencies[0].version_constraint",
    )
    await assert_invalid(s.GetArtifact(pb.GetArtifactRequest(id="")), "id")
    await assert_invalid(
        s.ListArtifacts(pb.ListArtifactsRequest(page_token="not-a-token")), "page_token"
    )
    await assert_invalid(s.ListArtifacts(pb.ListArtifactsRequest(page_size=-1)), "page_size")
    first = await create(registry, artifact(org, "A"))
    err = await rpc_error(s.CreateArtifact(pb.CreateArtifactRequest(artifact=artifact(org, "A"))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    await assert_invalid(
        s.UpdateArtifact(pb.UpdateArtifactRequest(artifact=pb.Artifact(id=first.id))),
        "update_mask",
    )
    err = await rpc_error(s.GetArtifact(pb.GetArtifactRequest(id="0" * 32)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info, _ = error_details(err)
    assert info is not None and info.reason == "ARTIFACT_NOT_FOUND"
    # nothing half-written: the lineage still has exactly the one good version
    versions = await s.ListVersions(pb.ListVersionsRequest(organization=org, slug="a"))
    assert [v.version for v in versions.versions] == ["1.0.0"]


async def test_semver_order_latest_and_ranges(registry: Registry) -> None:
    org = registry.org()
    for version in ["1.0.0", "1.1.0-beta.1", "1.1.0", "2.0.0-rc.1", "1.10.0", "1.2.0"]:
        await create(registry, artifact(org, "Tool", version))
    versions = await registry.stub.ListVersions(
        pb.ListVersionsRequest(organization=org, slug="tool")
    )
    assert [v.version for v in versions.versions] == [
        "2.0.0-rc.1", "1.10.0", "1.2.0", "1.1.0", "1.1.0-beta.1", "1.0.0",
    ]  # fmt: skip
    latest = [v for v in versions.versions if v.is_latest]
    assert [v.version for v in latest] == ["1.10.0"]  # prereleases never become latest

    async def resolve(spec: str) -> str:
        response = await registry.stub.GetArtifactBySlug(
            pb.GetArtifactBySlugRequest(organization=org, slug="tool", version=spec)
        )
        return response.artifact.version

    assert await resolve("^1.0.0") == "1.10.0"
    assert await resolve("~1.1.0") == "1.1.0"
    assert await resolve("1.1.0-beta.1") == "1.1.0-beta.1"
    assert await resolve(">=1.1.0-beta.0 <1.1.0") == "1.1.0-beta.1"
    assert await resolve("^2.0.0-rc.0") == "2.0.0-rc.1"
    assert await resolve("<1.2.0") == "1.1.0"
    assert await resolve("1.x || >=3") == "1.10.0"
    err = await rpc_error(resolve("^3.0.0"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    await assert_invalid(resolve("^^1"), "version")
    # pagination over versions, in order, nothing twice
    seen, token = [], ""
    while True:
        page = await registry.stub.ListVersions(
            pb.ListVersionsRequest(organization=org, slug="tool", page_size=4, page_token=token)
        )
        seen += [v.version for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [v.version for v in versions.versions]


async def test_update_in_place_guards_and_new_versions(registry: Registry) -> None:
    org = registry.org()
    draft = await create(registry, artifact(org, "Writer"), publish=False)
    mask = FieldMask(paths=["name", "metadata.description"])
    changed = pb.Artifact(
        id=draft.id, name="Writer Pro", metadata=pb.ArtifactMetadata(description="writes")
    )
    updated = await registry.stub.UpdateArtifact(
        pb.UpdateArtifactRequest(
            artifact=changed, update_mask=mask, expected_revision=draft.revision
        )
    )
    assert updated.artifact.name == "Writer Pro"
    assert updated.artifact.metadata.description == "writes"
    assert updated.artifact.revision != draft.revision and not updated.created_version
    stale = await rpc_error(
        registry.stub.UpdateArtifact(
            pb.UpdateArtifactRequest(
                artifact=changed, update_mask=mask, expected_revision=draft.revision
            )
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    await registry.stub.PublishVersion(pb.PublishVersionRequest(id=draft.id))
    immutable = await rpc_error(
        registry.stub.UpdateArtifact(
            pb.UpdateArtifactRequest(
                artifact=pb.Artifact(id=draft.id, source="changed"),
                update_mask=FieldMask(paths=["source"]),
            )
        )
    )
    assert immutable.code() == grpc.StatusCode.FAILED_PRECONDITION
    visibility = await registry.stub.UpdateArtifact(
        pb.UpdateArtifactRequest(
            artifact=pb.Artifact(id=draft.id, visibility=pb.VISIBILITY_UNLISTED),
            update_mask=FieldMask(paths=["visibility"]),
        )
    )
    assert visibility.artifact.visibility == pb.VISIBILITY_UNLISTED
    bumped = await registry.stub.UpdateArtifact(
        pb.UpdateArtifactRequest(
            artifact=pb.Artifact(id=draft.id, version="1.1.0", source="persona WriterPro {}"),
            update_mask=FieldMask(paths=["version", "source"]),
        )
    )
    assert bumped.created_version and bumped.artifact.version == "1.1.0"
    assert bumped.artifact.id != draft.id and bumped.artifact.state == pb.VERSION_STATE_DRAFT
    original = await registry.stub.GetArtifact(pb.GetArtifactRequest(id=draft.id))
    assert original.artifact.source != "persona WriterPro {}"


async def test_concurrent_updates_lose_nothing(registry: Registry) -> None:
    org = registry.org()
    draft = await create(registry, artifact(org, "Shared"), publish=False)

    async def add_keyword(client: int) -> None:
        while True:
            current = (await registry.stub.GetArtifact(pb.GetArtifactRequest(id=draft.id))).artifact
            meta = pb.ArtifactMetadata(keywords=[*current.metadata.keywords, f"k{client}"])
            try:
                await registry.stub.UpdateArtifact(
                    pb.UpdateArtifactRequest(
                        artifact=pb.Artifact(id=draft.id, metadata=meta),
                        update_mask=FieldMask(paths=["metadata.keywords"]),
                        expected_revision=current.revision,
                    )
                )
                return
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc.details()

    await asyncio.gather(*(add_keyword(c) for c in range(8)))
    final = (await registry.stub.GetArtifact(pb.GetArtifactRequest(id=draft.id))).artifact
    assert sorted(final.metadata.keywords) == sorted(f"k{c}" for c in range(8))


async def test_concurrent_publishes_all_present(registry: Registry) -> None:
    org = registry.org()
    versions = [f"1.{i}.0" for i in range(8)]
    await asyncio.gather(*(create(registry, artifact(org, "Busy", v)) for v in versions))
    listed = await registry.stub.ListVersions(pb.ListVersionsRequest(organization=org, slug="busy"))
    assert sorted(v.version for v in listed.versions) == sorted(versions)
    assert [v.version for v in listed.versions if v.is_latest] == ["1.7.0"]


async def test_delete_undelete_and_purge_with_dependents(registry: Registry) -> None:
    org = registry.org()
    base = await create(registry, artifact(org, "Base"))
    user = await create(registry, artifact(org, "User", deps={"base": "^1.0.0"}))
    deleted = await registry.stub.DeleteArtifact(pb.DeleteArtifactRequest(id=user.id))
    assert deleted.artifact.HasField("delete_time")
    err = await rpc_error(registry.stub.GetArtifact(pb.GetArtifactRequest(id=user.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    shown = await registry.stub.GetArtifact(pb.GetArtifactRequest(id=user.id, include_deleted=True))
    assert shown.artifact.id == user.id
    listed = await registry.stub.ListArtifacts(
        pb.ListArtifactsRequest(filter=pb.ArtifactFilter(organization=org))
    )
    assert [a.name for a in listed.artifacts] == ["Base"]
    await registry.stub.UndeleteArtifact(pb.UndeleteArtifactRequest(id=user.id))
    refused = await rpc_error(registry.stub.PurgeArtifact(pb.PurgeArtifactRequest(id=base.id)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(refused)
    assert info is not None and info.reason == "HAS_DEPENDENTS"
    assert info.metadata["dependents"] == user.id
    forced = await registry.stub.PurgeArtifact(pb.PurgeArtifactRequest(id=base.id, force=True))
    assert list(forced.dependents) == [user.id]
    gone = await rpc_error(
        registry.stub.GetArtifact(pb.GetArtifactRequest(id=base.id, include_deleted=True))
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_list_filters_sorts_and_pages(registry: Registry) -> None:
    org = registry.org()
    specs = [
        ("Alpha", PERSONA, ["ai", "chat"], ["python"], "ann", PUBLIC),
        ("Bravo", pb.ARTIFACT_TYPE_TEAM, ["ai"], ["go"], "bob", PUBLIC),
        ("Charlie", pb.ARTIFACT_TYPE_WORKFLOW, ["chat"], ["python", "go"], "ann", PUBLIC),
        ("Delta", pb.ARTIFACT_TYPE_SKILL, [], ["rust"], "cy", pb.VISIBILITY_PRIVATE),
        ("Echo", PERSONA, ["ai", "chat", "voice"], [], "bob", pb.VISIBILITY_UNLISTED),
    ]
    created = {}
    for name, kind, tags, skills, author, vis in specs:
        created[name] = await create(
            registry,
            artifact(org, name, type=kind, visibility=vis,
                     metadata={"tags": tags, "skills": skills, "author": author}),
        )  # fmt: skip
    await create(registry, artifact(org, "Foxtrot"), publish=False)
    for _ in range(3):
        await registry.stub.RecordDownload(pb.RecordDownloadRequest(id=created["Charlie"].id))
    await registry.stub.RecordDownload(pb.RecordDownloadRequest(id=created["Bravo"].id))

    async def names(**filter_kw: Any) -> list[str]:
        order = filter_kw.pop("order_by", pb.SORT_FIELD_NAME)
        descending = filter_kw.pop("descending", False)
        f = pb.ArtifactFilter(organization=org, **filter_kw)
        response = await registry.stub.ListArtifacts(
            pb.ListArtifactsRequest(filter=f, order_by=order, descending=descending)
        )
        count = await registry.stub.CountArtifacts(pb.CountArtifactsRequest(filter=f))
        assert count.count == len(response.artifacts)
        return [a.name for a in response.artifacts]

    assert await names() == ["Alpha", "Bravo", "Charlie", "Delta", "Foxtrot"]  # no unlisted
    assert await names(visibility=pb.VISIBILITY_UNLISTED) == ["Echo"]
    assert await names(types=[PERSONA]) == ["Alpha", "Foxtrot"]
    assert await names(types=[PERSONA, pb.ARTIFACT_TYPE_TEAM]) == ["Alpha", "Bravo", "Foxtrot"]
    assert await names(tags=["chat", "voice"]) == ["Alpha", "Charlie"]
    assert await names(tags=["ai", "chat"], tags_match=pb.LIST_MATCH_ALL) == ["Alpha"]
    assert await names(skills=["go", "python"], skills_match=pb.LIST_MATCH_ALL) == ["Charlie"]
    assert await names(skills=["rust"]) == ["Delta"]
    assert await names(author="bob") == ["Bravo"]
    assert await names(published=False) == ["Foxtrot"]
    assert await names(min_downloads=1) == ["Bravo", "Charlie"]
    assert await names(descending=True) == ["Foxtrot", "Delta", "Charlie", "Bravo", "Alpha"]
    by_downloads = await names(order_by=pb.SORT_FIELD_DOWNLOADS, descending=True)
    assert by_downloads[:2] == ["Charlie", "Bravo"]
    seen, token = [], ""
    while True:
        page = await registry.stub.ListArtifacts(
            pb.ListArtifactsRequest(
                filter=pb.ArtifactFilter(organization=org), page_size=2, page_token=token
            )
        )
        assert len(page.artifacts) <= 2
        seen += [a.name for a in page.artifacts]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["Alpha", "Bravo", "Charlie", "Delta", "Foxtrot"]


async def test_dependency_resolution(registry: Registry) -> None:
    org = registry.org()
    for version in ["1.0.0", "1.1.0", "1.2.0", "2.0.0"]:
        await create(registry, artifact(org, "D", version))
    await create(registry, artifact(org, "B", deps={"d": "^1.0.0"}))
    await create(registry, artifact(org, "C", deps={"d": ">=1.1.0 <1.2.0"}))
    await create(registry, artifact(org, "A", deps={"b": "^1", "c": "^1"}))
    diamond = await registry.stub.ResolveDependencies(
        pb.ResolveDependenciesRequest(organization=org, slug="a")
    )
    assert not diamond.problems
    lock = {entry.name: entry.version for entry in diamond.lock}
    assert lock == {
        f"{org}/a": "1.0.0",
        f"{org}/b": "1.0.0",
        f"{org}/c": "1.0.0",
        f"{org}/d": "1.1.0",
    }
    assert diamond.lock[-1].name == f"{org}/a"  # dependencies first
    assert diamond.lock[0].name == f"{org}/d"

    await create(registry, artifact(org, "E", deps={"d": "^2.0.0"}))
    await create(registry, artifact(org, "F", deps={"b": "*", "e": "*"}))
    conflict = await registry.stub.ResolveDependencies(
        pb.ResolveDependenciesRequest(organization=org, slug="f")
    )
    assert not conflict.lock
    [problem] = conflict.problems
    assert problem.reason == "CONFLICT" and problem.name == f"{org}/d"
    assert sorted(problem.constraints) == [
        f"{org}/b@1.0.0 requires ^1.0.0",
        f"{org}/e@1.0.0 requires ^2.0.0",
    ]

    await create(registry, artifact(org, "X", deps={"y": "*"}))
    await create(registry, artifact(org, "Y", deps={"x": "*"}))
    cycle = await registry.stub.ResolveDependencies(
        pb.ResolveDependenciesRequest(organization=org, slug="x")
    )
    assert [p.reason for p in cycle.problems] == ["CYCLE"]
    assert list(cycle.problems[0].path) == [f"{org}/x@1.0.0", f"{org}/y@1.0.0", f"{org}/x@1.0.0"]

    await create(registry, artifact(org, "Lonely", deps={"ghost": "^1"}))
    missing = await registry.stub.ResolveDependencies(
        pb.ResolveDependenciesRequest(organization=org, slug="lonely")
    )
    assert [(p.reason, p.name) for p in missing.problems] == [("MISSING", f"{org}/ghost")]


async def test_rollback_and_deprecate(registry: Registry) -> None:
    org = registry.org()
    v1 = await create(registry, artifact(org, "Flow", "1.0.0"))
    v2 = await create(registry, artifact(org, "Flow", "1.1.0"))

    async def latest() -> str:
        response = await registry.stub.GetArtifactBySlug(
            pb.GetArtifactBySlugRequest(organization=org, slug="flow")
        )
        return response.artifact.version

    assert await latest() == "1.1.0"
    rolled = await registry.stub.RollbackVersion(
        pb.RollbackVersionRequest(organization=org, slug="flow", version="1.0.0")
    )
    assert rolled.artifact.id == v1.id and rolled.artifact.is_latest
    assert await latest() == "1.0.0"
    deprecated = await registry.stub.DeprecateVersion(
        pb.DeprecateVersionRequest(id=v2.id, reason="broken")
    )
    assert deprecated.artifact.state == pb.VERSION_STATE_DEPRECATED
    again = await rpc_error(registry.stub.DeprecateVersion(pb.DeprecateVersionRequest(id=v2.id)))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    await create(registry, artifact(org, "Flow", "1.2.0"))  # publishing clears the pin
    assert await latest() == "1.2.0"


async def test_search_relevance_on_a_judged_corpus(registry: Registry) -> None:
    org = registry.org()
    corpus = [
        ("Code Reviewer", "reviews pull requests", ["review"]),
        ("Review Assistant", "a helpful code reviewer for teams", ["code"]),
        ("Reviewer", "checks code", []),
        ("Translator", "translates code comments", ["i18n"]),
        ("Secret Reviewer", "code reviewer", []),
    ]
    for name, description, tags in corpus:
        vis = pb.VISIBILITY_UNLISTED if name == "Secret Reviewer" else PUBLIC
        await create(
            registry,
            artifact(
                org, name, visibility=vis, metadata={"description": description, "tags": tags}
            ),
        )

    async def search(query: str, **f: Any) -> pb.SearchArtifactsResponse:
        return await registry.stub.SearchArtifacts(
            pb.SearchArtifactsRequest(query=query, filter=pb.ArtifactFilter(organization=org, **f))
        )

    hits = (await search("code reviewer")).hits
    names = [h.artifact.name for h in hits]
    assert names[0] == "Code Reviewer"  # exact name match first
    assert "Secret Reviewer" not in names  # unlisted never searched
    assert names.index("Review Assistant") > 0
    assert "Translator" not in names  # every term must match
    name_hits = [h.artifact.name for h in (await search("reviewer")).hits]
    # "reviewer" in the name outranks "reviewer" only in the description
    assert name_hits.index("Reviewer") < name_hits.index("Review Assistant")
    assert name_hits[0] == "Reviewer"  # the whole name equals the query
    top = (await search("translates")).hits[0]
    assert top.artifact.name == "Translator"
    assert any("<mark>translates</mark>" in h.snippet for h in top.highlights)
    filtered = (await search("code", tags=["i18n"])).hits
    assert [h.artifact.name for h in filtered] == ["Translator"]
    await assert_invalid(
        registry.stub.SearchArtifacts(pb.SearchArtifactsRequest(query="")), "query"
    )


async def test_discovery_stars_and_counters(registry: Registry) -> None:
    org = registry.org()
    a = await create(
        registry, artifact(org, "Ann", metadata={"tags": ["x", "y"], "skills": ["s1"]})
    )
    b = await create(registry, artifact(org, "Ben", metadata={"tags": ["x"], "skills": ["s1"]}))
    c = await create(registry, artifact(org, "Cid", metadata={"tags": ["y"]}))
    await create(registry, artifact(org, "Dot", metadata={"tags": ["z"]}))
    tags = await registry.stub.ListTags(pb.ListTagsRequest(organization=org))
    assert [(t.name, t.count) for t in tags.tags] == [("x", 2), ("y", 2), ("z", 1)]
    skills = await registry.stub.ListSkills(pb.ListSkillsRequest(organization=org))
    assert [(t.name, t.count) for t in skills.skills] == [("s1", 2)]
    related = await registry.stub.GetRelated(pb.GetRelatedRequest(id=a.id))
    assert [r.artifact.name for r in related.artifacts] == ["Ben", "Cid"]  # skill weighs more

    for user in ("u1", "u2", "u2"):
        starred = await registry.stub.StarArtifact(pb.StarArtifactRequest(id=c.id, user=user))
    assert starred.stats.stars == 2  # idempotent per user
    gazers = await registry.stub.ListStargazers(pb.ListStargazersRequest(id=c.id))
    assert list(gazers.users) == ["u1", "u2"]
    unstarred = await registry.stub.UnstarArtifact(pb.UnstarArtifactRequest(id=c.id, user="u1"))
    assert unstarred.stats.stars == 1
    await registry.stub.UnstarArtifact(pb.UnstarArtifactRequest(id=c.id, user="u1"))
    viewed = await registry.stub.RecordView(pb.RecordViewRequest(id=b.id))
    assert viewed.stats.views == 1 and viewed.stats.HasField("last_access_time")
    for _ in range(7):
        await registry.stub.RecordDownload(pb.RecordDownloadRequest(id=b.id))
    trending = await registry.stub.GetTrending(pb.GetTrendingRequest(limit=100))
    ours = [t.artifact.name for t in trending.artifacts if t.artifact.organization == org]
    # recent activity, not net counts: 7 downloads (weight 1) > 2 star events (weight 3 each)
    assert ours[:2] == ["Ben", "Cid"]
    scores = [t.score for t in trending.artifacts]
    assert scores == sorted(scores, reverse=True)


async def test_collections(registry: Registry) -> None:
    org = registry.org()
    arts = [await create(registry, artifact(org, f"Member {i}")) for i in range(3)]
    made = await registry.stub.CreateCollection(
        pb.CreateCollectionRequest(
            collection=pb.Collection(organization=org, name="Kit", artifact_ids=[arts[0].id])
        )
    )
    cid = made.collection.id
    added = await registry.stub.AddToCollection(
        pb.AddToCollectionRequest(collection_id=cid, artifact_id=arts[1].id, position=0)
    )
    assert list(added.collection.artifact_ids) == [arts[1].id, arts[0].id]
    await registry.stub.AddToCollection(
        pb.AddToCollectionRequest(collection_id=cid, artifact_id=arts[2].id, position=-1)
    )
    dup = await rpc_error(
        registry.stub.AddToCollection(
            pb.AddToCollectionRequest(collection_id=cid, artifact_id=arts[2].id)
        )
    )
    assert dup.code() == grpc.StatusCode.ALREADY_EXISTS
    order = [arts[2].id, arts[0].id, arts[1].id]
    reordered = await registry.stub.ReorderCollection(
        pb.ReorderCollectionRequest(collection_id=cid, artifact_ids=order)
    )
    assert list(reordered.collection.artifact_ids) == order
    await assert_invalid(
        registry.stub.ReorderCollection(
            pb.ReorderCollectionRequest(collection_id=cid, artifact_ids=order[:2])
        ),
        "artifact_ids",
    )
    removed = await registry.stub.RemoveFromCollection(
        pb.RemoveFromCollectionRequest(collection_id=cid, artifact_id=arts[0].id)
    )
    assert list(removed.collection.artifact_ids) == [arts[2].id, arts[1].id]
    listed = await registry.stub.ListCollections(pb.ListCollectionsRequest(organization=org))
    assert [c.name for c in listed.collections] == ["Kit"]
    got = await registry.stub.GetCollection(pb.GetCollectionRequest(id=cid))
    assert got.collection == removed.collection
    await registry.stub.DeleteCollection(pb.DeleteCollectionRequest(id=cid))
    err = await rpc_error(registry.stub.GetCollection(pb.GetCollectionRequest(id=cid)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def export(registry: Registry, ids: list[str]) -> list[pb.PackChunk]:
    request = pb.ExportPackRequest(ids=ids, include_dependencies=True)
    return [r.chunk async for r in registry.stub.ExportPack(request)]


async def import_(registry: Registry, chunks: list[pb.PackChunk], **kw: Any) -> list[Any]:
    request = pb.ImportPackRequest(chunks=chunks, **kw)
    return [r async for r in registry.stub.ImportPack(request)]


async def test_export_purge_import_round_trip(registry: Registry) -> None:
    org = registry.org()
    lib = await create(registry, artifact(org, "Lib", metadata={"tags": ["t"]}))
    app = await create(registry, artifact(org, "App", deps={"lib": "^1"}))
    chunks = await export(registry, [app.id])
    assert chunks[0].WhichOneof("chunk") == "manifest"
    assert [c.artifact.name for c in chunks[1:-1]] == ["Lib", "App"]
    assert chunks[-1].trailer.artifact_count == 2
    before = {a.id: a.source_sha256 for a in (lib, app)}

    dry = await import_(registry, chunks, dry_run=True)
    assert dry[-1].summary.dry_run and dry[-1].summary.skipped == 2  # both still here
    for artifact_id in (app.id, lib.id):
        await registry.stub.PurgeArtifact(pb.PurgeArtifactRequest(id=artifact_id))
    dry = await import_(registry, chunks, dry_run=True)
    assert dry[-1].summary.imported == 0 and not dry[-1].summary.issues
    err = await rpc_error(registry.stub.GetArtifact(pb.GetArtifactRequest(id=app.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # a dry run writes nothing

    events = await import_(registry, chunks)
    assert [e.progress.done for e in events[:-1]] == [1, 2]
    assert events[-1].summary.imported == 2 and not events[-1].summary.issues
    for artifact_id, digest in before.items():
        got = (await registry.stub.GetArtifact(pb.GetArtifactRequest(id=artifact_id))).artifact
        assert got.source_sha256 == digest and got.state == pb.VERSION_STATE_PUBLISHED
    latest = await registry.stub.GetArtifactBySlug(
        pb.GetArtifactBySlugRequest(organization=org, slug="app")
    )
    assert latest.artifact.id == app.id


async def test_tampered_packs_are_rejected(registry: Registry) -> None:
    org = registry.org()
    lib = await create(registry, artifact(org, "Lib"))
    chunks = await export(registry, [lib.id])
    await registry.stub.PurgeArtifact(pb.PurgeArtifactRequest(id=lib.id))

    tampered = [pb.PackChunk() for _ in chunks]
    for copy, chunk in zip(tampered, chunks, strict=True):
        copy.CopyFrom(chunk)
    tampered[1].artifact.source += " evil"
    await assert_invalid(import_(registry, tampered), "chunks")  # pack digest breaks

    # a forger who recomputes the pack digest is still caught by the source digest
    from hashlib import sha256

    digest = sha256()
    for chunk in tampered[:-1]:
        digest.update(chunk.SerializeToString(deterministic=True))
    tampered[-1].trailer.pack_sha256 = digest.hexdigest()
    events = await import_(registry, tampered)
    assert [i.reason for i in events[-1].summary.issues] == ["DIGEST_MISMATCH"]
    assert events[-1].summary.imported == 0
    err = await rpc_error(registry.stub.GetArtifact(pb.GetArtifactRequest(id=lib.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # nothing written


async def test_watch_streams_changes(registry: Registry) -> None:
    org = registry.org()
    stream = registry.stub.WatchArtifacts(pb.WatchArtifactsRequest(organization=org))
    first = await asyncio.wait_for(stream.read(), 10)
    assert first.started
    made = await create(registry, artifact(org, "Watched"), publish=False)
    await create(registry, artifact(registry.org(), "Elsewhere"))  # other org: filtered out
    await registry.stub.PublishVersion(pb.PublishVersionRequest(id=made.id))
    kinds = []
    while len(kinds) < 2:
        event = await asyncio.wait_for(stream.read(), 10)
        assert event.change.organization == org
        kinds.append(event.change.kind)
    assert kinds == [pb.CHANGE_KIND_CREATED, pb.CHANGE_KIND_PUBLISHED]
    stream.cancel()
    err = await rpc_error(
        registry.stub.WatchArtifacts(pb.WatchArtifactsRequest(resume_token="x")).read()
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_reads_after_writes_are_never_stale(registry: Registry) -> None:
    org = registry.org()
    made = await create(registry, artifact(org, "Cached"), publish=False)
    for i in range(5):
        await registry.stub.GetArtifact(pb.GetArtifactRequest(id=made.id))  # warm both caches
        await registry.stub.UpdateArtifact(
            pb.UpdateArtifactRequest(
                artifact=pb.Artifact(id=made.id, name=f"Cached {i}"),
                update_mask=FieldMask(paths=["name"]),
            )
        )
        got = await registry.stub.GetArtifact(pb.GetArtifactRequest(id=made.id))
        assert got.artifact.name == f"Cached {i}"


async def test_stats(registry: Registry) -> None:
    before = await registry.stub.GetStats(pb.GetStatsRequest())
    org = registry.org()
    await create(registry, artifact(org, "S1", source="x" * 100))
    await create(registry, artifact(org, "S2", type=pb.ARTIFACT_TYPE_TEAM, source="y" * 50))
    after = await registry.stub.GetStats(pb.GetStatsRequest())
    assert after.total_artifacts == before.total_artifacts + 2
    assert after.by_organization[org] == 2
    assert after.by_type["team"] == before.by_type["team"] + 1
    assert after.storage_bytes == before.storage_bytes + 150
    assert 0.0 <= after.cache_hit_rate <= 1.0
