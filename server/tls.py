"""The server's TLS: the plugin runtime's (plugins/runtime/tls.py), so prism-server and
prism-plugin read certificates and report bad files identically; this module names it for
server code."""

from plugins.runtime.tls import (
    ClientTLS,
    ServerTLS,
    TLSError,
    add_port,
    add_tls_arguments,
    server_tls_from_args,
)

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "TLSError",
    "add_port",
    "add_tls_arguments",
    "server_tls_from_args",
]
