"""Layout analysis: whether blocks of a dimension's columns run apart (`separable`), and a step
as passes over blocks of a dimension, one block at a time (`stream`)."""

from __future__ import annotations

from dataclasses import dataclass

from mirasc.graph import Graph, plan
from mirasc.memories import ChunkStep


def separable(step: ChunkStep, dim: str = "DV") -> bool:
    """Whether the forward step never mixes entries along `dim`: no sum or max over it, no dot
    contracting it. Then blocks of `dim` columns run apart (one program each), and only the
    gradients of inputs without `dim` are partial sums over the blocks."""
    graph = step.graph
    if any(dim not in graph.shape(s) for s in (*step.states, *step.params)):
        return False  # a tile without the dim would be written whole by every block
    return not any(_folds(graph, n, dim) for n in plan(graph, list(step.outputs.values())))


def _folds(graph: Graph, n: str, dim: str) -> bool:
    """Whether node n combines entries along its input's `dim`: a sum or max over it, or a dot
    contracting it."""
    node = graph.node(n)
    if node["op"] in ("sum", "max"):
        return graph.shape(node["inputs"][0])[node["axis"]] == dim
    if node["op"] == "gdot":
        return graph.shape(node["inputs"][0])[1] == dim
    if node["op"] == "nonfinite":  # a block of DV columns counts its own: they run apart
        return dim != "DV" and dim in graph.shape(node["inputs"][0])
    return node["op"] == "dot" and graph.shape(node["inputs"][0])[0 if node["ta"] else 1] == dim


@dataclass(frozen=True)
class Loop:
    """One pass over the blocks of a dimension: `nodes` are recomputed for each block (tiles with
    the dim, from the states and values ready before the pass), `reduce` are reductions over the
    dim summed (or maxed) across the blocks, `store` the blocked targets written per block."""

    nodes: tuple[str, ...]
    reduce: tuple[str, ...]
    store: tuple[str, ...]



@dataclass(frozen=True)
class Stream:
    """A chunk step run over blocks of a dimension, one block at a time: `whole[j]` are the nodes
    without the dim computed before `loops[j]` (`whole[-1]` after the last)."""

    whole: tuple[tuple[str, ...], ...]
    loops: tuple[Loop, ...]


def stream(graph: Graph, targets, dim: str = "DH", stop=()) -> Stream | None:
    """The step of `targets` as passes over blocks of `dim`, so that a program holds one block of
    each tile with `dim` at a time (an MLP memory's hidden units): a tile reduced over `dim` is
    complete only after a pass, so whatever depends on it waits for the next pass, which
    recomputes the blocked tiles it needs; a tile without `dim` waits for the part before its
    first reader. None when some tile has `dim` twice or a node mixes `dim` otherwise than by
    these reductions; `stop` as for `plan`."""
    nodes = plan(graph, targets, stop)
    blocked = {n for n in nodes if dim in graph.shape(n)}
    if any(graph.shape(n).count(dim) > 1 for n in blocked):
        return None
    ready: dict[str, int] = {}  # the pass from which a node's value (or a block of it) exists
    reductions = []  # tiles without `dim` computed from tiles with it: complete after a pass
    for n in nodes:
        inputs = () if n in stop else graph.node(n)["inputs"]
        ready[n] = max((ready[i] for i in inputs), default=0)
        if n not in blocked and any(i in blocked for i in inputs):
            if not _folds(graph, n, dim):
                return None
            ready[n] += 1
            reductions.append(n)
    stores = [t for t in dict.fromkeys(targets) if t in blocked]
    last = max([ready[n] - 1 for n in reductions] + [ready[t] for t in stores], default=-1)
    loops = []
    for j in range(last + 1):
        reduce = tuple(n for n in reductions if ready[n] == j + 1)
        store = tuple(t for t in stores if ready[t] == j)
        need, todo = set(), [*store, *(i for n in reduce for i in graph.node(n)["inputs"])]
        while todo:  # the blocked tiles these use, back to the states and the ready values
            n = todo.pop()
            if n in blocked and n not in need:
                need.add(n)
                todo.extend(graph.node(n)["inputs"])
        loops.append(Loop(tuple(n for n in nodes if n in need), reduce, store))
    # A tile without the dim is computed (or loaded) in the last whole part before its first
    # reader, so that it holds no registers across passes that do not read it; one no node
    # reads (a target) as soon as it is ready.
    first = {n: min(j for j, loop in enumerate(loops) if n in loop.nodes) for n in blocked}
    first |= {n: ready[n] - 1 for n in reductions}
    for n in reversed(nodes):
        if n not in first:
            readers = [c for c in graph.g.successors(n) if c in first and c not in stop]
            first[n] = min((first[c] for c in readers), default=ready[n])
    whole = tuple(tuple(n for n in nodes if n not in blocked and n not in reductions
                        and first[n] == j) for j in range(last + 2))
    return Stream(whole, tuple(loops))
