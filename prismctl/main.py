"""`prismctl`: registry queries, config validation and generation, conformance.

Every subcommand handler takes the parsed arguments and returns the exit code: 0 valid,
1 findings, 2 usage, 3 I/O or internal error. No traceback ever reaches the user."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from prismctl import cli_artifacts, cli_audit, cli_keys, cli_registry, cli_validate, generate
from prismctl.cli_common import EXIT_INTERNAL, EXIT_USAGE, CliError

CONFORMANCE_MODULE = "prismctl.conformance.cli"


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser(argv: Sequence[str] = ()) -> Parser:
    parser = Parser(prog="prismctl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        help="registry directory (default: $PRISM_REGISTRY_DIR or the repository's registry/)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_registry.register(sub)
    cli_validate.register(sub)
    generate.register(sub)
    cli_artifacts.register(sub)
    cli_keys.register(sub)
    cli_audit.register(sub)
    _register_conformance(sub, wanted="conformance" in argv)
    return parser


def _register_conformance(sub: argparse._SubParsersAction[Parser], *, wanted: bool) -> None:
    """The conformance subcommand lives in its own subpackage; wire it when it is present."""
    if importlib.util.find_spec(CONFORMANCE_MODULE) is None:
        return
    try:
        module = importlib.import_module(CONFORMANCE_MODULE)
        module.register(sub)
    except Exception as exc:
        if wanted:
            raise CliError(f"conformance commands unavailable: {exc}", EXIT_INTERNAL) from None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(args_list).parse_args(args_list)
        code: int = args.func(args)
        return code
    except CliError as exc:
        print(f"prismctl: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("prismctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_INTERNAL
    except Exception as exc:  # the promise: one line and exit 3, never a traceback
        print(f"prismctl: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
