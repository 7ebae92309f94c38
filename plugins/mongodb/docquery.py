"""The shared filter AST (plugins/runtime/docfilter.py) as a MongoDB query with exactly the
contract's semantics.

A body lives under `b`. MongoDB's matching already has the contract's equality (1 equals 1.0;
true, 1 and "1" all differ), its type bracketing for ranges (a string is never greater than a
number) and its one-level array rules (an array matches when an element does), so a condition
maps to the obvious operator. Two differences need care:
- MongoDB paths walk through arrays (`a.c` reaches `{"a": [{"c": 1}]}`, `a.0` indexes), where
  the contract says a path meeting an array before its last name is *missing*. Every condition
  on a dotted path is therefore guarded: it applies only when no proper prefix is an array, and
  otherwise the condition's value on a missing field (true for `$eq null`, false for `$gt`...)
  is used instead.
- `$ne`, `$nin` and `$not` are exact complements in the contract; they become `$nor` of the
  positive translation, so missing fields, nulls and arrays fall on the right side by
  construction. `$all` is a conjunction of equalities (MongoDB's own `$all` disagrees on null).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from plugins.runtime import docfilter
from plugins.runtime.docfilter import And, Condition, Node, Not, Or

Query = dict[str, Any]

BODY = "b"
MATCH_NOTHING: Query = {"_id": {"$in": []}}
INT64 = 2**63


def field(path: docfilter.Path) -> str:
    return ".".join((BODY, *path))


def operand(value: Any) -> Any:
    """A JSON scalar as BSON can hold it: integers beyond int64 become doubles (as the body
    stores them, see document.to_bson)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        return float(value)
    return value


def _no_array_prefix(path: docfilter.Path) -> list[Query]:
    return [{field(path[:i]): {"$not": {"$type": "array"}}} for i in range(1, len(path))]


def _guarded(path: docfilter.Path, test: Query, on_missing: bool) -> Query:
    guards = _no_array_prefix(path)
    if not guards:
        return test
    if on_missing:
        return {"$or": [{"$nor": [{"$and": guards}]}, test]}
    return {"$and": [*guards, test]}


def _condition(c: Condition) -> Query:
    path, op, value = c.path, c.op, c.operand
    if op == "$ne":
        return {"$nor": [_condition(Condition(path, "$eq", value))]}
    if op == "$nin":
        return {"$nor": [_condition(Condition(path, "$in", value))]}
    if op == "$all":
        if not value:
            return MATCH_NOTHING
        return _all([_condition(Condition(path, "$eq", v)) for v in value])
    if op == "$exists":
        present = _guarded(path, {field(path): {"$exists": True}}, False)
        return present if value else {"$nor": [present]}
    if op == "$eq":
        return _guarded(path, {field(path): operand(value)}, value is None)
    if op == "$in":
        values = [operand(v) for v in value]
        if not values:
            return MATCH_NOTHING
        return _guarded(path, {field(path): {"$in": values}}, None in value)
    # $gt $gte $lt $lte: MongoDB's type bracketing matches the contract's same-kind rule
    return _guarded(path, {field(path): {op: operand(value)}}, False)


def _all(parts: list[Query]) -> Query:
    return parts[0] if len(parts) == 1 else {"$and": parts}


def translate(node: Node) -> Query:
    """The MongoDB query matching exactly the documents `docfilter.matches` accepts."""
    if isinstance(node, Condition):
        return _condition(node)
    if isinstance(node, Not):
        return {"$nor": [translate(node.child)]}
    if isinstance(node, Or):
        return {"$or": [translate(c) for c in node.children]}
    if isinstance(node, And):
        return _all([translate(c) for c in node.children]) if node.children else {}
    raise TypeError(f"not a filter node: {node!r}")


def projection(paths: Iterable[docfilter.Path]) -> dict[str, int]:
    """A projection returning enough of the body to resolve every path (a path under another
    is covered by it; MongoDB rejects both at once)."""
    chosen: list[docfilter.Path] = []
    for path in sorted(set(paths), key=len):
        if not any(path[: len(p)] == p for p in chosen):
            chosen.append(path)
    return {"_id": 1, **{field(p): 1 for p in chosen}}
