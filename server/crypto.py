"""Encryption at rest: AES-256-GCM envelopes under a keyring of named keys.

Envelope (version 1), all of it authenticated:

    | 0x01 | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext + tag (16) |

The header (version, key id) and the caller's context (e.g. namespace + secret name + version)
are the GCM associated data, so an envelope copied into another record, or re-labelled with
another key id, fails to decrypt. Every failure is `DataLoss` reason DECRYPTION_FAILED: a
modified byte is an error, never garbage.

Keyring file (YAML or JSON): `{primary: k2, keys: {k1: <base64 of 32 bytes>, k2: ...}}`.
Env `PRISM_ENCRYPTION_KEYS`: `k2:<base64>,k1:<base64>` (the first is primary).
`python -m server.crypto new|rotate FILE` creates a keyring file / adds a new primary key.
The primary key encrypts; every key decrypts, so rotation is: add a key, make it primary, let
re-encryption move old records, then drop the old key. Key bytes never appear in reprs, logs
or errors. `Reencryption` is that background pass, shared by the patterns that encrypt.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugins.runtime.errors import DataLoss, NotFound, PrismError

ENVELOPE_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENV_KEYS = "PRISM_ENCRYPTION_KEYS"
DECRYPTION_FAILED = "DECRYPTION_FAILED"
#: the keyring file a server without a configured keyring creates in its data directory
DATA_DIR_KEYRING = "keyring.yaml"

log = logging.getLogger("prism.crypto")


class KeyringError(Exception):
    """The keyring source is unusable; the message says where and why (never key material)."""


def _decryption_failed(why: str, context: str) -> DataLoss:
    return DataLoss(
        f"stored ciphertext failed its integrity check ({why})",
        reason=DECRYPTION_FAILED,
        context=context,
    )


@dataclass(frozen=True)
class Header:
    """What an envelope says about itself before decryption."""

    key_id: str
    length: int  # bytes of version + key id length + key id


def parse_header(envelope: bytes, context: str = "") -> Header:
    """The envelope's key id, checked for shape only (authenticity needs `decrypt`)."""
    if len(envelope) < 2 or envelope[0] != ENVELOPE_VERSION:
        raise _decryption_failed("unknown envelope version", context)
    end = 2 + envelope[1]
    if len(envelope) < end + NONCE_BYTES + TAG_BYTES:
        raise _decryption_failed("truncated envelope", context)
    try:
        key_id = envelope[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise _decryption_failed("malformed key id", context) from None
    if not KEY_ID.fullmatch(key_id):
        raise _decryption_failed("malformed key id", context)
    return Header(key_id, end)


@dataclass(frozen=True)
class Keyring:
    """Named AES-256 keys and which one encrypts new data."""

    primary: str
    keys: Mapping[str, bytes] = field(repr=False)
    #: the keys sit in the data directory beside what they encrypt (no keyring was configured):
    #: fine against a leaked backup of a backend, useless against a copy of the data directory
    beside_data: bool = False

    def __post_init__(self) -> None:
        for key_id, key in self.keys.items():
            if not KEY_ID.fullmatch(key_id):
                raise KeyringError(f"key id {key_id!r} must match {KEY_ID.pattern}")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {key_id!r} must be {KEY_BYTES} bytes, not {len(key)}")
        if self.primary not in self.keys:
            raise KeyringError(f"primary key {self.primary!r} is not in the keyring")

    def encrypt(self, plaintext: bytes, context: bytes) -> bytes:
        """A fresh envelope under the primary key; `context` must be given again to decrypt."""
        kid = self.primary.encode("ascii")
        header = bytes((ENVELOPE_VERSION, len(kid))) + kid
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[self.primary]).encrypt(nonce, plaintext, header + context)
        return header + nonce + sealed

    def decrypt(self, envelope: bytes, context: bytes) -> bytes:
        label = context.decode("utf-8", "replace").replace("\0", "/")  # for humans
        header = parse_header(envelope, label)
        key = self.keys.get(header.key_id)
        if key is None:
            raise _decryption_failed(f"key id {header.key_id!r} is not in the keyring", label)
        nonce = envelope[header.length : header.length + NONCE_BYTES]
        try:
            return AESGCM(key).decrypt(
                nonce, envelope[header.length + NONCE_BYTES :], envelope[: header.length] + context
            )
        except InvalidTag:
            raise _decryption_failed("authentication tag mismatch", label) from None

    def needs_reencryption(self, envelope: bytes) -> bool:
        return parse_header(envelope).key_id != self.primary


def new_key() -> str:
    """32 random bytes, base64: one keyring entry."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _decode_key(key_id: str, text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise KeyringError(f"{where}: key {key_id!r} must be a base64 string")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: key {key_id!r} is not valid base64") from None


def keyring_from_mapping(data: Any, where: str) -> Keyring:
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), Mapping):
        raise KeyringError(f"{where}: expected a mapping with 'primary' and 'keys'")
    keys = {str(k): _decode_key(str(k), v, where) for k, v in data["keys"].items()}
    if not keys:
        raise KeyringError(f"{where}: 'keys' is empty")
    try:
        return Keyring(str(data.get("primary", "")), keys)
    except KeyringError as exc:
        raise KeyringError(f"{where}: {exc}") from None


def load_keyring_file(path: Path) -> Keyring:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read keyring: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise KeyringError(f"{path}: not valid YAML/JSON") from None
    return keyring_from_mapping(data, str(path))


def parse_env_keys(value: str) -> Keyring:
    """`id:base64,id:base64`; the first entry is the primary key."""
    keys: dict[str, bytes] = {}
    for entry in value.split(","):
        key_id, sep, text = entry.strip().partition(":")
        if not sep:
            raise KeyringError(f"{ENV_KEYS}: entries must be 'key_id:base64'")
        keys[key_id] = _decode_key(key_id, text, ENV_KEYS)
    try:
        return Keyring(next(iter(keys)), keys)
    except KeyringError as exc:
        raise KeyringError(f"{ENV_KEYS}: {exc}") from None


def configured_keyring(path: Path | None, env: Mapping[str, str]) -> Keyring | None:
    """The keyring file if given, else `PRISM_ENCRYPTION_KEYS`, else None."""
    if path is not None:
        return load_keyring_file(path)
    value = env.get(ENV_KEYS, "").strip()
    return parse_env_keys(value) if value else None


def write_keyring(path: Path, keyring_data: Mapping[str, Any]) -> None:
    """Write a keyring file readable by its owner only, replacing any old one atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(dict(keyring_data), out, sort_keys=False)
    os.replace(tmp, path)


def data_dir_keyring(data_dir: Path) -> tuple[Keyring, bool]:
    """The keyring kept in `data_dir` (created with one fresh key if missing), and whether it
    was created now. For servers given no keyring, so that encryption at rest still happens."""
    path = data_dir / DATA_DIR_KEYRING
    created = not path.exists()
    if created:
        write_keyring(path, {"primary": "k1", "keys": {"k1": new_key()}})
    keyring = load_keyring_file(path)
    return Keyring(keyring.primary, keyring.keys, beside_data=True), created


Record = TypeVar("Record")


class Reencryption(Generic[Record]):
    """One background pass moving stored envelopes to the primary key, off the call path
    (`name`: the namespace, for the task and log lines).

    `records()` yields (label, record) page by page; `move(label, record)` rewrites one record
    whose envelopes are under an older key and returns how many it re-encrypted (0: nothing to
    do). `move` writes conditionally on the revision it read and re-reads on a conflict, so a
    concurrent client write wins and is never overwritten. NotFound from `move` means deleted
    meanwhile; any other PrismError is logged, kept in `last_error`, and the pass goes on."""

    def __init__(
        self,
        name: str,
        records: Callable[[], AsyncIterator[tuple[str, Record]]],
        move: Callable[[str, Record], Awaitable[int]],
    ) -> None:
        self.name = name
        self.records = records
        self.move = move
        self.task: asyncio.Task[None] | None = None
        self.passes = 0
        self.rewritten = 0
        self.last_error = ""

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> bool:
        """Start a pass unless one is running; False if one was."""
        if self.running:
            return False
        self.task = asyncio.create_task(self._pass(), name=f"reencrypt:{self.name}")
        return True

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _pass(self) -> None:
        failures: list[str] = []
        try:
            async for label, record in self.records():
                try:
                    self.rewritten += await self.move(label, record)
                except NotFound:
                    continue  # deleted meanwhile: nothing left to move
                except PrismError as exc:
                    failures.append(f"{label}: {exc.message}")
                    log.warning("re-encryption in %s: %r failed: %s", self.name, label, exc.message)
        except PrismError as exc:
            failures.append(exc.message)
        except Exception as exc:  # a bug: kept visible in the status, not lost with the task
            log.exception("re-encryption pass of %s failed", self.name)
            failures.append(f"{type(exc).__name__}: {exc}")
        self.last_error = "; ".join(failures[:5])
        self.passes += 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m server.crypto new FILE [--key-id ID]` creates a keyring; `... rotate FILE
    --key-id ID` adds a key and makes it primary (old keys stay, so old data still decrypts;
    the server re-encrypts it in the background after a restart)."""
    parser = argparse.ArgumentParser(prog="python -m server.crypto")
    parser.add_argument("command", choices=["new", "rotate"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--key-id", default=None, help="id of the new key (default: k<n>)")
    args = parser.parse_args(argv)
    try:
        if args.command == "new":
            if args.file.exists():
                raise KeyringError(f"{args.file}: exists (use `rotate` to add a key)")
            keys: dict[str, str] = {}
        else:
            current = load_keyring_file(args.file)
            keys = {k: base64.b64encode(v).decode("ascii") for k, v in current.keys.items()}
        key_id = args.key_id or f"k{len(keys) + 1}"
        if key_id in keys:
            raise KeyringError(f"{args.file}: key id {key_id!r} exists")
        keys[key_id] = new_key()
        keyring_from_mapping({"primary": key_id, "keys": keys}, str(args.file))
        write_keyring(args.file, {"primary": key_id, "keys": keys})
    except KeyringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: primary key {key_id} ({len(keys)} key(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
