"""Namespace configuration (MEMO-006 format) checked against the registry. The server refuses
to start on any error found here; `prismctl validate` prints the same findings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugins.runtime.tls import ClientTLS, TLSError, read_certificates, read_key_pair
from prismctl.diagnostics import Diagnostic, Location, has_errors, render_text
from prismctl.registry import BackendSpec, PatternSpec, Registry, SlotSpec
from prismctl.source import (
    IOProblem,
    PathKey,
    Source,
    json_type_name,
    load_yaml,
    parse_yaml,
    schema_errors,
)

__all__ = [
    "CONFIG_RULES",
    "ConfigResult",
    "Diagnostic",
    "NamespaceConfig",
    "RateLimitConfig",
    "RateRule",
    "SecurityConfig",
    "SlotConfig",
    "duplicate_namespaces",
    "load_config",
    "render_text",
    "validate_config_data",
]


#: Every rule `prismctl validate` can report, with what it means (registry/README.md lists them).
CONFIG_RULES: dict[str, str] = {
    "IO_ERROR": "the file cannot be read (missing, a directory, permissions); exit code 3",
    "NOT_UTF8": "the file is not UTF-8 text",
    "EMPTY_FILE": "the file has no YAML document",
    "YAML_SYNTAX": "the file is not valid YAML (or holds several documents)",
    "YAML_KEY": "a mapping key is not a plain scalar",
    "DUPLICATE_KEY": "a mapping repeats a key",
    "SCHEMA": "the file does not match registry/schemas/config.schema.json "
    "(top-level shape, wrong types, unknown keys, bad names or addresses)",
    "DUPLICATE_NAMESPACE": "two namespaces share a name (also across files)",
    "UNKNOWN_PATTERN": "the pattern is not in registry/patterns",
    "UNKNOWN_PATTERN_VERSION": "the pattern has no such version",
    "UNKNOWN_SLOT": "the pattern has no such slot",
    "MISSING_REQUIRED_SLOT": "a required slot of the pattern is not filled",
    "TOO_FEW_SLOTS": "the pattern needs more filled slots (direct: at least one)",
    "UNKNOWN_BACKEND": "the backend is not in the registry",
    "BACKEND_PLANNED": "warning: the backend has no plugin yet (and no sidecar address: is given)",
    "BACKEND_CONFIG": "the slot's config is rejected by the backend's config_schema",
    "CONNECTION_FORMAT": "config.connection does not match the backend's connection format",
    "UNKNOWN_INTERFACE": "an interfaces entry names no interface in the registry",
    "MISSING_REQUIRED_INTERFACE": "the backend lacks an interface the slot requires",
    "REQUIRED_INTERFACE_NOT_LISTED": "the slot's interfaces list leaves out a required one",
    "INTERFACE_NOT_IN_SLOT": "an interfaces entry the slot does not use",
    "INTERFACE_NOT_IMPLEMENTED": "an interfaces entry the backend does not implement",
    "TLS_FILE": "a tls file of a sidecar slot cannot be read, is not PEM, or its key does not "
    "match its certificate (relative paths start at the config file's directory)",
}

#: what a `rate_limits.store` must offer: buckets are read-modify-written with CAS, and expire
#: when idle if the backend has TTLs
RATE_LIMIT_STORE_INTERFACES = (["keyvalue_basic", "keyvalue_cas"], ["keyvalue_ttl"])
#: what the `security:` slots must offer: API keys are listed by prefix; the audit log is
#: queried with filters, sorted and paginated
SECURITY_STORE_INTERFACES = {
    "keys": ["keyvalue_basic", "keyvalue_scan"],
    "audit": ["document_basic", "document_query"],
}
#: where the `security:` slots go when not configured: SQLite in the data directory
DEFAULT_SECURITY_SLOT = {"backend": "sqlite", "config": {"connection": "sqlite:///prism.db"}}


@dataclass(frozen=True)
class SlotConfig:
    name: str
    backend: str
    #: the interfaces this slot binds: the `interfaces:` list, else every interface of the
    #: pattern slot that the backend implements
    interfaces: list[str]
    config: dict[str, Any]
    address: str | None
    location: Location
    #: True when `interfaces:` was written in the file
    interfaces_listed: bool = False
    #: `tls:` of a sidecar slot, paths resolved; None: plaintext
    tls: ClientTLS | None = None


#: an organization name, everywhere one appears (API keys, artifacts, `access:` maps): 1-64 of
#: a-z0-9, '-' only inside; "*" in an `access:` map stands for every other organization
ORGANIZATION = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
EVERY_ORGANIZATION = "*"


@dataclass(frozen=True)
class NamespaceConfig:
    name: str
    pattern: str
    pattern_version: str
    slots: dict[str, SlotConfig]
    location: Location
    #: `access:` organization (or "*") → read | write | admin; None: every organization gets
    #: its keys' own level
    access: dict[str, str] | None = None


@dataclass(frozen=True)
class RateRule:
    """Calls whose `package.Service/Method` matches the glob `method` draw from a token bucket
    per caller and method: `rate` tokens per second, at most `burst` saved up."""

    method: str
    rate: float
    burst: int
    #: what a call matching this rule gets when the bucket store fails: "deny" (UNAVAILABLE,
    #: retryable) or "allow" (the call proceeds unlimited); from `rate_limits.on_store_error`
    on_store_error: str = "deny"


@dataclass(frozen=True)
class RateLimitConfig:
    store: SlotConfig
    #: the first rule matching a method applies
    rules: list[RateRule]


@dataclass(frozen=True)
class SecurityConfig:
    """Slots for API keys and the audit log (defaults filled in: SQLite in the data dir)."""

    keys: SlotConfig
    audit: SlotConfig
    audit_retention_days: float = 90.0


@dataclass
class ConfigResult:
    source: str
    namespaces: list[NamespaceConfig] = field(default_factory=list)
    rate_limits: RateLimitConfig | None = None
    #: None only when the config has errors
    security: SecurityConfig | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: the file could not be read at all (exit code 3 rather than 1)
    io_error: bool = False

    @property
    def ok(self) -> bool:
        return not has_errors(self.diagnostics)


def load_config(path: Path, registry: Registry) -> ConfigResult:
    """Read, parse and check one config file. Never raises for bad input."""
    name = str(path)
    try:
        src = load_yaml(path, name)
    except IOProblem as exc:
        return ConfigResult(name, diagnostics=[exc.diagnostic], io_error=True)
    return _validate(src, registry)


def validate_config_data(
    data: object, source: str, registry: Registry, text: str | None = None
) -> ConfigResult:
    """Check already-parsed data; `text` (the YAML it came from) supplies line:col positions."""
    if text is not None:
        src = parse_yaml(text, source)
        if not src.ok:
            return ConfigResult(source, diagnostics=list(src.diagnostics))
    else:
        src = Source(source)
    src.data = data
    return _validate(src, registry)


def duplicate_namespaces(results: Iterable[ConfigResult]) -> list[Diagnostic]:
    """Namespace names must be unique across every file the server loads."""
    seen: dict[str, Location] = {}
    found: list[Diagnostic] = []
    for result in results:
        for ns in result.namespaces:
            first = seen.setdefault(ns.name, ns.location)
            if first is not ns.location:
                found.append(
                    Diagnostic.at(
                        ns.location,
                        "DUPLICATE_NAMESPACE",
                        f"namespace '{ns.name}' is defined twice",
                        "rename one of them or merge their slots",
                        related=[first.noted("first defined here")],
                    )
                )
    return found


def _validate(src: Source, registry: Registry) -> ConfigResult:
    result = ConfigResult(src.file, diagnostics=list(src.diagnostics))
    if not src.ok:
        return result
    if not isinstance(src.data, dict):
        result.diagnostics.append(
            Diagnostic.at(
                src.at(()),
                "SCHEMA",
                f"expected a mapping with a 'namespaces' list at the top level, got "
                f"{json_type_name(src.data)}",
                "start the file with 'namespaces:'",
            )
        )
        return result
    findings = schema_errors(src, registry.schema_dir / "config.schema.json")
    result.diagnostics.extend(d for _, d in findings)
    broken = {p[1] for p, _ in findings if len(p) >= 2 and p[0] == "namespaces"}
    if any(len(p) < 2 for p, _ in findings):
        return result
    for i, ns in enumerate(src.data["namespaces"]):
        if i not in broken:
            _check_namespace(src, registry, ("namespaces", i), ns, result)
    limits = src.data.get("rate_limits")
    if limits is not None and not any(p[:1] == ("rate_limits",) for p, _ in findings):
        result.rate_limits = _check_rate_limits(src, registry, limits, result.diagnostics)
    if not any(p[:1] == ("security",) for p, _ in findings):
        security = src.data.get("security") or {}
        result.security = _check_security(src, registry, security, result.diagnostics)
    result.diagnostics.extend(duplicate_namespaces([result]))
    result.diagnostics.sort(key=lambda d: (d.line, d.col))
    return result


def _check_namespace(
    src: Source, reg: Registry, path: PathKey, ns: dict[str, Any], result: ConfigResult
) -> None:
    diags = result.diagnostics
    name_loc = src.at((*path, "name"))
    pattern = reg.patterns.get(ns["pattern"])
    version = ns.get("pattern_version")
    if pattern is None:
        known = ", ".join(sorted(reg.patterns)) or "none"
        diags.append(
            Diagnostic.at(
                src.at((*path, "pattern")),
                "UNKNOWN_PATTERN",
                f"unknown pattern '{ns['pattern']}'",
                f"use one of: {known}",
            )
        )
    elif version is not None and version != pattern.version:
        diags.append(
            Diagnostic.at(
                src.at((*path, "pattern_version")),
                "UNKNOWN_PATTERN_VERSION",
                f"pattern '{pattern.name}' has no version '{version}'",
                f"use pattern_version: {pattern.version}",
                related=[pattern.location.noted(f"{pattern.name} is defined here")],
            )
        )
    slots: dict[str, SlotConfig] = {}
    for slot_name, slot_data in ns["slots"].items():
        slot_path = (*path, "slots", slot_name)
        spec = pattern.slots.get(slot_name) if pattern else None
        if pattern is not None and spec is None:
            known = ", ".join(pattern.slots)
            diags.append(
                Diagnostic.at(
                    src.key_at(slot_path),
                    "UNKNOWN_SLOT",
                    f"pattern '{pattern.name}' has no slot '{slot_name}'",
                    f"use one of: {known}",
                )
            )
        slots[slot_name] = _check_slot(src, reg, slot_path, slot_name, slot_data, spec, diags)
    if pattern is not None:
        _check_slot_presence(src, path, pattern, ns["slots"], diags)
    access: dict[str, str] | None = ns.get("access")
    if access is not None:
        _check_access(src, (*path, "access"), access, diags)
    result.namespaces.append(
        NamespaceConfig(
            name=ns["name"],
            pattern=ns["pattern"],
            pattern_version=version or (pattern.version if pattern else ""),
            slots=slots,
            location=name_loc,
            access=access,
        )
    )


def _check_access(
    src: Source, path: PathKey, access: dict[str, str], diags: list[Diagnostic]
) -> None:
    """The schema checks the levels; the keys must be organization names, which a JSON Schema
    `propertyNames` finding could only locate at the whole map, not at the bad key."""
    for organization in access:
        if organization != EVERY_ORGANIZATION and not ORGANIZATION.fullmatch(organization):
            diags.append(
                Diagnostic.at(
                    src.key_at((*path, organization)),
                    "SCHEMA",
                    f"{'.'.join(map(str, path))}: '{organization}' is not an organization name",
                    "use 1-64 characters of a-z, 0-9 and '-' (not first or last), "
                    'or "*" for every other organization',
                )
            )


def _server_slot(
    src: Source,
    reg: Registry,
    path: PathKey,
    data: dict[str, Any],
    interfaces: tuple[list[str], list[str]],
    diags: list[Diagnostic],
) -> SlotConfig:
    """A server-level slot (not a pattern's), checked like any pattern slot."""
    name = ".".join(str(p) for p in path)
    spec = SlotSpec(
        name=name,
        description=name,
        required_interfaces=interfaces[0],
        optional_interfaces=interfaces[1],
        recommended_backends=[],
        optional=False,
        location=src.key_at(path),
        recommended_locations={},
    )
    return _check_slot(src, reg, path, name, data, spec, diags)


def _check_security(
    src: Source, reg: Registry, data: dict[str, Any], diags: list[Diagnostic]
) -> SecurityConfig:
    keys, audit = (
        _server_slot(
            src,
            reg,
            ("security", part),
            data.get(part, DEFAULT_SECURITY_SLOT),
            (SECURITY_STORE_INTERFACES[part], []),
            diags,
        )
        for part in ("keys", "audit")
    )
    return SecurityConfig(keys, audit, float(data.get("audit_retention_days", 90.0)))


def _check_rate_limits(
    src: Source, reg: Registry, data: dict[str, Any], diags: list[Diagnostic]
) -> RateLimitConfig:
    store = _server_slot(
        src, reg, ("rate_limits", "store"), data["store"], RATE_LIMIT_STORE_INTERFACES, diags
    )
    on_error = data.get("on_store_error", "deny")
    rules = [
        RateRule(r["method"], float(r["rate"]), int(r["burst"]), on_error) for r in data["rules"]
    ]
    return RateLimitConfig(store, rules)


def _check_slot_presence(
    src: Source,
    path: PathKey,
    pattern: PatternSpec,
    filled: dict[str, Any],
    diags: list[Diagnostic],
) -> None:
    slots_loc = src.key_at((*path, "slots"))
    for spec in pattern.slots.values():
        if not spec.optional and spec.name not in filled:
            diags.append(
                Diagnostic.at(
                    slots_loc,
                    "MISSING_REQUIRED_SLOT",
                    f"required slot '{spec.name}' of pattern '{pattern.name}' is not filled",
                    f"add slots.{spec.name} with a backend implementing "
                    f"{', '.join(spec.required_interfaces)}",
                    related=[spec.location.noted("slot defined here")],
                )
            )
    known_filled = [s for s in filled if s in pattern.slots]
    if len(known_filled) < pattern.min_filled_slots:
        diags.append(
            Diagnostic.at(
                slots_loc,
                "TOO_FEW_SLOTS",
                f"pattern '{pattern.name}' needs at least {pattern.min_filled_slots} filled "
                f"slot(s), got {len(known_filled)}",
                f"fill one of: {', '.join(pattern.slots)}",
            )
        )


def _check_slot(
    src: Source,
    reg: Registry,
    path: PathKey,
    slot_name: str,
    data: dict[str, Any],
    spec: SlotSpec | None,
    diags: list[Diagnostic],
) -> SlotConfig:
    backend = reg.backends.get(data["backend"])
    listed: list[str] | None = data.get("interfaces")
    config: dict[str, Any] = data.get("config", {})
    if backend is None:
        known = ", ".join(sorted(reg.backends)) or "none"
        diags.append(
            Diagnostic.at(
                src.at((*path, "backend")),
                "UNKNOWN_BACKEND",
                f"unknown backend '{data['backend']}'",
                f"use one of: {known}",
            )
        )
    else:
        if backend.status == "planned" and not data.get("address"):
            diags.append(
                Diagnostic.at(
                    src.at((*path, "backend")),
                    "BACKEND_PLANNED",
                    f"backend '{backend.name}' is planned: its plugin is not available yet, so "
                    "the server cannot bind this slot in-process",
                    "use an available backend or bind the slot to a sidecar with address:",
                    severity="warning",
                    related=[backend.location.noted("declared here")],
                )
            )
        if "address" not in data or "config" in data:
            # a sidecar slot's config lives with the sidecar, which validates it itself
            _check_backend_config(src, path, backend, config, diags)
    if listed is not None:
        _check_listed(src, reg, path, slot_name, listed, spec, backend, diags)
    if spec is not None and backend is not None:
        _check_required(src, reg, path, slot_name, spec, backend, listed, diags)
    if listed is not None:
        interfaces = list(listed)
    elif spec is not None and backend is not None:
        interfaces = [i for i in spec.interfaces if i in backend.implements]
    else:
        interfaces = []
    return SlotConfig(
        name=slot_name,
        backend=data["backend"],
        interfaces=interfaces,
        config=config,
        address=data.get("address"),
        location=src.key_at(path),
        interfaces_listed=listed is not None,
        tls=_check_tls(src, path, data.get("tls"), diags),
    )


def _check_tls(
    src: Source, path: PathKey, data: dict[str, str] | None, diags: list[Diagnostic]
) -> ClientTLS | None:
    """Resolve the files against the config's directory and read them now, so a wrong path is
    a finding at its line rather than a failed handshake at startup."""
    if data is None:
        return None
    base = Path(src.file).parent
    files = {role: base / name for role, name in data.items()}
    tls = ClientTLS(files["ca"], files.get("cert"), files.get("key"))
    checks: list[tuple[str, Callable[[], object]]] = [
        ("ca", lambda: read_certificates(tls.ca, "CA")),
    ]
    if tls.cert is not None and tls.key is not None:
        cert, key = tls.cert, tls.key
        checks.append(("cert", lambda: read_certificates(cert)))
        checks.append(("key", lambda: read_key_pair(cert, key)))
    for role, check in checks:
        try:
            check()
        except TLSError as exc:
            diags.append(
                Diagnostic.at(
                    src.at((*path, "tls", role)),
                    "TLS_FILE",
                    str(exc),
                    "give a readable PEM file (relative to the config file's directory)",
                )
            )
            break
    return tls


def _lacks(backend: BackendSpec, interface: str) -> Location:
    return backend.implements_location.noted(
        f"{backend.name}'s implements list (registry matrix) has no {interface}",
    )


def _check_required(
    src: Source,
    reg: Registry,
    path: PathKey,
    slot_name: str,
    spec: SlotSpec,
    backend: BackendSpec,
    listed: list[str] | None,
    diags: list[Diagnostic],
) -> None:
    for iid in spec.required_interfaces:
        if iid not in backend.implements:
            can = ", ".join(b.name for b in reg.implementers(spec.required_interfaces))
            diags.append(
                Diagnostic.at(
                    src.at((*path, "backend")),
                    "MISSING_REQUIRED_INTERFACE",
                    f"slot '{slot_name}' requires {iid}, which backend '{backend.name}' does "
                    "not implement",
                    f"use a backend implementing {', '.join(spec.required_interfaces)}: "
                    f"{can or 'none exists'}",
                    related=[_lacks(backend, iid)],
                )
            )
        elif listed is not None and iid not in listed:
            diags.append(
                Diagnostic.at(
                    src.at((*path, "interfaces")),
                    "REQUIRED_INTERFACE_NOT_LISTED",
                    f"slot '{slot_name}' requires {iid} but its interfaces list leaves it out",
                    f"add {iid} to interfaces (or drop the list to bind everything the slot uses)",
                )
            )


def _check_listed(
    src: Source,
    reg: Registry,
    path: PathKey,
    slot_name: str,
    listed: list[str],
    spec: SlotSpec | None,
    backend: BackendSpec | None,
    diags: list[Diagnostic],
) -> None:
    for i, iid in enumerate(listed):
        loc = src.at((*path, "interfaces", i))
        if iid not in reg.interfaces:
            diags.append(
                Diagnostic.at(
                    loc,
                    "UNKNOWN_INTERFACE",
                    f"unknown interface '{iid}'",
                    "see `prismctl registry backends describe` for interface ids",
                )
            )
            continue
        if spec is not None and iid not in spec.interfaces:
            diags.append(
                Diagnostic.at(
                    loc,
                    "INTERFACE_NOT_IN_SLOT",
                    f"slot '{slot_name}' does not use {iid}",
                    f"remove it; the slot uses {', '.join(spec.interfaces)}",
                    related=[spec.location.noted("slot defined here")],
                )
            )
        elif (
            backend is not None
            and iid not in backend.implements
            and not (spec is not None and iid in spec.required_interfaces)
        ):
            diags.append(
                Diagnostic.at(
                    loc,
                    "INTERFACE_NOT_IMPLEMENTED",
                    f"backend '{backend.name}' does not implement {iid}",
                    f"remove {iid} from interfaces or choose a backend that implements it",
                    related=[_lacks(backend, iid)],
                )
            )


def _check_backend_config(
    src: Source,
    path: PathKey,
    backend: BackendSpec,
    config: dict[str, Any],
    diags: list[Diagnostic],
) -> None:
    related = [backend.location.noted(f"{backend.name}'s config_schema")]
    for _, d in schema_errors(
        src, backend.config_schema, config, (*path, "config"), rule_id="BACKEND_CONFIG"
    ):
        diags.append(Diagnostic.at(d.location, d.rule_id, d.message, d.fix, related=related))
    connection = config.get("connection")
    if isinstance(connection, str) and not re.fullmatch(backend.connection_pattern, connection):
        diags.append(
            Diagnostic.at(
                src.at((*path, "config", "connection")),
                "CONNECTION_FORMAT",
                f"connection string '{connection}' does not match {backend.name}'s format "
                f"{backend.connection_string_format}",
                f"write it like {backend.default_connection}",
                related=related,
            )
        )
