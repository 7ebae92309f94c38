"""A namespace's `access:` map in `prismctl validate` and at `prism-server` start: a bad
organization name or level is one located finding (file:line:col, rule id), exit 1, and the
server refuses to start with the same line; a good map validates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli.cli_support import Run
from tests.support.harness import BIN

HEAD = (
    "namespaces:\n  - name: orders\n    pattern: keyvalue\n"
    "    slots: {store: {backend: memstore}}\n"
)


def config(tmp_path: Path, access: str) -> Path:
    path = tmp_path / "access.yaml"
    path.write_text(HEAD + "    access:\n" + access, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("access", "finding"),
    [
        (
            '      acme: write\n      "Acme Corp": read\n',
            "access.yaml:7:7: namespaces.0.access: 'Acme Corp' is not an organization name "
            "[SCHEMA]",
        ),
        (
            "      acme: owner\n",
            "access.yaml:6:13: namespaces.0.access.acme: 'owner' is not one of "
            "['read', 'write', 'admin'] [SCHEMA]",
        ),
        (
            "      -acme: read\n",
            "access.yaml:6:7: namespaces.0.access: '-acme' is not an organization name [SCHEMA]",
        ),
    ],
    ids=["organization", "level", "edge-dash"],
)
def test_bad_access_entry_is_one_located_finding(
    prismctl: Run, tmp_path: Path, access: str, finding: str
) -> None:
    path = config(tmp_path, access)
    proc = prismctl("validate", path.name, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    located = [line for line in proc.stdout.splitlines() if line.startswith("access.yaml:")]
    assert located == [finding]

    server = subprocess.run(
        [str(BIN / "prism-server"), "--no-auth", "--config", path.name, "--data-dir", "d"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert server.returncode == 1
    assert server.stdout == ""  # never listened
    assert server.stderr.startswith(finding), server.stderr
    assert "Traceback" not in server.stderr


def test_good_access_map_validates(prismctl: Run, tmp_path: Path) -> None:
    path = config(tmp_path, '      acme: write\n      globex-2: admin\n      "*": read\n')
    proc = prismctl("validate", path.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
