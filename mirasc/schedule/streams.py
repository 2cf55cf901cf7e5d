"""Layout analysis: whether blocks of a dimension's columns run apart (`separable`), a step as
passes over blocks of a dimension, one block at a time (`stream`), an output kernel walking the
value blocks (`value_walk`), and the gradients its programs per key block compute as shares
summed after (`key_shares`)."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

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
        # the blocked tiles these use, back to the states and the ready values
        need = _blocked_inputs(graph, [*store, *(i for n in reduce for i in graph.node(n)["inputs"])],
                               blocked)
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


@dataclass(frozen=True)
class ValueWalk:
    """An output kernel whose program walks the blocks of value columns, summing in registers
    what contracts them (`sums`: dots over DV, sums over it), so that what follows from the sums
    runs once, after the walk (`after`), and its gradients are stored once. `before`: the
    value-free tiles the walk reads, as passes over every key block; `walk`: one value block's
    step, as passes over every key block. With `per_key_block` (gradients of key columns) a
    program holds one block of key columns: the walk's last pass runs on it alone, and so does
    the part after the walk."""

    before: Stream
    walk: Stream
    sums: tuple[str, ...]
    after: tuple[str, ...]
    per_key_block: bool
    shares: KeyShares | None = None


def _blocked_inputs(graph: Graph, roots, blocked) -> set[str]:
    """The blocked tiles `roots` are computed from, back to the unblocked ones."""
    need, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in blocked and n not in need:
            need.add(n)
            todo.extend(graph.node(n)["inputs"])
    return need


def _stores_last(graph: Graph, passes: Stream | None) -> Stream | None:
    """`passes` with every blocked target stored in one last pass that reduces nothing (its own
    pass after the others where a pass both reduced and stored); None where it stores none."""
    if passes is None or not any(loop.store for loop in passes.loops):
        return None
    stores = [t for loop in passes.loops for t in loop.store]
    if len(passes.loops) == 1 and not passes.loops[0].reduce:
        return passes
    blocked = {n for loop in passes.loops for n in loop.nodes}
    loops = [Loop(tuple(n for n in loop.nodes if n in _blocked_inputs(
        graph, [i for r in loop.reduce for i in graph.node(r)["inputs"]], blocked)), loop.reduce, ())
             for loop in passes.loops if loop.reduce]
    need = _blocked_inputs(graph, stores, blocked)
    own = Loop(tuple(dict.fromkeys(n for loop in passes.loops for n in loop.nodes if n in need)),
               (), tuple(stores))
    whole = (*passes.whole[:len(loops)], tuple(n for w in passes.whole[len(loops):] for n in w), ())
    return Stream(whole, (*loops, own))


def _by_values(graph: Graph, nodes, stop) -> tuple[set, list, set] | None:
    """The nodes that depend on one block of value columns, those that sum over the blocks
    (fold DV, from the former), and those that follow from the sums; None where a node of one
    block reads a sum, or the blocks are maxed over."""
    value, sums, after = set(), [], set()
    for n in nodes:
        inputs = () if n in stop else graph.node(n)["inputs"]
        from_values = any(i in value for i in inputs)
        if "DV" in graph.shape(n) or (from_values and not _folds(graph, n, "DV")):
            if any(i in after or i in sums for i in inputs):
                return None
            value.add(n)
        elif from_values:
            if graph.node(n)["op"] == "max":
                return None
            sums.append(n)
        elif any(i in after or i in sums for i in inputs):
            after.add(n)
    return value, sums, after


def _sum_over_keys(graph: Graph, nodes, value: set, sums: list, after: set) -> bool:
    """Where the program holds every key column: a sum over DV that keeps key columns and is
    read only by sums over them becomes one block's tile, and its readers the sums (summed over
    both); False where such a sum has another reader."""
    for s in [s for s in sums if "DK" in graph.shape(s)]:
        readers = [c for c in graph.g.successors(s) if c in nodes]
        if not readers or not all(graph.node(c)["op"] == "sum" and _folds(graph, c, "DK")
                                  for c in readers):
            return False
        sums.remove(s)
        value.add(s)
        after.difference_update(readers)
        sums.extend(c for c in readers if c not in sums)
    sums.sort(key=list(nodes).index)
    return True


def value_walk(graph: Graph, targets, stop=()) -> ValueWalk | None:
    """The kernel of `targets` (gradients, from a step that never mixes value columns) as a
    `ValueWalk`, per key block where the targets have key columns; None where it does not run
    so: a tile of one value block reads a sum over them, or the blocks are maxed over, or what
    follows the sums reduces over DK, or (per key block) a sum over DV is also one over DK."""
    nodes = plan(graph, targets, stop)
    classes = _by_values(graph, nodes, stop)
    if classes is None:
        return None
    value, sums, after = classes
    per_key_block = any("DK" in graph.shape(t) for t in targets)
    if not sums or not (per_key_block or _sum_over_keys(graph, nodes, value, sums, after)):
        return None
    done = {n for n in nodes if n not in value and n not in after and n not in sums
            and "DK" not in graph.shape(n)}
    walk = stream(graph, sums, dim="DK", stop=(*stop, *done))
    if per_key_block:
        walk = _stores_last(graph, walk)
        if walk is None or any(n in sums for loop in walk.loops for n in loop.reduce) or \
                {n for n in sums if "DK" in graph.shape(n)} != set(walk.loops[-1].store):
            return None
    elif walk is None or any(loop.store for loop in walk.loops):
        return None
    walked = value | set(sums)
    walk = Stream(tuple(tuple(n for n in whole if n in walked) for whole in walk.whole),
                  walk.loops)
    # Before the walk: what it reads, and the sums over key blocks only the part after it
    # reads; the rest waits for the part after the walk, holding no registers across it.
    wanted = [n for n in done if any(c in walked for c in graph.g.successors(n)) or (
        any(c in after for c in graph.g.successors(n))
        and any(_folds(graph, i, "DK") for i in plan(graph, [n], stop) if i not in stop))]
    before = stream(graph, wanted, dim="DK", stop=stop)
    ready = set(plan(graph, wanted, stop))
    tail = [n for n in plan(graph, targets, (*stop, *ready, *sums))
            if n not in ready and n not in walked]
    if before is None or any(_folds(graph, n, "DK") or (
            not per_key_block and "DK" in graph.shape(n)) for n in tail):
        return None
    return ValueWalk(before, walk, tuple(sums), tuple(tail), per_key_block)


# ops linear in each input (a dot in each operand apart): a key block's share passes through them
_LINEAR = ("dot", "sum", "trans", "broadcast", "cumsum", "revcumsum")


@dataclass(frozen=True)
class KeyShares:
    """Gradients without key columns (per-head gates) that a per-key-block `ValueWalk` computes
    beside its own from the program's key block alone, as fla's dq/dk kernels do their gates'
    gradients: each sum over key columns they read covers that block only, and as the gradients
    are affine in those sums, the programs' values add up to the whole gradient, each affine
    constant counted by the first key block alone (`constants`: node -> its constant term).
    `pre`: key-free tiles the walk's step reads, before the walk; `inner`: one value block's step
    on the program's key block, after the walk's own; `sums`: over the value blocks; `after`:
    what follows, after the walk's own; `shares`: the nodes whose value is a key block's share;
    `targets`: the gradients, each written per key block and summed after where it is a share,
    else (read no sum over key columns) whole, by the first key block."""

    targets: tuple[str, ...]
    pre: tuple[str, ...]
    inner: tuple[str, ...]
    sums: tuple[str, ...]
    after: tuple[str, ...]
    shares: frozenset
    constants: dict


def _visible(walk: ValueWalk) -> tuple[set, set, set]:
    """The walk's nodes that hold their value (the whole tile, or the program's key block)
    before the walk, in a value block's step after the walk's own pass, and after the walk."""
    before = {n for w in walk.before.whole for n in w} | \
        {r for loop in walk.before.loops for r in loop.reduce}
    inner = before | {n for w in walk.walk.whole for n in w} | set(walk.walk.loops[-1].nodes) | \
        {r for loop in walk.walk.loops for r in loop.reduce}
    return before, inner, before | set(walk.sums) | set(walk.after)


def _affine(graph: Graph, n: str, shares) -> tuple[bool, sp.Expr | None]:
    """Whether node n is affine in its inputs among `shares` (linear in them jointly, so that a
    key block's shares give a share of n), and its constant term where it has one."""
    node = graph.node(n)
    inputs = node["inputs"]
    if node["op"] in _LINEAR:
        return node["op"] != "dot" or not all(i in shares for i in inputs), None
    if node["op"] != "ew":
        return False, None
    gens = [s for s, i in zip(node["symbols"], inputs, strict=True) if i in shares]
    try:
        poly = sp.Poly(node["expr"], *gens)
    except sp.PolynomialError:
        return False, None
    if poly.total_degree() != 1:
        return False, None
    constant = poly.coeff_monomial(1)
    return True, (None if constant == 0 else constant)


def key_shares(graph: Graph, walk: ValueWalk, targets, theirs, stop=()) -> KeyShares | None:
    """`targets` (gradients without key columns) beside `walk` (per key block, computing
    `theirs`) as `KeyShares`; None where they are not affine in their sums over key columns, or
    read a tile of the walk where it does not hold the program's key block."""
    nodes = plan(graph, [*theirs, *targets], stop)
    classes = _by_values(graph, nodes, stop)
    if not walk.per_key_block or classes is None:
        return None
    value, sums, after = classes
    walked = set(plan(graph, theirs, stop))
    mine = [n for n in nodes if n not in walked]
    shares, constants = set(), {}
    for n in mine:
        if n in stop:
            continue
        if set(graph.node(n)["inputs"]) & shares:
            able, constant = _affine(graph, n, shares)
            if not able:
                return None
            if constant is not None:
                constants[n] = constant
        elif not _folds(graph, n, "DK"):
            continue
        if "DK" in graph.shape(n):  # a block of key columns is the program's own, no share
            return None
        shares.add(n)
    keyed = set()
    for n in mine:
        if n in shares or "DK" in graph.shape(n) or (
                n not in stop and set(graph.node(n)["inputs"]) & keyed):
            keyed.add(n)
    inner = {n for n in mine if n in value}
    own_sums = [n for n in sums if n in mine]
    late = {n for n in mine if n in after}
    pre, ours = set(), set(mine)
    for n in reversed(mine):
        if n in inner or n in late or n in own_sums:
            continue
        readers = [c for c in graph.g.successors(n) if c in ours]
        if any(c in inner or c in own_sums or c in pre for c in readers):
            (inner if n in keyed else pre).add(n)
        if n in targets or n not in pre and any(c in late for c in readers):
            late.add(n)
    # what the walk holds where a section reads it; an input or a loaded tile it does not hold
    # there is loaded again
    before, during, behind = _visible(walk)
    for section, seen, also in ((pre, before, ()), (inner, during | pre, own_sums),
                                (late, behind | pre, ())):
        for n in [*section, *also]:
            for i in () if n in stop else graph.node(n)["inputs"]:
                if i not in walked or i in seen:
                    continue
                if graph.node(i)["op"] != "input" and i not in stop:
                    return None
                section.add(i)
    order = list(nodes)
    return KeyShares(tuple(targets), *(tuple(n for n in order if n in s) for s in (pre, inner)),
                     tuple(own_sums), tuple(n for n in order if n in late), frozenset(shares),
                     constants)
