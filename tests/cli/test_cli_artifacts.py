"""`prismctl artifacts` as real subprocesses against a real `prism-server` subprocess running the
embedded default (the artifact registry on SQLite): what a new user does after `make run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
LISTENING = "prism-server listening on "
BOOTSTRAP = "prism-server: bootstrap admin key (shown once, store it now): "
#: server address → the admin key it printed (the server runs with authentication on)
API_KEYS: dict[str, str] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("registry-cli")
    proc = subprocess.Popen(
        [str(BIN / "prism-server"), "--listen", "127.0.0.1:0", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        key = ""
        for line in proc.stdout:
            if line.startswith(BOOTSTRAP):
                key = line.removeprefix(BOOTSTRAP).strip()
            if line.startswith(LISTENING):
                address = line.removeprefix(LISTENING).strip()
                API_KEYS[address] = key
                yield address
                break
        else:
            pytest.fail(f"prism-server exited with {proc.wait()} before listening")
    finally:
        proc.terminate()
        proc.wait(10)


def prismctl(address: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "prismctl"), "artifacts", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PRISM_ADDRESS": address, "PRISM_API_KEY": API_KEYS[address]},
        timeout=60,
    )
    assert "Traceback" not in result.stderr
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def create(address: str, org: str, name: str, *extra: str) -> dict[str, object]:
    result = prismctl(
        address, "create", "--org", org, "--name", name, "--type", "persona",
        "--source", f"persona {name} {{}}", "--format", "json", *extra,
    )  # fmt: skip
    artifact: dict[str, object] = json.loads(result.stdout)["artifact"]
    return artifact


def test_publish_search_and_browse(server: str) -> None:
    made = create(server, "acme", "Code Reviewer", "--tag", "review", "--description",
                  "reviews code")  # fmt: skip
    assert made["state"] == "VERSION_STATE_DRAFT"
    published = prismctl(server, "publish", str(made["id"]), "--changelog", "first")
    assert "(latest)" in published.stdout
    create(server, "acme", "Team", "--dep", "acme/code-reviewer@^1", "--publish")

    listing = prismctl(server, "list", "--org", "acme")
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "ORG/SLUG"]
    assert any("acme/code-reviewer" in line for line in lines[1:])

    hits = prismctl(server, "search", "code reviewer", "--format", "json")
    top = json.loads(hits.stdout)["hits"][0]
    assert top["artifact"]["name"] == "Code Reviewer"
    ranked = prismctl(server, "search", "code reviewer").stdout.splitlines()
    assert ranked[0].split() == ["1.", "acme/code-reviewer@1.0.0", "Code", "Reviewer"]
    assert "name: <mark>Code</mark> <mark>Reviewer</mark>" in ranked[1]

    shown = prismctl(server, "get", "--org", "acme", "--slug", "code-reviewer", "--version", "^1")
    assert "acme/code-reviewer@1.0.0" in shown.stdout

    versions = prismctl(server, "versions", "--org", "acme", "--slug", "code-reviewer")
    assert "1.0.0" in versions.stdout

    resolved = prismctl(server, "resolve", "--org", "acme", "--slug", "team")
    assert "acme/code-reviewer" in resolved.stdout and "1.0.0" in resolved.stdout

    starred = prismctl(server, "star", str(made["id"]))  # as the key's owner
    assert "1 stars" in starred.stdout
    spoofed = prismctl(server, "star", str(made["id"]), "--user", "ann", ok=False)
    assert spoofed.returncode != 0 and "PERMISSION_DENIED" in spoofed.stderr
    assert len(spoofed.stderr.strip().splitlines()) == 1

    deprecated = prismctl(server, "deprecate", str(made["id"]), "--reason", "old")
    assert "deprecated" in deprecated.stdout


def test_export_purge_import(server: str, tmp_path: Path) -> None:
    lib = create(server, "packs", "Lib", "--publish")
    app = create(server, "packs", "App", "--dep", "packs/lib@^1", "--publish")
    pack = tmp_path / "app.pclpack"
    exported = prismctl(server, "export", str(app["id"]), "--with-deps", "-o", str(pack))
    assert "exported 2 artifact(s)" in exported.stdout
    refused = prismctl(server, "purge", str(lib["id"]), ok=False)
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    prismctl(server, "purge", str(app["id"]))
    prismctl(server, "purge", str(lib["id"]))
    dry = prismctl(server, "import", str(pack), "--dry-run")
    assert "would import 0" in dry.stdout
    imported = prismctl(server, "import", str(pack))
    assert "imported 2, skipped 0" in imported.stdout
    again = prismctl(server, "get", str(app["id"]), "--format", "json")
    assert json.loads(again.stdout)["artifact"]["source_sha256"] == app["source_sha256"]

    corrupt = tmp_path / "corrupt.pclpack"
    corrupt.write_bytes(pack.read_bytes()[:-5])
    truncated = prismctl(server, "import", str(corrupt), ok=False)
    assert truncated.returncode == 1 and "truncated" in truncated.stderr
    assert len(truncated.stderr.strip().splitlines()) == 1


def test_errors_are_one_line(server: str, tmp_path: Path) -> None:
    missing = prismctl(server, "get", "0" * 32, ok=False)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines() == [missing.stderr.strip()]
        and "NOT_FOUND" in missing.stderr
    )
    bad = prismctl(server, "create", "--org", "acme", "--name", "X", "--type", "persona",
                   "--version", "1.0", "--source", "x", ok=False)  # fmt: skip
    assert bad.returncode == 1 and "artifact.version" in bad.stderr
    usage = prismctl(server, "create", "--org", "acme", ok=False)
    assert usage.returncode == 2
    unreadable = prismctl(server, "import", str(tmp_path / "nope.pclpack"), ok=False)
    assert unreadable.returncode == 3 and "cannot read" in unreadable.stderr
    down = subprocess.run(
        [str(BIN / "prismctl"), "artifacts", "list", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 3 and "UNAVAILABLE" in down.stderr and "Traceback" not in down.stderr
