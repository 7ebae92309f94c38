"""ResolveDependencies: a lock set of exact published versions for a whole dependency graph.

Fixed-point search: pick for every required lineage the highest published version that satisfies
every constraint the currently picked versions impose; repeat until the picks stop changing. A
lineage no version satisfies is a CONFLICT listing each constraint and who imposed it; a missing
lineage is MISSING; a dependency cycle among the picks is a CYCLE with its path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb

from plugins.runtime.context import CallContext
from server.patterns.artifact_registry.store import Stored
from server.patterns.artifact_registry.versions import Range, Version, parse_range, parse_version

MAX_ROUNDS = 100

LineageVersions = Callable[[str, str, CallContext], Awaitable[list[Stored]]]
Constraint = tuple[Range, str]


def _label(stored: Stored) -> str:
    return f"{stored.doc['lineage']}@{stored.doc['version']}"


class DependencyResolver:
    def __init__(self, lineage_versions: LineageVersions) -> None:
        self.lineage_versions = lineage_versions

    async def resolve(
        self, root: Stored, ctx: CallContext
    ) -> tuple[list[Stored], list[pb.DependencyProblem]]:
        available: dict[str, list[tuple[Version, Stored]]] = {}
        picks: dict[str, Stored] = {root.doc["lineage"]: root}
        problems: list[pb.DependencyProblem] = []
        for _ in range(MAX_ROUNDS):
            constraints = self._constraints(root, picks)
            problems = []
            new_picks: dict[str, Stored] = {root.doc["lineage"]: root}
            for name, cons in constraints.items():
                if name == root.doc["lineage"]:
                    if not all(r.matches(parse_version(root.doc["version"])) for r, _ in cons):
                        problems.append(self._conflict(name, cons))
                    continue
                if name not in available:
                    available[name] = await self._published(name, ctx)
                if not available[name]:
                    problems.append(
                        pb.DependencyProblem(
                            reason="MISSING", name=name, constraints=[w for _, w in cons]
                        )
                    )
                    continue
                best = next(
                    (s for v, s in available[name] if all(r.matches(v) for r, _ in cons)), None
                )
                if best is None:
                    problems.append(self._conflict(name, cons))
                else:
                    new_picks[name] = best
            if {k: v.id for k, v in new_picks.items()} == {k: v.id for k, v in picks.items()}:
                break
            picks = new_picks
        cycle = self._cycle(root, picks)
        if cycle:
            problems.append(pb.DependencyProblem(reason="CYCLE", name=cycle[0], path=cycle))
        return self._order(root, picks), problems

    async def _published(self, name: str, ctx: CallContext) -> list[tuple[Version, Stored]]:
        organization, _, slug = name.partition("/")
        versions = [
            (parse_version(s.doc["version"]), s)
            for s in await self.lineage_versions(organization, slug, ctx)
            if s.doc["state"] == "published"
        ]
        return sorted(versions, key=lambda t: t[0], reverse=True)

    @staticmethod
    def _conflict(name: str, cons: list[Constraint]) -> pb.DependencyProblem:
        return pb.DependencyProblem(reason="CONFLICT", name=name, constraints=[w for _, w in cons])

    @staticmethod
    def _deps(stored: Stored) -> list[dict[str, Any]]:
        deps: list[dict[str, Any]] = stored.doc["dependencies"]
        return deps

    def _constraints(self, root: Stored, picks: dict[str, Stored]) -> dict[str, list[Constraint]]:
        """Constraints imposed by the picks reachable from the root."""
        constraints: dict[str, list[Constraint]] = {}
        seen: set[str] = set()
        frontier = [root]
        while frontier:
            node = frontier.pop()
            if node.id in seen:
                continue
            seen.add(node.id)
            for dep in self._deps(node):
                who = f"{_label(node)} requires {dep['constraint']}"
                constraints.setdefault(dep["name"], []).append(
                    (parse_range(dep["constraint"]), who)
                )
                if dep["name"] in picks:
                    frontier.append(picks[dep["name"]])
        return constraints

    def _cycle(self, root: Stored, picks: dict[str, Stored]) -> list[str]:
        path: list[Stored] = []
        done: set[str] = set()

        def visit(node: Stored) -> list[str]:
            if node in path:
                loop = [*path[path.index(node) :], node]
                return [_label(s) for s in loop]
            if node.id in done:
                return []
            path.append(node)
            for dep in self._deps(node):
                child = picks.get(dep["name"])
                if child is not None and (found := visit(child)):
                    return found
            path.pop()
            done.add(node.id)
            return []

        return visit(root)

    def _order(self, root: Stored, picks: dict[str, Stored]) -> list[Stored]:
        """Dependencies before dependents (post-order from the root)."""
        ordered: list[Stored] = []
        seen: set[str] = set()

        def visit(node: Stored) -> None:
            if node.id in seen:
                return
            seen.add(node.id)
            for dep in self._deps(node):
                child = picks.get(dep["name"])
                if child is not None:
                    visit(child)
            ordered.append(node)

        visit(root)
        return ordered
