"""Pattern executors: what a bound namespace serves.

A pattern whose registry YAML says `exposes: slot-interfaces` (direct, keyvalue) is served by
`slot_interfaces`. Any other pattern is served by the module `server.patterns.<pattern_name>`
(dashes → underscores) providing `async def expose(namespace: BoundNamespace) -> list[Exposed]`.
Executors see only contract objects, never which backend or mode fills a slot.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.descriptor import ServiceDescriptor

from prismctl.registry import SLOT_INTERFACES, PatternSpec
from server.binding import BindError, SlotBinding
from server.crypto import Keyring


@dataclass(frozen=True)
class BoundNamespace:
    """What an executor gets: the namespace's filled slots as contract objects. An executor that
    starts background work appends its cleanup to `on_close`; the server awaits each on stop,
    before closing the plugins the slots use. `keyring` encrypts data at rest: the configured
    one, else the data directory's (`Keyring.beside_data`, which the secret vault refuses); None
    only where a server is assembled without create_server."""

    name: str
    pattern: PatternSpec
    slots: Mapping[str, SlotBinding]
    on_close: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    keyring: Keyring | None = None


@dataclass(frozen=True)
class Exposed:
    """One gRPC service a namespace serves: the object answering it, ErrorInfo labels, and the
    slots whose health it depends on. The router checks each RPC's level (read/write/admin) in
    the namespace unless `authorizes`: such a service applies finer rules itself to the
    effective principal (server.authz.current_principal) the router sets."""

    service: ServiceDescriptor
    impl: object
    labels: Mapping[str, str] = field(default_factory=dict)
    slots: tuple[str, ...] = ()
    authorizes: bool = False


Executor = Callable[[BoundNamespace], Awaitable[list[Exposed]]]


def executor_for(pattern: PatternSpec) -> Executor:
    if pattern.exposes == SLOT_INTERFACES:
        from server.patterns import slot_interfaces

        return slot_interfaces.expose
    module_name = f"server.patterns.{pattern.name.replace('-', '_')}"
    try:
        expose: Executor = importlib.import_module(module_name).expose
    except (ImportError, AttributeError) as exc:
        raise BindError(
            f"pattern '{pattern.name}' has no usable executor in this server "
            f"({module_name}.expose: {exc})"
        ) from None
    return expose
