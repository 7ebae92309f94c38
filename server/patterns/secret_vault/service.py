"""SecretVaultService over the `store` slot. Values are encrypted here, before any byte reaches
the backend, and decrypted here; the backend only ever holds envelopes and clear metadata."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prism.patterns.secret_vault.v1 import secret_vault_pb2 as pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    InvalidArgument,
    NotFound,
    PrismError,
)
from server.crypto import DECRYPTION_FAILED, Keyring, Reencryption, parse_header
from server.patterns.secret_vault.store import SecretStore, Stored, WriteConflict

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")
MAX_VALUE_BYTES = 64 * 1024
MAX_SCOPE_CHARS = 64
MAX_SCOPES = 32
MAX_DESCRIPTION_CHARS = 1024
DEFAULT_RETAIN = 5
MAX_RETAIN = 100
DEFAULT_PAGE = 50
MAX_PAGE = 500
#: re-reads of one record before a write gives up under contention
WRITE_ATTEMPTS = 20
#: records per KV page in whole-store passes (status, re-encryption)
PASS_PAGE = 200
TYPE_NAMES = {
    pb.SECRET_TYPE_PASSWORD: "password",
    pb.SECRET_TYPE_API_KEY: "api-key",
    pb.SECRET_TYPE_CERTIFICATE: "certificate",
    pb.SECRET_TYPE_JWT: "jwt",
    pb.SECRET_TYPE_CONNECTION: "connection",
    pb.SECRET_TYPE_CUSTOM: "custom",
}
TYPES_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}
UNREADABLE_KEY = "<unreadable>"


def _context(namespace: str, name: str, version: int) -> bytes:
    """Associated data: a value decrypts only as this version of this secret in this namespace."""
    return f"prism.secret-vault.v1\0{namespace}\0{name}\0{version}".encode()


def _name(value: str) -> str:
    if not value:
        raise InvalidArgument("name", "is required")
    if not NAME.fullmatch(value):
        raise InvalidArgument(
            "name", "must be 1-200 letters, digits or ._-/: starting with a letter or digit"
        )
    return value


def _value(value: bytes) -> bytes:
    if not value:
        raise InvalidArgument("value", "is required")
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument("value", f"must be at most {MAX_VALUE_BYTES} bytes")
    return value


def _expiry(request: Any) -> float | None:
    if not request.HasField("expire_time"):
        return None
    expire = float(request.expire_time.ToNanoseconds()) / 1e9
    if expire <= time.time():
        raise InvalidArgument("expire_time", "must be in the future")
    return expire


def _scopes(scopes: Any) -> list[str]:
    if len(scopes) > MAX_SCOPES:
        raise InvalidArgument("scopes", f"must have at most {MAX_SCOPES} entries")
    for i, scope in enumerate(scopes):
        if not scope or len(scope) > MAX_SCOPE_CHARS or not scope.isprintable():
            raise InvalidArgument(
                f"scopes[{i}]", f"must be 1-{MAX_SCOPE_CHARS} printable characters"
            )
    return sorted(set(scopes))


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _envelope(version: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(version["value"], validate=True)
    except (binascii.Error, ValueError):
        raise DataLoss(
            "stored ciphertext is not base64", reason=DECRYPTION_FAILED, version=version["version"]
        ) from None


def _key_id(version: dict[str, Any]) -> str:
    try:
        return parse_header(_envelope(version)).key_id
    except PrismError:
        return UNREADABLE_KEY


def metadata(stored: Stored) -> pb.SecretMetadata:
    """Everything but the value: what List and every write answer."""
    record = stored.record
    versions = record["versions"]
    meta = pb.SecretMetadata(
        name=record["name"],
        type=TYPES_BY_NAME.get(record["type"], pb.SECRET_TYPE_UNSPECIFIED),
        scopes=record["scopes"],
        description=record["description"],
        current_version=versions[0]["version"],
        versions=[v["version"] for v in versions],
        create_time=_ts(record["create_time"]),
        update_time=_ts(record["update_time"]),
        expired=stored.expired,
        key_id=_key_id(versions[0]),
    )
    if record.get("expire_time") is not None:
        meta.expire_time.CopyFrom(_ts(record["expire_time"]))
    return meta


class _PageToken:
    """ListSecrets tokens: the store's scan token, bound to the listing's filters."""

    @staticmethod
    def encode(scan_token: str, filters: list[Any]) -> str:
        if not scan_token:
            return ""
        raw = json.dumps({"t": scan_token, "f": filters}).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @staticmethod
    def decode(token: str, filters: list[Any]) -> str:
        if not token:
            return ""
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
        except (ValueError, binascii.Error):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            raise InvalidArgument("page_token", "is not a token this service issued")
        if data.get("f") != filters:
            raise InvalidArgument("page_token", "was issued for different filters")
        return str(data["t"])


class SecretVault:
    """The service object the generic gRPC adapter calls (contract methods)."""

    def __init__(self, namespace: str, store: SecretStore, keyring: Keyring) -> None:
        self.namespace = namespace
        self.store = store
        self.keyring = keyring
        ctx = CallContext(namespace=namespace, request_id="reencrypt")
        self.reencryption: Reencryption[Stored | DataLoss] = Reencryption(
            namespace, lambda: self.records(ctx), lambda name, s: self._reencrypt(name, s, ctx)
        )

    def encrypt(self, name: str, version: int, value: bytes) -> dict[str, Any]:
        envelope = self.keyring.encrypt(value, _context(self.namespace, name, version))
        return {
            "version": version,
            "create_time": time.time(),
            "value": base64.b64encode(envelope).decode(),
        }

    async def _live(self, name: str, ctx: CallContext) -> Stored:
        stored = await self.store.get(name, ctx)
        if stored is None or stored.expired:
            raise NotFound(f"secret '{name}' not found", reason="SECRET_NOT_FOUND", name=name)
        return stored

    async def store_secret(
        self, request: pb.StoreSecretRequest, ctx: CallContext
    ) -> pb.StoreSecretResponse:
        name = _name(request.name)
        value = _value(request.value)
        if request.type not in TYPE_NAMES:
            raise InvalidArgument("type", "must be one of " + ", ".join(TYPE_NAMES.values()))
        scopes = _scopes(request.scopes)
        if len(request.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument("description", f"must be at most {MAX_DESCRIPTION_CHARS} chars")
        expire = _expiry(request)
        now = time.time()
        record = {
            "name": name,
            "type": TYPE_NAMES[request.type],
            "scopes": scopes,
            "description": request.description,
            "create_time": now,
            "update_time": now,
            "expire_time": expire,
            "versions": [self.encrypt(name, 1, value)],
        }
        existing = await self.store.get(name, ctx)
        if existing is not None and not existing.expired:
            raise AlreadyExists(
                f"secret '{name}' exists (RotateSecret changes its value)",
                reason="SECRET_EXISTS",
                name=name,
            )
        try:
            revision = await self.store.write(
                name, record, existing.revision if existing else 0, ctx
            )
        except WriteConflict:
            raise AlreadyExists(
                f"secret '{name}' exists", reason="SECRET_EXISTS", name=name
            ) from None
        return pb.StoreSecretResponse(metadata=metadata(Stored(record, revision)))

    async def get_secret(
        self, request: pb.GetSecretRequest, ctx: CallContext
    ) -> pb.GetSecretResponse:
        name = _name(request.name)
        if request.version < 0:
            raise InvalidArgument("version", "must not be negative")
        stored = await self._live(name, ctx)
        versions = stored.record["versions"]
        wanted = request.version or versions[0]["version"]
        match = next((v for v in versions if v["version"] == wanted), None)
        if match is None:
            raise NotFound(
                f"secret '{name}' has no version {wanted}",
                reason="SECRET_NOT_FOUND",
                name=name,
                version=wanted,
            )
        plaintext = self.keyring.decrypt(_envelope(match), _context(self.namespace, name, wanted))
        return pb.GetSecretResponse(metadata=metadata(stored), value=plaintext, version=wanted)

    async def list_secrets(
        self, request: pb.ListSecretsRequest, ctx: CallContext
    ) -> pb.ListSecretsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        if request.type and request.type not in TYPE_NAMES:
            raise InvalidArgument("type", "is not a known secret type")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        filters: list[Any] = [request.prefix, request.type, request.scope]
        token = _PageToken.decode(request.page_token, filters)
        type_name = TYPE_NAMES.get(request.type)
        found: list[pb.SecretMetadata] = []
        while True:
            # never ask for more entries than still fit: the scan token then marks exactly
            # where the next page starts
            page, token = await self.store.scan(request.prefix, size - len(found), token, ctx)
            for _, stored in page:
                if isinstance(stored, DataLoss):
                    raise stored
                record = stored.record
                if type_name and record["type"] != type_name:
                    continue
                if request.scope and request.scope not in record["scopes"]:
                    continue
                found.append(metadata(stored))
            if len(found) >= size or not token:
                break
        return pb.ListSecretsResponse(
            secrets=found, next_page_token=_PageToken.encode(token, filters)
        )

    async def delete_secret(
        self, request: pb.DeleteSecretRequest, ctx: CallContext
    ) -> pb.DeleteSecretResponse:
        name = _name(request.name)
        try:
            stored = await self.store.get(name, ctx)
            live = stored is not None and not stored.expired
        except DataLoss:
            live = True  # an unreadable record must still be removable
        deleted = await self.store.delete(name, ctx)
        if not (deleted and live):
            raise NotFound(f"secret '{name}' not found", reason="SECRET_NOT_FOUND", name=name)
        return pb.DeleteSecretResponse()

    async def rotate_secret(
        self, request: pb.RotateSecretRequest, ctx: CallContext
    ) -> pb.RotateSecretResponse:
        name = _name(request.name)
        value = _value(request.value)
        if request.expected_version < 0:
            raise InvalidArgument("expected_version", "must not be negative")
        if not 0 <= request.retain_versions <= MAX_RETAIN:
            raise InvalidArgument("retain_versions", f"must be between 0 and {MAX_RETAIN}")
        retain = request.retain_versions or DEFAULT_RETAIN
        expire = _expiry(request)

        def change(record: dict[str, Any]) -> None:
            current = record["versions"][0]["version"]
            if request.expected_version and request.expected_version != current:
                raise Aborted(
                    f"secret '{name}' is at version {current}, not {request.expected_version}",
                    reason="VERSION_MISMATCH",
                    name=name,
                    current_version=current,
                )
            new = self.encrypt(name, current + 1, value)
            record["versions"] = [new, *record["versions"][: retain - 1]]
            record["update_time"] = new["create_time"]
            if expire is not None:
                record["expire_time"] = expire

        stored = await self.update(name, change, ctx, live=True)
        return pb.RotateSecretResponse(metadata=metadata(stored))

    async def update(
        self,
        name: str,
        change: Callable[[dict[str, Any]], None],
        ctx: CallContext,
        *,
        live: bool,
    ) -> Stored:
        """Read-modify-write of one record, retried on a concurrent write so none is lost.
        `live` refuses expired records (clients); the re-encryption task sees them all."""
        for _ in range(WRITE_ATTEMPTS):
            stored = await (self._live(name, ctx) if live else self.store.get(name, ctx))
            if stored is None:
                raise NotFound(f"secret '{name}' not found", reason="SECRET_NOT_FOUND", name=name)
            change(stored.record)
            try:
                revision = await self.store.write(name, stored.record, stored.revision, ctx)
            except WriteConflict:
                continue
            return Stored(stored.record, revision)
        raise Aborted(
            f"secret '{name}' kept changing; try again", reason="WRITE_CONTENTION", name=name
        )

    async def records(self, ctx: CallContext) -> AsyncIterator[tuple[str, Stored | DataLoss]]:
        token = ""
        while True:
            page, token = await self.store.scan("", PASS_PAGE, token, ctx)
            for item in page:
                yield item
            if not token:
                return

    async def get_encryption_status(
        self, request: pb.GetEncryptionStatusRequest, ctx: CallContext
    ) -> pb.GetEncryptionStatusResponse:
        counts: Counter[str] = Counter()
        async for _, stored in self.records(ctx):
            if isinstance(stored, DataLoss):
                counts[UNREADABLE_KEY] += 1
            else:
                counts.update(_key_id(v) for v in stored.record["versions"])
        state = self.reencryption
        return pb.GetEncryptionStatusResponse(
            primary_key_id=self.keyring.primary,
            keys=[pb.KeyUsage(key_id=k, values=n) for k, n in sorted(counts.items())],
            pending_values=sum(n for k, n in counts.items() if k != self.keyring.primary),
            reencryption_running=state.running,
            passes_completed=state.passes,
            values_reencrypted=state.rewritten,
            last_error=state.last_error,
        )

    async def _reencrypt(self, name: str, stored: Stored | DataLoss, ctx: CallContext) -> int:
        """Move one secret's values under older keys to the primary (the background pass)."""
        if isinstance(stored, DataLoss):
            raise stored
        keyring = self.keyring
        if not any(keyring.needs_reencryption(_envelope(v)) for v in stored.record["versions"]):
            return 0
        moved = 0

        def reencrypt(record: dict[str, Any]) -> None:
            nonlocal moved
            moved = 0
            for version in record["versions"]:
                envelope = _envelope(version)
                if keyring.needs_reencryption(envelope):
                    context = _context(self.namespace, record["name"], version["version"])
                    fresh = keyring.encrypt(keyring.decrypt(envelope, context), context)
                    version["value"] = base64.b64encode(fresh).decode()
                    moved += 1

        await self.update(name, reencrypt, ctx, live=False)
        return moved

    async def reencrypt_all(
        self, request: pb.ReencryptAllRequest, ctx: CallContext
    ) -> pb.ReencryptAllResponse:
        return pb.ReencryptAllResponse(started=self.reencryption.start())
