"""The secret-vault pattern over real gRPC on memstore, SQLite, PostgreSQL, Redis and SQLite
as a sidecar.

Each backend gets one server for the module with two namespaces on the same backend: `vault`
(the slot's every interface: TTL and CAS too) and `plain` (keyvalue_basic + keyvalue_scan only,
so expired secrets stay in the store and are flagged). Tests use their own secret names. Where
the backend has storage outside the server process, tests read it directly (sqlite3, psycopg,
redis-py) to prove no plaintext reaches it and that a tampered ciphertext is DATA_LOSS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from prism.patterns.secret_vault.v1 import secret_vault_pb2 as pb
from prism.patterns.secret_vault.v1 import secret_vault_pb2_grpc as vault_grpc

from plugins.redis.keys import Keyspace
from server.crypto import ENV_KEYS, Keyring, new_key, parse_header
from tests.conformance.backends import SETUPS
from tests.support.harness import error_details, namespaced, running_server, running_sidecar
from tests.support.wait import eventually

if TYPE_CHECKING:
    from prism.patterns.secret_vault.v1.secret_vault_pb2_grpc import (
        SecretVaultServiceAsyncStub as AsyncStub,
    )

#: "sqlite-sidecar": the store slot bound to a `prism-plugin sqlite` subprocess
BACKENDS = ["memstore", "sqlite", "postgres", "redis", "sqlite-sidecar"]
#: backends whose data outlives the server and can be read without it (memstore's cannot)
RAW_BACKENDS = [b for b in BACKENDS if b != "memstore"]
VAULT = "vault"
PASSWORD = pb.SECRET_TYPE_PASSWORD
PLAIN = "plain"
SERVER_BIN = Path(sys.executable).parent / "prism-server"


def keyring(primary: str, *others: str) -> Keyring:
    return Keyring(primary, {k: base64.b64decode(new_key()) for k in (primary, *others)})


def vault_config(slot: dict[str, Any], namespaces: dict[str, Any]) -> dict[str, Any]:
    """namespace → `interfaces:` subset (None: all the backend has), all in the same slot."""
    result = []
    for name, interfaces in namespaces.items():
        store = dict(slot)
        if interfaces is not None:
            store["interfaces"] = interfaces
        result.append(
            {
                "name": name,
                "pattern": "secret-vault",
                "pattern_version": "v1",
                "slots": {"store": store},
            }
        )
    return {"namespaces": result}


@contextlib.asynccontextmanager
async def vault_server(
    config: dict[str, Any], data_dir: Path, ring: Keyring
) -> AsyncIterator[AsyncStub]:
    """A server of its own (for restarts with another keyring) and a stub to it."""
    async with (
        running_server(config, data_dir, keyring=ring) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub: AsyncStub = vault_grpc.SecretVaultServiceStub(channel)
        yield stub


class RawStore:
    """The backend's own view of one namespace's KV entries, bypassing Prism entirely."""

    def __init__(self, backend: str, slot: dict[str, Any], data_dir: Path) -> None:
        self.backend = backend
        self.slot = slot
        self.data_dir = data_dir

    async def entries(self, namespace: str) -> dict[str, bytes]:
        if self.backend == "sqlite":
            return await asyncio.to_thread(self._sqlite_entries, namespace)
        if self.backend == "postgres":
            async with await psycopg.AsyncConnection.connect(self.slot["connection"]) as conn:
                cur = await conn.execute(
                    "SELECT key, value FROM prism_kv WHERE ns = %s", (namespace,)
                )
                return {bytes(k).decode(): bytes(v) for k, v in await cur.fetchall()}
        space = Keyspace(b"prism:", namespace)
        client = aioredis.from_url(self.slot["connection"])
        try:
            found = {}
            async for key in client.scan_iter(match=space.data_prefix + b"*"):
                value = await client.hget(key, "v")
                assert isinstance(value, bytes)
                found[key.removeprefix(space.data_prefix).decode()] = value
            return found
        finally:
            await client.aclose()

    def _sqlite_entries(self, namespace: str) -> dict[str, bytes]:
        with contextlib.closing(sqlite3.connect(self.data_dir / "conformance.db")) as conn:
            rows = conn.execute("SELECT key, value FROM kv WHERE ns = ?", (namespace,))
            return {k: bytes(v) for k, v in rows}

    async def overwrite(self, namespace: str, key: str, value: bytes) -> None:
        """Replace an entry's value in place (same revision): what an attacker with database
        access, or a disk fault, does."""
        if self.backend == "sqlite":
            await asyncio.to_thread(self._sqlite_overwrite, namespace, key, value)
        elif self.backend == "postgres":
            async with await psycopg.AsyncConnection.connect(self.slot["connection"]) as conn:
                await conn.execute(
                    "UPDATE prism_kv SET value = %s WHERE ns = %s AND key = %s",
                    (value, namespace, key.encode()),
                )
        else:
            client = aioredis.from_url(self.slot["connection"])
            try:
                await client.hset(Keyspace(b"prism:", namespace).data(key), "v", value)
            finally:
                await client.aclose()

    def _sqlite_overwrite(self, namespace: str, key: str, value: bytes) -> None:
        with contextlib.closing(sqlite3.connect(self.data_dir / "conformance.db")) as conn:
            conn.execute(
                "UPDATE kv SET value = ? WHERE ns = ? AND key = ?", (value, namespace, key)
            )
            conn.commit()

    def files(self) -> bytes:
        """Every byte the SQLite backend keeps on disk (database, WAL, journal)."""
        return b"".join(p.read_bytes() for p in self.data_dir.glob("conformance.db*"))


@dataclass
class Vault:
    backend: str
    #: the store slot's entry (backend + config, or backend + sidecar address)
    slot: dict[str, Any]
    root: Path
    stub: AsyncStub
    raw: RawStore | None
    _ids: itertools.count[int]

    def name(self, base: str = "s") -> str:
        return f"{base}-{next(self._ids)}"

    def call(self, rpc: str, request: Any, namespace: str = VAULT) -> Awaitable[Any]:
        method: Callable[..., Awaitable[Any]] = getattr(self.stub, rpc)
        return method(request, metadata=namespaced(namespace), timeout=20)

    def needs_raw(self) -> RawStore:
        assert self.raw is not None, "mark the test raw_backend: it runs on RAW_BACKENDS only"
        return self.raw


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `raw_backend` read or restart the backend under the server, so they run
    on the backends whose data lives outside it; the rest run on every backend."""
    if "vault" in metafunc.fixturenames:
        raw = metafunc.definition.get_closest_marker("raw_backend") is not None
        backends = RAW_BACKENDS if raw else BACKENDS
        metafunc.parametrize("vault", backends, indirect=True, scope="module", ids=backends)


@pytest_asyncio.fixture(scope="module")
async def vault(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Vault]:
    backend: str = request.param
    root = tmp_path_factory.mktemp(f"vault-{backend}")
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite-sidecar":
            config: dict[str, Any] = {"connection": "sqlite:///conformance.db"}
            address = await stack.enter_async_context(
                running_sidecar("sqlite", config, root / "sidecar")
            )
            slot: dict[str, Any] = {"backend": "sqlite", "address": address}
            raw: RawStore | None = RawStore("sqlite", config, root / "sidecar")
        else:
            config = await stack.enter_async_context(SETUPS[backend](root / "backend"))
            slot = {"backend": backend, "config": config}
            raw = None if backend == "memstore" else RawStore(backend, config, root / "server")
        namespaces = {VAULT: None, PLAIN: ["keyvalue_basic", "keyvalue_scan"]}
        server = await stack.enter_async_context(
            running_server(vault_config(slot, namespaces), root / "server", keyring=keyring("k1"))
        )
        channel = grpc.aio.insecure_channel(server.address)
        stack.push_async_callback(channel.close, None)
        yield Vault(
            backend, slot, root, vault_grpc.SecretVaultServiceStub(channel), raw, itertools.count()
        )


def _in(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return ts


async def _error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, BadRequest field) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info, bad = error_details(caught.value)
    field = bad.field_violations[0].field if bad and bad.field_violations else ""
    return caught.value.code(), info.reason if info else "", field


async def _store(vault: Vault, name: str, value: bytes, **kw: Any) -> pb.SecretMetadata:
    kw.setdefault("type", pb.SECRET_TYPE_PASSWORD)
    request = pb.StoreSecretRequest(name=name, value=value, **kw)
    response: pb.StoreSecretResponse = await vault.call("StoreSecret", request)
    return response.metadata


async def test_store_get_round_trip(vault: Vault) -> None:
    name = vault.name("db/password")
    meta = await _store(
        vault, name, b"hunter2", type=pb.SECRET_TYPE_CONNECTION, scopes=["prod", "auth", "prod"],
        description="primary database",
    )  # fmt: skip
    assert (meta.name, meta.type, meta.current_version) == (name, pb.SECRET_TYPE_CONNECTION, 1)
    assert list(meta.scopes) == ["auth", "prod"]
    assert meta.key_id == "k1"
    got = await vault.call("GetSecret", pb.GetSecretRequest(name=name))
    assert (got.value, got.version) == (b"hunter2", 1)
    assert got.metadata.description == "primary database"
    code, reason, _ = await _error(
        vault.call("StoreSecret", pb.StoreSecretRequest(name=name, value=b"x", type=PASSWORD))
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "SECRET_EXISTS")
    assert (await vault.call("GetSecret", pb.GetSecretRequest(name=name))).value == b"hunter2"


async def test_namespaces_are_separate(vault: Vault) -> None:
    name = vault.name()
    await _store(vault, name, b"in-vault")
    code, reason, _ = await _error(vault.call("GetSecret", pb.GetSecretRequest(name=name), PLAIN))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")


async def test_get_unknown_and_delete(vault: Vault) -> None:
    name = vault.name()
    code, reason, _ = await _error(vault.call("GetSecret", pb.GetSecretRequest(name=name)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    await _store(vault, name, b"v")
    await vault.call("DeleteSecret", pb.DeleteSecretRequest(name=name))
    code, _, _ = await _error(vault.call("GetSecret", pb.GetSecretRequest(name=name)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, reason, _ = await _error(vault.call("DeleteSecret", pb.DeleteSecretRequest(name=name)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    await _store(vault, name, b"again")  # a deleted name can be stored anew
    assert (await vault.call("GetSecret", pb.GetSecretRequest(name=name))).value == b"again"


async def test_rotate_keeps_versions(vault: Vault) -> None:
    name = vault.name()
    await _store(vault, name, b"v1")
    for i in range(2, 5):
        rotated = await vault.call(
            "RotateSecret", pb.RotateSecretRequest(name=name, value=f"v{i}".encode())
        )
        assert rotated.metadata.current_version == i
    meta = (
        await vault.call(
            "RotateSecret", pb.RotateSecretRequest(name=name, value=b"v5", retain_versions=3)
        )
    ).metadata
    assert list(meta.versions) == [5, 4, 3]
    assert (await vault.call("GetSecret", pb.GetSecretRequest(name=name))).value == b"v5"
    old = await vault.call("GetSecret", pb.GetSecretRequest(name=name, version=3))
    assert (old.value, old.version) == (b"v3", 3)
    code, reason, _ = await _error(
        vault.call("GetSecret", pb.GetSecretRequest(name=name, version=2))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    code, reason, _ = await _error(
        vault.call(
            "RotateSecret", pb.RotateSecretRequest(name=name, value=b"x", expected_version=4)
        )
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    ok = await vault.call(
        "RotateSecret", pb.RotateSecretRequest(name=name, value=b"v6", expected_version=5)
    )
    assert ok.metadata.current_version == 6
    code, _, _ = await _error(
        vault.call("RotateSecret", pb.RotateSecretRequest(name=vault.name(), value=b"x"))
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_concurrent_rotations_lose_nothing(vault: Vault) -> None:
    """With keyvalue_cas every concurrent rotation lands as its own version."""
    name = vault.name()
    await _store(vault, name, b"start")
    values = [f"value-{i}".encode() for i in range(8)]
    await asyncio.gather(
        *(
            vault.call(
                "RotateSecret", pb.RotateSecretRequest(name=name, value=v, retain_versions=50)
            )
            for v in values
        )
    )
    meta = (await vault.call("GetSecret", pb.GetSecretRequest(name=name))).metadata
    assert list(meta.versions) == list(range(9, 0, -1))
    seen = {
        (await vault.call("GetSecret", pb.GetSecretRequest(name=name, version=v))).value
        for v in range(2, 10)
    }
    assert seen == set(values)


async def test_list_metadata_only_filtered_and_paginated(vault: Vault) -> None:
    base = vault.name("list")
    types = [pb.SECRET_TYPE_API_KEY, pb.SECRET_TYPE_JWT, pb.SECRET_TYPE_CERTIFICATE]
    for i in range(7):
        await _store(
            vault, f"{base}/{i}", f"SECRET-VALUE-{i}".encode(), type=types[i % 3],
            scopes=["prod"] if i % 2 else ["dev"],
        )  # fmt: skip
    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await vault.call(
            "ListSecrets", pb.ListSecretsRequest(prefix=f"{base}/", page_size=3, page_token=token)
        )
        pages += 1
        assert len(page.secrets) <= 3
        names += [s.name for s in page.secrets]
        assert b"SECRET-VALUE" not in page.SerializeToString()
        token = page.next_page_token
        if not token:
            break
    assert names == [f"{base}/{i}" for i in range(7)]
    assert pages == 3
    by_type = await vault.call(
        "ListSecrets", pb.ListSecretsRequest(prefix=f"{base}/", type=pb.SECRET_TYPE_JWT)
    )
    assert [s.name for s in by_type.secrets] == [f"{base}/1", f"{base}/4"]
    by_scope = await vault.call(
        "ListSecrets", pb.ListSecretsRequest(prefix=f"{base}/", scope="prod", page_size=2)
    )
    assert [s.name for s in by_scope.secrets] == [f"{base}/1", f"{base}/3"]
    rest = await vault.call(
        "ListSecrets",
        pb.ListSecretsRequest(
            prefix=f"{base}/", scope="prod", page_size=2, page_token=by_scope.next_page_token
        ),
    )
    assert [s.name for s in rest.secrets] == [f"{base}/5"]
    code, _, field = await _error(
        vault.call(
            "ListSecrets",
            pb.ListSecretsRequest(
                prefix=f"{base}/", scope="dev", page_token=by_scope.next_page_token
            ),
        )
    )
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")


def _store_req(**kw: Any) -> pb.StoreSecretRequest:
    """A valid StoreSecretRequest but for `kw`."""
    return pb.StoreSecretRequest(**{"name": "ok", "value": b"v", "type": PASSWORD, **kw})


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("StoreSecret", _store_req(name=""), "name"),
        ("StoreSecret", _store_req(name="-bad"), "name"),
        ("StoreSecret", _store_req(name="a b"), "name"),
        ("StoreSecret", _store_req(name="x" * 201), "name"),
        ("StoreSecret", _store_req(value=b""), "value"),
        ("StoreSecret", _store_req(value=b"v" * 65537), "value"),
        ("StoreSecret", _store_req(type=pb.SECRET_TYPE_UNSPECIFIED), "type"),
        ("StoreSecret", _store_req(type=99), "type"),
        ("StoreSecret", _store_req(scopes=["a", ""]), "scopes[1]"),
        ("StoreSecret", _store_req(scopes=["s"] * 33), "scopes"),
        ("StoreSecret", _store_req(description="d" * 1025), "description"),
        ("StoreSecret", _store_req(expire_time=_in(-5)), "expire_time"),
        ("GetSecret", pb.GetSecretRequest(name=""), "name"),
        ("GetSecret", pb.GetSecretRequest(name="ok", version=-1), "version"),
        ("ListSecrets", pb.ListSecretsRequest(page_size=-1), "page_size"),
        ("ListSecrets", pb.ListSecretsRequest(type=pb.SecretType.ValueType(42)), "type"),
        ("ListSecrets", pb.ListSecretsRequest(page_token="not-a-token"), "page_token"),
        ("DeleteSecret", pb.DeleteSecretRequest(name="a\nb"), "name"),
        ("RotateSecret", pb.RotateSecretRequest(name="ok"), "value"),
        ("RotateSecret", pb.RotateSecretRequest(name="ok", value=b"v", retain_versions=101),
         "retain_versions"),
        ("RotateSecret", pb.RotateSecretRequest(name="ok", value=b"v", expected_version=-2),
         "expected_version"),
    ],
)  # fmt: skip
async def test_invalid_input_names_the_field(
    vault: Vault, rpc: str, request_: Any, field: str
) -> None:
    code, reason, got = await _error(vault.call(rpc, request_))
    assert (code, reason, got) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)


async def test_expired_secret_is_not_found_and_flagged(vault: Vault) -> None:
    names = {ns: vault.name("exp") for ns in (VAULT, PLAIN)}
    for ns, name in names.items():
        await vault.call(
            "StoreSecret",
            pb.StoreSecretRequest(
                name=name, value=b"short-lived", type=pb.SECRET_TYPE_CUSTOM, expire_time=_in(1.0)
            ),
            ns,
        )
        assert (await vault.call("GetSecret", pb.GetSecretRequest(name=name), ns)).value
    for ns, name in names.items():

        async def gone(ns: str = ns, name: str = name) -> bool:
            try:
                await vault.call("GetSecret", pb.GetSecretRequest(name=name), ns)
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        await eventually(gone, timeout=10)
    # without keyvalue_ttl the record stays and List flags it
    listed = await vault.call("ListSecrets", pb.ListSecretsRequest(prefix=names[PLAIN]), PLAIN)
    assert [(s.name, s.expired) for s in listed.secrets] == [(names[PLAIN], True)]

    # with keyvalue_ttl it also vanishes from the store
    async def vanished() -> bool:
        page = await vault.call("ListSecrets", pb.ListSecretsRequest(prefix=names[VAULT]))
        return not page.secrets

    await eventually(vanished, timeout=10)
    # an expired name may be stored again
    await vault.call(
        "StoreSecret",
        pb.StoreSecretRequest(name=names[PLAIN], value=b"renewed", type=pb.SECRET_TYPE_CUSTOM),
        PLAIN,
    )
    got = await vault.call("GetSecret", pb.GetSecretRequest(name=names[PLAIN]), PLAIN)
    assert (got.value, got.version) == (b"renewed", 1)


@pytest.mark.raw_backend
async def test_backend_holds_no_plaintext(vault: Vault) -> None:
    raw = vault.needs_raw()
    secrets = {vault.name("plain"): f"PLAINTEXT-{os.urandom(8).hex()}".encode() for _ in range(5)}
    for name, value in secrets.items():
        await _store(vault, name, value, description="metadata is clear")
        await vault.call("RotateSecret", pb.RotateSecretRequest(name=name, value=value + b"-2"))
    entries = await raw.entries(VAULT)
    stored = b"".join(entries.values())
    assert all(f"secret/{name}" in entries for name in secrets)  # the check looks where they are
    assert b"metadata is clear" in stored
    for value in secrets.values():
        assert value not in stored
        assert base64.b64encode(value) not in stored
    if raw.backend == "sqlite":
        on_disk = raw.files()
        assert on_disk
        for value in secrets.values():
            assert value not in on_disk


async def _tamper(vault: Vault, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = vault.needs_raw()
    key = f"secret/{name}"
    record = json.loads((await raw.entries(VAULT))[key])
    edit(record)
    await raw.overwrite(VAULT, key, json.dumps(record).encode())


def _flip(position: Callable[[bytes], int]) -> Callable[[dict[str, Any]], None]:
    def edit(record: dict[str, Any]) -> None:
        envelope = bytearray(base64.b64decode(record["versions"][0]["value"]))
        envelope[position(bytes(envelope))] ^= 0x01
        record["versions"][0]["value"] = base64.b64encode(bytes(envelope)).decode()

    return edit


@pytest.mark.raw_backend
@pytest.mark.parametrize(
    "position",
    [
        lambda e: 0,  # version byte
        lambda e: 2,  # key id
        lambda e: parse_header(e).length,  # nonce
        lambda e: parse_header(e).length + 12,  # ciphertext
        lambda e: len(e) - 1,  # tag
    ],
    ids=["version", "key-id", "nonce", "ciphertext", "tag"],
)
async def test_tampered_ciphertext_is_data_loss(
    vault: Vault, position: Callable[[bytes], int]
) -> None:
    vault.needs_raw()
    name = vault.name("tamper")
    await _store(vault, name, b"do-not-leak")
    await _tamper(vault, name, _flip(position))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await vault.call("GetSecret", pb.GetSecretRequest(name=name))
    info, _ = error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert info is not None and info.reason == "DECRYPTION_FAILED"
    assert info.metadata["context"] == f"prism.secret-vault.v1/{VAULT}/{name}/1"
    assert "do-not-leak" not in (caught.value.details() or "")


@pytest.mark.raw_backend
async def test_ciphertext_moved_to_another_record_is_data_loss(vault: Vault) -> None:
    raw = vault.needs_raw()
    source, target = vault.name("src"), vault.name("dst")
    await _store(vault, source, b"source-value")
    await _store(vault, target, b"target-value")
    moved = json.loads((await raw.entries(VAULT))[f"secret/{source}"])["versions"][0]["value"]

    def replace(record: dict[str, Any]) -> None:
        record["versions"][0]["value"] = moved

    await _tamper(vault, target, replace)
    code, reason, _ = await _error(vault.call("GetSecret", pb.GetSecretRequest(name=target)))
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "DECRYPTION_FAILED")
    # the source itself is untouched
    assert (
        await vault.call("GetSecret", pb.GetSecretRequest(name=source))
    ).value == b"source-value"


@pytest.mark.raw_backend
async def test_corrupt_record_is_data_loss(vault: Vault) -> None:
    raw = vault.needs_raw()
    name = vault.name("corrupt")
    await _store(vault, name, b"v")
    await raw.overwrite(VAULT, f"secret/{name}", b"{not json")
    code, reason, _ = await _error(vault.call("GetSecret", pb.GetSecretRequest(name=name)))
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "RECORD_CORRUPT")
    await vault.call("DeleteSecret", pb.DeleteSecretRequest(name=name))  # it can be cleaned up


@pytest.mark.raw_backend
async def test_key_rotation_with_concurrent_writes(vault: Vault) -> None:
    """Secrets written under k1; the server restarts with k2 as primary (k1 kept). While the
    background pass moves everything to k2, clients rotate and store: nothing is lost, and
    afterwards every value is under k2."""
    vault.needs_raw()  # a restart must find the data again
    old = keyring("k1")
    new = Keyring("k2", {**old.keys, "k2": base64.b64decode(new_key())})
    config = vault_config(vault.slot, {"rot": None})
    data_dir = vault.root / "server"  # same SQLite file as the module's server
    expected: dict[str, list[bytes]] = {}
    async with vault_server(config, data_dir, old) as stub:
        for i in range(40):
            name, value = f"r{i:02d}", f"old-{i}".encode()
            await stub.StoreSecret(
                pb.StoreSecretRequest(name=name, value=value, type=PASSWORD),
                metadata=namespaced("rot"),
            )
            expected[name] = [value]
    async with vault_server(config, data_dir, new) as stub:
        md = namespaced("rot")

        async def rotate(name: str) -> None:
            value = f"new-{name}".encode()
            await stub.RotateSecret(pb.RotateSecretRequest(name=name, value=value), metadata=md)
            expected[name].append(value)

        async def store(i: int) -> None:
            name, value = f"n{i:02d}", f"fresh-{i}".encode()
            await stub.StoreSecret(
                pb.StoreSecretRequest(name=name, value=value, type=PASSWORD), metadata=md
            )
            expected[name] = [value]

        await asyncio.gather(
            *(rotate(f"r{i:02d}") for i in range(0, 40, 2)), *(store(i) for i in range(10))
        )

        async def settled() -> bool:
            status = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
            return not status.reencryption_running and status.passes_completed >= 1

        await eventually(settled, timeout=30)
        status = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
        assert status.primary_key_id == "k2"
        assert status.pending_values == 0
        assert status.last_error == ""
        assert [(k.key_id, k.values) for k in status.keys] == [("k2", 40 + 20 + 10)]
        assert status.values_reencrypted == 40  # each k1 value moved exactly once
        for name, values in expected.items():
            for version, value in enumerate(values, start=1):
                got = await stub.GetSecret(
                    pb.GetSecretRequest(name=name, version=version), metadata=md
                )
                assert got.value == value, (name, version)
                assert got.metadata.key_id == "k2"
        started = await stub.ReencryptAll(pb.ReencryptAllRequest(), metadata=md)
        assert started.started
        await eventually(settled, timeout=30)
        again = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
        assert again.passes_completed == 2
        assert again.values_reencrypted == 40  # nothing left to move


@pytest.mark.raw_backend
async def test_missing_or_unknown_key_is_data_loss_not_garbage(vault: Vault) -> None:
    """A server whose keyring lost the key a value was written under answers DATA_LOSS and
    reports the value as pending in the status (its pass cannot move it)."""
    vault.needs_raw()  # a restart must find the data again
    config = vault_config(vault.slot, {"lost": None})
    data_dir = vault.root / "server"
    async with vault_server(config, data_dir, keyring("k1")) as stub:
        await stub.StoreSecret(
            pb.StoreSecretRequest(name="x", value=b"v", type=PASSWORD), metadata=namespaced("lost")
        )
    async with vault_server(config, data_dir, keyring("k9")) as stub:
        md = namespaced("lost")
        code, reason, _ = await _error(stub.GetSecret(pb.GetSecretRequest(name="x"), metadata=md))
        assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "DECRYPTION_FAILED")

        async def failed_pass() -> bool:
            s = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
            return s.passes_completed >= 1

        await eventually(failed_pass, timeout=30)
        status = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
        assert status.pending_values == 1
        assert "not in the keyring" in status.last_error


@pytest.mark.raw_backend
async def test_unreadable_record_does_not_stop_reencryption(vault: Vault) -> None:
    raw = vault.needs_raw()
    old = keyring("k1")
    new = Keyring("k2", {**old.keys, "k2": base64.b64decode(new_key())})
    config = vault_config(vault.slot, {"broken": None})
    data_dir = vault.root / "server"
    md = namespaced("broken")
    async with vault_server(config, data_dir, old) as stub:
        for name in ("a", "b", "c"):
            await stub.StoreSecret(_store_req(name=name, value=name.encode() * 3), metadata=md)
    await raw.overwrite("broken", "secret/b", b'{"versions": [{"value": 1}]}')
    async with vault_server(config, data_dir, new) as stub:

        async def passed() -> bool:
            s = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
            return s.passes_completed >= 1

        await eventually(passed, timeout=30)
        status = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
        assert [(k.key_id, k.values) for k in status.keys] == [("<unreadable>", 1), ("k2", 2)]
        assert status.values_reencrypted == 2
        assert status.pending_values == 1
        assert "'secret/b' is not readable" in status.last_error
        for name in ("a", "c"):
            got = await stub.GetSecret(pb.GetSecretRequest(name=name), metadata=md)
            assert (got.value, got.metadata.key_id) == (name.encode() * 3, "k2")
        code, reason, _ = await _error(stub.ListSecrets(pb.ListSecretsRequest(), metadata=md))
        assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "RECORD_CORRUPT")
        await stub.DeleteSecret(pb.DeleteSecretRequest(name="b"), metadata=md)
        listed = await stub.ListSecrets(pb.ListSecretsRequest(), metadata=md)
        assert [s.name for s in listed.secrets] == ["a", "c"]
        status = await stub.GetEncryptionStatus(pb.GetEncryptionStatusRequest(), metadata=md)
        assert ([(k.key_id, k.values) for k in status.keys], status.pending_values) == (
            [("k2", 2)],
            0,
        )


def _server(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PRISM_KEYRING", ENV_KEYS)}
    return subprocess.Popen(
        [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--no-auth", *args],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def vault_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "vault.yaml"
    config = vault_config({"backend": "memstore", "config": {}}, {VAULT: None})
    path.write_text(yaml.safe_dump(config))
    return path


def test_server_without_keyring_refuses_to_start(vault_config_file: Path, tmp_path: Path) -> None:
    proc = _server(["--config", str(vault_config_file), "--data-dir", str(tmp_path / "d")], {})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "namespace 'vault' (pattern secret-vault) needs an encryption keyring" in lines[0]
    assert "--keyring FILE" in lines[0]
    assert "listening" not in out


def test_server_with_bad_keyring_file_says_why(vault_config_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "keyring.yaml"
    bad.write_text("primary: k1\nkeys:\n  k1: c2hvcnQ=\n")
    args = ["--config", str(vault_config_file), "--data-dir", str(tmp_path / "d")]
    proc = _server([*args, "--keyring", str(bad)], {})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert err.strip().splitlines() == [f"prism-server: {bad}: key 'k1' must be 32 bytes, not 5"]


@pytest.mark.parametrize("source", ["flag", "env-file", "env-keys"])
def test_server_starts_with_a_keyring(vault_config_file: Path, tmp_path: Path, source: str) -> None:
    key = new_key()
    file = tmp_path / "keyring.yaml"
    file.write_text(f"primary: k1\nkeys:\n  k1: {key}\n")
    args = ["--config", str(vault_config_file), "--data-dir", str(tmp_path / "d")]
    env: dict[str, str] = {}
    if source == "flag":
        args += ["--keyring", str(file)]
    elif source == "env-file":
        env["PRISM_KEYRING"] = str(file)
    else:
        env[ENV_KEYS] = f"k1:{key}"
    proc = _server(args, env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[-1].startswith("prism-server listening on 127.0.0.1:"), lines
        assert all(key not in line for line in lines)
        address = lines[-1].strip().rpartition(" ")[2]
        with grpc.insecure_channel(address) as channel:
            stored = vault_grpc.SecretVaultServiceStub(channel).StoreSecret(
                _store_req(), metadata=namespaced(VAULT), timeout=20
            )
        assert stored.metadata.key_id == "k1"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert key not in err
