"""The executor of patterns that expose their slots' thin interfaces as they are (`direct`,
`keyvalue`): each filled slot serves the interfaces it was bound with."""

from __future__ import annotations

from plugins.runtime.interfaces import catalog
from server.patterns import BoundNamespace, Exposed


async def expose(namespace: BoundNamespace) -> list[Exposed]:
    known = catalog()
    exposed: list[Exposed] = []
    for slot, binding in namespace.slots.items():
        for iid, impl in binding.implementations.items():
            labels = {
                "backend": binding.backend,
                "interface": iid,
                "namespace": namespace.name,
                "slot": slot,
            }
            exposed.append(Exposed(known[iid].service, impl, labels, (slot,)))
    return exposed
