"""The audit log: a scripted mix of mutations, reads and denied calls leaves exactly one entry
per mutation and per denial (none for successful reads) with the right fields; QueryAudit
filters and pages newest first; old entries are purged automatically; a full queue drops and
says so in health; the `security:` config block; `prismctl audit` as a subprocess."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from prismctl.config import validate_config_data
from prismctl.registry import load_registry
from server.app import AUDIT_HEALTH, PrismServer, ServerOptions, create_server
from server.audit import QUEUE_LIMIT, AuditRecord
from tests.security.test_auth import MEMSTORE, Started, bearer, prismctl, secured
from tests.support.harness import namespaced, running_server
from tests.support.wait import eventually

KV = "/prism.interfaces.keyvalue.v1.KeyValueBasicService"
ADMIN = "/prism.admin.v1.KeyAdminService"


def with_id(metadata: tuple[tuple[str, str], ...], request_id: str) -> Any:
    return (*metadata, ("x-request-id", request_id))


async def all_entries(server: PrismServer, admin: str, **filters: Any) -> list[pb.AuditEntry]:
    """Every entry matching `filters`, page by page (small pages, to cross page boundaries)."""
    await server.security.audit.flush()
    entries: list[pb.AuditEntry] = []
    request = pb.QueryAuditRequest(page_size=2, **filters)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.KeyAdminServiceStub(channel)
        while True:
            page = await stub.QueryAudit(request, metadata=bearer(admin))
            assert len(page.entries) <= 2
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            request.page_token = page.next_page_token


async def test_every_mutation_and_denial_has_exactly_one_entry(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        admin = server.bootstrap_key
        assert admin is not None
        admin_id = f"key:{admin.split('_')[1]}"
        # (request id, identity, method, namespace, resource, outcome, reason) expected
        expected: list[tuple[str, ...]] = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            kv_stub = kv_grpc.KeyValueBasicServiceStub(channel)
            keys = pb_grpc.KeyAdminServiceStub(channel)
            md = bearer(admin)
            await kv_stub.Set(kv.SetRequest(key="a", value=b"1"), metadata=with_id(md, "r1"))
            expected.append(("r1", admin_id, f"{KV}/Set", "default", "a", "OK", ""))
            await kv_stub.Get(kv.GetRequest(key="a"), metadata=with_id(md, "read-ok"))
            await kv_stub.Delete(kv.DeleteRequest(key="a"), metadata=with_id(md, "r2"))
            expected.append(("r2", admin_id, f"{KV}/Delete", "default", "a", "OK", ""))
            with pytest.raises(grpc.aio.AioRpcError):  # a failed mutation is recorded too
                await kv_stub.Set(kv.SetRequest(key="", value=b"1"), metadata=with_id(md, "r3"))
            expected.append(
                ("r3", admin_id, f"{KV}/Set", "default", "", "INVALID_ARGUMENT", "INVALID_ARGUMENT")
            )
            for rid, call in (
                ("r4", kv_stub.Set(kv.SetRequest(key="b", value=b"1"),
                                   metadata=with_id(namespaced("default"), "r4"))),
                ("r5", kv_stub.Get(kv.GetRequest(key="b"),
                                   metadata=with_id(namespaced("default"), "r5"))),
            ):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
                method = "Set" if rid == "r4" else "Get"
                expected.append(
                    (rid, "anonymous", f"{KV}/{method}", "default", "b", "UNAUTHENTICATED",
                     "MISSING_CREDENTIALS")
                )  # fmt: skip
            made = await keys.CreateKey(
                pb.CreateKeyRequest(name="viewer", roles=[pb.ROLE_VIEWER]),
                metadata=with_id(md, "r6"),
            )
            expected.append(("r6", admin_id, f"{ADMIN}/CreateKey", "default", "viewer", "OK", ""))
            viewer = bearer(made.secret_key)
            with pytest.raises(grpc.aio.AioRpcError):
                await keys.ListKeys(pb.ListKeysRequest(), metadata=with_id(viewer, "r7"))
            expected.append(
                ("r7", f"key:{made.key.id}", f"{ADMIN}/ListKeys", "default", "",
                 "PERMISSION_DENIED", "ADMIN_REQUIRED")
            )  # fmt: skip
            await keys.RevokeKey(pb.RevokeKeyRequest(id=made.key.id), metadata=with_id(md, "r8"))
            expected.append(
                ("r8", admin_id, f"{ADMIN}/RevokeKey", "default", made.key.id, "OK", "")
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await kv_stub.Get(kv.GetRequest(key="a"), metadata=with_id(viewer, "r9"))
            expected.append(
                ("r9", f"key:{made.key.id}", f"{KV}/Get", "default", "a", "UNAUTHENTICATED",
                 "KEY_REVOKED")
            )  # fmt: skip
        entries = await all_entries(server, admin)
        got = [
            (e.request_id, e.identity, e.method, e.namespace, e.resource, e.outcome, e.reason)
            for e in entries
        ]
        assert sorted(got) == sorted(expected)  # exactly one each; no successful read
        assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
        assert [e.request_id for e in entries] == [x[0] for x in reversed(expected)]
        assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in entries)
        assert all(abs(e.time.ToNanoseconds() / 1e9 - time.time()) < 60 for e in entries)


async def test_query_filters(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        admin = server.bootstrap_key
        assert admin is not None
        async with grpc.aio.insecure_channel(server.address) as channel:
            kv_stub = kv_grpc.KeyValueBasicServiceStub(channel)
            for key in "abc":
                await kv_stub.Set(kv.SetRequest(key=key, value=b"1"), metadata=bearer(admin))
            middle = (await all_entries(server, admin))[1].time
            with pytest.raises(grpc.aio.AioRpcError):
                await kv_stub.Delete(kv.DeleteRequest(key="a"), metadata=namespaced("default"))
        everything = await all_entries(server, admin)
        assert [e.resource for e in everything] == ["a", "c", "b", "a"]
        by_outcome = await all_entries(server, admin, outcome="unauthenticated")
        assert [(e.identity, e.method) for e in by_outcome] == [("anonymous", f"{KV}/Delete")]
        by_identity = await all_entries(server, admin, identity=f"key:{admin.split('_')[1]}")
        assert [e.resource for e in by_identity] == ["c", "b", "a"]
        for method in (f"{KV}/Set", "KeyValueBasicService/Set"):
            assert [e.resource for e in await all_entries(server, admin, method=method)] == list(
                "cba"
            )
        since = await all_entries(server, admin, start_time=middle)
        assert [e.resource for e in since] == ["a", "c", "b"]
        before = await all_entries(server, admin, end_time=middle)
        assert [e.resource for e in before] == ["a"]
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.KeyAdminServiceStub(channel).QueryAudit(
                    pb.QueryAuditRequest(outcome="NOPE"), metadata=bearer(admin)
                )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outcome" in (caught.value.details() or "")


def record_at(time_ns: int, resource: str) -> AuditRecord:
    return AuditRecord("anonymous", "test", f"{KV}/Set", "default", resource, "OK", "", "",
                       time_ns)  # fmt: skip


async def test_old_entries_are_purged_automatically(tmp_path: Path) -> None:
    config = {**MEMSTORE, "security": {"audit_retention_days": 1}}
    options = ServerOptions(config=config, data_dir=tmp_path, auth=False, audit_purge_interval=0.1)
    server = await create_server(options)
    await server.start()
    try:
        audit = server.security.audit
        assert audit.retention == 86_400.0
        now = time.time_ns()
        audit.record(record_at(now - 2 * 86_400 * 10**9, "two-days-old"))
        audit.record(record_at(now - 3_600 * 10**9, "an-hour-old"))
        await audit.flush()

        async def remaining() -> list[str]:
            page = await audit.query(pb.QueryAuditRequest())
            return [e.resource for e in page.entries]

        await eventually(
            lambda: _eq(remaining(), ["an-hour-old"]), timeout=10, message="old entry kept"
        )
    finally:
        await server.stop(0.5)


async def _eq(value: Any, expected: list[str]) -> bool:
    got: list[str] = await value
    return got == expected


async def test_a_full_queue_drops_and_health_says_so(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path) as server:
        audit = server.security.audit
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=AUDIT_HEALTH)
            assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
            for i in range(QUEUE_LIMIT + 5):  # no await: the writer cannot run in between
                audit.record(record_at(time.time_ns(), f"k{i}"))
            assert audit.dropped == 5

            async def not_serving() -> bool:
                answer = await health.Check(request)
                return bool(answer.status == health_pb2.HealthCheckResponse.NOT_SERVING)

            await eventually(not_serving, message="health still SERVING after drops")
            # the overall status is untouched: calls go on
            overall = await health.Check(health_pb2.HealthCheckRequest())
            assert overall.status == health_pb2.HealthCheckResponse.SERVING


def test_security_block_is_validated_with_locations() -> None:
    registry = load_registry()
    text = """namespaces:
  - name: default
    pattern: direct
    slots:
      keyvalue: {backend: memstore}
security:
  keys: {backend: memstore}
  audit:
    backend: memstore
    interfaces: [document_basic]
  audit_retention_days: 30
"""
    result = validate_config_data(yaml.safe_load(text), "c.yaml", registry, text=text)
    findings = [(d.rule_id, d.location.line) for d in result.diagnostics]
    assert findings == [("REQUIRED_INTERFACE_NOT_LISTED", 10)], result.diagnostics
    fine = text.replace("    interfaces: [document_basic]\n", "")
    result = validate_config_data(yaml.safe_load(fine), "c.yaml", registry, text=fine)
    assert result.ok and result.security is not None
    assert result.security.audit_retention_days == 30.0
    assert result.security.audit.interfaces == ["document_basic", "document_query"]
    bad = text.replace("audit_retention_days: 30", "audit_retention_days: 0")
    result = validate_config_data(yaml.safe_load(bad), "c.yaml", registry, text=bad)
    assert [d.rule_id for d in result.diagnostics if d.location.line == 11] == ["SCHEMA"]


__all__ = ["secured"]  # the real secured prism-server fixture, shared with test_auth


def test_prismctl_audit(secured: tuple[Started, str]) -> None:
    started, admin = secured
    key_id = admin.split("_")[1]
    prismctl(started.address, admin, "keys", "create", "--name", "audited")
    denied = prismctl(started.address, None, "keys", "create", "--name", "nope", ok=False)
    assert denied.returncode == 1

    def entries(*flags: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = prismctl(
            started.address, admin, "audit", *flags, "--format", "json"
        )
        return found

    def created_by_admin() -> bool:
        return any(e["resource"] == "audited" for e in entries("--identity", f"key:{key_id}"))

    assert eventually_sync(created_by_admin)
    refused = entries("--outcome", "UNAUTHENTICATED", "--method", "KeyAdminService/CreateKey")
    assert refused and refused[0]["identity"] == "anonymous"
    assert refused[0]["reason"] == "MISSING_CREDENTIALS"
    assert len(entries("--limit", "1")) == 1
    assert entries("--since", "2h", "--until", "1h") == []
    table = prismctl(started.address, admin, "audit", "--limit", "5")
    assert table.splitlines()[0].split()[:4] == ["TIME", "IDENTITY", "OUTCOME", "REASON"]
    usage = prismctl(started.address, admin, "audit", "--limit", "0", ok=False)
    assert usage.returncode == 2 and "--limit 0" in usage.stderr


def eventually_sync(predicate: Any, timeout: float = 30.0) -> bool:
    """The audit writer is asynchronous: poll (never sleep blindly) until it shows up; each
    probe is a prismctl subprocess, slow on a loaded machine, hence the generous bound."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def test_entries_name_the_serving_namespace_and_a_nested_resource(tmp_path: Path) -> None:
    """A call that names no namespace is recorded under the one that served it; a request whose
    resource sits in a message it carries (CreateArtifact's `artifact`) names it."""
    from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as ar
    from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as ar_grpc

    async with running_server(None, tmp_path, auth=True) as server:
        admin = server.bootstrap_key
        assert admin is not None
        async with grpc.aio.insecure_channel(server.address) as channel:
            artifact = ar.Artifact(
                organization="acme", name="Reviewer", type=ar.ARTIFACT_TYPE_PERSONA, source="p {}"
            )
            auth_only = (("authorization", f"Bearer {admin}"),)  # no x-prism-namespace
            await ar_grpc.ArtifactRegistryServiceStub(channel).CreateArtifact(
                ar.CreateArtifactRequest(artifact=artifact), metadata=with_id(auth_only, "made")
            )
        [entry] = [e for e in await all_entries(server, admin) if e.request_id == "made"]
        assert (entry.namespace, entry.resource, entry.outcome) == ("registry", "Reviewer", "OK")
