"""`create_server()`: validated config → bound slots → routed gRPC services, health, reflection.

The config is checked with prismctl.config, exactly what `prismctl validate` checks; any error
finding refuses the start (ConfigError carries them). Tests and embedders bind port 0 and read
`PrismServer.port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import yaml
from prism.admin.v1 import key_admin_pb2
from prism.contracts.document import DocumentBasic, DocumentQuery
from prism.contracts.keyvalue import KeyValueBasic, KeyValueCAS, KeyValueScan, KeyValueTTL

from plugins.runtime.grpc_adapter import Target, service_handler
from plugins.runtime.serving import (
    NOT_SERVING,
    SERVING,
    Check,
    HealthMonitor,
    enable_reflection,
    new_server,
)
from prismctl.config import (
    ConfigResult,
    Diagnostic,
    RateLimitConfig,
    SecurityConfig,
    load_config,
    validate_config_data,
)
from prismctl.diagnostics import has_errors
from prismctl.registry import Registry, load_registry
from server import audit as audit_log
from server import auth
from server.binding import Binder, BindError, SlotBinding
from server.crypto import DATA_DIR_KEYRING, Keyring, data_dir_keyring
from server.patterns import BoundNamespace, executor_for
from server.ratelimit import NAMESPACE as RATE_LIMIT_NAMESPACE
from server.ratelimit import RateLimitInterceptor, TokenBuckets
from server.router import Router
from server.tls import ServerTLS, add_port

DEFAULT_LISTEN = "127.0.0.1:50051"
log = logging.getLogger("prism.server")
EMBEDDED_SOURCE = "<embedded default config>"
#: health services a client reads to learn the security state: `prism.auth` is NOT_SERVING
#: while authentication is off; `prism.audit` NOT_SERVING once audit entries were dropped
AUTH_HEALTH = "prism.auth"
AUDIT_HEALTH = "prism.audit"
ADMIN_SERVICE = key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdminService"]


def embedded_default() -> dict[str, Any]:
    """No config given: everything on one SQLite file in the data directory — namespace
    `default` (pattern `direct`: keyvalue, document and queue slots) and namespace `registry`
    (the artifact registry, its store and L2 cache on the same file)."""
    sqlite = {"backend": "sqlite", "config": {"connection": "sqlite:///prism.db"}}
    return {
        "namespaces": [
            {
                "name": "default",
                "pattern": "direct",
                "pattern_version": "v1",
                "slots": {slot: dict(sqlite) for slot in ("keyvalue", "document", "queue")},
            },
            {
                "name": "registry",
                "pattern": "artifact-registry",
                "pattern_version": "v1",
                "slots": {slot: dict(sqlite) for slot in ("store", "cache")},
            },
        ]
    }


class ConfigError(Exception):
    """The config has findings; the server does not start."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        findings = "; ".join(f"{d.file}:{d.line}:{d.col}: {d.message} [{d.rule_id}]"
                             for d in diagnostics)  # fmt: skip
        super().__init__(f"{len(diagnostics)} configuration finding(s): {findings}")
        self.diagnostics = diagnostics


class RegistryError(ConfigError):
    """registry/ itself has problems (`prismctl registry validate` shows them); exit 3 like
    prismctl, since no config can be checked against it."""


class StartupError(Exception):
    """A slot could not be bound or the address cannot be listened on."""


@dataclass
class ServerOptions:
    listen: str = "127.0.0.1:0"
    #: a YAML file, an already-parsed mapping, or None for the embedded default
    config: Path | Mapping[str, Any] | None = None
    data_dir: Path = field(default_factory=lambda: Path("data"))
    registry: Registry | None = None
    health_interval: float = 1.0
    grace: float = 5.0
    #: how long a sidecar named by `address:` may take to answer Describe at startup
    sidecar_timeout: float = 5.0
    #: keys for encryption at rest (server/crypto.py); patterns that store secrets need one
    keyring: Keyring | None = None
    #: serve TLS (and require client certificates when it names a client CA); None: plaintext
    tls: ServerTLS | None = None
    #: require an API key on every call but health and reflection (False: `--no-auth`)
    auth: bool = True
    #: how often expired audit entries are purged
    audit_purge_interval: float = 3600.0


def check_config(options: ServerOptions, registry: Registry) -> ConfigResult:
    if isinstance(options.config, Path):
        return load_config(options.config, registry)
    data = embedded_default() if options.config is None else dict(options.config)
    source = EMBEDDED_SOURCE if options.config is None else "<config mapping>"
    return validate_config_data(data, source, registry, text=yaml.safe_dump(data, sort_keys=False))


class PrismServer:
    """A bound, not yet started server. `start()`, then `stop()` or `wait_for_termination()`."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        host: str,
        binder: Binder,
        health: HealthMonitor,
        router: Router,
        grace: float,
        security: Security,
        rate_limiter: RateLimitInterceptor | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.address = f"{host}:{port}"
        self.binder = binder
        self.health = health
        self.router = router
        self.grace = grace
        self.data_dir = binder.data_dir
        #: None when the config has no `rate_limits:` (no interceptor at all)
        self.rate_limiter = rate_limiter
        self.security = security
        #: the bootstrap admin key made by `start()` (to be shown once), else None
        self.bootstrap_key: str | None = None

    @property
    def auth(self) -> bool:
        return self.security.enforced

    @property
    def services(self) -> list[str]:
        return self.router.services

    async def start(self) -> None:
        await self.health.start()
        await self.health.servicer.set(AUTH_HEALTH, SERVING if self.auth else NOT_SERVING)
        await self.health.servicer.set(AUDIT_HEALTH, SERVING)
        self.security.audit.start(self._audit_dropped)
        await self.server.start()
        if self.auth:
            # only once serving can no longer fail: a key made by a start that then failed
            # would never be shown, and its hash would block the next bootstrap
            try:
                self.bootstrap_key = await auth.bootstrap_key(self.security.keys)
            except Exception as exc:
                await self.stop(0)
                raise StartupError(f"security: cannot read API keys: {exc}") from None

    def _audit_dropped(self) -> None:
        """Called on the first dropped audit entry: health tells from then on."""
        task = asyncio.create_task(self.health.servicer.set(AUDIT_HEALTH, NOT_SERVING))
        self.security.tasks.add(task)
        task.add_done_callback(self.security.tasks.discard)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so balancers drain), then finish in-flight calls, then close
        plugins and sidecar channels."""
        await self.health.shutdown()
        await self.server.stop(self.grace if grace is None else grace)
        await self.binder.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(options: ServerOptions) -> PrismServer:
    registry = options.registry or load_registry()
    result = check_config(options, registry)
    if has_errors(registry.diagnostics):
        raise RegistryError([d for d in registry.diagnostics if d.severity == "error"])
    if not result.ok:
        raise ConfigError([d for d in result.diagnostics if d.severity == "error"])
    credentials = None if options.tls is None else options.tls.credentials()
    options.data_dir.mkdir(parents=True, exist_ok=True)
    created: bool | None = None
    if options.keyring is None:
        # private registry sources are still encrypted at rest, under keys kept beside the data
        keyring, created = data_dir_keyring(options.data_dir)
        options = replace(options, keyring=keyring)
    binder = Binder(registry, options.data_dir, options.sidecar_timeout)
    try:
        server = await _assemble(options, registry, result, binder, credentials)
    except BaseException:
        await binder.close()
        raise
    if created is not None:  # once the server is up: a refused start stays a one-line error
        log.warning(
            "no keyring configured: encryption at rest uses %s (%s), which lives beside the "
            "data it protects; in production pass --keyring FILE or PRISM_KEYRING (carry this "
            "file's keys over into it, or data encrypted so far stays unreadable)",
            options.data_dir / DATA_DIR_KEYRING,
            "created now" if created else "kept from an earlier start",
        )
    return server


async def _assemble(
    options: ServerOptions,
    registry: Registry,
    result: ConfigResult,
    binder: Binder,
    credentials: grpc.ServerCredentials | None,
) -> PrismServer:
    router = Router(result.namespaces)
    health = HealthMonitor(options.health_interval)
    checks: dict[Check, set[str]] = {}
    for ns in result.namespaces:
        slots: dict[str, SlotBinding] = {}
        try:
            for slot in ns.slots.values():
                slots[slot.name] = await binder.bind(ns.name, slot)
            pattern = registry.patterns[ns.pattern]
            bound = BoundNamespace(ns.name, pattern, slots, keyring=options.keyring)
            binder.closers.append(bound.on_close)
            exposed = await executor_for(pattern)(bound)
            for item in exposed:
                router.add(ns.name, item)
        except BindError as exc:
            raise StartupError(str(exc)) from None
        except Exception as exc:  # a pattern executor failing to start
            log.debug("namespace %s failed to start", ns.name, exc_info=True)
            raise StartupError(
                f"namespace '{ns.name}' (pattern {ns.pattern}): {type(exc).__name__}: {exc}"
            ) from None
        for item in exposed:
            # a service naming no slots depends on all of its namespace's slots
            for slot_name in item.slots or tuple(slots):
                checks.setdefault(slots[slot_name].check, set()).add(item.service.full_name)
    for check, services in checks.items():
        health.watch(sorted(services), check)
    assert result.security is not None  # the config has no errors
    security = await _security(result.security, binder, options)
    limiter = (
        None if result.rate_limits is None else await _rate_limiter(result.rate_limits, binder)
    )
    interceptors = [security.interceptor] if limiter is None else [security.interceptor, limiter]
    server = new_server(*interceptors)
    server.add_generic_rpc_handlers(tuple(router.handlers()))
    admin = Target("", security.admin, {})
    server.add_generic_rpc_handlers((service_handler(ADMIN_SERVICE, lambda _: admin),))
    health.add_to_server(server)
    enable_reflection(server, [*router.services, ADMIN_SERVICE.full_name])
    host = options.listen.rpartition(":")[0]
    try:
        port = add_port(server, options.listen, credentials)
    except RuntimeError as exc:
        with contextlib.suppress(Exception):
            await server.stop(None)
        reason = str(exc).split(";")[0]
        raise StartupError(f"cannot listen on {options.listen}: {reason}") from None
    return PrismServer(server, port, host, binder, health, router, options.grace, security, limiter)


@dataclass
class Security:
    """API keys, the audit log and the interceptor enforcing them."""

    enforced: bool
    keys: auth.KeyStore
    audit: audit_log.AuditLog
    interceptor: auth.AuthInterceptor
    admin: auth.KeyAdmin
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


async def _security(config: SecurityConfig, binder: Binder, options: ServerOptions) -> Security:
    """Bind the `security:` slots (SQLite in the data dir unless configured); on a secured
    server with no admin key yet, make the bootstrap key."""
    try:
        keys_slot = await binder.bind(auth.NAMESPACE, config.keys)
        audit_slot = await binder.bind(audit_log.NAMESPACE, config.audit)
        keys = auth.KeyStore(
            cast(KeyValueBasic, keys_slot.implementations["keyvalue_basic"]),
            cast(KeyValueScan, keys_slot.implementations["keyvalue_scan"]),
        )
        log_ = audit_log.AuditLog(
            cast(DocumentBasic, audit_slot.implementations["document_basic"]),
            cast(DocumentQuery, audit_slot.implementations["document_query"]),
            config.audit_retention_days,
            options.audit_purge_interval,
        )
        binder.closers.append([log_.close, keys.close])
    except BindError as exc:
        raise StartupError(f"security: {exc}") from None
    return Security(
        enforced=options.auth,
        keys=keys,
        audit=log_,
        interceptor=auth.AuthInterceptor(keys if options.auth else None, log_),
        admin=auth.KeyAdmin(keys, log_, options.auth),
    )


async def _rate_limiter(config: RateLimitConfig, binder: Binder) -> RateLimitInterceptor:
    """Bind `rate_limits.store` like any slot (in-process or a sidecar): the buckets live there."""
    try:
        slot = await binder.bind(RATE_LIMIT_NAMESPACE, config.store)
    except BindError as exc:
        raise StartupError(f"rate_limits: {exc}") from None
    impls = slot.implementations
    buckets = TokenBuckets(
        cast(KeyValueBasic, impls["keyvalue_basic"]),
        cast(KeyValueCAS, impls["keyvalue_cas"]),
        cast(KeyValueTTL | None, impls.get("keyvalue_ttl")),
    )
    binder.closers.append([buckets.close])
    return RateLimitInterceptor(config.rules, buckets)
