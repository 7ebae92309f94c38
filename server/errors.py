"""The server's error mapping is the plugin runtime's (plugins/runtime/status.py), so the server
and every sidecar map errors identically; this module names it where docs/conventions.md says."""

from plugins.runtime.status import error_from_status, status_for, to_domain_error

__all__ = ["error_from_status", "status_for", "to_domain_error"]
