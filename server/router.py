"""Namespace routing: one generic gRPC handler per served service, picking per call the
namespace from `x-prism-namespace` (or the only namespace serving that service), and deciding
there, once per call, what the caller may do in it (docs/authorization.md, "Namespaces")."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache, partial
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from plugins.runtime import errors
from plugins.runtime.grpc_adapter import (
    NAMESPACE_HEADER,
    Resolver,
    Target,
    method_routed_handler,
)
from prismctl.config import NamespaceConfig
from server.auth import Identity, current_identity, is_mutation
from server.authz import (
    ADMIN_RPCS,
    Level,
    NamespaceAccess,
    Principal,
    current_principal,
    scope_level,
)
from server.binding import BindError
from server.patterns import Exposed


def method_level(service: str, method: str) -> Level:
    """The level an RPC of a service that does not authorize itself needs."""
    if method in ADMIN_RPCS:
        return Level.ADMIN
    return Level.WRITE if is_mutation(f"/{service}/{method}") else Level.READ


def namespace_not_found(namespace: str, interface: str) -> errors.NotFound:
    """A namespace this server lacks, or one the caller's organization is not granted: the
    same answer, so the caller learns nothing about namespaces it may not use."""
    return errors.NotFound(
        f"namespace '{namespace}' is not configured on this server",
        reason="NAMESPACE_NOT_FOUND",
        namespace=namespace,
        interface=interface,
    )


@lru_cache(maxsize=4096)
def effective_principal(identity: Identity, grant: Level) -> Principal:
    """Remembered: building a Principal costs several times the rest of the check, and a
    key's identity is one value until its record changes (a new Identity, a new entry)."""
    return identity.principal(grant)


def admitted(identity: Identity, access: NamespaceAccess) -> Principal | None:
    """The caller's effective principal in the namespace; None when the namespace grants its
    organization nothing or the key's scopes leave it out. A server admin ignores `access:`
    maps; scopes bind every key."""
    grant = scope_level(identity.scopes, access.name)
    if not identity.server_admin:
        grant = min(grant, access.grant(identity.organization))
    return None if grant is Level.NONE else effective_principal(identity, grant)


def authorize(
    identity: Identity, access: NamespaceAccess, needed: Level, rpc: str, interface: str
) -> None:
    """Make the caller's effective principal in the namespace the call's, or refuse: NOT_FOUND
    when its organization is not granted, ROLE_REQUIRED below `needed`. A server admin passes."""
    principal = admitted(identity, access)
    if principal is None:
        raise namespace_not_found(access.name, interface)
    if principal.level < needed:
        raise errors.PermissionDenied(
            f"{rpc} needs {needed.label} access in namespace '{access.name}'; "
            f"this API key has {principal.level.label}",
            reason="ROLE_REQUIRED",
            required=needed.label,
            level=principal.level.label,
            namespace=access.name,
            interface=interface,
        )
    current_principal.set(principal)


class Router:
    """Which namespace serves which service with which object, and who may reach it."""

    def __init__(self, namespaces: Iterable[NamespaceConfig]) -> None:
        self.access = {ns.name: NamespaceAccess.of(ns.name, ns.access) for ns in namespaces}
        self.routes: dict[str, dict[str, Target]] = {}
        #: (service, namespace) pairs whose object checks permissions itself (finer rules)
        self.self_authorizing: set[tuple[str, str]] = set()
        self.descriptors: dict[str, ServiceDescriptor] = {}

    def add(self, namespace: str, exposed: Exposed) -> None:
        name = exposed.service.full_name
        by_namespace = self.routes.setdefault(name, {})
        if namespace in by_namespace:
            raise BindError(f"namespace '{namespace}' serves {name} from two slots")
        self.descriptors[name] = exposed.service
        by_namespace[namespace] = Target(namespace, exposed.impl, dict(exposed.labels))
        if exposed.authorizes:
            self.self_authorizing.add((name, namespace))

    @property
    def services(self) -> list[str]:
        return sorted(self.routes)

    def resolver(self, service: str, method: MethodDescriptor) -> Resolver:
        """The resolver of one RPC: the level it needs in each namespace is settled here, so a
        call costs a dictionary lookup and a comparison."""
        by_namespace = self.routes[service]
        level = method_level(service, method.name)
        #: namespace → (target, its access, the level this RPC needs there)
        routes = {
            ns: (
                target,
                self.access[ns],
                Level.NONE if (service, ns) in self.self_authorizing else level,
            )
            for ns, target in by_namespace.items()
        }
        only = next(iter(routes.values())) if len(routes) == 1 else None
        interface = next(iter(by_namespace.values())).labels.get("interface", service)
        rpc = f"{service}/{method.name}"

        def resolve(requested: str) -> Target:
            route = routes.get(requested) if requested else only
            if route is None:
                if not requested:
                    candidates = ", ".join(self.reachable(sorted(by_namespace)))
                    raise errors.InvalidArgument(
                        NAMESPACE_HEADER,
                        f"several namespaces serve {service} ({candidates}); "
                        f"send one of them in the {NAMESPACE_HEADER} metadata",
                        reason="NAMESPACE_AMBIGUOUS",
                        candidates=candidates,
                        interface=interface,
                    )
                access = self.access.get(requested)
                if access is None:
                    raise namespace_not_found(requested, interface)
                identity = current_identity.get()
                if identity is not None:
                    authorize(identity, access, Level.NONE, rpc, interface)
                raise errors.Unimplemented(
                    f"namespace '{requested}' does not serve {service}",
                    namespace=requested,
                    interface=interface,
                )
            target, access, needed = route
            identity = current_identity.get()
            if identity is not None:  # None: auth is off, the call stays the system's
                authorize(identity, access, needed, rpc, interface)
            return target

        return resolve

    def reachable(self, namespaces: Iterable[str]) -> list[str]:
        """Those of `namespaces` the caller's organization is granted (all with auth off): the
        only ones an error may name to it."""
        identity = current_identity.get()
        if identity is None:
            return list(namespaces)
        return [ns for ns in namespaces if admitted(identity, self.access[ns]) is not None]

    def handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        return [
            method_routed_handler(self.descriptors[s], partial(self.resolver, s))
            for s in self.services
        ]
