"""Shared by the CLI tests: where things are, and how a prismctl run is typed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REGISTRY = REPO / "registry"
FIXTURES = REPO / "tests" / "fixtures" / "configs"

Run = Callable[..., subprocess.CompletedProcess[str]]
