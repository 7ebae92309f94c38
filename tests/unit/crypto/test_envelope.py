"""server/crypto.py: the envelope format, associated-data binding, tamper detection at every
byte of every part, keyring sources and rotation."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from plugins.runtime.errors import DataLoss
from server.crypto import (
    DECRYPTION_FAILED,
    ENV_KEYS,
    ENVELOPE_VERSION,
    NONCE_BYTES,
    TAG_BYTES,
    Keyring,
    KeyringError,
    configured_keyring,
    load_keyring_file,
    new_key,
    parse_env_keys,
    parse_header,
)

CONTEXT = b"ns\0db-password\x001"
PLAINTEXT = b"correct horse battery staple"


def ring(primary: str = "k1", *ids: str) -> Keyring:
    return Keyring(primary, {i: base64.b64decode(new_key()) for i in (primary, *ids)})


def test_envelope_layout() -> None:
    keyring = ring("key-2026")
    envelope = keyring.encrypt(PLAINTEXT, CONTEXT)
    kid = b"key-2026"
    assert envelope[0] == ENVELOPE_VERSION
    assert envelope[1] == len(kid)
    assert envelope[2 : 2 + len(kid)] == kid
    header = parse_header(envelope)
    assert header.key_id == "key-2026"
    assert header.length == 2 + len(kid)
    assert len(envelope) == header.length + NONCE_BYTES + len(PLAINTEXT) + TAG_BYTES
    assert PLAINTEXT not in envelope
    assert keyring.decrypt(envelope, CONTEXT) == PLAINTEXT


def test_fresh_nonce_per_encryption() -> None:
    keyring = ring()
    envelopes = {keyring.encrypt(PLAINTEXT, CONTEXT) for _ in range(50)}
    nonces = {e[parse_header(e).length :][:NONCE_BYTES] for e in envelopes}
    assert len(envelopes) == 50
    assert len(nonces) == 50


@pytest.mark.parametrize(
    "other",
    [b"ns\0db-password\x002", b"ns\0other\x001", b"ns2\0db-password\x001", b""],
    ids=["other-version", "other-name", "other-namespace", "empty"],
)
def test_associated_data_binds_the_context(other: bytes) -> None:
    keyring = ring()
    envelope = keyring.encrypt(PLAINTEXT, CONTEXT)
    with pytest.raises(DataLoss) as caught:
        keyring.decrypt(envelope, other)
    assert caught.value.reason == DECRYPTION_FAILED
    assert PLAINTEXT.decode() not in str(caught.value)


def _positions(envelope: bytes) -> dict[str, list[int]]:
    start = parse_header(envelope).length
    tag = len(envelope) - TAG_BYTES
    return {
        "header": list(range(start)),
        "nonce": list(range(start, start + NONCE_BYTES)),
        "ciphertext": list(range(start + NONCE_BYTES, tag)),
        "tag": list(range(tag, len(envelope))),
    }


@pytest.mark.parametrize("part", ["header", "nonce", "ciphertext", "tag"])
@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_any_modified_byte_is_data_loss(part: str, flip: int) -> None:
    keyring = ring("k1", "k2")
    envelope = keyring.encrypt(PLAINTEXT, CONTEXT)
    positions = _positions(envelope)[part]
    assert positions
    for i in positions:
        tampered = bytearray(envelope)
        tampered[i] ^= flip
        with pytest.raises(DataLoss) as caught:
            keyring.decrypt(bytes(tampered), CONTEXT)
        assert caught.value.reason == DECRYPTION_FAILED, (part, i)


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 14, 29, -1])
def test_truncated_or_extended_envelope_is_data_loss(cut: int) -> None:
    keyring = ring()
    envelope = keyring.encrypt(PLAINTEXT, CONTEXT)
    for candidate in (envelope[:cut], envelope + b"\0"):
        with pytest.raises(DataLoss):
            keyring.decrypt(candidate, CONTEXT)


def test_relabelled_key_id_is_data_loss() -> None:
    """Swapping in the id of another key the ring holds must not decrypt (header is AD)."""
    keyring = Keyring("k1", {"k1": bytes(32), "k2": bytes(32)})  # same key bytes on purpose
    envelope = keyring.encrypt(PLAINTEXT, CONTEXT)
    relabelled = envelope.replace(b"k1", b"k2", 1)
    assert parse_header(relabelled).key_id == "k2"
    with pytest.raises(DataLoss):
        keyring.decrypt(relabelled, CONTEXT)


def test_rotation_old_keys_decrypt_new_writes_use_primary() -> None:
    old = ring("k1")
    envelope = old.encrypt(PLAINTEXT, CONTEXT)
    rotated = Keyring("k2", {**old.keys, "k2": base64.b64decode(new_key())})
    assert rotated.needs_reencryption(envelope)
    assert rotated.decrypt(envelope, CONTEXT) == PLAINTEXT
    fresh = rotated.encrypt(PLAINTEXT, CONTEXT)
    assert parse_header(fresh).key_id == "k2"
    assert not rotated.needs_reencryption(fresh)
    with pytest.raises(DataLoss) as caught:
        old.decrypt(fresh, CONTEXT)
    assert "not in the keyring" in caught.value.message


def test_key_material_never_in_repr() -> None:
    keyring = ring()
    text = repr(keyring) + str(keyring)
    for key in keyring.keys.values():
        assert base64.b64encode(key).decode() not in text
        assert repr(key) not in text


def test_keyring_file_yaml_and_json(tmp_path: Path) -> None:
    k1, k2 = new_key(), new_key()
    yaml_file = tmp_path / "keyring.yaml"
    yaml_file.write_text(f"primary: k2\nkeys:\n  k1: {k1}\n  k2: {k2}\n")
    json_file = tmp_path / "keyring.json"
    json_file.write_text(json.dumps({"primary": "k2", "keys": {"k1": k1, "k2": k2}}))
    for path in (yaml_file, json_file):
        keyring = load_keyring_file(path)
        assert keyring.primary == "k2"
        assert keyring.keys["k1"] == base64.b64decode(k1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("primary: k9\nkeys:\n  k1: {k}\n", "primary key 'k9' is not in the keyring"),
        ("primary: k1\nkeys:\n  k1: c2hvcnQ=\n", "must be 32 bytes, not 5"),
        ("primary: k1\nkeys:\n  k1: '***'\n", "is not valid base64"),
        ("primary: k1\nkeys: {{}}\n", "'keys' is empty"),
        ("- just a list\n", "expected a mapping"),
        ("primary: 'bad id'\nkeys:\n  'bad id': {k}\n", "must match"),
        ("keys: [\n", "not valid YAML/JSON"),
    ],
)
def test_bad_keyring_file_says_where_and_why(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keyring.yaml"
    key = new_key()
    path.write_text(content.format(k=key))
    with pytest.raises(KeyringError) as caught:
        load_keyring_file(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)
    assert key not in str(caught.value)


def test_missing_keyring_file(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read keyring"):
        load_keyring_file(tmp_path / "absent.yaml")


def test_env_keys_first_is_primary() -> None:
    k1, k2 = new_key(), new_key()
    keyring = parse_env_keys(f"k2:{k2}, k1:{k1}")
    assert keyring.primary == "k2"
    assert set(keyring.keys) == {"k1", "k2"}
    with pytest.raises(KeyringError, match=ENV_KEYS):
        parse_env_keys(f"k2{k2}")


def test_configured_keyring_prefers_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.yaml"
    path.write_text(f"primary: file\nkeys:\n  file: {new_key()}\n")
    env = {ENV_KEYS: f"env:{new_key()}"}
    assert configured_keyring(path, env) is not None
    assert configured_keyring(path, env).primary == "file"  # type: ignore[union-attr]
    assert configured_keyring(None, env).primary == "env"  # type: ignore[union-attr]
    assert configured_keyring(None, {}) is None
