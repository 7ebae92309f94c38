"""What every prismctl command shares: the error that carries an exit code, and loading the
registry so that a broken registry is reported, not tripped over."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from prismctl.diagnostics import render_text
from prismctl.registry import Registry, load_registry

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class CliError(Exception):
    """A one-line message for stderr plus the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def registry_from_args(args: argparse.Namespace) -> Registry:
    """The registry, or exit 3 when it has load problems: every command trusts its content."""
    root: Path | None = getattr(args, "registry", None)
    reg = load_registry(root)
    if not (reg.root / "backends").is_dir():
        raise CliError(f"{reg.root}: not a registry directory (no backends/)", EXIT_INTERNAL)
    if reg.diagnostics:
        print(render_text(reg.diagnostics), file=sys.stderr)
        raise CliError(
            "the registry itself is invalid; run `prismctl registry validate`", EXIT_INTERNAL
        )
    return reg


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a failed write never leaves half a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    except OSError as exc:
        raise CliError(f"{path}: cannot write: {exc.strerror or exc}", EXIT_INTERNAL) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CliError(f"{path}: cannot write: {exc.strerror or exc}", EXIT_INTERNAL) from None
