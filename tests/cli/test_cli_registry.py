"""`prismctl registry ...` on the real registry and on broken copies of it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from prismctl.registry import load_registry
from prismctl.registry_check import matrix_data
from tests.cli.cli_support import Run

REG = load_registry()


def test_registry_validate_passes_on_the_real_registry(prismctl: Run) -> None:
    proc = prismctl("registry", "validate")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("✅ registry valid:")
    as_json = json.loads(prismctl("registry", "validate", "--format", "json").stdout)
    assert as_json == {"version": 1, "valid": True, "diagnostics": []}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


BREAKS = [
    # (id, file, old, new, rule, needle locating the expected line)
    (
        "unknown-interface-claimed",
        "backends/sqlite.yaml",
        "  - keyvalue_scan\n",
        "  - keyvalue_scan\n  - keyvalue_search\n",
        "UNKNOWN_INTERFACE",
        "- keyvalue_search",
    ),
    (
        "planned-interface-claimed",
        "backends/memstore.yaml",
        "  - keyvalue_scan\n",
        "  - keyvalue_scan\n  - list_basic\n",
        "PLANNED_INTERFACE_CLAIMED",
        "- list_basic",
    ),
    (
        "schema-unknown-key",
        "backends/sqlite.yaml",
        "status: available",
        "status: available\nhomepage: https://sqlite.org",
        "SCHEMA",
        "homepage:",
    ),
    (
        "schema-bad-status",
        "backends/sqlite.yaml",
        "status: available",
        "status: beta",
        "SCHEMA",
        "status: beta",
    ),
    (
        "naming-rule",
        "interfaces/keyvalue.yaml",
        "service: prism.interfaces.keyvalue.v1.KeyValueTTLService",
        "service: prism.interfaces.keyvalue.v1.KeyValueExpiryService",
        "NAMING_RULE",
        "  - id: keyvalue_ttl",
    ),
    (
        "rpcs-differ-from-proto",
        "interfaces/keyvalue.yaml",
        "rpcs: [Set, Get, Delete, Exists]",
        "rpcs: [Set, Get, Delete]",
        "PROTO_MISMATCH",
        "  - id: keyvalue_basic",
    ),
    (
        "proto-missing",
        "interfaces/list.yaml",
        "    status: planned\n    proto_file: prism/interfaces/list/v1/list_basic.proto",
        "    status: available\n    proto_file: prism/interfaces/list/v1/list_basic.proto",
        "INTERFACE_WITHOUT_PROTO",
        "  - id: list_basic",
    ),
    (
        "planned-has-proto",
        "interfaces/keyvalue.yaml",
        "  - id: keyvalue_cas\n    flavor: CAS\n",
        "  - id: keyvalue_cas\n    flavor: CAS\n    status: planned\n",
        "PLANNED_HAS_PROTO",
        "  - id: keyvalue_cas",
    ),
    (
        "unsatisfiable-slot",
        "patterns/keyvalue.yaml",
        "required_interfaces: [keyvalue_basic]",
        "required_interfaces: [keyvalue_basic, graph_basic]",
        "UNSATISFIABLE_SLOT",
        "  store:",
    ),
    (
        "recommended-unknown",
        "patterns/keyvalue.yaml",
        "recommended_backends: [sqlite,",
        "recommended_backends: [etcd, sqlite,",
        "UNKNOWN_BACKEND",
        "recommended_backends",
    ),
    (
        "recommended-lacks",
        "patterns/keyvalue.yaml",
        "recommended_backends: [sqlite,",
        "recommended_backends: [nats, sqlite,",
        "RECOMMENDED_BACKEND_LACKS",
        "recommended_backends: [nats, sqlite,",
    ),
    (
        "slot-unknown-interface",
        "patterns/keyvalue.yaml",
        "optional_interfaces: [keyvalue_scan,",
        "optional_interfaces: [keyvalue_sacn,",
        "UNKNOWN_INTERFACE",
        "  store:",
    ),
    (
        "capability-unknown-interface",
        "capabilities.yaml",
        "interface: keyvalue_ttl",
        "interface: keyvalue_expiry",
        "UNKNOWN_INTERFACE",
        "ttl_support:",
    ),
    (
        "default-connection-mismatch",
        "backends/sqlite.yaml",
        'default_connection: "sqlite:///prism.db"',
        'default_connection: "file:prism.db"',
        "BAD_DEFAULT_CONNECTION",
        "backend: sqlite",
    ),
    (
        "duplicate-backend",
        "backends/sqlite.yaml",
        "backend: sqlite",
        "backend: memstore",
        "REGISTRY_DUPLICATE",
        "backend: memstore",
    ),
    (
        "available-without-plugin",
        "backends/sqlite.yaml",
        "plugin_class: plugins.sqlite:SqlitePlugin",
        "plugin_class: plugins.nosuchdb:NoSuchPlugin",
        "PLUGIN_MISSING",
        "backend: sqlite",
    ),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_registry_validate_finds(case: tuple[str, ...], prismctl: Run, registry_copy: Path) -> None:
    _, rel, old, new, rule, needle = case
    target = registry_copy / rel
    _edit(target, old, new)
    proc = prismctl("registry", "validate", cwd=registry_copy.parent, registry=registry_copy)
    assert proc.returncode == 1, proc.stdout
    line = _line_of(target, needle)
    pattern = rf"^registry/{re.escape(rel)}:{line}:\d+: .* \[{rule}\]$"
    assert re.search(pattern, proc.stdout, re.M), proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("❌ registry invalid")


def test_stale_matrix_then_write(prismctl: Run, registry_copy: Path) -> None:
    _edit(registry_copy / "backends" / "sqlite.yaml", "  - keyvalue_cas\n", "")
    stale = prismctl("registry", "validate", cwd=registry_copy.parent, registry=registry_copy)
    assert stale.returncode == 1
    assert "registry/matrix.yaml:1:1: matrix.yaml differs" in stale.stdout
    assert "[MATRIX_STALE]" in stale.stdout
    wrote = prismctl("registry", "matrix", "--write", registry=registry_copy)
    assert wrote.returncode == 0, wrote.stderr
    fresh = prismctl("registry", "validate", registry=registry_copy)
    assert fresh.returncode == 0, fresh.stdout
    written = yaml.safe_load((registry_copy / "matrix.yaml").read_text())
    assert "keyvalue_cas" not in written["backends"]["sqlite"]["implements"]


def test_missing_matrix_is_a_finding(prismctl: Run, registry_copy: Path) -> None:
    (registry_copy / "matrix.yaml").unlink()
    proc = prismctl("registry", "validate", registry=registry_copy)
    assert proc.returncode == 1
    assert "[MATRIX_STALE]" in proc.stdout


def test_matrix_formats(prismctl: Run) -> None:
    data = matrix_data(REG)
    as_json = prismctl("registry", "matrix", "--format", "json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == data
    text = prismctl("registry", "matrix").stdout.splitlines()
    assert text[0].split() == ["interface", *data["backends"]]
    row = next(ln for ln in text if ln.startswith("keyvalue_basic "))
    assert row.split()[1:] == [
        "✓" if "keyvalue_basic" in b["implements"] else "·" for b in data["backends"].values()
    ]
    markdown = prismctl("registry", "matrix", "--format", "markdown").stdout.splitlines()
    assert markdown[0] == "| interface | " + " | ".join(data["backends"]) + " |"
    assert len(markdown) == 2 + len(data["interfaces"])


def test_checked_in_matrix_is_current() -> None:
    on_disk = yaml.safe_load((REG.root / "matrix.yaml").read_text(encoding="utf-8"))
    assert on_disk == matrix_data(REG), "run `prismctl registry matrix --write`"


def test_patterns_list_and_describe(prismctl: Run) -> None:
    listed = prismctl("registry", "patterns", "list")
    assert listed.returncode == 0
    names = [ln.split()[0] for ln in listed.stdout.splitlines()]
    assert names == list(REG.patterns)
    described = prismctl("registry", "patterns", "describe", "multicast-registry")
    assert described.returncode == 0
    out = described.stdout
    assert out.startswith("Pattern: multicast-registry v1\n")
    assert "  registry (required): " in out
    assert "    Required capabilities: scan_support\n" in out
    assert "    Optional capabilities: ttl_support\n" in out
    assert "  durability (optional): " in out
    assert "Exposes: prism.patterns.multicast_registry.v1.MulticastRegistryService" in out
    unknown = prismctl("registry", "patterns", "describe", "saga")
    assert unknown.returncode == 1
    assert "unknown pattern 'saga'" in unknown.stderr


def test_backends_list_and_describe(prismctl: Run) -> None:
    listed = prismctl("registry", "backends", "list")
    assert listed.returncode == 0
    rows = {ln.split()[0]: ln.split()[1] for ln in listed.stdout.splitlines()}
    assert rows == {b.name: b.status for b in REG.backends.values()}
    described = prismctl("registry", "backends", "describe", "sqlite")
    assert described.returncode == 0
    assert "Plugin: plugins.sqlite:SqlitePlugin" in described.stdout
    assert "  busy_timeout_ms (integer)" in described.stdout
    assert "Connection: sqlite:///path/to/file.db" in described.stdout
    unknown = prismctl("registry", "backends", "describe", "oracle")
    assert unknown.returncode == 1 and "unknown backend 'oracle'" in unknown.stderr


def test_backends_find(prismctl: Run) -> None:
    proc = prismctl(
        "registry", "backends", "find", "--interface", "keyvalue", "--capability", "scan_support"
    )
    assert proc.returncode == 0
    found = {ln.split()[0] for ln in proc.stdout.splitlines()}
    assert found == {b.name for b in REG.implementers(["keyvalue_basic", "keyvalue_scan"])}
    assert all("✓ keyvalue with " in ln and "scan_support" in ln for ln in proc.stdout.splitlines())
    by_id = prismctl("registry", "backends", "find", "--interface", "queue_visibility")
    assert {ln.split()[0] for ln in by_id.stdout.splitlines()} == {
        b.name for b in REG.implementers(["queue_visibility"])
    }
    none = prismctl(
        "registry", "backends", "find", "--interface", "list", "--capability", "blocking_pops"
    )
    assert none.returncode == 1 and "no backend implements" in none.stdout
    bad = prismctl("registry", "backends", "find", "--interface", "keyvalue", "--capability", "x")
    assert bad.returncode == 1 and "unknown capability 'x'" in bad.stderr
