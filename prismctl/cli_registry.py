"""`prismctl registry ...`: validate the registry and answer questions about it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prismctl.cli_common import EXIT_FINDINGS, EXIT_OK, CliError, registry_from_args
from prismctl.cli_common import write_atomically as write_file
from prismctl.diagnostics import has_errors, render_json, render_text
from prismctl.registry import SLOT_INTERFACES, BackendSpec, Registry, load_registry
from prismctl.registry_check import matrix_data, matrix_yaml, validate_registry


def register(sub: Any) -> None:
    reg_parser = sub.add_parser("registry", help="validate and query the schema registry")
    reg_sub = reg_parser.add_subparsers(dest="registry_command", metavar="WHAT", required=True)

    p = reg_sub.add_parser("validate", help="check every registry file and cross-reference")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_validate)

    patterns = reg_sub.add_parser("patterns", help="list or describe patterns")
    pat_sub = patterns.add_subparsers(dest="patterns_command", metavar="ACTION", required=True)
    pat_sub.add_parser("list", help="every pattern").set_defaults(func=cmd_patterns_list)
    p = pat_sub.add_parser("describe", help="one pattern's slots")
    p.add_argument("pattern")
    p.set_defaults(func=cmd_patterns_describe)

    backends = reg_sub.add_parser("backends", help="list, describe or find backends")
    be_sub = backends.add_subparsers(dest="backends_command", metavar="ACTION", required=True)
    be_sub.add_parser("list", help="every backend").set_defaults(func=cmd_backends_list)
    p = be_sub.add_parser("describe", help="one backend's interfaces and config")
    p.add_argument("backend")
    p.set_defaults(func=cmd_backends_describe)
    p = be_sub.add_parser("find", help="backends implementing an interface and capabilities")
    p.add_argument(
        "--interface", required=True, help="a model (keyvalue) or an interface id (keyvalue_scan)"
    )
    p.add_argument("--capability", action="append", default=[], help="e.g. scan_support")
    p.set_defaults(func=cmd_backends_find)

    p = reg_sub.add_parser("matrix", help="the backend × interface matrix")
    p.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    p.add_argument("--write", action="store_true", help="regenerate registry/matrix.yaml")
    p.set_defaults(func=cmd_matrix)


def cmd_validate(args: argparse.Namespace) -> int:
    reg = load_registry(args.registry)
    found = validate_registry(reg)
    if args.format == "json":
        print(render_json(found))
    else:
        if found:
            print(render_text(found))
        if has_errors(found):
            errors = sum(d.severity == "error" for d in found)
            print(f"❌ registry invalid: {errors} error(s)")
        else:
            print(
                f"✅ registry valid: {len(reg.interfaces)} interfaces, {len(reg.backends)} "
                f"backends, {len(reg.patterns)} patterns, {len(reg.capabilities)} capabilities"
            )
    return EXIT_FINDINGS if has_errors(found) else EXIT_OK


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_patterns_list(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    print(_table([[p.name, p.version, p.description] for p in reg.patterns.values()]))
    return EXIT_OK


def _pattern(reg: Registry, name: str) -> Any:
    spec = reg.patterns.get(name)
    if spec is None:
        raise CliError(
            f"unknown pattern '{name}' (known: {', '.join(reg.patterns)})", EXIT_FINDINGS
        )
    return spec


def _capabilities_for(reg: Registry, interfaces: list[str]) -> list[str]:
    return [c.name for c in reg.capabilities.values() if c.interface in interfaces]


def cmd_patterns_describe(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    p = _pattern(reg, args.pattern)
    exposes = (
        "each slot's thin interfaces, as they are" if p.exposes == SLOT_INTERFACES else p.exposes
    )
    lines = [f"Pattern: {p.name} {p.version}", f"  {p.description}", f"Exposes: {exposes}"]
    if p.min_filled_slots:
        lines.append(f"At least {p.min_filled_slots} slot(s) must be filled.")
    lines.append("Slots:")
    for s in p.slots.values():
        fits = [b.name for b in reg.implementers(s.required_interfaces)]
        lines += [
            f"  {s.name} ({'optional' if s.optional else 'required'}): {s.description}",
            f"    Required interfaces: {', '.join(s.required_interfaces)}",
            f"    Optional interfaces: {', '.join(s.optional_interfaces) or '-'}",
            f"    Required capabilities: "
            f"{', '.join(_capabilities_for(reg, s.required_interfaces)) or '-'}",
            f"    Optional capabilities: "
            f"{', '.join(_capabilities_for(reg, s.optional_interfaces)) or '-'}",
            f"    Recommended backends: {', '.join(s.recommended_backends) or '-'}",
            f"    Satisfied by: {', '.join(fits) or 'no backend'}",
        ]
    print("\n".join(lines))
    return EXIT_OK


def cmd_backends_list(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    rows = [
        [b.name, b.status, f"{len(b.implements)} interfaces", b.description]
        for b in sorted(reg.backends.values(), key=lambda b: b.name)
    ]
    print(_table(rows))
    return EXIT_OK


def cmd_backends_describe(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    b = reg.backends.get(args.backend)
    if b is None:
        raise CliError(
            f"unknown backend '{args.backend}' (known: {', '.join(sorted(reg.backends))})",
            EXIT_FINDINGS,
        )
    lines = [
        f"Backend: {b.name} {b.version} ({b.status})",
        f"  {b.description}",
        f"Plugin: {b.plugin_class or '-'}",
        f"Declared in: {b.source_file}",
        f"Connection: {b.connection_string_format} (default {b.default_connection})",
        "Implements:",
    ]
    for model in reg.models.values():
        mine = [i for i in model.interfaces if i in b.implements]
        if mine:
            lines.append(f"  {model.display_name}: {', '.join(mine)}")
    lines.append(f"Capabilities: {', '.join(reg.capabilities_of(b)) or '-'}")
    props: dict[str, Any] = b.config_schema.get("properties", {})
    required = set(b.config_schema.get("required", []))
    lines.append("Config keys:")
    for key, schema in props.items():
        kind = schema.get("type", "any")
        lines.append(f"  {key} ({kind}{', required' if key in required else ''})")
    if b.notes:
        lines.append(f"Notes: {b.notes}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_backends_find(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    wanted = args.interface
    if wanted in reg.models:
        model = wanted
        base = reg.models[wanted].interfaces[0]
    elif wanted in reg.interfaces:
        model, base = reg.interfaces[wanted].model, wanted
    else:
        raise CliError(
            f"unknown interface or model '{wanted}' (models: {', '.join(reg.models)})",
            EXIT_FINDINGS,
        )
    needed = [base]
    for cap in args.capability:
        spec = reg.capabilities.get(cap)
        if spec is None:
            raise CliError(
                f"unknown capability '{cap}' (known: {', '.join(reg.capabilities)})",
                EXIT_FINDINGS,
            )
        needed.append(spec.interface)
    matches: list[BackendSpec] = reg.implementers(needed)
    if not matches:
        print(f"no backend implements {', '.join(needed)}")
        return EXIT_FINDINGS
    rows = []
    for b in matches:
        caps = reg.capabilities_of(b, model)
        with_caps = f" with {', '.join(caps)}" if caps else ""
        status = " (planned)" if b.status == "planned" else ""
        rows.append([b.name, f"✓ {wanted}{with_caps}{status}"])
    print(_table(rows))
    return EXIT_OK


def cmd_matrix(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    if args.write:
        write_file(reg.matrix_path, matrix_yaml(reg))
        print(f"wrote {reg.display(reg.matrix_path)}")
        return EXIT_OK
    data = matrix_data(reg)
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return EXIT_OK
    names = list(data["backends"])
    cells = [
        [iid] + ["✓" if iid in data["backends"][n]["implements"] else "·" for n in names]
        for iid in data["interfaces"]
    ]
    if args.format == "markdown":
        print("| interface | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        print("\n".join("| " + " | ".join(row) + " |" for row in cells))
    else:
        print(_table([["interface", *names], *cells]))
    return EXIT_OK
