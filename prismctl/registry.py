"""The schema registry as Python objects: interfaces, backends, patterns and capabilities,
loaded from registry/ (plus backend YAMLs shipped by third-party plugins), every entry keeping
the file:line:col it came from so findings can point at it."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prismctl.diagnostics import Diagnostic, Location
from prismctl.source import IOProblem, Source, load_yaml, schema_diagnostics

Status = Literal["available", "planned"]
ENTRY_POINT_GROUP = "prism.backends"
REGISTRY_ENV = "PRISM_REGISTRY_DIR"
SLOT_INTERFACES = "slot-interfaces"


def default_root() -> Path:
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "registry"


@dataclass(frozen=True)
class InterfaceSpec:
    id: str
    model: str
    flavor: str
    status: Status
    proto_file: str
    service: str
    rpcs: list[str]
    guarantees: str
    location: Location


@dataclass(frozen=True)
class ModelSpec:
    model: str
    display_name: str
    package: str
    interfaces: list[str]
    location: Location


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    status: Status
    version: str
    plugin_class: str | None
    connection_string_format: str
    connection_pattern: str
    default_connection: str
    implements: list[str]
    config_schema: dict[str, Any]
    notes: str
    source_file: str
    location: Location
    implements_location: Location
    implements_locations: dict[str, Location]
    builtin: bool = True


@dataclass(frozen=True)
class SlotSpec:
    name: str
    description: str
    required_interfaces: list[str]
    optional_interfaces: list[str]
    recommended_backends: list[str]
    optional: bool
    location: Location
    recommended_locations: dict[str, Location]

    @property
    def interfaces(self) -> list[str]:
        return [*self.required_interfaces, *self.optional_interfaces]


@dataclass(frozen=True)
class PatternSpec:
    name: str
    version: str
    description: str
    slots: dict[str, SlotSpec]
    exposes: str
    min_filled_slots: int
    location: Location


@dataclass(frozen=True)
class CapabilitySpec:
    name: str
    interface: str
    description: str
    location: Location


@dataclass
class Registry:
    root: Path
    interfaces: dict[str, InterfaceSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    patterns: dict[str, PatternSpec] = field(default_factory=dict)
    capabilities: dict[str, CapabilitySpec] = field(default_factory=dict)
    #: problems met while loading (unreadable files, schema violations, duplicates)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def schema_dir(self) -> Path:
        return self.root / "schemas"

    @property
    def matrix_path(self) -> Path:
        return self.root / "matrix.yaml"

    def display(self, path: Path) -> str:
        """Paths relative to the current directory when possible: shorter, clickable."""
        try:
            return str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def implementers(self, interface_ids: list[str]) -> list[BackendSpec]:
        """Backends implementing every one of `interface_ids`, in name order."""
        need = set(interface_ids)
        return [b for b in self.backends.values() if need <= set(b.implements)]

    def capabilities_of(self, backend: BackendSpec, model: str | None = None) -> list[str]:
        return [
            c.name
            for c in self.capabilities.values()
            if c.interface in backend.implements
            and (model is None or c.interface.startswith(f"{model}_"))
        ]


def load_registry(root: Path | None = None) -> Registry:
    """Load everything; never raises for bad content — problems land in `diagnostics`."""
    reg = Registry(root or default_root())
    for path in sorted((reg.root / "interfaces").glob("*.yaml")):
        src = _load(reg, path, "interface.schema.json")
        if src is not None:
            _add_model(reg, src)
    for path in sorted((reg.root / "backends").glob("*.yaml")):
        src = _load(reg, path, "backend.schema.json")
        if src is not None:
            _add_backend(reg, src, builtin=True)
    _load_entry_point_backends(reg)
    for path in sorted((reg.root / "patterns").glob("*.yaml")):
        src = _load(reg, path, "pattern.schema.json")
        if src is not None:
            _add_pattern(reg, src)
    src = _load(reg, reg.root / "capabilities.yaml", "capabilities.schema.json")
    if src is not None:
        for name, entry in src.data["capabilities"].items():
            reg.capabilities[name] = CapabilitySpec(
                name,
                entry["interface"],
                entry.get("description", ""),
                src.key_at(("capabilities", name)),
            )
    return reg


def _load(reg: Registry, path: Path, schema: str) -> Source | None:
    """Parsed and schema-valid document, or None with the reasons recorded."""
    try:
        src = load_yaml(path, reg.display(path))
    except IOProblem as exc:
        reg.diagnostics.append(exc.diagnostic)
        return None
    if src.ok:
        src.diagnostics.extend(schema_diagnostics(src, reg.schema_dir / schema))
    reg.diagnostics.extend(src.diagnostics)
    return src if src.ok else None


def _duplicate(reg: Registry, kind: str, name: str, here: Location, first: Location) -> None:
    reg.diagnostics.append(
        Diagnostic.at(
            here,
            "REGISTRY_DUPLICATE",
            f"{kind} '{name}' is defined twice",
            "remove one definition",
            related=[first.noted("first defined here")],
        )
    )


def _add_model(reg: Registry, src: Source) -> None:
    data = src.data
    model = data["model"]
    ids: list[str] = []
    for i, entry in enumerate(data["interfaces"]):
        loc = src.at(("interfaces", i))
        iid = entry["id"]
        if iid in reg.interfaces:
            _duplicate(reg, "interface", iid, loc, reg.interfaces[iid].location)
            continue
        ids.append(iid)
        reg.interfaces[iid] = InterfaceSpec(
            id=iid,
            model=model,
            flavor=entry["flavor"],
            status=entry.get("status", data.get("status", "available")),
            proto_file=entry["proto_file"],
            service=entry["service"],
            rpcs=list(entry["rpcs"]),
            guarantees=" ".join(entry.get("guarantees", "").split()),
            location=loc,
        )
    loc = src.at(())
    if model in reg.models:
        _duplicate(reg, "model", model, loc, reg.models[model].location)
        return
    reg.models[model] = ModelSpec(model, data["display_name"], data["package"], ids, loc)


def _add_backend(
    reg: Registry, src: Source, *, builtin: bool, plugin_class: str | None = None
) -> None:
    data = src.data
    name = data["backend"]
    loc = src.at(("backend",))
    if name in reg.backends:
        _duplicate(reg, "backend", name, loc, reg.backends[name].location)
        return
    implements = list(data["implements"])
    reg.backends[name] = BackendSpec(
        name=name,
        description=data.get("description", ""),
        status=data["status"],
        version=str(data.get("version", "")),
        plugin_class=data.get("plugin_class") or plugin_class,
        connection_string_format=data["connection_string_format"],
        connection_pattern=data["connection_pattern"],
        default_connection=data["default_connection"],
        implements=implements,
        config_schema=data["config_schema"],
        notes=" ".join(str(data.get("notes", "")).split()),
        source_file=src.file,
        location=loc,
        implements_location=src.key_at(("implements",)),
        implements_locations={iid: src.at(("implements", i)) for i, iid in enumerate(implements)},
        builtin=builtin,
    )


def _load_entry_point_backends(reg: Registry) -> None:
    """Third-party plugins: entry point name → "module:Class" whose `backend_yaml` ClassVar
    names the backend YAML they ship."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = Location(f"entry point {ep.name} = {ep.value}", 1, 1)
        try:
            cls = ep.load()
            yaml_path = Path(cls.backend_yaml)
        except Exception as exc:  # a broken third-party package must not crash prismctl
            reg.diagnostics.append(
                Diagnostic.at(
                    where,
                    "ENTRY_POINT",
                    f"cannot load backend plugin: {type(exc).__name__}: {exc}",
                    f"fix or uninstall the package providing '{ep.name}'",
                )
            )
            continue
        src = _load(reg, yaml_path, "backend.schema.json")
        if src is not None:
            _add_backend(reg, src, builtin=False, plugin_class=ep.value)


def _add_pattern(reg: Registry, src: Source) -> None:
    data = src.data
    name = data["pattern"]
    slots: dict[str, SlotSpec] = {}
    for slot_name, s in data["slots"].items():
        recommended = list(s.get("recommended_backends", []))
        slots[slot_name] = SlotSpec(
            name=slot_name,
            description=s.get("description", ""),
            required_interfaces=list(s["required_interfaces"]),
            optional_interfaces=list(s.get("optional_interfaces", [])),
            recommended_backends=recommended,
            optional=bool(s.get("optional", False)),
            location=src.key_at(("slots", slot_name)),
            recommended_locations={
                b: src.at(("slots", slot_name, "recommended_backends", i))
                for i, b in enumerate(recommended)
            },
        )
    loc = src.at(("pattern",))
    if name in reg.patterns:
        _duplicate(reg, "pattern", name, loc, reg.patterns[name].location)
        return
    reg.patterns[name] = PatternSpec(
        name=name,
        version=data["version"],
        description=data.get("description", ""),
        slots=slots,
        exposes=data["exposes"],
        min_filled_slots=int(data.get("min_filled_slots", 0)),
        location=loc,
    )
