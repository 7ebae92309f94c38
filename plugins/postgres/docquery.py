"""The shared filter AST (plugins/runtime/docfilter.py) and sort order, as parameterized SQL over
JSONB.

Every value and member name is a bound parameter (named `%(pN)s`); only fixed SQL fragments are
concatenated. Paths are chains of `->` with text operands, which address object members only
(a numeric name never indexes an array, as the contract requires). Every condition is made
two-valued (coalesce / IS NULL tests), so `$not` and `$ne` of a missing field behave as the
contract says instead of turning into SQL's "unknown". Comparisons never cast: numbers compare
as JSONB numbers (numerically, 1 equals 1.0) and strings as text under COLLATE "C" (code point
order), so no stored value can make a query fail.
"""

from __future__ import annotations

import json
from typing import Any

from plugins.runtime import docfilter
from plugins.runtime.docfilter import And, Condition, Node, Not, SortKey, SortSpec

_CMP_SQL = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_RANK_SQL = (
    "(CASE jsonb_typeof({v}) WHEN 'number' THEN 1 WHEN 'string' THEN 2 WHEN 'boolean' THEN 3 "
    "WHEN 'object' THEN 4 WHEN 'array' THEN 4 ELSE 0 END)"
)
# within one rank only one of the two is set: numbers/booleans as JSONB, strings as C text
_JSON_VALUE_SQL = "(CASE WHEN jsonb_typeof({v}) IN ('number', 'boolean') THEN {v} END)"
_TEXT_VALUE_SQL = "(CASE WHEN jsonb_typeof({v}) = 'string' THEN ({v} #>> '{{}}') COLLATE \"C\" END)"


def _nested(path: docfilter.Path, leaf: Any) -> Any:
    """{"a": {"b": leaf}} for the path ("a", "b")."""
    for name in reversed(path):
        leaf = {name: leaf}
    return leaf


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Sql:
    """A WHERE / ORDER BY fragment being built and its named parameters."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def p(self, value: Any, cast: str = "") -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"%({name})s{cast}"

    def value(self, path: docfilter.Path) -> str:
        """The JSONB value at `path`, NULL when missing."""
        return "(body" + "".join(f"->{self.p(name, '::text')}" for name in path) + ")"

    # -- filter ------------------------------------------------------------------------------

    def where(self, node: Node) -> str:
        if isinstance(node, Condition):
            return f"coalesce({self._condition(node)}, false)"
        if isinstance(node, Not):
            return f"(NOT {self.where(node.child)})"
        if not node.children:
            return "true" if isinstance(node, And) else "false"
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(self.where(c) for c in node.children) + ")"

    def _condition(self, c: Condition) -> str:
        if c.op == "$eq":
            return self._eq(c.path, c.operand)
        if c.op == "$ne":
            return f"(NOT coalesce({self._eq(c.path, c.operand)}, false))"
        if c.op == "$exists":
            return f"({self.value(c.path)} IS {'NOT ' if c.operand else ''}NULL)"
        if c.op in _CMP_SQL:
            return self._compare(self.value(c.path), _CMP_SQL[c.op], c.operand)
        if not c.operand:  # $in / $all of nothing match nothing; $nin of nothing everything
            return "true" if c.op == "$nin" else "false"
        parts = [f"coalesce({self._eq(c.path, x)}, false)" for x in c.operand]
        if c.op == "$all":
            return "(" + " AND ".join(parts) + ")"
        any_of = "(" + " OR ".join(parts) + ")"
        return any_of if c.op == "$in" else f"(NOT {any_of})"

    def _eq(self, path: docfilter.Path, operand: Any) -> str:
        """{"$eq": operand} at `path`: equal, or an array with an equal element, one level deep.

        For a non-null operand this is exactly JSONB containment of {path: operand} or
        {path: [operand]}: below the top level a scalar is contained only in an equal scalar
        and an array only in an array holding each element (arrays of arrays are not looked
        into), objects only in objects (so paths never cross arrays), and numbers compare
        numerically. Containment is what the GIN index over the bodies serves."""
        if operand is None:
            v = self.value(path)
            element = f"(jsonb_typeof({v}) = 'array' AND {v} @> '[null]'::jsonb)"
            return f"({v} IS NULL OR {v} = 'null'::jsonb OR {element})"
        scalar = self.p(dumps(_nested(path, operand)), "::jsonb")
        element = self.p(dumps(_nested(path, [operand])), "::jsonb")
        return f"(body @> {scalar} OR body @> {element})"

    def _compare(self, v: str, op: str, operand: Any) -> str:
        """The value, or an element of it, is of the operand's kind and compares as asked."""
        if isinstance(operand, str):
            x = self.p(operand, "::text")
            test = "jsonb_typeof({e}) = 'string' AND ({e} #>> '{{}}') COLLATE \"C\" " + op + " " + x
        else:
            x = self.p(dumps(operand), "::jsonb")
            test = "jsonb_typeof({e}) = 'number' AND {e} " + op + " " + x
        elements = (
            f"(CASE WHEN jsonb_typeof({v}) = 'array' THEN EXISTS (SELECT 1 FROM "
            f"jsonb_array_elements({v}) AS el(e) WHERE {test.format(e='el.e')}) ELSE false END)"
        )
        return f"(({test.format(e=v)}) OR {elements})"

    # -- sort --------------------------------------------------------------------------------

    def _sort_exprs(self, path: docfilter.Path) -> tuple[str, str, str]:
        v = self.value(path)
        return _RANK_SQL.format(v=v), _JSON_VALUE_SQL.format(v=v), _TEXT_VALUE_SQL.format(v=v)

    def order_by(self, spec: SortSpec) -> str:
        terms = []
        for path, descending in spec.fields:
            direction = " DESC" if descending else ""
            terms += [e + direction for e in self._sort_exprs(path)]
        return ", ".join([*terms, "id"])

    def after(self, spec: SortSpec, key: SortKey) -> str:
        """Rows strictly after `key` in `spec`'s order (keyset pagination): equal on the first
        j sort values and beyond on value j, for some j, or equal on all and a greater id."""
        fields = [
            (*self._sort_exprs(path), descending, rank, value)
            for (path, descending), (rank, value) in zip(spec.fields, key.values, strict=True)
        ]
        alternatives = []
        for j in range(len(fields) + 1):
            parts = [self._same(*f[:3], *f[4:]) for f in fields[:j]]
            if j == len(fields):
                parts.append(f"id > {self.p(key.doc_id, '::text')}")
            else:
                parts.append(self._beyond(*fields[j]))
            alternatives.append("(" + " AND ".join(parts) + ")")
        return "(" + " OR ".join(alternatives) + ")"

    def _typed(self, json_expr: str, text_expr: str, rank: int, value: Any) -> tuple[str, str]:
        if rank == 2:
            return text_expr, self.p(value, "::text") + ' COLLATE "C"'
        return json_expr, self.p(dumps(value), "::jsonb")

    def _same(self, rank_expr: str, json_expr: str, text_expr: str, rank: int, value: Any) -> str:
        same_rank = f"{rank_expr} = {rank:d}"
        if rank in (0, 4):
            return same_rank
        expr, x = self._typed(json_expr, text_expr, rank, value)
        return f"{same_rank} AND {expr} = {x}"

    def _beyond(
        self,
        rank_expr: str,
        json_expr: str,
        text_expr: str,
        descending: bool,
        rank: int,
        value: Any,
    ) -> str:
        op = "<" if descending else ">"
        if rank in (0, 4):
            return f"{rank_expr} {op} {rank:d}"
        expr, x = self._typed(json_expr, text_expr, rank, value)
        return f"({rank_expr} {op} {rank:d} OR ({rank_expr} = {rank:d} AND {expr} {op} {x}))"
