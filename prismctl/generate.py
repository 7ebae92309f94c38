"""`prismctl generate config`: a namespace config whose every slot is satisfied, with default
connection strings — checked by the same validator before it is emitted."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prismctl.cli_common import (
    EXIT_FINDINGS,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    registry_from_args,
    write_atomically,
)
from prismctl.config import validate_config_data
from prismctl.diagnostics import has_errors, render_text
from prismctl.registry import BackendSpec, PatternSpec, Registry, SlotSpec


@dataclass(frozen=True)
class Impossible(Exception):
    """The request cannot be met; the message says why."""

    reason: str


def register(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate configuration")
    gen_sub = gen.add_subparsers(dest="generate_command", metavar="WHAT", required=True)
    p = gen_sub.add_parser("config", help="a namespace config for a pattern")
    p.add_argument("--pattern", required=True)
    p.add_argument(
        "--slot",
        action="append",
        default=[],
        metavar="SLOT:BACKEND",
        help="fill SLOT with BACKEND (repeatable); unnamed required slots are chosen for you",
    )
    p.add_argument("--namespace", required=True)
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here, not stdout")
    p.set_defaults(func=cmd_generate)


def rank(reg: Registry, slot: SlotSpec, backend: BackendSpec) -> tuple[int, int, int, str]:
    """Available before planned, then the pattern's recommended order, then the most optional
    interfaces, then name (so the choice is deterministic)."""
    order = slot.recommended_backends
    position = order.index(backend.name) if backend.name in order else len(order)
    optional = sum(i in backend.implements for i in slot.optional_interfaces)
    return (backend.status != "available", position, -optional, backend.name)


def choose_backend(reg: Registry, slot: SlotSpec) -> BackendSpec:
    candidates = reg.implementers(slot.required_interfaces)
    if not candidates:
        raise Impossible(
            f"no backend implements {', '.join(slot.required_interfaces)} for slot '{slot.name}'"
        )
    return min(candidates, key=lambda b: rank(reg, slot, b))


def slot_entry(slot: SlotSpec, backend: BackendSpec) -> dict[str, Any]:
    return {
        "backend": backend.name,
        "interfaces": [i for i in slot.interfaces if i in backend.implements],
        "config": {"connection": backend.default_connection},
    }


def generate_config(
    reg: Registry, pattern_name: str, chosen: dict[str, str], namespace: str
) -> dict[str, Any]:
    pattern: PatternSpec | None = reg.patterns.get(pattern_name)
    if pattern is None:
        raise Impossible(f"unknown pattern '{pattern_name}' (known: {', '.join(reg.patterns)})")
    slots: dict[str, dict[str, Any]] = {}
    for slot_name, backend_name in chosen.items():
        slot = pattern.slots.get(slot_name)
        if slot is None:
            raise Impossible(
                f"pattern '{pattern.name}' has no slot '{slot_name}' "
                f"(slots: {', '.join(pattern.slots)})"
            )
        backend = reg.backends.get(backend_name)
        if backend is None:
            raise Impossible(
                f"unknown backend '{backend_name}' (known: {', '.join(sorted(reg.backends))})"
            )
        lacking = [i for i in slot.required_interfaces if i not in backend.implements]
        if lacking:
            fits = ", ".join(b.name for b in reg.implementers(slot.required_interfaces))
            raise Impossible(
                f"backend '{backend_name}' cannot fill slot '{slot_name}': it lacks "
                f"{', '.join(lacking)} (backends that can: {fits or 'none'})"
            )
        slots[slot_name] = slot_entry(slot, backend)
    for slot in pattern.slots.values():
        needed = not slot.optional or len(slots) < pattern.min_filled_slots
        if slot.name not in slots and needed:
            slots[slot.name] = slot_entry(slot, choose_backend(reg, slot))
    ordered = {name: slots[name] for name in pattern.slots if name in slots}
    return {
        "namespaces": [
            {
                "name": namespace,
                "pattern": pattern.name,
                "pattern_version": pattern.version,
                "slots": ordered,
            }
        ]
    }


def namespace_name_pattern(reg: Registry) -> str:
    """The one definition of a valid namespace name: the config JSON Schema's."""
    schema = json.loads((reg.schema_dir / "config.schema.json").read_text(encoding="utf-8"))
    pattern: str = schema["properties"]["namespaces"]["items"]["properties"]["name"]["pattern"]
    return pattern


def _parse_slots(values: list[str]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for value in values:
        slot, sep, backend = value.partition(":")
        if not (sep and slot and backend):
            raise CliError(f"--slot {value!r}: expected SLOT:BACKEND", EXIT_USAGE)
        if slot in chosen:
            raise CliError(f"--slot {value!r}: slot '{slot}' given twice", EXIT_USAGE)
        chosen[slot] = backend
    return chosen


def cmd_generate(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    chosen = _parse_slots(args.slot)
    name_pattern = namespace_name_pattern(reg)
    if not re.fullmatch(name_pattern, args.namespace):
        print(
            f"prismctl generate config: --namespace {args.namespace!r} must match {name_pattern}",
            file=sys.stderr,
        )
        return EXIT_FINDINGS
    try:
        data = generate_config(reg, args.pattern, chosen, args.namespace)
    except Impossible as exc:
        print(f"prismctl generate config: {exc.reason}", file=sys.stderr)
        return EXIT_FINDINGS
    header = (
        f"# Generated by: prismctl generate config --pattern {args.pattern} "
        + "".join(f"--slot {s} " for s in args.slot)
        + f"--namespace {args.namespace}\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    name = str(args.output) if args.output else "<generated>"
    check = validate_config_data(data, name, reg, text)
    if has_errors(check.diagnostics):
        # The namespace name is the only free-form input; anything else is our bug.
        print(render_text(check.diagnostics), file=sys.stderr)
        invalid_name = all(
            d.rule_id == "SCHEMA" and ".name" in d.message for d in check.diagnostics
        )
        return EXIT_FINDINGS if invalid_name else EXIT_INTERNAL
    if args.output:
        write_atomically(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK
