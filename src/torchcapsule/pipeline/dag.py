"""The stage graph (pure): topological order, cycle detection, --from/--only selection.

Input is plain data (stage name -> names it needs, in declaration order) so every decision
here is unit-tested without a project file. Order is stable: among stages whose needs are met,
the one declared first in capsule.yaml runs first.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

from ..errors import PipelineError

Graph = Mapping[str, Sequence[str]]


def graph_of(project) -> dict[str, tuple[str, ...]]:
    return {name: tuple(stage.needs) for name, stage in project.stages.items()}


def _unknown(name: str, graph: Graph, where: str) -> PipelineError:
    close = difflib.get_close_matches(name, list(graph), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return PipelineError(f"{where}: unknown stage '{name}'{hint}; stages: {', '.join(graph) or 'none'}")


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle as [a, b, ..., a] (first found in declaration order), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in graph[n]:
            if m not in color:
                continue  # unknown names are reported by order()
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE and (c := visit(m)):
                return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in graph:
        if color[n] == WHITE and (c := visit(n)):
            # `needs` points upstream; show the cycle in run order (a -> b means a runs before b)
            return list(reversed(c))
    return None


def check(graph: Graph) -> None:
    """Raise PipelineError for a need on an unknown stage or a cycle, naming the stage and fix."""
    for name, needs in graph.items():
        for need in needs:
            if need not in graph:
                raise _unknown(need, graph, f"stages.{name}.needs")
            if need == name:
                raise PipelineError(f"stages.{name}.needs: '{name}' needs itself; remove '{name}' from its needs")
    cycle = find_cycle(graph)
    if cycle:
        a, b = cycle[-2], cycle[-1]
        raise PipelineError(
            f"stages.{b}.needs: cycle {' -> '.join(cycle)}; remove '{a}' from stages.{b}.needs "
            f"(or another need on the cycle)"
        )


def order(graph: Graph) -> list[str]:
    """All stages, each after everything it needs (Kahn's algorithm, declaration order for ties)."""
    check(graph)
    pos = {n: i for i, n in enumerate(graph)}
    remaining = {n: set(needs) for n, needs in graph.items()}
    done: list[str] = []
    while remaining:
        ready = sorted((n for n, needs in remaining.items() if not needs), key=pos.__getitem__)
        n = ready[0]  # check() ruled out cycles, so something is always ready
        done.append(n)
        del remaining[n]
        for needs in remaining.values():
            needs.discard(n)
    return done


def downstream(graph: Graph, start: str) -> set[str]:
    """`start` and every stage that needs it, directly or not."""
    users: dict[str, set[str]] = {n: set() for n in graph}
    for n, needs in graph.items():
        for m in needs:
            users[m].add(n)
    seen, todo = {start}, [start]
    while todo:
        for u in users[todo.pop()]:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def upstream(graph: Graph, start: str) -> set[str]:
    """Every stage `start` needs, directly or not (not `start` itself)."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n])
    return seen


def select(graph: Graph, *, from_stage: str | None = None, only: Iterable[str] = ()) -> list[str]:
    """The stages to consider, in run order.

    --from STAGE: STAGE and everything downstream of it (what it needs is taken as done).
    --only A B:   exactly those stages (their needs are not pulled in).
    Both: the --only stages that are downstream of --from.
    """
    only = list(only)
    for n in only:
        if n not in graph:
            raise _unknown(n, graph, "--only")
    if from_stage is not None and from_stage not in graph:
        raise _unknown(from_stage, graph, "--from")
    chosen = set(graph)
    if from_stage is not None:
        chosen &= downstream(graph, from_stage)
    if only:
        chosen &= set(only)
        if not chosen:
            raise PipelineError(f"--only {' '.join(only)} and --from {from_stage}: no stage is in both; "
                                f"pick --only stages at or after '{from_stage}'")
    return [n for n in order(graph) if n in chosen]


__all__ = ["Graph", "graph_of", "find_cycle", "check", "order", "downstream", "upstream", "select"]
