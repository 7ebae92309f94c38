"""The re-encryption task against a client write landing at the worst moment: after the task
read a record and before its conditional write. On a real memstore; the only interposition is a
pass-through of the CAS interface that lets the client write first."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.patterns.secret_vault.v1 import secret_vault_pb2 as pb

from plugins.memstore import MemstorePlugin
from plugins.runtime.context import CallContext
from server.crypto import Keyring, new_key
from server.patterns.secret_vault.service import SecretVault
from server.patterns.secret_vault.store import SecretStore

CTX = CallContext(namespace="ns")
OLD = Keyring("k1", {"k1": base64.b64decode(new_key())})
NEW = Keyring("k2", {**OLD.keys, "k2": base64.b64decode(new_key())})


class ClientWritesFirst:
    """memstore's CAS; before the re-encryption task's first write, a client rotation of the
    same secret lands through the same vault."""

    def __init__(self, cas: Any) -> None:
        self.cas = cas
        self.vault: SecretVault | None = None
        self.raced = 0

    async def compare_and_swap(
        self, request: cas_pb.CompareAndSwapRequest, ctx: CallContext
    ) -> cas_pb.CompareAndSwapResponse:
        if ctx.request_id == "reencrypt" and not self.raced and self.vault is not None:
            self.raced += 1
            rotate = pb.RotateSecretRequest(name="s", value=b"client-write")
            await self.vault.rotate_secret(rotate, CTX)
        response: cas_pb.CompareAndSwapResponse = await self.cas.compare_and_swap(request, ctx)
        return response

    async def compare_and_delete(
        self, request: cas_pb.CompareAndDeleteRequest, ctx: CallContext
    ) -> cas_pb.CompareAndDeleteResponse:
        response: cas_pb.CompareAndDeleteResponse = await self.cas.compare_and_delete(request, ctx)
        return response


@pytest_asyncio.fixture
async def impls(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    plugin = MemstorePlugin({}, data_dir=tmp_path)
    await plugin.start()
    try:
        yield dict(plugin.implementations())
    finally:
        await plugin.close()


async def test_pass_rereads_a_record_a_client_changed(impls: dict[str, Any]) -> None:
    plain = SecretStore(
        impls["keyvalue_basic"], impls["keyvalue_scan"], None, impls["keyvalue_cas"]
    )
    await SecretVault("ns", plain, OLD).store_secret(
        pb.StoreSecretRequest(name="s", value=b"original", type=pb.SECRET_TYPE_PASSWORD), CTX
    )
    racing = ClientWritesFirst(impls["keyvalue_cas"])
    store = SecretStore(impls["keyvalue_basic"], impls["keyvalue_scan"], None, racing)
    vault = SecretVault("ns", store, NEW)
    racing.vault = vault
    assert vault.reencryption.start()
    assert vault.reencryption.task is not None
    await vault.reencryption.task

    assert racing.raced == 1
    current = await vault.get_secret(pb.GetSecretRequest(name="s"), CTX)
    assert (current.version, current.value) == (2, b"client-write")  # the client's write kept
    first = await vault.get_secret(pb.GetSecretRequest(name="s", version=1), CTX)
    assert first.value == b"original"
    status = await vault.get_encryption_status(pb.GetEncryptionStatusRequest(), CTX)
    assert [(k.key_id, k.values) for k in status.keys] == [("k2", 2)]
    assert (status.values_reencrypted, status.passes_completed, status.last_error) == (1, 1, "")
