"""Malformed input never produces a traceback: a one-line located diagnostic and the right exit
code (3 when the file cannot be read at all, 1 when its content is wrong)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.cli.cli_support import Run

HEADLINE = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+) \[(?P<rule>[A-Z_0-9]+)\]$"
)

CASES: dict[str, tuple[bytes | None, str, int, str]] = {
    # name: (content or None for "do not create", rule, exit code, location)
    "missing": (None, "IO_ERROR", 3, "1:1"),
    "empty": (b"", "EMPTY_FILE", 1, "1:1"),
    "only-comments": (b"# nothing here\n", "EMPTY_FILE", 1, "1:1"),
    "invalid-yaml": (b"namespaces:\n  - name: a\n   pattern: x\n", "YAML_SYNTAX", 1, "3:4"),
    "two-documents": (b"namespaces: []\n---\nnamespaces: []\n", "YAML_SYNTAX", 1, "2:1"),
    "top-level-list": (b"- name: a\n- name: b\n", "SCHEMA", 1, "1:1"),
    "top-level-scalar": (b"hello\n", "SCHEMA", 1, "1:1"),
    "wrong-type-namespaces": (b"namespaces: yes\n", "SCHEMA", 1, "1:13"),
    "wrong-type-name": (
        b"namespaces:\n  - name: 42\n    pattern: keyvalue\n    slots: {}\n",
        "SCHEMA",
        1,
        "2:11",
    ),
    "unknown-top-key": (
        b"namespaces:\n  - name: a\n    pattern: keyvalue\n    slots: {store: {backend: sqlite}}\n"
        b"extra: 1\n",
        "SCHEMA",
        1,
        "5:1",
    ),
    "unknown-slot-key": (
        b"namespaces:\n  - name: a\n    pattern: keyvalue\n"
        b"    slots:\n      store: {backend: sqlite, colour: red}\n",
        "SCHEMA",
        1,
        "5:32",
    ),
    "not-utf8": (b"namespaces:\n  - name: \xff\xfe\n", "NOT_UTF8", 1, "2:11"),
    "alias-bomb": (
        b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            b"a%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 10) + b"]\n"
            for i in range(1, 9)
        ),
        "YAML_SYNTAX",
        1,
        "1:34",
    ),
    "nested-too-deeply": (b"namespaces: " + b"[" * 5000 + b"]" * 5000, "YAML_SYNTAX", 1, "1:1"),
    "binary": (b"\x00\x01\x02\x89PNG", "NOT_UTF8", 1, "1:4"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_config(name: str, prismctl: Run, tmp_path: Path) -> None:
    content, rule, code, where = CASES[name]
    target = tmp_path / f"{name}.yaml"
    if content is not None:
        target.write_bytes(content)
    proc = prismctl("validate", target.name, cwd=tmp_path)
    assert proc.returncode == code, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    m = HEADLINE.match(first)
    assert m, first
    assert (m["file"], f"{m['line']}:{m['col']}", m["rule"]) == (target.name, where, rule)
    # exactly one finding, and no ✓ report for a file that did not parse into namespaces
    assert sum(bool(HEADLINE.match(ln)) for ln in proc.stdout.splitlines()) == 1
    assert "Validating namespace" not in proc.stdout


def test_directory(prismctl: Run, tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    proc = prismctl("validate", "configs", cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stdout.splitlines()[0] == "configs:1:1: is a directory, not a file [IO_ERROR]"


def test_unreadable_file(prismctl: Run, tmp_path: Path) -> None:
    target = tmp_path / "secret.yaml"
    if os.geteuid() == 0:
        # root reads through permission bits; /proc/self/mem fails every read from offset 0
        target.symlink_to("/proc/self/mem")
    else:
        target.write_text("namespaces: []\n")
        target.chmod(0)
    proc = prismctl("validate", target.name, cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stdout.startswith("secret.yaml:1:1: ")
    assert proc.stdout.splitlines()[0].endswith("[IO_ERROR]")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["validate"],
        ["frobnicate"],
        ["validate", "--format", "xml", "x.yaml"],
        ["registry"],
        ["registry", "matrix", "--format", "csv"],
        ["registry", "backends", "find"],
        ["generate", "config", "--pattern", "keyvalue"],
        ["generate", "config", "--pattern", "keyvalue", "--namespace", "a", "--slot", "nocolon"],
        [
            "generate",
            "config",
            "--pattern",
            "keyvalue",
            "--namespace",
            "a",
            "--slot",
            "s:a",
            "--slot",
            "s:b",
        ],
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_usage_errors_exit_2_with_one_line(args: list[str], prismctl: Run) -> None:
    proc = prismctl(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr


def test_help_exits_0(prismctl: Run) -> None:
    proc = prismctl("--help")
    assert proc.returncode == 0
    for command in ("registry", "validate", "generate"):
        assert command in proc.stdout


def test_broken_registry_is_exit_3(prismctl: Run, registry_copy: Path, tmp_path: Path) -> None:
    (registry_copy / "backends" / "sqlite.yaml").write_text("backend: [unclosed\n")
    config = tmp_path / "c.yaml"
    config.write_text("namespaces:\n  - name: a\n    pattern: keyvalue\n    slots: {}\n")
    proc = prismctl("validate", config, registry=registry_copy)
    assert proc.returncode == 3
    assert re.search(r"sqlite\.yaml:2:1: invalid YAML: .* \[YAML_SYNTAX\]", proc.stderr)
    assert proc.stderr.rstrip().splitlines()[-1].startswith("prismctl: error: the registry")


@pytest.mark.parametrize(("content", "code"), [(None, 3), (b"[1, 2]\n", 1), (b"x: [\n", 1)])
def test_json_format_for_unusable_files(
    content: bytes | None, code: int, prismctl: Run, tmp_path: Path
) -> None:
    target = tmp_path / "c.yaml"
    if content is not None:
        target.write_bytes(content)
    proc = prismctl("validate", "--format", "json", target.name, cwd=tmp_path)
    assert proc.returncode == code
    doc = json.loads(proc.stdout)
    assert doc["version"] == 1 and doc["valid"] is False
    (finding,) = doc["diagnostics"]
    assert finding["file"] == "c.yaml" and finding["line"] >= 1 and finding["col"] >= 1
