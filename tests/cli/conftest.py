"""Run the installed `prismctl` console script as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.cli_support import REGISTRY, Run


def prismctl_path() -> str:
    found = shutil.which("prismctl", path=str(Path(sys.executable).parent)) or shutil.which(
        "prismctl"
    )
    if found is None:
        pytest.fail("the prismctl console script is not installed: run `make install`")
    return found


@pytest.fixture(scope="session")
def prismctl() -> Run:
    exe = prismctl_path()

    def run(
        *args: str | Path, cwd: Path | None = None, registry: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.pop("PRISM_REGISTRY_DIR", None)
        if registry is not None:
            env["PRISM_REGISTRY_DIR"] = str(registry)
        proc = subprocess.run(
            [exe, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=60,
        )
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc

    return run


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    """A private copy of the registry that a test may break."""
    dest = tmp_path / "registry"
    shutil.copytree(REGISTRY, dest)
    return dest
