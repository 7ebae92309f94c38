"""Backend name → running plugin instance, checked against its registry declaration.

Built-in backends name their class in `plugin_class` of registry/backends/<name>.yaml;
third-party packages register one in the `prism.backends` entry point group (prismctl.registry
reads both). Loading fails fast, naming the YAML file and the interface, when the declaration
and the code disagree, so a plugin can never claim an interface it does not serve.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from plugins.runtime.base import BackendPlugin
from plugins.runtime.interfaces import catalog, missing_methods
from prismctl.registry import BackendSpec, Registry, load_registry


class PluginLoadError(Exception):
    """A backend that cannot be loaded; the message names the backend, file and interface."""


def backend_spec(name: str, registry: Registry | None = None) -> BackendSpec:
    reg = registry or load_registry()
    spec = reg.backends.get(name)
    if spec is None:
        known = ", ".join(sorted(reg.backends)) or "none"
        raise PluginLoadError(f"unknown backend '{name}' (known backends: {known})")
    return spec


def plugin_class(spec: BackendSpec) -> type[BackendPlugin]:
    """The class `spec` names; a planned backend or an unimportable class is a clear error."""
    if spec.status == "planned" or not spec.plugin_class:
        raise PluginLoadError(
            f"backend '{spec.name}' is planned, not implemented yet ({spec.source_file})"
        )
    module_name, _, attr = spec.plugin_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(
            f"backend '{spec.name}': cannot import plugin_class {spec.plugin_class} "
            f"({spec.source_file}): {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, BackendPlugin)):
        raise PluginLoadError(
            f"backend '{spec.name}': {spec.plugin_class} ({spec.source_file}) "
            "is not a BackendPlugin subclass"
        )
    return cls


def config_errors(
    spec: BackendSpec, config: Mapping[str, Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Violations of the backend's config_schema and connection string format (the checks
    `prismctl validate` makes on a slot's config block): (path inside the config, problem)."""
    validator = Draft202012Validator(spec.config_schema)
    found: list[tuple[tuple[str | int, ...], str]] = [
        (tuple(err.absolute_path), err.message)
        for err in sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path))
    ]
    connection = config.get("connection")
    if isinstance(connection, str) and not re.fullmatch(spec.connection_pattern, connection):
        found.append(
            (
                ("connection",),
                f"'{connection}' does not match {spec.name}'s format "
                f"{spec.connection_string_format}",
            )
        )
    return found


def describe_path(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "config"


def check_declaration(plugin: BackendPlugin, spec: BackendSpec) -> None:
    """Declared `implements` ⇔ `implementations()`, both directions, and every object has every
    contract method. Raises PluginLoadError naming the file and interface on the first mismatch
    set found."""
    impls = plugin.implementations()
    declared = set(spec.implements)
    problems: list[str] = []
    for iid in sorted(declared - impls.keys()):
        problems.append(f"declares '{iid}' but {type(plugin).__name__} does not implement it")
    for iid in sorted(impls.keys() - declared):
        problems.append(f"does not declare '{iid}' but {type(plugin).__name__} implements it")
    known = catalog()
    for iid in sorted(declared & impls.keys()):
        if iid not in known:
            problems.append(f"'{iid}' has no generated contract (unknown or planned interface)")
            continue
        missing = missing_methods(iid, impls[iid])
        if missing:
            problems.append(f"'{iid}' implementation lacks {', '.join(missing)}")
    if problems:
        raise PluginLoadError(f"backend '{spec.name}' ({spec.source_file}): " + "; ".join(problems))


def load_plugin(
    name: str,
    config: Mapping[str, Any],
    data_dir: Path,
    registry: Registry | None = None,
) -> BackendPlugin:
    """Construct backend `name` with a schema-checked config and verify its declaration. The
    plugin is not started; the caller owns start()/close()."""
    spec = backend_spec(name, registry)
    return instantiate(plugin_class(spec), spec, config, data_dir)


def instantiate(
    cls: type[BackendPlugin], spec: BackendSpec, config: Mapping[str, Any], data_dir: Path
) -> BackendPlugin:
    errors = config_errors(spec, config)
    if errors:
        raise PluginLoadError(
            f"backend '{spec.name}': invalid config ({spec.source_file} config_schema): "
            + "; ".join(f"{describe_path(path)}: {problem}" for path, problem in errors)
        )
    plugin = cls(config, data_dir=data_dir)
    check_declaration(plugin, spec)
    return plugin
