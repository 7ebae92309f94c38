"""`prism-server [--config FILE] [--listen HOST:PORT] [--data-dir DIR] [--keyring FILE]
[--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--no-auth]` (env PRISM_CONFIG,
PRISM_LISTEN, PRISM_DATA_DIR, PRISM_KEYRING or PRISM_ENCRYPTION_KEYS, PRISM_TLS_CERT,
PRISM_TLS_KEY, PRISM_TLS_CLIENT_CA, PRISM_NO_AUTH=1).

Every call but health and reflection needs an API key unless --no-auth. The first secured start
without an admin key in the store prints a bootstrap admin key once, on stdout, before the
`listening on` line. Exit codes: 0 clean shutdown, 1 config findings, 2 usage (including a
certificate or key with wrong content), 3 cannot start (invalid registry, bind failure,
unreachable backend or sidecar, unreadable certificate file, unusable keyring, a secret vault
without a keyring). Without a keyring the server uses (and first creates) `keyring.yaml` in the
data directory, for the registry's private sources, and warns that it lives beside the data."""

from __future__ import annotations

import os

# before grpc is imported: grpc core would log its own lines for e.g. a port in use, which we
# report once as a one-line diagnostic (GRPC_VERBOSITY set by the user still wins)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from plugins.runtime.serving import configure_logging, install_uvloop, on_shutdown_signals
from plugins.runtime.tls import add_tls_arguments, server_tls_from_args
from server.app import (
    DEFAULT_LISTEN,
    ConfigError,
    RegistryError,
    ServerOptions,
    StartupError,
    create_server,
    embedded_default,
)
from server.crypto import KeyringError, configured_keyring
from server.tls import TLSError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prism-server", description="Serve Prism over gRPC.")
    env_config = os.environ.get("PRISM_CONFIG")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(env_config) if env_config else None,
        help="namespace config YAML (env PRISM_CONFIG; default: embedded SQLite namespace)",
    )
    parser.add_argument(
        "--listen",
        default=os.environ.get("PRISM_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT, port 0 picks a free one (env PRISM_LISTEN; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("PRISM_DATA_DIR", "data")),
        help="where embedded backends keep their files (env PRISM_DATA_DIR; default ./data)",
    )
    env_keyring = os.environ.get("PRISM_KEYRING")
    parser.add_argument(
        "--keyring",
        type=Path,
        default=Path(env_keyring) if env_keyring else None,
        help="encryption-at-rest keyring file (env PRISM_KEYRING; else env PRISM_ENCRYPTION_KEYS; "
        "default: DATA_DIR/keyring.yaml, created if missing, not accepted by secret vaults)",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        default=os.environ.get("PRISM_NO_AUTH", "") not in ("", "0"),
        help="serve without API keys, for local development only (env PRISM_NO_AUTH=1)",
    )
    add_tls_arguments(parser, "PRISM_")
    args = parser.parse_args(argv)
    args.tls = server_tls_from_args(parser, args)
    return args


async def serve(args: argparse.Namespace) -> int:
    options = ServerOptions(
        listen=args.listen,
        config=args.config,
        data_dir=args.data_dir,
        keyring=configured_keyring(args.keyring, os.environ),
        tls=args.tls,
        auth=not args.no_auth,
    )
    stopping = asyncio.Event()
    on_shutdown_signals(stopping.set)  # before anyone can learn the address and signal us
    server = await create_server(options)
    await server.start()
    embedded = ", ".join(
        f"{ns['name']} ({ns['pattern']})" for ns in embedded_default()["namespaces"]
    )
    source = args.config or f"embedded default: {embedded} on sqlite"
    print(f"prism-server: config {source}", flush=True)
    print(f"prism-server: data in {server.data_dir.resolve()}", flush=True)
    if args.tls is not None:
        mtls = "" if args.tls.client_ca is None else ", client certificates required (mTLS)"
        print(f"prism-server: TLS with {args.tls.cert}{mtls}", flush=True)
    if not server.auth:
        print(
            "prism-server: WARNING: authentication is OFF (--no-auth): anyone who can reach "
            f"{server.address} can read and change everything; health service "
            "'prism.auth' reports NOT_SERVING",
            file=sys.stderr,
            flush=True,
        )
    if server.bootstrap_key is not None:
        print(f"prism-server: bootstrap admin key (shown once, store it now): "
              f"{server.bootstrap_key}", flush=True)  # fmt: skip
    print(f"prism-server listening on {server.address}", flush=True)
    await stopping.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    install_uvloop()
    try:
        return asyncio.run(serve(args))
    except ConfigError as exc:
        for d in exc.diagnostics:
            fix = f" (fix: {d.fix})" if d.fix else ""
            print(f"{d.location}: {d.message} [{d.rule_id}]{fix}", file=sys.stderr)
        return 3 if isinstance(exc, RegistryError) else 1
    except (StartupError, KeyringError) as exc:
        print(f"prism-server: {exc}", file=sys.stderr)
        return 3
    except TLSError as exc:
        print(f"prism-server: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. the data directory cannot be created
        print(f"prism-server: cannot start: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
