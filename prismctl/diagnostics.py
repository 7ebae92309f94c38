"""One diagnostics model for every prismctl finding, rendered as compiler-style text or as
versioned JSON, so people and tools read the same facts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning"]
JSON_VERSION = 1


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    col: int
    note: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def noted(self, note: str) -> Location:
        """The same place, labelled for use as a diagnostic's second location."""
        return Location(self.file, self.line, self.col, note)


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int
    col: int
    rule_id: str
    message: str
    fix: str | None = None
    severity: Severity = "error"
    related: tuple[Location, ...] = field(default_factory=tuple)

    @classmethod
    def at(
        cls,
        loc: Location,
        rule_id: str,
        message: str,
        fix: str | None = None,
        *,
        severity: Severity = "error",
        related: Iterable[Location] = (),
    ) -> Diagnostic:
        return cls(loc.file, loc.line, loc.col, rule_id, message, fix, severity, tuple(related))

    @property
    def location(self) -> Location:
        return Location(self.file, self.line, self.col)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "rule_id": self.rule_id,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "related": [
                {"file": r.file, "line": r.line, "col": r.col, "note": r.note} for r in self.related
            ],
        }


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)


def render_text(diagnostics: Iterable[Diagnostic]) -> str:
    """`path:line:col: message [RULE_ID]`, then the fix and any second location, indented."""
    lines: list[str] = []
    for d in diagnostics:
        prefix = "warning: " if d.severity == "warning" else ""
        lines.append(f"{d.location}: {prefix}{d.message} [{d.rule_id}]")
        if d.fix:
            lines.append(f"    fix: {d.fix}")
        lines.extend(f"    {r}: {r.note}" for r in d.related)
    return "\n".join(lines)


def render_json(diagnostics: Iterable[Diagnostic], **extra: Any) -> str:
    items = list(diagnostics)
    doc: dict[str, Any] = {
        "version": JSON_VERSION,
        "valid": not has_errors(items),
        **extra,
        "diagnostics": [d.to_json() for d in items],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)
