"""`python -m server.crypto new|rotate FILE`: keyring files for operators, as a subprocess."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from server.crypto import load_keyring_file


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.crypto", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_new_then_rotate_keeps_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyring.yaml"
    created = run("new", str(path))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"{path}: primary key k1 (1 key(s))"
    assert path.stat().st_mode & 0o777 == 0o600
    first = load_keyring_file(path)
    envelope = first.encrypt(b"old data", b"ctx")

    rotated = run("rotate", str(path), "--key-id", "2026-11")
    assert rotated.returncode == 0, rotated.stderr
    second = load_keyring_file(path)
    assert second.primary == "2026-11"
    assert second.keys["k1"] == first.keys["k1"]
    assert second.decrypt(envelope, b"ctx") == b"old data"
    assert second.needs_reencryption(envelope)
    printed = created.stdout + rotated.stdout + rotated.stderr
    assert all(base64.b64encode(key).decode() not in printed for key in second.keys.values())


def test_refusals_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "keyring.yaml"
    assert run("new", str(path)).returncode == 0
    before = path.read_text()
    for args, message in [
        (("new", str(path)), "exists (use `rotate` to add a key)"),
        (("rotate", str(path), "--key-id", "k1"), "key id 'k1' exists"),
        (("rotate", str(tmp_path / "absent.yaml")), "cannot read keyring"),
        (("rotate", str(path), "--key-id", "bad id"), "must match"),
    ]:
        result = run(*args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert path.read_text() == before
