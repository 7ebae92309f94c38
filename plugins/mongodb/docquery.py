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

Sorting runs on the server too: an aggregation stage computes, per sort field, the contract's
(rank, value) pair (docfilter.sort_value: missing = null < numbers < strings < booleans <
objects = arrays, the value kept only for the three scalar ranks) with the same array-prefix
guard, and MongoDB sorts on those pairs then `_id`; keyset pages match "after the last pair".
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


# Sorting -----------------------------------------------------------------------------------
_RANKS: list[tuple[list[str], int]] = [
    (["int", "long", "double", "decimal"], 1),
    (["string"], 2),
    (["bool"], 3),
    (["object", "array"], 4),
]


def _value(path: docfilter.Path) -> Any:
    """Aggregation expression for the value at `path`, missing when a prefix is an array
    (aggregation paths never index arrays by number, so the guard is all that is needed)."""
    full = "$" + field(path)
    guards = [{"$ne": [{"$type": "$" + field(path[:i])}, "array"]} for i in range(1, len(path))]
    return {"$cond": [{"$and": guards}, full, "$$REMOVE"]} if guards else full


def _rank(value: Any) -> Any:
    kind = {"$type": value}
    return {
        "$switch": {
            "branches": [{"case": {"$in": [kind, names]}, "then": r} for names, r in _RANKS],
            "default": 0,
        }
    }


def sort_stages(spec: docfilter.SortSpec, after: docfilter.SortKey | None) -> list[Query]:
    """Pipeline stages putting matching documents in the contract's order, starting after
    `after`; the computed fields are `_s<i>r` / `_s<i>v`."""
    computed: Query = {}
    order: dict[str, int] = {}
    for i, (path, descending) in enumerate(spec.fields):
        value = _value(path)
        rank = _rank(value)
        computed[f"_s{i}r"] = rank
        computed[f"_s{i}v"] = {"$cond": [{"$in": [rank, [1, 2, 3]]}, value, None]}
        order[f"_s{i}r"] = order[f"_s{i}v"] = -1 if descending else 1
    stages: list[Query] = [{"$addFields": computed}]
    if after is not None:
        stages.append({"$match": _keyset_after(spec, after)})
    stages.append({"$sort": {**order, "_id": 1}})
    return stages


def sort_cleanup(spec: docfilter.SortSpec) -> Query:
    return {"$project": {f"_s{i}{part}": 0 for i in range(len(spec.fields)) for part in "rv"}}


def _keyset_after(spec: docfilter.SortSpec, after: docfilter.SortKey) -> Query:
    """Documents strictly after `after` in the order sort_stages sorts by."""
    branches: list[Query] = []
    equal: Query = {}
    for i, ((_, descending), (rank, value)) in enumerate(
        zip(spec.fields, after.values, strict=True)
    ):
        beyond = "$lt" if descending else "$gt"
        r, v = f"_s{i}r", f"_s{i}v"
        scalar = rank in (1, 2, 3)
        branches.append({**equal, r: {beyond: rank}})
        if scalar:
            branches.append({**equal, r: rank, v: {beyond: operand(value)}})
        equal = {**equal, r: rank, v: operand(value) if scalar else None}
    branches.append({**equal, "_id": {"$gt": after.doc_id}})
    return {"$or": branches}


def projection(paths: Iterable[docfilter.Path]) -> dict[str, int]:
    """A projection returning enough of the body to resolve every path (a path under another
    is covered by it; MongoDB rejects both at once)."""
    chosen: list[docfilter.Path] = []
    for path in sorted(set(paths), key=len):
        if not any(path[: len(p)] == p for p in chosen):
            chosen.append(path)
    return {"_id": 1, **{field(p): 1 for p in chosen}}
