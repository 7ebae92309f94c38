"""The portable document filter language, sort order and aggregation of DocumentQueryService.

One pure-Python definition every Document backend shares: `parse_filter` turns filter JSON into a
small AST (And / Or / Not / Condition) with the precise INVALID_ARGUMENT the proto prescribes;
`matches` evaluates it in memory; SQL backends translate the same AST instead. Sorting
(`SortSpec`, `compare_keys`), keyset positions and `aggregate` follow the proto's SORTING and
Aggregate rules, so every backend orders and groups identically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from plugins.runtime.errors import InvalidArgument

MAX_FILTER_BYTES = 64 * 1024
MAX_FILTER_DEPTH = 32
MAX_SORT_FIELDS = 8
MAX_ACCUMULATORS = 16

Path = tuple[str, ...]
Scalar = str | int | float | bool | None


class _Missing:
    """The value of a path that does not resolve (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

COMPARISON_OPS: Final = frozenset({"$gt", "$gte", "$lt", "$lte"})
LIST_OPS: Final = frozenset({"$in", "$nin", "$all"})
OPERATORS: Final = frozenset({"$eq", "$ne", "$exists"}) | COMPARISON_OPS | LIST_OPS


# AST ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class And:
    """Every child matches; `And(())` matches everything (the empty filter)."""

    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


@dataclass(frozen=True, slots=True)
class Condition:
    """One operator on one path. `operand` is a scalar, a tuple of scalars ($in/$nin/$all) or a
    bool ($exists). An operator object with several operators becomes an And of Conditions."""

    path: Path
    op: str
    operand: Any


Node = And | Or | Not | Condition
MATCH_ALL: Final = And(())


# Paths and values --------------------------------------------------------------------------
def parse_path(text: str, field: str, location: str = "") -> Path:
    """A dotted member path; `location` prefixes the description (filter errors)."""
    names = tuple(text.split("."))
    for name in names:
        if not name or name.startswith("$"):
            prefix = f"{location}: " if location else ""
            raise InvalidArgument(
                field,
                f"{prefix}invalid field path {text!r}: names must be non-empty and must not "
                "start with '$'",
            )
    return names


def resolve(body: Any, path: Path) -> Any:
    """The value at `path`, or MISSING. Only object members are addressed (never array items)."""
    value = body
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return MISSING
        value = value[name]
    return value


def kind(value: Any) -> str:
    """JSON type name: null, bool, number, string, object, array, or missing."""
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def scalar_equal(a: Any, b: Any) -> bool:
    """Equality of the filter language: same JSON type and equal (1 equals 1.0)."""
    return kind(a) == kind(b) and a == b


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


# Parsing -----------------------------------------------------------------------------------
def _at(location: str, name: str) -> str:
    return f"{location}.{name}" if location else name


def _bad(location: str, message: str, field: str) -> InvalidArgument:
    return InvalidArgument(field, f"{location}: {message}" if location else message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_filter(text: str, field: str = "filter") -> Node:
    """Parse and validate a filter; errors are INVALID_ARGUMENT for `field` whose description
    starts with the offending location (e.g. `$and[1].price.$foo: unknown operator`)."""
    if not text:
        return MATCH_ALL
    if len(text.encode("utf-8")) > MAX_FILTER_BYTES:
        raise InvalidArgument(field, f"larger than {MAX_FILTER_BYTES} bytes")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise InvalidArgument(field, f"nests deeper than {MAX_FILTER_DEPTH} levels") from exc
    except ValueError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return _filter_object(raw, "", 1, field)


def _filter_object(obj: dict[str, Any], location: str, depth: int, field: str) -> Node:
    if depth > MAX_FILTER_DEPTH:
        raise _bad(location, f"filters nest at most {MAX_FILTER_DEPTH} levels", field)
    parts: list[Node] = []
    for name, value in obj.items():
        here = _at(location, name)
        if name in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise _bad(here, "must be a non-empty list of filter objects", field)
            children: list[Node] = []
            for i, child in enumerate(value):
                if not isinstance(child, dict):
                    raise _bad(f"{here}[{i}]", "must be a filter object", field)
                children.append(_filter_object(child, f"{here}[{i}]", depth + 1, field))
            parts.append(And(tuple(children)) if name == "$and" else Or(tuple(children)))
        elif name == "$not":
            if not isinstance(value, dict):
                raise _bad(here, "must be a filter object", field)
            parts.append(Not(_filter_object(value, here, depth + 1, field)))
        elif name.startswith("$"):
            raise _bad(here, "unknown operator", field)
        else:
            parts.extend(_conditions(parse_path(name, field, here), value, here, field))
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _conditions(path: Path, value: Any, location: str, field: str) -> list[Condition]:
    if isinstance(value, list):
        raise _bad(location, "arrays are not equality operands", field)
    if not isinstance(value, dict):
        return [Condition(path, "$eq", value)]
    if not value:
        raise _bad(location, "empty operator object", field)
    operators = [n for n in value if n.startswith("$")]
    if len(operators) != len(value):
        if operators:
            raise _bad(location, "mixes operators and field names", field)
        raise _bad(location, "objects are not equality operands", field)
    return [
        Condition(path, op, _operand(op, operand, _at(location, op), field))
        for op, operand in value.items()
    ]


def _operand(op: str, operand: Any, location: str, field: str) -> Any:
    if op not in OPERATORS:
        raise _bad(location, "unknown operator", field)
    if op in ("$eq", "$ne"):
        if not _is_scalar(operand):
            raise _bad(location, "operand must be a string, number, boolean or null", field)
        return operand
    if op in COMPARISON_OPS:
        if kind(operand) not in ("number", "string"):
            raise _bad(location, "operand must be a number or a string", field)
        return operand
    if op == "$exists":
        if not isinstance(operand, bool):
            raise _bad(location, "operand must be a boolean", field)
        return operand
    if not isinstance(operand, list):
        raise _bad(location, "operand must be a list of scalars", field)
    for i, item in enumerate(operand):
        if not _is_scalar(item):
            raise _bad(f"{location}[{i}]", "must be a string, number, boolean or null", field)
    return tuple(operand)


# Evaluation --------------------------------------------------------------------------------
def _eq(value: Any, operand: Any) -> bool:
    if value is MISSING:
        return operand is None
    if isinstance(value, list):
        return any(scalar_equal(e, operand) for e in value)
    return scalar_equal(value, operand)


_COMPARE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _condition_holds(c: Condition, body: Any) -> bool:
    value = resolve(body, c.path)
    op = c.op
    if op == "$eq":
        return _eq(value, c.operand)
    if op == "$ne":
        return not _eq(value, c.operand)
    if op == "$exists":
        return (value is not MISSING) is c.operand
    if op in COMPARISON_OPS:
        want = kind(c.operand)
        test = _COMPARE[op]
        candidates = value if isinstance(value, list) else [value]
        return any(kind(v) == want and test(v, c.operand) for v in candidates)
    if op == "$in":
        return any(_eq(value, v) for v in c.operand)
    if op == "$nin":
        return not any(_eq(value, v) for v in c.operand)
    # $all
    return bool(c.operand) and all(_eq(value, v) for v in c.operand)


def matches(node: Node, body: Any) -> bool:
    """Does the document body satisfy the filter?"""
    if isinstance(node, Condition):
        return _condition_holds(node, body)
    if isinstance(node, And):
        return all(matches(c, body) for c in node.children)
    if isinstance(node, Or):
        return any(matches(c, body) for c in node.children)
    return not matches(node.child, body)


# Sorting -----------------------------------------------------------------------------------
_RANK: Final = {
    "missing": 0,
    "null": 0,
    "number": 1,
    "string": 2,
    "bool": 3,
    "object": 4,
    "array": 4,
}

SortValue = tuple[int, Any]


def sort_value(value: Any) -> SortValue:
    """(rank, comparable) in the SORTING order: missing = null < numbers < strings < booleans <
    objects = arrays. JSON-serialisable, so it can live in a page token."""
    rank = _RANK[kind(value)]
    return (rank, value if rank in (1, 2, 3) else None)


def compare_sort_values(a: SortValue, b: SortValue) -> int:
    if a[0] != b[0]:
        return -1 if a[0] < b[0] else 1
    if a[1] == b[1] or a[0] in (0, 4):
        return 0
    return -1 if a[1] < b[1] else 1


@dataclass(frozen=True, slots=True)
class SortSpec:
    """Sort fields in order; ties always broken by id ascending."""

    fields: tuple[tuple[Path, bool], ...] = ()

    def key(self, doc_id: str, body: Any) -> SortKey:
        return SortKey(tuple(sort_value(resolve(body, p)) for p, _ in self.fields), doc_id)

    def compare(self, a: SortKey, b: SortKey) -> int:
        for (_, descending), va, vb in zip(self.fields, a.values, b.values, strict=True):
            c = compare_sort_values(va, vb)
            if c:
                return -c if descending else c
        return (a.doc_id > b.doc_id) - (a.doc_id < b.doc_id)

    def sort(self, items: Iterable[tuple[SortKey, Any]]) -> list[tuple[SortKey, Any]]:
        cmp = functools.cmp_to_key(self.compare)
        return sorted(items, key=lambda item: cmp(item[0]))

    def canonical(self) -> list[Any]:
        return [[".".join(p), d] for p, d in self.fields]


@dataclass(frozen=True, slots=True)
class SortKey:
    values: tuple[SortValue, ...]
    doc_id: str

    def position(self) -> list[Any]:
        """JSON form for a keyset page token."""
        return [[list(v) for v in self.values], self.doc_id]


def parse_sort(fields: Sequence[tuple[str, bool]], field: str = "sort") -> SortSpec:
    if len(fields) > MAX_SORT_FIELDS:
        raise InvalidArgument(field, f"at most {MAX_SORT_FIELDS} sort fields")
    return SortSpec(
        tuple((parse_path(p, f"{field}[{i}].field"), d) for i, (p, d) in enumerate(fields))
    )


def _decode_sort_value(item: Any, field: str) -> SortValue:
    """A sort value read back from a page token, checked so comparisons cannot fail."""
    if isinstance(item, list) and len(item) == 2:
        rank, value = item
        if rank in (0, 4) and value is None:
            return (rank, None)
        if rank in (1, 2, 3) and sort_value(value)[0] == rank:
            return (rank, value)
    raise InvalidArgument(field, "malformed page token")


def key_from_position(position: Any, spec: SortSpec, field: str = "page_token") -> SortKey:
    """Rebuild a SortKey from `SortKey.position()` output; anything else is INVALID_ARGUMENT."""
    if not (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], list)
        and len(position[0]) == len(spec.fields)
        and isinstance(position[1], str)
    ):
        raise InvalidArgument(field, "malformed page token")
    return SortKey(tuple(_decode_sort_value(v, field) for v in position[0]), position[1])


def token_scope(*parts: Any) -> str:
    """A short digest binding a page token to the request that produced it."""
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode("ascii")).hexdigest()[:24]


# Aggregation -------------------------------------------------------------------------------
ACCUMULATOR_OPS: Final = ("count", "sum", "min", "max", "avg")


@dataclass(frozen=True, slots=True)
class AggregateSpec:
    group_by: Path | None
    unwind: bool
    accumulators: tuple[tuple[str, Path], ...]

    def canonical(self) -> list[Any]:
        return [
            None if self.group_by is None else ".".join(self.group_by),
            self.unwind,
            [[op, ".".join(p)] for op, p in self.accumulators],
        ]


def parse_aggregate(
    group_by: str, unwind: bool, accumulators: Sequence[tuple[str | None, str]]
) -> AggregateSpec:
    """`accumulators` are (op name from ACCUMULATOR_OPS or None when unspecified, field path)."""
    if unwind and not group_by:
        raise InvalidArgument("unwind", "requires group_by")
    if len(accumulators) > MAX_ACCUMULATORS:
        raise InvalidArgument("accumulators", f"at most {MAX_ACCUMULATORS} accumulators")
    accs: list[tuple[str, Path]] = []
    for i, (op, path) in enumerate(accumulators):
        if op not in ACCUMULATOR_OPS:
            raise InvalidArgument(f"accumulators[{i}].op", "must be specified")
        if not path:
            raise InvalidArgument(f"accumulators[{i}].field", "is required")
        accs.append((op, parse_path(path, f"accumulators[{i}].field")))
    return AggregateSpec(
        parse_path(group_by, "group_by") if group_by else None, unwind, tuple(accs)
    )


@dataclass(slots=True)
class Group:
    key: Scalar
    count: int = 0
    #: per accumulator, the values its field has in the group's documents
    values: list[list[Any]] = field(default_factory=list)

    @property
    def key_json(self) -> str:
        return json_scalar(self.key)


def json_scalar(value: Scalar) -> str:
    """JSON text of a scalar; integral numbers without a fraction (`1`, not `1.0`)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


def _group_keys(value: Any, unwind: bool) -> dict[SortValue, Scalar]:
    """The groups a document joins, keyed by sort value: keys equal under the filter's
    equality (1 and 1.0) have equal sort values, so an unwound array joins each group once."""
    if value is MISSING or value is None:
        return {sort_value(None): None}
    if isinstance(value, dict):
        return {}
    if isinstance(value, list):
        if not unwind:
            return {}
        keys: dict[SortValue, Scalar] = {}
        for element in value:
            if _is_scalar(element):
                keys.setdefault(sort_value(element), element)
        return keys
    return {sort_value(value): value}


def _accumulate(op: str, values: list[Any]) -> Scalar:
    if op == "count":
        return sum(1 for v in values if v is not MISSING and v is not None)
    numbers = [v for v in values if kind(v) == "number"]
    if op == "sum":
        return math.fsum(numbers) if any(isinstance(n, float) for n in numbers) else sum(numbers)
    if op == "avg":
        return math.fsum(numbers) / len(numbers) if numbers else None
    scalars = [v for v in values if kind(v) in ("number", "string", "bool")]
    if not scalars:
        return None
    cmp = functools.cmp_to_key(lambda a, b: compare_sort_values(sort_value(a), sort_value(b)))
    chosen: Scalar = (min if op == "min" else max)(scalars, key=cmp)
    return chosen


def aggregate(bodies: Iterable[Any], spec: AggregateSpec) -> list[tuple[Group, list[str]]]:
    """Every group with its accumulator values as JSON text, sorted by count descending then key
    ascending (SORTING order). Groups whose keys are equal (1 and 1.0) are one group."""
    return aggregate_values(
        (
            (
                None if spec.group_by is None else resolve(body, spec.group_by),
                [resolve(body, path) for _, path in spec.accumulators],
            )
            for body in bodies
        ),
        spec,
    )


def aggregate_values(
    rows: Iterable[tuple[Any, Sequence[Any]]], spec: AggregateSpec
) -> list[tuple[Group, list[str]]]:
    """`aggregate` of documents given by the values it reads: per document, the group_by
    field's value (ignored without group_by) and each accumulator field's value. Every rule
    treats a missing field as null, so a backend may pass None (or MISSING) for either."""
    groups: dict[SortValue, Group] = {}
    if spec.group_by is None:
        groups[sort_value(None)] = Group(None, values=[[] for _ in spec.accumulators])
    everything = {sort_value(None): None}
    for group_value, field_values in rows:
        keys = everything if spec.group_by is None else _group_keys(group_value, spec.unwind)
        for ordering, k in keys.items():
            g = groups.get(ordering)
            if g is None:
                g = groups[ordering] = Group(k, values=[[] for _ in spec.accumulators])
            g.count += 1
            for column, value in zip(g.values, field_values, strict=True):
                column.append(value)
    ordered = sorted(
        groups.values(), key=lambda g: functools.cmp_to_key(_group_cmp)(group_position(g))
    )
    return [
        (
            g,
            [
                json_scalar(_accumulate(op, column))
                for (op, _), column in zip(spec.accumulators, g.values, strict=True)
            ],
        )
        for g in ordered
    ]


def group_position(group: Group) -> list[Any]:
    """Keyset position of a group in the Aggregate order (JSON form for a page token)."""
    return [group.count, list(sort_value(group.key))]


def group_after(group: Group, position: Any, field: str = "page_token") -> bool:
    """Does `group` come after the position `group_position` produced?"""
    if not (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], int)
        and not isinstance(position[0], bool)
    ):
        raise InvalidArgument(field, "malformed page token")
    probe = [position[0], list(_decode_sort_value(position[1], field))]
    return _group_cmp(group_position(group), probe) > 0


def _group_cmp(a: list[Any], b: list[Any]) -> int:
    if a[0] != b[0]:
        return -1 if a[0] > b[0] else 1
    return compare_sort_values((a[1][0], a[1][1]), (b[1][0], b[1][1]))


# Indexes -----------------------------------------------------------------------------------
MAX_INDEX_FIELDS = 16
_INDEX_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A validated index definition; `kind` is "value" or "text"."""

    name: str
    fields: tuple[tuple[str, bool], ...]
    unique: bool
    kind: str

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(tuple(p.split(".")) for p, _ in self.fields)


def parse_index(
    name: str, fields: Sequence[tuple[str, bool]], unique: bool, index_kind: str
) -> IndexSpec:
    """Validate an index definition (field names as DocumentIndexingService states them)."""
    if not _INDEX_NAME_RE.fullmatch(name):
        raise InvalidArgument("name", "must match ^[a-z][a-z0-9_]{0,62}$")
    if not fields or len(fields) > MAX_INDEX_FIELDS:
        raise InvalidArgument("fields", f"must list 1 to {MAX_INDEX_FIELDS} fields")
    seen: set[str] = set()
    for i, (path, descending) in enumerate(fields):
        parse_path(path, f"fields[{i}].path")
        if path in seen:
            raise InvalidArgument(f"fields[{i}].path", f"duplicate path {path!r}")
        seen.add(path)
        if index_kind == "text" and descending:
            raise InvalidArgument(f"fields[{i}].descending", "text index fields cannot descend")
    if index_kind == "text" and unique:
        raise InvalidArgument("unique", "a text index cannot be unique")
    return IndexSpec(name, tuple(fields), unique, index_kind)


def unique_key(body: Any, paths: Sequence[Path]) -> tuple[SortValue, ...] | None:
    """The value a unique index constrains, or None when the document is not constrained (a
    field missing, null, an object or an array). Equal keys ⇔ equal under the query's equality
    rules (1 equals 1.0, true does not equal 1)."""
    key: list[SortValue] = []
    for path in paths:
        value = sort_value(resolve(body, path))
        if value[0] in (0, 4):
            return None
        key.append(value)
    return tuple(key)
