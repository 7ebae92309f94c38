"""The shared filter AST (plugins/runtime/docfilter.py) and sort order, as SQL.

Every value is a bound parameter. JSON paths are inlined as quoted string literals (validated by
`json_path`, quoted by `sql_literal`): SQLite matches an expression index only against the same
expression spelt with the same literal path, never against a bound one. Each condition is wrapped
in IFNULL(..., 0) so it is always 0 or 1: SQL's three-valued logic would otherwise turn `$not` /
`$ne` of a missing field into "unknown" and drop the row.

Conditions on JSON cannot use an index by themselves (equality must also match array elements, so
it is an OR with a json_each scan), so `Sql.index_driver` rewrites one top-level condition on an
indexed field as a rowid set taken from that index; the whole filter is still checked per row.

A value index keeps each field as the two sort expressions (`rank_sql`, `sort_value_sql`), the
very ones ORDER BY spells, so one index serves equality, ranges, uniqueness and order: a sorted
page can walk an index in order and stop at its LIMIT (`Sql.ordered_terms`) instead of sorting
every match.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

from plugins.runtime import docfilter
from plugins.runtime.docfilter import And, Condition, Node, Not, SortKey, SortSpec
from plugins.runtime.errors import InvalidArgument

NUMBER_TYPES = "('integer', 'real')"
SCALAR_TYPES = "('integer', 'real', 'text', 'true', 'false')"
NULL_ELEMENT = "type = 'null'"
_CMP_SQL = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
#: docfilter.sort_value's ranks: missing or null, number, text, boolean, array or object
_NUMBER, _TEXT, _BOOL, COMPOUND_RANK = 1, 2, 3, 4
#: preference among conditions that could drive a query from an index (lower first): equality
#: on a string or number usually selects a few rows, a boolean often half the collection
_EQ_VALUE, _IN_VALUES, _RANGE, _EQ_BOOL = range(4)
#: an $in longer than this drives no query: it is rarely selective, and its values would be
#: bound twice more (SQLite caps the parameters of one statement)
MAX_DRIVER_VALUES = 256


def json_path(path: docfilter.Path, field: str = "filter") -> str:
    """Field path → SQLite JSON path; every name quoted so digits never index arrays.

    SQLite 3.40's JSON paths cannot spell a member name containing a double quote, so such a
    path is refused rather than silently matching nothing."""
    for name in path:
        if '"' in name:
            raise InvalidArgument(field, f"field name {name!r}: '\"' is not supported by sqlite")
    return "$" + "".join(f'."{name}"' for name in path)


def sql_literal(text: str) -> str:
    """A SQL string literal, for what SQLite must see written out: DDL (which takes no bound
    parameters) and the paths and scopes of queries that must spell an index's terms."""
    return "'" + text.replace("'", "''") + "'"


def path_literal(path: docfilter.Path, field: str = "filter") -> str:
    return sql_literal(json_path(path, field))


def rank_sql(path: str) -> str:
    """The sort rank (docfilter.sort_value) of the value at `path` (a literal): the first key
    of ORDER BY and the first column a value index keeps per field, so 1 and 1.0 rank alike and
    `true`, 1 and "1" apart."""
    return (
        f"(CASE json_type(body, {path}) WHEN 'integer' THEN 1 WHEN 'real' THEN 1 "
        "WHEN 'text' THEN 2 WHEN 'true' THEN 3 WHEN 'false' THEN 3 WHEN 'array' THEN 4 "
        "WHEN 'object' THEN 4 ELSE 0 END)"
    )


def sort_value_sql(path: str) -> str:
    """The scalar at `path` (booleans as 1 and 0; NULL for arrays and objects): the second key
    of ORDER BY and the second column a value index keeps per field."""
    return (
        f"(CASE WHEN json_type(body, {path}) IN ('array', 'object') THEN NULL "
        f"ELSE json_extract(body, {path}) END)"
    )


def scope_sql(ns: str, collection: str) -> str:
    """The partial-index WHERE of the collection's value indexes, and the scope of a query
    that must be answered from them (SQLite needs the same terms, literally)."""
    return f"ns = {sql_literal(ns)} AND collection = {sql_literal(collection)}"


class Sql:
    """A WHERE/ORDER BY fragment being built and its named parameters (`:p0`, `:p1`, ...)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def p(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            value = float(value)  # as SQLite's JSON1 reads such a number
        self.params[name] = value
        return ":" + name

    # -- filter ------------------------------------------------------------------------------

    def where(self, node: Node) -> str:
        if isinstance(node, Condition):
            return f"IFNULL({self._condition(node)}, 0)"
        if isinstance(node, Not):
            return f"(NOT {self.where(node.child)})"
        if not node.children:
            return "1" if isinstance(node, And) else "0"
        joiner = " AND " if isinstance(node, And) else " OR "
        return _balanced(joiner, [self.where(c) for c in node.children])

    def _condition(self, c: Condition) -> str:
        path = path_literal(c.path)
        if c.op == "$eq":
            return self._eq(path, c.operand)
        if c.op == "$ne":
            return f"(NOT IFNULL({self._eq(path, c.operand)}, 0))"
        if c.op == "$exists":
            return f"(json_type(body, {path}) IS {'NOT ' if c.operand else ''}NULL)"
        if c.op in _CMP_SQL:
            return self._scalar_or_element(path, _types(c.operand), _CMP_SQL[c.op], c.operand)
        if not c.operand:  # $in / $all of nothing match nothing; $nin of nothing everything
            return "1" if c.op == "$nin" else "0"
        parts = [f"IFNULL({self._eq(path, v)}, 0)" for v in c.operand]
        if c.op == "$all":
            return _balanced(" AND ", parts)
        any_of = _balanced(" OR ", parts)
        return any_of if c.op == "$in" else f"(NOT {any_of})"

    def _eq(self, path: str, operand: Any) -> str:
        """{"$eq": operand}: equal, or an array with an equal element (one level deep)."""
        if operand is None:
            return (
                f"(json_type(body, {path}) IS NULL OR json_type(body, {path}) = 'null' "
                f"OR {_element(path, NULL_ELEMENT)})"
            )
        if isinstance(operand, bool):
            name = "'true'" if operand else "'false'"
            return f"(json_type(body, {path}) = {name} OR {_element(path, f'type = {name}')})"
        return self._scalar_or_element(path, _types(operand), "=", operand)

    def _scalar_or_element(self, path: str, types: str, op: str, operand: Any) -> str:
        value = self.p(operand)
        scalar = f"(json_type(body, {path}) IN {types} AND json_extract(body, {path}) {op} {value})"
        return f"({scalar} OR {_element(path, f'type IN {types} AND value {op} {value}')})"

    # -- index use ---------------------------------------------------------------------------

    def index_driver(
        self,
        node: Node,
        indexed: Collection[docfilter.Path],
        scope: str,
        *,
        selective_only: bool = False,
    ) -> str | None:
        """`rowid IN (...)` answering one top-level condition of `node` on an `indexed` path
        (the leading field of a usable value index) from that index, or None when none can
        (or, `selective_only`, none that may select few rows: a boolean equality selects many,
        reading them all costs more than a walk in sort order that stops at the page's end).

        One UNION ALL arm per value rank the condition can match as a scalar, spelt as the
        index's (rank, value) columns, plus one arm for arrays (the index's rank of arrays and
        objects), each under `scope`, the index's partial WHERE."""
        best: tuple[int, Condition, list[str]] | None = None
        for c in _conjuncts(node):
            if isinstance(c, Condition) and c.path in indexed:
                found = self._scalar_arms(c)
                if found is None or (selective_only and found[0] == _EQ_BOOL):
                    continue
                if best is None or found[0] < best[0]:
                    best = (found[0], c, found[1])
        if best is None:
            return None
        _, c, scalar_arms = best
        path = path_literal(c.path)
        arms = [*scalar_arms, f"{rank_sql(path)} = {COMPOUND_RANK} AND {self.where(c)}"]
        selects = " UNION ALL ".join(f"SELECT rowid FROM docs WHERE {scope} AND {a}" for a in arms)
        return f"rowid IN ({selects})"

    def _scalar_arms(self, c: Condition) -> tuple[int, list[str]] | None:
        """(preference, index-shaped conditions on the scalar values `c` matches), or None
        when `c` cannot be answered that way (null operands, negations, $exists, $all)."""
        path = path_literal(c.path)
        rank, value = rank_sql(path), sort_value_sql(path)
        if c.op in _CMP_SQL:  # compares numbers (booleans as numbers, as `where` does) or text
            kind = _NUMBER if isinstance(c.operand, int | float) else _TEXT
            return _RANGE, [f"{rank} = {kind} AND {value} {_CMP_SQL[c.op]} {self.p(c.operand)}"]
        operands: tuple[Any, ...]
        if c.op == "$eq":
            operands = (c.operand,)
        elif c.op == "$in" and 0 < len(c.operand) <= MAX_DRIVER_VALUES:
            operands = c.operand
        else:
            return None
        if any(v is None for v in operands):
            return None
        arms = []
        for kind in (_BOOL, _TEXT, _NUMBER):
            same = dict.fromkeys(v for v in operands if _rank(v) == kind)
            if same:
                arms.append(f"{rank} = {kind} AND {value} IN ({', '.join(map(self.p, same))})")
        if c.op == "$in":
            return _IN_VALUES, arms
        return (_EQ_BOOL if isinstance(c.operand, bool) else _EQ_VALUE), arms

    def ordered_terms(self, node: Node, prefix: Sequence[docfilter.Path]) -> list[str] | None:
        """Terms that let SQLite walk a value index over `prefix` + the sort fields in order:
        an index equality per prefix field, each required by a top-level `$eq` of a scalar in
        `node` (exact only where the collection holds no array there: the caller checks), or
        None when a prefix field has no such condition. A later page's keyset bound is read
        from the index's columns as it walks, so skipped entries cost no document read."""
        conditions = {
            c.path: c
            for c in _conjuncts(node)
            if isinstance(c, Condition) and c.op == "$eq" and _scalar(c.operand)
        }
        terms = []
        for path in prefix:
            c = conditions.get(path)
            if c is None:
                return None
            literal = path_literal(path)
            terms.append(
                f"{rank_sql(literal)} = {_rank(c.operand)} "
                f"AND {sort_value_sql(literal)} = {self.p(c.operand)}"
            )
        return terms

    # -- sort --------------------------------------------------------------------------------

    def _sort_exprs(self, path: docfilter.Path) -> tuple[str, str]:
        jp = path_literal(path, "sort")
        return rank_sql(jp), sort_value_sql(jp)

    def order_by(self, spec: SortSpec) -> str:
        terms = []
        for path, descending in spec.fields:
            direction = " DESC" if descending else ""
            rank, value = self._sort_exprs(path)
            terms += [rank + direction, value + direction]
        return ", ".join([*terms, "id"])

    def after(self, spec: SortSpec, key: SortKey) -> str:
        """Rows strictly after `key` in `spec`'s order (keyset pagination): equal on the first
        j sort values and beyond on value j, for some j, or equal on all and a greater id."""
        exprs = [self._sort_exprs(path) for path, _ in spec.fields]
        bounds = [(self.p(rank), self.p(value)) for rank, value in key.values]
        alternatives = []
        for j in range(len(spec.fields) + 1):
            equal = [
                f"{r} = {rank} AND {v} IS {value}"
                for (r, v), (rank, value) in zip(exprs[:j], bounds[:j], strict=True)
            ]
            if j == len(spec.fields):
                beyond = f"id > {self.p(key.doc_id)}"
            else:
                (r, v), (rank, value) = exprs[j], bounds[j]
                op = "<" if spec.fields[j][1] else ">"
                beyond = f"({r} {op} {rank} OR ({r} = {rank} AND {v} {op} {value}))"
            alternatives.append("(" + " AND ".join([*equal, beyond]) + ")")
        return "(" + " OR ".join(alternatives) + ")"


def _balanced(joiner: str, parts: list[str]) -> str:
    """`parts` joined as a balanced tree: SQLite refuses expressions nested 1000 deep, which a
    flat chain of a long $in (or $or) would be."""
    if len(parts) == 1:
        return f"({parts[0]})"
    middle = len(parts) // 2
    return f"({_balanced(joiner, parts[:middle])}{joiner}{_balanced(joiner, parts[middle:])})"


def _types(operand: Any) -> str:
    return NUMBER_TYPES if isinstance(operand, int | float) else "('text')"


def _element(path: str, test: str) -> str:
    """Some element of the array at `path` passes `test` (a condition on json_each's row)."""
    return (
        f"(json_type(body, {path}) = 'array' AND EXISTS "
        f"(SELECT 1 FROM json_each(body, {path}) WHERE {test}))"
    )


def _rank(operand: Any) -> int:
    """The sort rank (see `rank_sql`) of a boolean, number or string operand."""
    if isinstance(operand, bool):
        return _BOOL
    return _NUMBER if isinstance(operand, int | float) else _TEXT


def _scalar(operand: Any) -> bool:
    return isinstance(operand, bool | int | float | str)


def _conjuncts(node: Node) -> Iterator[Node]:
    """The nodes every match must satisfy: `node`, or its children through nested $and."""
    if isinstance(node, And):
        for child in node.children:
            yield from _conjuncts(child)
    else:
        yield node
