"""What a backend plugin is: a typed config in, contract implementations out.

A plugin class lives in plugins/<name>/ and is named by `plugin_class` in
registry/backends/<name>.yaml (built-ins) or by an entry point in the `prism.backends` group
(third-party packages). The runtime checks, when it loads a plugin, that the interfaces it
declares in YAML and the ones `implementations()` returns are the same set, and that every object
has every method of its interface's contract (plugins/runtime/interfaces.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar


class BackendPlugin(ABC):
    """Base class of every backend plugin.

    One instance serves one slot binding (or one sidecar). Data is scoped per call by
    `CallContext.namespace`, never by instance, so a sidecar shared by several namespaces still
    keeps their keys apart.
    """

    #: backend name, equal to the `backend:` of its registry YAML
    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        """`config` has already been validated against the backend's JSON Schema; `data_dir` is
        where embedded backends keep files."""
        self.raw_config = dict(config)
        self.data_dir = data_dir

    @abstractmethod
    def implementations(self) -> Mapping[str, object]:
        """Interface id → object implementing that interface's contract Protocol."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, migrate, start background tasks. Must be idempotent and must not hang:
        an unreachable database raises runtime.errors.Unavailable."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and stop background tasks."""

    async def check_health(self) -> bool:
        """True when the backend answers right now. Called by the health reporter."""
        return True

    def details(self) -> dict[str, str]:
        """Facts for PluginService.Describe (e.g. isolation level, server version)."""
        return {}
