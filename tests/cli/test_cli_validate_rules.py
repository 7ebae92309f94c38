"""A failing config for every `prismctl validate` rule: the rule id, its line:col and the
exit code are written in each fixture's first line (`# expect: RULE LINE:COL exit=N`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prismctl.config import CONFIG_RULES
from tests.cli.cli_support import FIXTURES, Run

RULE_FIXTURES = sorted((FIXTURES / "rules").glob("*.yaml"))
EXPECT = re.compile(
    rb"^# expect: (?P<rule>[A-Z_0-9]+) (?P<line>\d+):(?P<col>\d+) exit=(?P<exit>\d)"
)
#: rules that need a file that cannot carry an `# expect:` line; tests/cli/test_cli_malformed.py
NO_FIXTURE = {"IO_ERROR", "EMPTY_FILE"}
#: rules whose fixture needs a registry where the backend is still planned
NEEDS_PLANNED_REDIS = {"BACKEND_PLANNED"}


def expectation(path: Path) -> tuple[str, int, int, int]:
    m = EXPECT.match(path.read_bytes())
    assert m, f"{path} lacks its '# expect:' line"
    return m["rule"].decode(), int(m["line"]), int(m["col"]), int(m["exit"])


def test_every_rule_has_a_failing_fixture() -> None:
    covered = {expectation(p)[0] for p in RULE_FIXTURES} | NO_FIXTURE
    assert covered == set(CONFIG_RULES)


@pytest.mark.parametrize("fixture", RULE_FIXTURES, ids=lambda p: p.stem)
def test_rule_fixture(fixture: Path, prismctl: Run, registry_copy: Path) -> None:
    rule, line, col, code = expectation(fixture)
    if rule in NEEDS_PLANNED_REDIS:
        redis = registry_copy / "backends" / "redis.yaml"
        redis.write_text(re.sub(r"(?m)^status: \w+", "status: planned", redis.read_text()))
    proc = prismctl("validate", fixture.name, cwd=fixture.parent, registry=registry_copy)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert f"{fixture.name}:{line}:{col}: " in proc.stdout
    located = [
        ln for ln in proc.stdout.splitlines() if ln.startswith(f"{fixture.name}:{line}:{col}: ")
    ]
    assert any(ln.endswith(f"[{rule}]") for ln in located), proc.stdout

    as_json = prismctl(
        "validate", "--format", "json", fixture.name, cwd=fixture.parent, registry=registry_copy
    )
    assert as_json.returncode == code
    doc = json.loads(as_json.stdout)
    assert doc["version"] == 1
    assert doc["valid"] is (code == 0)
    assert isinstance(doc["diagnostics"], list)
    assert {
        "rule_id": rule,
        "line": line,
        "col": col,
        "file": fixture.name,
    }.items() <= next(d for d in doc["diagnostics"] if d["rule_id"] == rule).items()
    assert all(d["message"] for d in doc["diagnostics"])


def test_mismatch_points_at_slot_and_backend_matrix_entry(prismctl: Run) -> None:
    fixture = FIXTURES / "rules" / "missing_required_interface.yaml"
    proc = prismctl("validate", fixture.name, cwd=fixture.parent)
    lines = proc.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.endswith("[MISSING_REQUIRED_INTERFACE]"))
    # the fix, then the second location: the backend's implements list in its registry YAML
    assert lines[at + 1].strip().startswith("fix: use a backend implementing keyvalue_basic")
    assert re.search(r"registry/backends/nats\.yaml:\d+:1: nats's implements list", lines[at + 2])


def test_duplicate_namespace_across_files(prismctl: Run, tmp_path: Path) -> None:
    body = (
        "namespaces:\n  - name: shared\n    pattern: keyvalue\n"
        "    slots: {store: {backend: sqlite}}\n"
    )
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text("# second file\n" + body)
    proc = prismctl("validate", "a.yaml", "b.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert "b.yaml:3:11: namespace 'shared' is defined twice [DUPLICATE_NAMESPACE]" in proc.stdout
    assert "a.yaml:2:11: first defined here" in proc.stdout


def test_valid_and_invalid_files_together_exit_1(prismctl: Run) -> None:
    proc = prismctl(
        "validate",
        FIXTURES / "embedded-default.yaml",
        FIXTURES / "rules" / "unknown_backend.yaml",
    )
    assert proc.returncode == 1
    assert "Validating namespace: default" in proc.stdout
    assert "    Backend: dynamodb ✗ (unknown backend)" in proc.stdout
    assert proc.stdout.rstrip().endswith("❌ Configuration invalid: 1 error(s)")
