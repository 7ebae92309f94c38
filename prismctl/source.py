"""Reading YAML with positions: every value keeps the line:col it came from, so each finding
can point at the exact place to change. Also the JSON Schema check that maps schema errors back
to those positions."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from prismctl.diagnostics import Diagnostic, Location

PathKey = tuple[str | int, ...]

SCHEMA_DIR_ENV = "PRISM_REGISTRY_DIR"


@dataclass
class Source:
    """A parsed document plus where each of its values and keys sits in the file."""

    file: str
    data: Any = None
    text: str = ""
    values: dict[PathKey, Location] = field(default_factory=dict)
    keys: dict[PathKey, Location] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.diagnostics

    def at(self, path: PathKey) -> Location:
        """Location of the value at `path`, else of its nearest enclosing value."""
        while path not in self.values and path:
            path = path[:-1]
        return self.values.get(path, Location(self.file, 1, 1))

    def key_at(self, path: PathKey) -> Location:
        """Location of the mapping key naming `path` (falls back to the value)."""
        return self.keys.get(path) or self.at(path)


class IOProblem(Exception):
    """The file could not be read at all (missing, a directory, permissions): exit code 3."""

    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def _loc(file: str, mark: yaml.Mark | None) -> Location:
    if mark is None:
        return Location(file, 1, 1)
    return Location(file, mark.line + 1, mark.column + 1)


def read_text(path: Path, display: str | None = None) -> str:
    """File text as UTF-8: IOProblem when unreadable, _NotUtf8 (located at the first bad byte)
    when it is not text."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise IOProblem(
            Diagnostic(name, 1, 1, "IO_ERROR", "is a directory, not a file", "pass a YAML file")
        ) from None
    except FileNotFoundError:
        raise IOProblem(Diagnostic(name, 1, 1, "IO_ERROR", "no such file")) from None
    except OSError as exc:
        raise IOProblem(Diagnostic(name, 1, 1, "IO_ERROR", exc.strerror or str(exc))) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise _NotUtf8(
            Diagnostic(
                name,
                line,
                col,
                "NOT_UTF8",
                f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                "save the file as UTF-8",
            )
        ) from None


class _NotUtf8(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def load_yaml(path: Path, display: str | None = None) -> Source:
    """Read and parse one YAML file; raises IOProblem only when it cannot be read at all."""
    name = display or str(path)
    try:
        text = read_text(path, name)
    except _NotUtf8 as exc:
        return Source(name, diagnostics=[exc.diagnostic])
    return parse_yaml(text, name)


def parse_yaml(text: str, file: str) -> Source:
    src = Source(file, text=text)
    try:
        node = yaml.compose(text, Loader=yaml.CSafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        src.diagnostics.append(
            Diagnostic.at(_loc(file, mark), "YAML_SYNTAX", f"invalid YAML: {problem}")
        )
        return src
    except yaml.YAMLError as exc:
        src.diagnostics.append(Diagnostic(file, 1, 1, "YAML_SYNTAX", f"invalid YAML: {exc}"))
        return src
    if node is None:
        src.diagnostics.append(
            Diagnostic(file, 1, 1, "EMPTY_FILE", "file is empty", "add the document's content")
        )
        return src
    try:
        src.data = _convert(node, (), src, yaml.CSafeLoader(""))
    except _TooBig as exc:
        src.data = None
        src.diagnostics.append(Diagnostic.at(exc.location, "YAML_SYNTAX", str(exc)))
    except RecursionError:
        src.data = None
        src.diagnostics.append(
            Diagnostic(file, 1, 1, "YAML_SYNTAX", "invalid YAML: nested too deeply")
        )
    return src


#: Values one document may expand to: aliases can make a small file huge (billion laughs).
MAX_VALUES = 200_000


class _TooBig(Exception):
    def __init__(self, location: Location) -> None:
        super().__init__(f"document expands to more than {MAX_VALUES} values (nested aliases?)")
        self.location = location


def _convert(node: yaml.Node, path: PathKey, src: Source, loader: yaml.CSafeLoader) -> Any:
    src.values[path] = _loc(src.file, node.start_mark)
    if len(src.values) > MAX_VALUES:
        raise _TooBig(src.values[path])
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_loc = _loc(src.file, key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                src.diagnostics.append(
                    Diagnostic.at(key_loc, "YAML_KEY", "mapping keys must be plain strings")
                )
                continue
            key = str(loader.construct_object(key_node))
            if key in result:
                first = src.keys[(*path, key)]
                src.diagnostics.append(
                    Diagnostic.at(
                        key_loc,
                        "DUPLICATE_KEY",
                        f"duplicate key '{key}'",
                        "keep one of the two",
                        related=[first.noted("first defined here")],
                    )
                )
                continue
            src.keys[(*path, key)] = key_loc
            result[key] = _convert(value_node, (*path, key), src, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), src, loader) for i, item in enumerate(node.value)]
    value = loader.construct_object(node)
    # Dates and other YAML-only types are not JSON: keep their text so schemas reject them cleanly.
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(node.value)


@cache
def _schema_file(schema_path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(schema_path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return schema


def schema_errors(
    src: Source,
    schema: Path | dict[str, Any],
    data: Any = None,
    base: PathKey = (),
    rule_id: str = "SCHEMA",
) -> list[tuple[PathKey, Diagnostic]]:
    """Check `data` (default: the whole document) against a JSON Schema (a file or a dict); one
    (path, finding) per error, located at the offending key or value."""
    schema_doc = _schema_file(schema) if isinstance(schema, Path) else schema
    instance = src.data if data is None and not base else data
    errors = sorted(
        Draft202012Validator(schema_doc).iter_errors(instance),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    out = []
    for err in _leaves(errors):
        path: PathKey = (*base, *err.absolute_path)
        if err.validator == "additionalProperties":
            out += [(path, _unknown_key(src, err, path, key, rule_id)) for key in _extra(err)]
        else:
            out.append((path, _schema_finding(src, err, path, rule_id)))
    return out


def schema_diagnostics(
    src: Source, schema: Path | dict[str, Any], rule_id: str = "SCHEMA"
) -> list[Diagnostic]:
    return [d for _, d in schema_errors(src, schema, rule_id=rule_id)]


def _leaves(errors: list[ValidationError]) -> list[ValidationError]:
    """For oneOf/anyOf, report the most specific sub-error rather than the summary."""
    out: list[ValidationError] = []
    for err in errors:
        if err.context:
            best = max(err.context, key=lambda e: len(e.absolute_path))
            out.append(best if len(best.absolute_path) > len(err.absolute_path) else err)
        else:
            out.append(err)
    return out


def _where(path: PathKey) -> str:
    return ".".join(str(p) for p in path) or "document"


def _extra(err: ValidationError) -> list[str]:
    """The keys an additionalProperties error is about."""
    props = err.schema.get("properties", {})
    patterns = err.schema.get("patternProperties", {})
    return [
        k for k in err.instance if k not in props and not any(re.search(p, k) for p in patterns)
    ]


def _unknown_key(
    src: Source, err: ValidationError, path: PathKey, key: str, rule_id: str
) -> Diagnostic:
    allowed = ", ".join(sorted(err.schema.get("properties", {}))) or "none"
    return Diagnostic.at(
        src.key_at((*path, key)),
        rule_id,
        f"unknown key '{key}' in {_where(path)}",
        f"remove it; allowed keys: {allowed}",
    )


def _schema_finding(src: Source, err: ValidationError, path: PathKey, rule_id: str) -> Diagnostic:
    where = _where(path)
    if err.validator == "required":
        return Diagnostic.at(src.at(path), rule_id, f"{where}: {err.message}", "add the key")
    if err.validator == "type":
        got = json_type_name(err.instance)
        want = err.validator_value
        want_s = " or ".join(want) if isinstance(want, list) else str(want)
        return Diagnostic.at(
            src.at(path), rule_id, f"{where}: expected {want_s}, got {got}", f"make it {_a(want_s)}"
        )
    return Diagnostic.at(src.at(path), rule_id, f"{where}: {err.message}")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def json_type_name(value: Any) -> str:
    """The JSON Schema name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
