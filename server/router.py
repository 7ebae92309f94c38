"""Namespace routing: one generic gRPC handler per served service, picking per call the
namespace from `x-prism-namespace` (or the only namespace serving that service)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from plugins.runtime import errors
from plugins.runtime.grpc_adapter import NAMESPACE_HEADER, Resolver, Target, service_handler
from server.binding import BindError
from server.patterns import Exposed


class Router:
    """Which namespace serves which service with which object."""

    def __init__(self, namespaces: Iterable[str]) -> None:
        self.namespaces = frozenset(namespaces)
        self.routes: dict[str, dict[str, Target]] = {}
        self.descriptors: dict[str, ServiceDescriptor] = {}

    def add(self, namespace: str, exposed: Exposed) -> None:
        name = exposed.service.full_name
        by_namespace = self.routes.setdefault(name, {})
        if namespace in by_namespace:
            raise BindError(f"namespace '{namespace}' serves {name} from two slots")
        self.descriptors[name] = exposed.service
        by_namespace[namespace] = Target(namespace, exposed.impl, dict(exposed.labels))

    @property
    def services(self) -> list[str]:
        return sorted(self.routes)

    def resolver(self, service: str) -> Resolver:
        by_namespace = self.routes[service]
        only = next(iter(by_namespace.values())) if len(by_namespace) == 1 else None
        interface = next(iter(by_namespace.values())).labels.get("interface", service)
        candidates = ", ".join(sorted(by_namespace))

        def resolve(requested: str) -> Target:
            if not requested:
                if only is not None:
                    return only
                raise errors.InvalidArgument(
                    NAMESPACE_HEADER,
                    f"several namespaces serve {service} ({candidates}); "
                    f"send one of them in the {NAMESPACE_HEADER} metadata",
                    reason="NAMESPACE_AMBIGUOUS",
                    candidates=candidates,
                    interface=interface,
                )
            target = by_namespace.get(requested)
            if target is not None:
                return target
            if requested not in self.namespaces:
                raise errors.NotFound(
                    f"namespace '{requested}' is not configured on this server",
                    reason="NAMESPACE_NOT_FOUND",
                    namespace=requested,
                    interface=interface,
                )
            raise errors.Unimplemented(
                f"namespace '{requested}' does not serve {service}",
                namespace=requested,
                interface=interface,
            )

        return resolve

    def handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        return [service_handler(self.descriptors[s], self.resolver(s)) for s in self.services]
