"""The secret-vault pattern: secrets encrypted at rest (AES-256-GCM, server/crypto.py) in one
`store` slot (keyvalue_basic + keyvalue_scan; keyvalue_ttl makes expired secrets vanish,
keyvalue_cas makes concurrent writes and re-encryption safe). Talks to the slot only through
those thin interfaces. Needs the server's configured keyring: without one (or with only the
keyring a server creates beside its data) the namespace refuses to start.
"""

from __future__ import annotations

from typing import Any

from prism.patterns.secret_vault.v1 import secret_vault_pb2 as pb

from server.binding import BindError
from server.crypto import ENV_KEYS
from server.patterns import BoundNamespace, Exposed
from server.patterns.secret_vault.service import SecretVault
from server.patterns.secret_vault.store import SecretStore


async def expose(namespace: BoundNamespace) -> list[Exposed]:
    if namespace.keyring is None or namespace.keyring.beside_data:
        raise BindError(
            f"namespace '{namespace.name}' (pattern secret-vault) needs an encryption keyring "
            f"(fix: create one with `python -m server.crypto new FILE` and pass --keyring FILE "
            f"or env PRISM_KEYRING, or set {ENV_KEYS})"
        )
    impls: dict[str, Any] = dict(namespace.slots["store"].implementations)
    store = SecretStore(
        impls["keyvalue_basic"],
        impls["keyvalue_scan"],
        impls.get("keyvalue_ttl"),
        impls.get("keyvalue_cas"),
    )
    vault = SecretVault(namespace.name, store, namespace.keyring)
    # records left under an older key (a rotated keyring) move to the primary in the background
    vault.reencryption.start()
    namespace.on_close.append(vault.reencryption.stop)
    labels = {"namespace": namespace.name, "pattern": namespace.pattern.name}
    service = pb.DESCRIPTOR.services_by_name["SecretVaultService"]
    return [Exposed(service, vault, labels, ("store",))]
