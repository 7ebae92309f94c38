"""`prismctl validate CONFIG...`: MEMO-006's ✓/✗ report per namespace and slot, then the
located findings (text), or the versioned JSON document."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prismctl.cli_common import EXIT_FINDINGS, EXIT_INTERNAL, EXIT_OK, registry_from_args
from prismctl.config import ConfigResult, NamespaceConfig, duplicate_namespaces, load_config
from prismctl.diagnostics import Diagnostic, has_errors, render_json, render_text
from prismctl.registry import BackendSpec, Registry


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="check namespace config files against the registry")
    p.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    results = [load_config(path, reg) for path in args.configs]
    cross = duplicate_namespaces(results) if len(results) > 1 else []
    diagnostics = [d for r in results for d in r.diagnostics] + cross
    io_error = any(r.io_error for r in results)
    if args.format == "json":
        print(render_json(diagnostics, files=[r.source for r in results]))
    else:
        print(_render(results, cross, reg))
    if io_error:
        return EXIT_INTERNAL
    return EXIT_FINDINGS if has_errors(diagnostics) else EXIT_OK


def _render(results: list[ConfigResult], cross: list[Diagnostic], reg: Registry) -> str:
    out: list[str] = []
    shown = False
    for result in results:
        for ns in result.namespaces:
            out += _layout(ns, reg)
            shown = True
        if result.diagnostics:
            out.append(render_text(result.diagnostics))
    if cross:
        out.append(render_text(cross))
    every = [d for r in results for d in r.diagnostics] + cross
    errors = sum(d.severity == "error" for d in every)
    if shown or not every:
        out.append(
            "✅ Configuration valid"
            if not errors
            else f"❌ Configuration invalid: {errors} error(s)"
        )
    return "\n".join(out)


def _mark(iid: str, backend: BackendSpec) -> str:
    if iid in backend.implements:
        return f"      ✓ {iid} ({backend.name} implements)"
    return f"      ✗ {iid} ({backend.name} does not implement)"


def _layout(ns: NamespaceConfig, reg: Registry) -> list[str]:
    """The MEMO-006 report: pattern, then per slot its backend and interfaces with ✓/✗."""
    lines = [f"Validating namespace: {ns.name}"]
    pattern = reg.patterns.get(ns.pattern)
    if pattern is None:
        return [*lines, f"  Pattern: {ns.pattern} ✗ (unknown pattern)", ""]
    version_ok = ns.pattern_version == pattern.version
    lines.append(
        f"  Pattern: {pattern.name} {ns.pattern_version}"
        + ("" if version_ok else f" ✗ (only {pattern.version} exists)")
    )
    for slot_name, spec in pattern.slots.items():
        slot = ns.slots.get(slot_name)
        if slot is None:
            if not spec.optional:
                lines.append(f"  Slot: {slot_name} ✗ (required, not filled)")
            continue
        lines.append(f"  Slot: {slot_name}")
        backend = reg.backends.get(slot.backend)
        if backend is None:
            lines.append(f"    Backend: {slot.backend} ✗ (unknown backend)")
            continue
        lines.append(f"    Backend: {backend.name}")
        lines.append("    Required interfaces:")
        lines += [_mark(i, backend) for i in spec.required_interfaces]
        optional = [i for i in slot.interfaces if i not in spec.required_interfaces]
        if optional:
            lines.append("    Optional interfaces:")
            for iid in optional:
                if iid in spec.optional_interfaces:
                    lines.append(_mark(iid, backend))
                else:
                    lines.append(f"      ✗ {iid} (not used by slot {slot_name})")
    lines += [
        f"  Slot: {name} ✗ (no such slot in {pattern.name})"
        for name in ns.slots
        if name not in pattern.slots
    ]
    lines.append("")
    return lines
