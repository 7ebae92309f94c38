"""API keys: UNAUTHENTICATED with a precise reason for missing, malformed, unknown, wrong, revoked
and expired keys; admin-only key administration scoped by organization (organization admins
see, make and revoke their organization's keys only; the audit log needs a server admin); keys
stored only as salted hashes; the lockout after repeated wrong secrets; revocation reaching
another replica within the refresh time; key rotation without a failed call on two replicas;
the bootstrap key printed once by a real `prism-server`; `--no-auth` saying so; `prismctl keys`
as subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from server.app import AUTH_HEALTH, PrismServer
from server.auth import MAX_FAILURE_ENTRIES, SCRYPT, hash_secret
from tests.support.harness import error_details, namespaced, running_server
from tests.support.wait import eventually

BIN = Path(sys.executable).parent
LISTENING = "prism-server listening on "
BOOTSTRAP = "prism-server: bootstrap admin key (shown once, store it now): "
#: keys and audit default to SQLite in the data dir; data on memstore keeps these tests quick
MEMSTORE = {
    "namespaces": [
        {"name": "default", "pattern": "direct", "slots": {"keyvalue": {"backend": "memstore"}}}
    ]
}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (*namespaced("default"), ("authorization", f"Bearer {key}"))


async def failure(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, details) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), reason_of(caught.value), caught.value.details() or ""


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    info, _ = error_details(exc)
    return info.reason if info else ""


def set_call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Any:
    return kv_grpc.KeyValueBasicServiceStub(channel).Set(
        kv.SetRequest(key="k", value=b"v"), metadata=metadata
    )


async def create_key(
    server: PrismServer, admin: str, role: pb.Role.ValueType = pb.ROLE_EDITOR, **fields: Any
) -> pb.CreateKeyResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        made: pb.CreateKeyResponse = await pb_grpc.KeyAdminServiceStub(channel).CreateKey(
            pb.CreateKeyRequest(name="test", roles=[role], **fields), metadata=bearer(admin)
        )
    return made


async def test_bad_credentials_are_unauthenticated_with_reason(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        admin = server.bootstrap_key
        assert admin is not None
        key_id = admin.split("_")[1]
        wrong_secret = f"prism_{key_id}_{'A' * 43}"
        cases = {
            "MISSING_CREDENTIALS": namespaced("default"),
            "MALFORMED_CREDENTIALS": (("authorization", "Basic dXNlcjpwYXNz"),),
            "INVALID_KEY": (("authorization", f"Bearer prism_{'0' * 16}_{'A' * 43}"),),
        }
        async with grpc.aio.insecure_channel(server.address) as channel:
            for reason, metadata in cases.items():
                code, got, _ = await failure(set_call(channel, metadata))
                assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason)
            for malformed in ("Bearer", f"Bearer {admin}x", f"Bearer prism_{key_id}"):
                code, got, _ = await failure(set_call(channel, (("authorization", malformed),)))
                assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, "MALFORMED_CREDENTIALS")
            code, got, _ = await failure(set_call(channel, bearer(wrong_secret)))
            assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_KEY")
            # the right key is accepted, also when the scheme is written in lower case
            await set_call(channel, bearer(admin))
            await set_call(channel, (*namespaced("default"), ("authorization", f"bearer {admin}")))
            # health stays open and says authentication is on
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=AUTH_HEALTH))
            assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_admin_rpcs_need_the_admin_role_and_valid_input(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        assert server.bootstrap_key is not None
        viewer = (await create_key(server, server.bootstrap_key, pb.ROLE_VIEWER)).secret_key
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = pb_grpc.KeyAdminServiceStub(channel)
            call = admin.ListKeys(pb.ListKeysRequest(), metadata=bearer(viewer))
            code, reason, _ = await failure(call)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
            md = bearer(server.bootstrap_key)
            past = pb.CreateKeyRequest(name="x", roles=[pb.ROLE_VIEWER])
            past.expire_time.FromSeconds(int(time.time()) - 10)
            for request, field in (
                (pb.CreateKeyRequest(name="x"), "roles"),
                (pb.CreateKeyRequest(roles=[pb.ROLE_VIEWER]), "name"),
                (past, "expire_time"),
                *(
                    (pb.CreateKeyRequest(name="x", roles=[pb.ROLE_VIEWER], organization=org),
                     "organization")
                    for org in ("Acme", "acme-", "-acme", "a_b", "a" * 65)
                ),
            ):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await admin.CreateKey(request, metadata=md)
                _, bad = error_details(caught.value)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert bad is not None and bad.field_violations[0].field == field
            code, reason, _ = await failure(
                admin.RevokeKey(pb.RevokeKeyRequest(id="0" * 16), metadata=md)
            )
            assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")


async def list_all(
    stub: pb_grpc.KeyAdminServiceAsyncStub, key: str, size: int, include_revoked: bool = False
) -> list[list[str]]:
    """Every page of ListKeys (key ids per page), following next_page_token to its end."""
    pages: list[list[str]] = []
    request = pb.ListKeysRequest(page_size=size, include_revoked=include_revoked)
    while True:
        page = await stub.ListKeys(request, metadata=bearer(key))
        pages.append([k.id for k in page.keys])
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


async def test_organization_admins_manage_only_their_organizations_keys(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        root = server.bootstrap_key
        assert root is not None
        acme_admin = await create_key(server, root, pb.ROLE_ADMIN, organization="acme")
        acme = {acme_admin.key.id}
        beta: set[str] = set()
        for i in range(9):  # interleaved in id order at random: filtering spans scan pages
            org = "acme" if i % 3 == 0 else "beta"
            made = await create_key(server, root, organization=org)
            (acme if org == "acme" else beta).add(made.key.id)
        org_admin = acme_admin.secret_key
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.KeyAdminServiceStub(channel)
            # ListKeys: exactly acme's keys, in full pages but the last, at every page size
            for size in (1, 2, 3, 100):
                pages = await list_all(stub, org_admin, size)
                assert [i for page in pages for i in page] == sorted(acme), size
                assert all(len(page) == size for page in pages[:-1]), (size, pages)
                assert pages[-1], (size, pages)  # no empty trailing page
            everything = await list_all(stub, root, 2)
            root_id = root.split("_")[1]
            assert {i for page in everything for i in page} == acme | beta | {root_id}
            code, reason, _ = await failure(
                stub.ListKeys(pb.ListKeysRequest(page_token="bm9wZQ"), metadata=bearer(org_admin))
            )
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")

            # CreateKey: its own organization only; a key of no organization would be an
            # escalation to server admin
            mine = await create_key(server, org_admin, pb.ROLE_ADMIN, organization="acme")
            assert mine.key.organization == "acme"
            for org in ("beta", "", "Not Valid"):
                code, reason, _ = await failure(
                    stub.CreateKey(
                        pb.CreateKeyRequest(name="x", roles=[pb.ROLE_ADMIN], organization=org),
                        metadata=bearer(org_admin),
                    )
                )
                assert (code, reason) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "NOT_ORGANIZATION_MEMBER",
                ), org
            after = {i for page in await list_all(stub, root, 100) for i in page}
            assert after == acme | beta | {root_id, mine.key.id}  # nothing else was made

            # RevokeKey: another organization's key (or the server admin's) does not exist
            beta_id = min(beta)
            unknown = await failure(
                stub.RevokeKey(pb.RevokeKeyRequest(id="0" * 16), metadata=bearer(org_admin))
            )
            for other in (beta_id, root_id):
                code, reason, details = await failure(
                    stub.RevokeKey(pb.RevokeKeyRequest(id=other), metadata=bearer(org_admin))
                )
                assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
                assert details == unknown[2].replace("0" * 16, other)
            listed = await stub.ListKeys(pb.ListKeysRequest(), metadata=bearer(root))
            assert all(not k.HasField("revoke_time") for k in listed.keys)
            revoked = await stub.RevokeKey(
                pb.RevokeKeyRequest(id=mine.key.id), metadata=bearer(org_admin)
            )
            assert revoked.key.HasField("revoke_time")
            pages = await list_all(stub, org_admin, 2, include_revoked=True)
            assert sorted(i for page in pages for i in page) == sorted(acme | {mine.key.id})

            # QueryAudit: the whole server's log, server admins only
            viewer = (await create_key(server, root, pb.ROLE_VIEWER)).secret_key
            for key in (org_admin, viewer):
                code, reason, _ = await failure(
                    stub.QueryAudit(pb.QueryAuditRequest(), metadata=bearer(key))
                )
                assert (code, reason) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "SERVER_ADMIN_REQUIRED",
                )
            audit = await stub.QueryAudit(pb.QueryAuditRequest(), metadata=bearer(root))
            assert audit.entries


async def test_wrong_secrets_lock_out_the_key_id_but_not_a_verified_secret(tmp_path: Path) -> None:
    """Five wrong secrets lock a key id out (answers stay INVALID_KEY and come without hashing);
    a secret already verified on this server still works; a correct one not yet verified is
    refused until the window has passed; a burst of one correct new secret is never locked out."""
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        root = server.bootstrap_key
        assert root is not None
        keys = server.security.keys
        in_use, fresh, burst = [(await create_key(server, root)).secret_key for _ in range(3)]
        started = time.perf_counter()
        hash_secret("x" * 43, b"0" * 16, SCRYPT)
        one_hash = time.perf_counter() - started

        def wrong(key: str, n: int) -> str:
            return f"prism_{key.split('_')[1]}_{hashlib.sha256(str(n).encode()).hexdigest()[:43]}"

        async def refused(channel: grpc.aio.Channel, key: str) -> None:
            code, reason, _ = await failure(set_call(channel, bearer(key)))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_KEY")

        async with grpc.aio.insecure_channel(server.address) as channel:
            await set_call(channel, bearer(in_use))
            for key in (in_use, fresh):
                for n in range(keys.lockout_failures):
                    await refused(channel, wrong(key, n))
            # locked: more guesses fail the same way, fast (20 scrypt runs would take 20 hashes)
            started = time.perf_counter()
            for n in range(20):
                await refused(channel, wrong(fresh, 100 + n))
            assert time.perf_counter() - started < 5 * one_hash
            await refused(channel, fresh)  # right, but first seen during the lockout
            await set_call(channel, bearer(in_use))  # verified before: no denial of service

            # a client opening with many calls at once shares one check of its new secret
            await asyncio.gather(*(set_call(channel, bearer(burst)) for _ in range(30)))

            keys.lockout_window = 1.0  # the lockout began well over a second ago by now

            async def accepted() -> bool:
                try:
                    await set_call(channel, bearer(fresh))
                except grpc.aio.AioRpcError:
                    return False
                return True

            await eventually(accepted, timeout=10, message="the lockout did not end")
            await refused(channel, wrong(fresh, 999))  # an accepted secret reset the count...
            await set_call(channel, bearer(fresh))  # ...and is now verified


async def test_the_failure_table_stays_bounded(tmp_path: Path) -> None:
    """A full table of lockout counts forgets passed windows first, then the oldest entries,
    and still counts the newest key id."""
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        assert server.bootstrap_key is not None
        keys = server.security.keys
        key = (await create_key(server, server.bootstrap_key)).secret_key
        now = time.monotonic()
        stale = {f"{n:016x}": (1, now - 2 * keys.lockout_window) for n in range(10)}
        live = {f"{n:016x}": (1, now) for n in range(10, MAX_FAILURE_ENTRIES + 15)}  # 5 too many
        keys._failures = {**stale, **live}
        async with grpc.aio.insecure_channel(server.address) as channel:
            wrong = f"prism_{key.split('_')[1]}_{'A' * 43}"
            code, reason, _ = await failure(set_call(channel, bearer(wrong)))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_KEY")
        table = keys._failures
        assert len(table) == MAX_FAILURE_ENTRIES
        assert table[key.split("_")[1]][0] == 1
        assert not set(stale) & set(table)  # passed windows went first...
        assert f"{15:016x}" not in table and f"{16:016x}" in table  # ...then the 6 oldest


def database_bytes(data_dir: Path) -> bytes:
    """The SQLite file with its WAL: everything the key store wrote."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("prism.db*")))


async def test_keys_are_stored_only_as_salted_hashes(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        assert server.bootstrap_key is not None
        made = await create_key(server, server.bootstrap_key, owner="ann", organization="acme")
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = pb_grpc.KeyAdminServiceStub(channel)
            listed = await admin.ListKeys(
                pb.ListKeysRequest(), metadata=bearer(server.bootstrap_key)
            )
    secrets = [k.split("_", 2)[2] for k in (server.bootstrap_key, made.secret_key)]  # may hold "_"
    assert {k.id for k in listed.keys} == {made.key.id, server.bootstrap_key.split("_")[1]}
    mine = next(k for k in listed.keys if k.id == made.key.id)
    assert (mine.owner, mine.organization, list(mine.roles)) == ("ann", "acme", [pb.ROLE_EDITOR])
    wire = listed.SerializeToString()
    raw = database_bytes(tmp_path)
    assert made.key.id.encode() in raw  # the record is in this file...
    for secret in secrets:
        assert secret.encode() not in wire
        assert secret.encode() not in raw  # ...but never the secret


async def test_revocation_reaches_another_replica_within_seconds(tmp_path: Path) -> None:
    """Two servers sharing the key store: B has the key verified and cached; A revokes it."""
    async with (
        running_server(MEMSTORE, tmp_path, auth=True) as a,
        running_server(MEMSTORE, tmp_path, auth=True) as b,
    ):
        assert a.bootstrap_key is not None and b.bootstrap_key is None  # one bootstrap only
        key = (await create_key(a, a.bootstrap_key)).secret_key
        async with (
            grpc.aio.insecure_channel(a.address) as on_a,
            grpc.aio.insecure_channel(b.address) as on_b,
        ):
            await set_call(on_b, bearer(key))
            await pb_grpc.KeyAdminServiceStub(on_a).RevokeKey(
                pb.RevokeKeyRequest(id=key.split("_")[1]), metadata=bearer(a.bootstrap_key)
            )
            code, reason, _ = await failure(set_call(on_a, bearer(key)))  # at once on A
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED")
            revoked_at = time.monotonic()
            await eventually(lambda: revoked(on_b, key), timeout=10, message="B accepts the key")
            assert time.monotonic() - revoked_at < b.security.keys.refresh + 2.0


async def revoked(channel: grpc.aio.Channel, key: str) -> bool:
    """Whether the server behind `channel` now refuses `key` as revoked."""
    try:
        await set_call(channel, bearer(key))
    except grpc.aio.AioRpcError as exc:
        return reason_of(exc) == "KEY_REVOKED"
    return False


async def test_key_rotation_without_a_failed_call_on_two_replicas(tmp_path: Path) -> None:
    """A client calls both replicas non-stop while a new key is made (on one), the client
    switches to it, and the old key is revoked (on the other): not one call fails, and the old
    key is refused everywhere within the refresh time."""
    async with (
        running_server(MEMSTORE, tmp_path, auth=True) as a,
        running_server(MEMSTORE, tmp_path, auth=True) as b,
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        assert a.bootstrap_key is not None
        old = (await create_key(a, a.bootstrap_key)).secret_key
        using = [old]
        answered: dict[str, int] = {}
        failed: list[grpc.aio.AioRpcError] = []
        stop = asyncio.Event()

        async def client() -> None:
            calls = 0
            while not stop.is_set():
                key = using[0]
                try:
                    await set_call((on_a, on_b)[calls % 2], bearer(key))
                    answered[key] = answered.get(key, 0) + 1
                except grpc.aio.AioRpcError as exc:
                    failed.append(exc)
                calls += 1

        def answered_at_least(key: str, calls: int) -> bool:
            return answered.get(key, 0) >= calls

        running = asyncio.create_task(client())
        try:
            await eventually(lambda: answered_at_least(old, 20), timeout=10)
            new = (await create_key(b, a.bootstrap_key)).secret_key
            using[0] = new
            await eventually(lambda: answered_at_least(new, 20), timeout=10)
            await pb_grpc.KeyAdminServiceStub(on_b).RevokeKey(
                pb.RevokeKeyRequest(id=old.split("_")[1]), metadata=bearer(a.bootstrap_key)
            )
            revoked_at = time.monotonic()
            await eventually(lambda: answered_at_least(new, 100), timeout=10)
        finally:
            stop.set()
            await running
        assert failed == []
        for channel in (on_b, on_a):  # B revoked it, A finds out on its next refresh
            await eventually(partial(revoked, channel, old), timeout=10, message="old key works")
        assert time.monotonic() - revoked_at < a.security.keys.refresh + 2.0


async def test_expired_key_is_refused(tmp_path: Path) -> None:
    async with running_server(MEMSTORE, tmp_path, auth=True) as server:
        assert server.bootstrap_key is not None
        soon = pb.CreateKeyRequest().expire_time
        soon.FromNanoseconds(time.time_ns() + 1_500_000_000)
        key = (await create_key(server, server.bootstrap_key, expire_time=soon)).secret_key
        async with grpc.aio.insecure_channel(server.address) as channel:
            await set_call(channel, bearer(key))

            async def expired() -> bool:
                try:
                    await set_call(channel, bearer(key))
                except grpc.aio.AioRpcError as exc:
                    return reason_of(exc) == "KEY_EXPIRED"
                return False

            await eventually(expired, timeout=10, message="the expired key is still accepted")


async def test_rate_limits_count_each_key_apart(tmp_path: Path) -> None:
    """Same host, two keys: each has its own bucket (the key comes before the peer)."""
    config = {
        **MEMSTORE,
        "rate_limits": {
            "store": {"backend": "memstore"},
            "rules": [{"method": "*/Set", "rate": 0.01, "burst": 1}],
        },
    }
    async with running_server(config, tmp_path, auth=True) as server:
        assert server.bootstrap_key is not None
        other = (await create_key(server, server.bootstrap_key)).secret_key
        async with grpc.aio.insecure_channel(server.address) as channel:
            await set_call(channel, bearer(server.bootstrap_key))
            code, reason, _ = await failure(set_call(channel, bearer(server.bootstrap_key)))
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            await set_call(channel, bearer(other))


# ---- the real prism-server and prismctl -------------------------------------------------------


@dataclass
class Started:
    proc: subprocess.Popen[str]
    address: str
    lines: list[str]

    @property
    def bootstrap(self) -> str | None:
        found = [line.removeprefix(BOOTSTRAP) for line in self.lines if line.startswith(BOOTSTRAP)]
        assert len(found) <= 1, self.lines
        return found[0] if found else None


def start_server(data: Path, *flags: str, env: dict[str, str] | None = None) -> Started:
    proc = subprocess.Popen(
        [str(BIN / "prism-server"), "--listen", "127.0.0.1:0", "--data-dir", str(data), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or {k: v for k, v in os.environ.items() if k != "PRISM_NO_AUTH"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(LISTENING):
            return Started(proc, line.removeprefix(LISTENING).strip(), lines)
    proc.wait(10)
    raise AssertionError(f"prism-server exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]


def stop(started: Started) -> str:
    """SIGTERM, wait, and return its stderr."""
    started.proc.terminate()
    _, err = started.proc.communicate(timeout=30)
    assert started.proc.returncode == 0, err
    return err


def health_of(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return int(answer.status)


def blocking_set(address: str, key: str | None) -> grpc.StatusCode:
    metadata: tuple[tuple[str, str], ...] = (("x-prism-namespace", "default"),)
    if key is not None:
        metadata += (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(address) as channel:
        try:
            kv_grpc.KeyValueBasicServiceStub(channel).Set(
                kv.SetRequest(key="k", value=b"v"), metadata=metadata, timeout=10
            )
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Started, str]]:
    """A real secured prism-server (embedded default) on a fresh data dir, and its admin key."""
    started = start_server(tmp_path_factory.mktemp("secured"))
    try:
        assert started.bootstrap is not None
        yield started, started.bootstrap
    finally:
        stop(started)


def test_bootstrap_key_is_printed_once_and_works(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    try:
        key = first.bootstrap
        assert key is not None and key.startswith("prism_")
        assert first.lines.index(BOOTSTRAP + key) < len(first.lines) - 1  # before `listening`
        assert blocking_set(first.address, None) == grpc.StatusCode.UNAUTHENTICATED
        assert blocking_set(first.address, key) == grpc.StatusCode.OK
        assert health_of(first.address, AUTH_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    finally:
        err = stop(first)
    assert key not in err
    second = start_server(tmp_path)
    try:
        assert second.bootstrap is None
        assert not any(key in line for line in second.lines)
        assert blocking_set(second.address, key) == grpc.StatusCode.OK
    finally:
        stop(second)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_auth_warns_and_reports_in_health(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "PRISM_NO_AUTH": "1"} if how == "env" else None
    started = start_server(tmp_path, *(["--no-auth"] if how == "flag" else []), env=env)
    try:
        assert started.bootstrap is None
        assert blocking_set(started.address, None) == grpc.StatusCode.OK
        assert health_of(started.address, AUTH_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_of(started.address, "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        err = stop(started)
    assert "WARNING: authentication is OFF" in err


def prismctl(address: str, key: str | None, *args: str, ok: bool = True) -> Any:
    env = {**os.environ, "PRISM_ADDRESS": address}
    env.pop("PRISM_API_KEY", None)
    done = subprocess.run(
        [str(BIN / "prismctl"), *args, *(["--api-key", key] if key else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr
    if ok:
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if "--format" in args else done.stdout
    return done


def test_prismctl_keys_create_list_revoke(secured: tuple[Started, str]) -> None:
    started, admin = secured
    made = prismctl(started.address, admin, "keys", "create", "--name", "ci", "--role",
                    "editor", "--org", "acme", "--scope", "default:write", "--expires", "30d",
                    "--format", "json")  # fmt: skip
    key, key_id = made["secret_key"], made["key"]["id"]
    assert key.startswith(f"prism_{key_id}_")
    assert made["key"]["roles"] == ["ROLE_EDITOR"] and made["key"]["scopes"] == ["default:write"]
    assert blocking_set(started.address, key) == grpc.StatusCode.OK

    table = prismctl(started.address, admin, "keys", "list")
    assert table.splitlines()[0].split()[:3] == ["ID", "NAME", "OWNER"]
    row = next(line for line in table.splitlines() if line.startswith(key_id))
    assert "ci" in row and "editor" in row and key.split("_", 2)[2] not in table

    assert f"revoked {key_id} (ci)" in prismctl(started.address, admin, "keys", "revoke", key_id)
    assert blocking_set(started.address, key) == grpc.StatusCode.UNAUTHENTICATED
    listed = prismctl(started.address, admin, "keys", "list", "--format", "json")
    assert key_id not in {k["id"] for k in listed.get("keys", [])}
    listed = prismctl(started.address, admin, "keys", "list", "--include-revoked", "--format",
                      "json")  # fmt: skip
    assert any(k["id"] == key_id and "revoke_time" in k for k in listed["keys"])

    # refusals are one line with exit 1; bad flags exit 2
    denied = prismctl(started.address, key, "keys", "list", ok=False)
    assert denied.returncode == 1
    assert (
        denied.stderr.strip()
        == f"prismctl: error: UNAUTHENTICATED: API key {key_id} has been revoked"
    )
    anonymous = prismctl(started.address, None, "keys", "list", ok=False)
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
    assert len(anonymous.stderr.strip().splitlines()) == 1
    unknown = prismctl(started.address, admin, "keys", "revoke", "0" * 16, ok=False)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    bad = prismctl(started.address, admin, "keys", "create", "--name", "x", "--expires", "soon",
                   ok=False)  # fmt: skip
    assert bad.returncode == 2 and "--expires 'soon'" in bad.stderr


def test_prismctl_keys_as_an_organization_admin(secured: tuple[Started, str]) -> None:
    started, root = secured
    made = prismctl(started.address, root, "keys", "create", "--name", "acme-admin", "--role",
                    "admin", "--org", "acme", "--format", "json")  # fmt: skip
    org_admin = made["secret_key"]
    other = prismctl(started.address, root, "keys", "create", "--name", "beta-ci", "--org",
                     "beta", "--format", "json")  # fmt: skip
    ours = prismctl(started.address, org_admin, "keys", "create", "--name", "acme-ci", "--org",
                    "acme", "--format", "json")  # fmt: skip
    listed = prismctl(started.address, org_admin, "keys", "list", "--format", "json")
    assert {k["id"] for k in listed["keys"]} >= {made["key"]["id"], ours["key"]["id"]}
    assert {k["organization"] for k in listed["keys"]} == {"acme"}

    escalation = prismctl(started.address, org_admin, "keys", "create", "--name", "root",
                          "--role", "admin", ok=False)  # fmt: skip
    assert escalation.returncode == 1
    assert escalation.stderr.startswith("prismctl: error: PERMISSION_DENIED: ")
    assert "needs a server admin key" in escalation.stderr
    hidden = prismctl(started.address, org_admin, "keys", "revoke", other["key"]["id"], ok=False)
    assert hidden.returncode == 1
    assert f"NOT_FOUND: no API key '{other['key']['id']}'" in hidden.stderr
    everything = prismctl(started.address, root, "keys", "list", "--format", "json")
    assert other["key"]["id"] in {k["id"] for k in everything["keys"]}  # still not revoked
    audit = prismctl(started.address, org_admin, "audit", ok=False)
    assert audit.returncode == 1 and "PERMISSION_DENIED" in audit.stderr
