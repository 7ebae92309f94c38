"""API key scopes (docs/authorization.md, "Scopes"): a key with scopes reaches only the
namespaces they name (`ns` or `ns:read|write|admin`), `prism-admin` names key administration, a
scoped key mints only keys within its own scopes, and bad scopes are INVALID_ARGUMENT.

Real server (memstore namespaces), keys made through KeyAdminService, real gRPC calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from plugins.runtime.grpc_adapter import NAMESPACE_HEADER
from tests.security.test_namespace_access import Metadata, memstore, outcome
from tests.support.harness import error_details, running_server

CONFIG = {
    "namespaces": [memstore("kv", "keyvalue", "store"), memstore("other", "keyvalue", "store")]
}


class Scoped:
    def __init__(self, channel: grpc.aio.Channel, bootstrap: str) -> None:
        self.admin = pb_grpc.KeyAdminServiceStub(channel)
        self.kv = kv_grpc.KeyValueBasicServiceStub(channel)
        self.bootstrap = bootstrap

    @staticmethod
    def md(key: str, namespace: str | None = None) -> Metadata:
        auth = (("authorization", f"Bearer {key}"),)
        return auth if namespace is None else ((NAMESPACE_HEADER, namespace), *auth)

    async def key(self, scopes: list[str], organization: str = "acme", by: str = "") -> str:
        request = pb.CreateKeyRequest(
            name="scoped", organization=organization, roles=[pb.ROLE_ADMIN], scopes=scopes
        )
        made = await self.admin.CreateKey(request, metadata=self.md(by or self.bootstrap))
        assert list(made.key.scopes) == scopes
        return made.secret_key

    async def set_and_get(self, key: str, namespace: str) -> tuple[str, str]:
        md = self.md(key, namespace)
        wrote = await outcome(self.kv.Set(kv.SetRequest(key="k", value=b"v"), metadata=md))
        read = await outcome(self.kv.Get(kv.GetRequest(key="k"), metadata=md))
        return wrote, read


@pytest.fixture(scope="module")
async def scoped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scoped]:
    data: Path = tmp_path_factory.mktemp("scopes")
    async with running_server(CONFIG, data, auth=True) as server:
        assert server.bootstrap_key is not None
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Scoped(channel, server.bootstrap_key)


async def test_scopes_limit_namespaces_and_levels(scoped: Scoped) -> None:
    unscoped = await scoped.key([])
    assert await scoped.set_and_get(unscoped, "kv") == ("OK", "OK")

    reader = await scoped.key(["kv:read"])
    assert await scoped.set_and_get(reader, "kv") == ("PERMISSION_DENIED ROLE_REQUIRED", "OK")
    # a namespace outside the scopes does not exist for the key
    missing = "NOT_FOUND NAMESPACE_NOT_FOUND"
    assert await scoped.set_and_get(reader, "other") == (missing, missing)
    assert await scoped.set_and_get(reader, "nowhere") == (missing, missing)

    both = await scoped.key(["kv", "other:write"])
    assert await scoped.set_and_get(both, "kv") == ("OK", "OK")
    assert await scoped.set_and_get(both, "other") == ("OK", "OK")

    # scopes bind a server admin key too: held to read, it is a member of nothing that reads
    server_reader = await scoped.key(["kv:read"], organization="")
    assert await scoped.set_and_get(server_reader, "kv") == (
        "PERMISSION_DENIED ROLE_REQUIRED",
        "OK",
    )


async def test_key_administration_needs_the_prism_admin_scope(scoped: Scoped) -> None:
    no_key_api = await scoped.key(["kv"])
    listed = scoped.admin.ListKeys(pb.ListKeysRequest(), metadata=scoped.md(no_key_api))
    assert await outcome(listed) == "PERMISSION_DENIED ADMIN_REQUIRED"

    key_admin = await scoped.key(["prism-admin", "kv:write"])
    listed = scoped.admin.ListKeys(pb.ListKeysRequest(), metadata=scoped.md(key_admin))
    assert await outcome(listed) == "OK"
    # it mints keys within its own scopes only: never a way out of them
    narrower = await scoped.key(["kv:read"], by=key_admin)
    assert await scoped.set_and_get(narrower, "kv") == ("PERMISSION_DENIED ROLE_REQUIRED", "OK")
    for wider in (["kv:admin"], ["other"], []):
        request = pb.CreateKeyRequest(
            name="wider", organization="acme", roles=[pb.ROLE_EDITOR], scopes=wider
        )
        created = scoped.admin.CreateKey(request, metadata=scoped.md(key_admin))
        assert await outcome(created) == "PERMISSION_DENIED SCOPE_EXCEEDED", wider


@pytest.mark.parametrize("bad", ["", "kv:delete", "-kv", "kv:read:write", "x" * 65, "a b"])
async def test_malformed_scopes_are_invalid_arguments(scoped: Scoped, bad: str) -> None:
    request = pb.CreateKeyRequest(
        name="bad", organization="acme", roles=[pb.ROLE_VIEWER], scopes=["kv", bad]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoped.admin.CreateKey(request, metadata=scoped.md(scoped.bootstrap))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad_request = error_details(caught.value)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["scopes[1]"]
