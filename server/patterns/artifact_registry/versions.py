"""Semantic versions and npm-style ranges, on top of the `semver` package.

Ranges: comparators joined by spaces (AND) and `||` (OR); each comparator is `1.2.3`, `=1.2.3`,
`>1.2.3`, `>=1.2`, `<2`, `<=1.2.3`, `^1.2.3`, `~1.2.3`, an x-range (`1.x`, `1.2.*`, `*`, empty)
or a hyphen range `1.2.3 - 2.3.4`. As in npm, a prerelease version satisfies a range only when
one of the range's comparators names a prerelease of the same major.minor.patch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import semver

from plugins.runtime.errors import InvalidArgument

Version = semver.Version

_PARTIAL = re.compile(
    r"^v?(?P<major>0|[1-9]\d*|[xX*])(?:\.(?P<minor>0|[1-9]\d*|[xX*]))?"
    r"(?:\.(?P<patch>0|[1-9]\d*|[xX*]))?(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_COMPARATOR = re.compile(r"^(?P<op><=|>=|<|>|=|\^|~)?\s*(?P<ver>\S*)$")


def parse_version(text: str, field: str = "version") -> Version:
    """A full semver 2.0.0 version, or INVALID_ARGUMENT naming `field`."""
    try:
        return Version.parse(text)
    except (ValueError, TypeError):
        raise InvalidArgument(field, f"'{text}' is not a semantic version (e.g. 1.4.2)") from None


@dataclass(frozen=True)
class _Comparator:
    test: Callable[[Version], bool]
    #: (major, minor, patch) of a prerelease this comparator names, which lets prereleases of
    #: exactly that triple satisfy the range
    prerelease_triple: tuple[int, int, int] | None


@dataclass(frozen=True)
class Range:
    text: str
    alternatives: tuple[tuple[_Comparator, ...], ...]

    def matches(self, version: Version) -> bool:
        triple = (version.major, version.minor, version.patch)
        for comparators in self.alternatives:
            if not all(c.test(version) for c in comparators):
                continue
            if version.prerelease and not any(c.prerelease_triple == triple for c in comparators):
                continue
            return True
        return False

    def best(self, versions: Iterable[Version]) -> Version | None:
        matching = [v for v in versions if self.matches(v)]
        return max(matching) if matching else None


def parse_range(text: str, field: str = "version_constraint") -> Range:
    alternatives: list[tuple[_Comparator, ...]] = []
    for part in text.split("||"):
        part = part.strip()
        try:
            alternatives.append(tuple(_conjunction(part)))
        except ValueError as exc:
            raise InvalidArgument(field, f"'{text}' is not a version range: {exc}") from None
    return Range(text, tuple(alternatives))


def is_exact(text: str) -> bool:
    return Version.is_valid(text.removeprefix("="))


def _conjunction(part: str) -> list[_Comparator]:
    hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", part)
    if hyphen:
        return [*_expand(">=", hyphen.group(1)), *_expand("<=", hyphen.group(2))]
    if not part:
        return [_Comparator(lambda v: True, None)]
    comparators: list[_Comparator] = []
    tokens = re.findall(r"(?:<=|>=|<|>|=|\^|~)?\s*[^\s<>=^~]+", part)
    if "".join(t.replace(" ", "") for t in tokens) != part.replace(" ", ""):
        raise ValueError(f"cannot read '{part}'")
    for token in tokens:
        match = _COMPARATOR.match(token.strip())
        if not match:
            raise ValueError(f"cannot read '{token}'")
        comparators += _expand(match.group("op") or "", match.group("ver"))
    return comparators


def _partial(text: str) -> tuple[list[int | None], str | None]:
    match = _PARTIAL.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a version")
    parts: list[int | None] = []
    for name in ("major", "minor", "patch"):
        value = match.group(name)
        parts.append(None if value is None or value in "xX*" else int(value))
    for i in range(1, 3):  # anything after a wildcard is a wildcard too
        if parts[i - 1] is None:
            parts[i] = None
    return parts, match.group("pre")


def _cmp(op: str, bound: Version, pre: tuple[int, int, int] | None) -> _Comparator:
    tests: dict[str, Callable[[Version], bool]] = {
        ">=": lambda v: v >= bound,
        ">": lambda v: v > bound,
        "<=": lambda v: v <= bound,
        "<": lambda v: v < bound,
        "=": lambda v: v == bound,
    }
    return _Comparator(tests[op], pre)


def _expand(op: str, text: str) -> list[_Comparator]:
    """One comparator of the range grammar → plain comparisons against full versions."""
    (major, minor, patch), pre = _partial(text)
    pre_triple = (major or 0, minor or 0, patch or 0) if pre else None
    if major is None:
        return [_Comparator(lambda v: op not in ("<", ">"), None)]
    low = Version(major, minor or 0, patch or 0, prerelease=pre)
    if op in ("", "="):
        if minor is None:
            return [_cmp(">=", low, None), _cmp("<", Version(major + 1, 0, 0, "0"), None)]
        if patch is None:
            return [_cmp(">=", low, None), _cmp("<", Version(major, minor + 1, 0, "0"), None)]
        return [_cmp("=", low, pre_triple)]
    if op == "^":
        if major > 0 or minor is None:
            upper = Version(major + 1, 0, 0, "0")
        elif minor > 0 or patch is None:
            upper = Version(0, minor + 1, 0, "0")
        else:
            upper = Version(0, 0, (patch or 0) + 1, "0")
        return [_cmp(">=", low, pre_triple), _cmp("<", upper, None)]
    if op == "~":
        upper = (
            Version(major + 1, 0, 0, "0") if minor is None else Version(major, minor + 1, 0, "0")
        )
        return [_cmp(">=", low, pre_triple), _cmp("<", upper, None)]
    if op in (">", "<="):
        # "<=1.2" means "<1.3.0-0"; ">1.2" means ">=1.3.0"
        if minor is None:
            high = Version(major + 1, 0, 0, "0")
        elif patch is None:
            high = Version(major, minor + 1, 0, "0")
        else:
            return [_cmp(op, low, pre_triple)]
        return [_cmp(">=" if op == ">" else "<", high, None)]
    return [_cmp(op, low, pre_triple)]
