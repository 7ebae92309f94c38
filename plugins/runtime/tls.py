"""TLS from PEM files for both gRPC edges: server credentials (optional mTLS) for prism-server
and prism-plugin, channel credentials for the server's connections to sidecars.

Files are read and parsed once at startup, so a wrong path or a key that does not match its
certificate is a one-line startup error instead of a handshake failure on the first call.
server/tls.py re-exports this module where the server looks for it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TLSError(Exception):
    """A certificate or key that cannot be used. `exit_code` 3 when the file cannot be read,
    2 when its content is wrong (the command line names the wrong file)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"{path}: cannot read {what}: {exc.strerror or exc}", 3) from None


def read_certificates(path: Path, what: str = "certificate") -> bytes:
    """PEM bytes holding at least one X.509 certificate (a chain or a CA bundle)."""
    data = _read(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"{path}: {what} is not a PEM X.509 certificate") from None
    return data


def read_key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), refusing a key that does not belong to the certificate."""
    chain = read_certificates(cert)
    data = _read(key, "private key")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted key (no passphrase support)
        reason = "is encrypted" if isinstance(exc, TypeError) else "is not a PEM private key"
        raise TLSError(f"{key}: private key {reason}") from None
    leaf = x509.load_pem_x509_certificates(chain)[0]
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if private.public_key().public_bytes(pem, raw) != leaf.public_key().public_bytes(pem, raw):
        raise TLSError(f"{key}: private key does not match certificate {cert}")
    return data, chain


@dataclass(frozen=True)
class ServerTLS:
    """A listening port's certificate, and the CA client certificates must chain to (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key, chain = read_key_pair(self.cert, self.key)
        ca = None if self.client_ca is None else read_certificates(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """How to reach a TLS peer: the CA its certificate must chain to, and optionally our own
    certificate for a peer that requires one."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        ca = read_certificates(self.ca, "CA")
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        key, chain = read_key_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=chain)


def add_tls_arguments(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    """--tls-cert/--tls-key/--tls-client-ca, defaulting to <env_prefix>TLS_CERT etc."""

    def env(name: str) -> Path | None:
        value = os.environ.get(f"{env_prefix}{name}")
        return Path(value) if value else None

    group = parser.add_argument_group("TLS (plaintext when --tls-cert is not given)")
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env("TLS_CERT"),
        help=f"PEM certificate chain to serve (env {env_prefix}TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=env("TLS_KEY"),
        help=f"PEM private key of --tls-cert (env {env_prefix}TLS_KEY)",
    )
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("TLS_CLIENT_CA"),
        help="PEM CA: clients must present a certificate it signed (mTLS) "
        f"(env {env_prefix}TLS_CLIENT_CA)",
    )


def server_tls_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> ServerTLS | None:
    """The flags as a ServerTLS (None: plaintext); incomplete combinations are usage errors."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        parser.error("--tls-cert and --tls-key go together")
    return ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)


def add_port(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind `listen` in plaintext or TLS; the bound port (RuntimeError when it cannot bind)."""
    if credentials is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, credentials)
