"""Stages: which state-free tiles a stage kernel computes for every chunk at once, which tiles
each pass stores for the output kernels, and what each kernel loads rather than computes.

A stage tile is a node of the chunk step that does not depend on the state; the sequential pass
then only loads it (fla's chunk kernels split their work the same way)."""

from __future__ import annotations

import sympy as sp

from mirasc.graph import Graph, plan
from mirasc.memories.step import masked_input
from mirasc.schedule.streams import stream

STAGED_CONSTS = ("tainted", "qbad")  # consts that read every input: a stage computes them once
COSTLY = ("dot", "gdot", "gmix", "tri_inv")  # ops a kernel does not recompute from another's inputs
# Scalars per chunk that a pass over blocks of value columns stores per column: each program
# writes its block's, and a reader takes the largest over every column (nonzero where any
# block's is), so every kernel after the pass sees the whole state's count.
ACROSS_V = ("nonfinite",)


def stageable(graph: Graph, n: str) -> bool:
    """Whether a state-free node can be a stage kernel's output: a tile of the chunk's rows (or
    one row, or one column of key or value entries), not a loaded input (nor one under its
    masks, `masked_input`) and not a state-shaped tile, which the pass computes itself rather
    than move one per chunk through memory (but for those that `frontier` is told to stage:
    the backward's stage computes the tiles nonlinear in the stored states)."""
    node = graph.node(n)
    rows, cols = node["shape"]
    computed = node["op"] not in ("input", "const", "broadcast", "trans") or \
        node.get("kind") in STAGED_CONSTS
    return computed and (rows in ("T", 1) or cols == 1) and "DH" not in (rows, cols) and \
        masked_input(graph, n) is None


def recomputed(graph: Graph, n: str) -> bool:
    """Whether the backward's output kernels compute a stage tile rather than load it: an
    elementwise tile of the chunk's rows by columns made of inputs and per-row or per-column
    tiles alone (simple GLA's u exp(gamma_end - gamma), the masked output cotangent). Simple
    GLA, sm_90, bf16, D=128: its dq/dk kernel, loading two float32 [T, BV] tiles per value
    block, ran 501 M warp-instructions at 8 warps (at 4 it spilled); computing them, 330 M at 4
    warps without spilling. The passes load it (computed, a tile taken transposed into a
    product goes through shared memory: linear attention's backward pass, D=64, 14.9 -> 32.9 M,
    computing u = -v before `fold_masked_operands`), and so does the forward's output kernel
    (linear attention's, D=128, ran 11 M more computing u than loading it)."""
    node = graph.node(n)
    if node["op"] != "ew" or graph.shape(n)[0] != "T" or graph.shape(n)[1] == 1:
        return False
    return all(_given(graph, m) or 1 in graph.shape(m) or recomputed(graph, m)
               for m in node["inputs"])


def _given(graph: Graph, n: str) -> bool:
    """An input, or a constant every kernel makes itself (a mask), not a stage's row flags."""
    node = graph.node(n)
    return node["op"] in ("input", "const", "broadcast") and node.get("kind") not in STAGED_CONSTS


def row_operands(graph: Graph, n: str) -> tuple[str, ...]:
    """The computed per-row or per-column tiles a `recomputed` tile reads: the backward's stage
    stores them, so that its output kernels compute the tile from them and its inputs. In the
    forward's stage, beside the tile, simple GLA's tail exp(gamma_end - gamma) would cost 9 and
    18 M more warp-instructions at D=128 and 64 (sm_90, bf16), and save the backward's 26: so
    the forward phase keeps its cost."""
    out = []
    for m in graph.node(n)["inputs"]:
        if recomputed(graph, m):
            out += row_operands(graph, m)
        elif 1 in graph.shape(m) and not _given(graph, m):
            out.append(m)
    return tuple(dict.fromkeys(out))


def frontier(graph: Graph, targets, live, also=frozenset()) -> tuple[str, ...]:
    """The state-free tiles that the nodes of `targets` depending on `live` (the states, their
    cotangents) read: what a stage kernel computes for every chunk at once, so that the
    sequential pass only loads them. A state-free node that cannot be staged (`stageable`, or
    one of `also`) runs in the pass, and its own state-free inputs join the frontier."""
    nodes = plan(graph, targets)
    dep = set(live)
    for n in nodes:
        if any(i in dep for i in graph.node(n)["inputs"]):
            dep.add(n)
    staged, todo = set(), [i for n in nodes if n in dep for i in graph.node(n)["inputs"]]
    while todo:
        n = todo.pop()
        if n in dep or n in staged:
            continue
        if stageable(graph, n) or n in also:
            staged.add(n)
        else:
            dep.add(n)
            todo.extend(graph.node(n)["inputs"])
    return tuple(n for n in graph.order() if n in staged)


def decayed_products(graph: Graph, targets, live, stop) -> tuple[str, ...]:
    """The products under per-channel decays, the prefix sums of per-channel gates and the
    decayed key-column tiles (`_decayed_keys`) that the nodes of `targets` read and that depend
    on none of `live` (the states, their cotangents): a stage computes each once per chunk,
    rather than every output program (one per block of value or key columns) its own."""
    nodes = plan(graph, targets, stop)
    free = [n for n in nodes if n not in stop and not set(live) & set(plan(graph, [n]))]
    decayed = {n for n in free if _decayed_keys(graph, n, stop)}
    need = set(nodes)
    return tuple(n for n in free if _once_per_chunk(graph, n) or n in decayed and any(
        c in need and c not in decayed for c in graph.g.successors(n)))


def _once_per_chunk(graph: Graph, n: str) -> bool:
    """A gdot (the exact pairs of its diagonal blocks besides its tensor-core products), or the
    prefix sum of a tile of several columns: a scan across the program's warps (GLA, bf16,
    D=128, sm_90: a third of its output kernel's instructions), where a load of the stored sums
    is a few."""
    node = graph.node(n)
    return node["op"] == "gdot" or node["op"] == "cumsum" and graph.shape(n)[1] != 1


def _decayed_keys(graph: Graph, n: str, stop) -> bool:
    """An elementwise tile of the chunk's rows by key columns computed through an exp (q or k
    under per-channel decays, the decays themselves): every program of a kernel over value
    blocks computes the same one, and as a matmul operand in a layout that each of its warp
    groups holds whole (GLA, bf16, D=128, sm_90, 8 warps: q exp(gamma) was half its output
    kernel's instructions). Only the largest such tiles a kernel reads are stored."""
    if graph.node(n)["op"] != "ew" or graph.shape(n) != ("T", "DK"):
        return False
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        node = graph.node(m)
        if m in seen or m in stop or node["op"] != "ew":
            continue
        if node["expr"].has(sp.exp):
            return True
        seen.add(m)
        todo.extend(node["inputs"])
    return False


def _keepable(graph: Graph, n: str, nonlinear) -> bool:
    """Whether a node the forward pass computes is a tile it stores for the output kernels: a
    product (what is costly to recompute) of the chunk's rows by value columns (a block of
    columns is its program's own), the count of a state's non-finite entries (which rereads
    the state: the pass has it at hand; `ACROSS_V`), or a `nonlinear` state-shaped tile."""
    node = graph.node(n)
    return node["op"] == "dot" and graph.shape(n) == ("T", "DV") or node["op"] in ACROSS_V or \
        n in nonlinear


def nonlinear_states(graph: Graph, live) -> set[str]:
    """The state-shaped tiles that are not linear in `live` (the states, or their cotangents)
    and cost a product to recompute: computed through a product of two tiles without the
    chunk's rows that both read one (the Newton-Schulz iteration's Gram matrices, and their
    reverse), by a product or from two such tiles. An elementwise tile of one such tile and
    linear ones (the step eta_e NS_k(S_e), the moved state) is not: a kernel recomputes it from
    that tile. Without them an output kernel would rerun the iteration in every program."""
    shapes = {graph.shape(s) for s in live}
    reads, nonlinear, able = set(live), set(), set()
    for n in graph.order():
        node = graph.node(n)
        inputs = node["inputs"] if n not in live else ()
        if any(m in reads for m in inputs):
            reads.add(n)
        product = node["op"] == "dot" and all(m in reads and "T" not in graph.shape(m)
                                               for m in inputs)
        mixed = [m for m in inputs if m in nonlinear]
        if product or mixed:
            nonlinear.add(n)
        if product or node["op"] == "dot" and mixed or len(mixed) > 1:
            able.add(n)
    return {n for n in able if graph.shape(n) in shapes}


def kept(graph: Graph, pass_targets, out_targets, stop, keepable) -> tuple[str, ...]:
    """The tiles of a pass (computing `pass_targets` from `stop`) that the output kernels (of
    `out_targets`) read, of those `keepable`: the pass stores them rather than have the output
    kernels recompute what led to them (as fla's state kernel stores the delta rule's corrected
    values)."""
    able = {n for n in plan(graph, pass_targets, stop) if n not in stop and keepable(n)}
    return tuple(n for n in plan(graph, out_targets, (*stop, *able)) if n in able)


def stops(graph: Graph, targets: dict, staged: dict, forward: set,
          backward: set) -> tuple[dict, tuple, tuple]:
    """Per kernel, the tiles it loads rather than computes: the forward's stage tiles, then
    those of the forward pass (the forward saves both for the backward), then the backward
    stage's, and for the backward's output kernels those of the backward pass. Also the tiles
    each pass stores (`kept`). `forward` and `backward` are the `nonlinear_states` in the states
    and in the states and their cotangents; the backward pass keeps only those: keeping its
    [T, DV] products too was measured worse (gated_deltanet, sm_90, D=128): its step grew and
    spilled."""

    def carried(stop):
        return kept(graph, targets["bwd"], targets["bwd_out"], (*stop, *staged["bwd"]),
                    backward.__contains__)

    # what the forward pass keeps for the backward's output kernels depends on what the
    # backward pass keeps for them, and the other way round: the latter first as if the
    # forward kept nothing, then again from what it keeps
    stored = kept(graph, targets["fwd"], targets["fwd_out"] + targets["bwd_out"],
                  (*staged["fwd"], *carried(staged["fwd"])),
                  lambda n: _keepable(graph, n, forward))
    loads = {"fwd": staged["fwd"], "fwd_out": staged["fwd"] + stored}
    loads["bwd"] = tuple(dict.fromkeys(loads["fwd_out"] + staged["bwd"]))
    after = carried(loads["fwd_out"])
    loads["bwd_out"] = tuple(n for n in loads["bwd"] if not recomputed(graph, n)) + after
    return loads, stored, after


def stage_parts(graph: Graph, targets, saved) -> list[tuple[str, ...]]:
    """A stage that passes over hidden blocks as one kernel per pass, in order: the tiles each
    stores, its share of `targets` and those a later kernel reads from it (handed over through
    memory rather than held in registers across the passes after it). A kernel makes its pass
    and computes what that pass completes, up to the next pass; a tile computed without a
    product or a hidden unit is recomputed where it is read instead. One part when the stage
    makes one pass or less, or a tile to hand over cannot be stored (not a tile of rows or a
    column). Memora, sm_90, bf16, D=64, 8 warps: its single stage kernel spilled 2352 B per
    thread, its four 0, 0, 552 and 384 B (with what follows a pass in the next kernel instead,
    the last two spilled 360 and 2064 B against 800 and 752, segments unrolled)."""
    passes = stream(graph, targets, stop=saved)
    last = len(passes.loops) - 1
    if last < 1:
        return [tuple(targets)]
    part = {n: min(max(j - 1, 0), last) for j, whole in enumerate(passes.whole) for n in whole}
    part |= {n: j for j, loop in enumerate(passes.loops) for n in loop.reduce}
    readers = {j: set(loop.nodes) for j, loop in enumerate(passes.loops)}
    for n, j in part.items():
        readers[j].add(n)

    def cheap(n):
        return all(graph.node(m)["op"] not in COSTLY and "DH" not in graph.shape(m)
                   for m in plan(graph, [n], saved) if m not in saved)

    handed = []
    for n in plan(graph, targets, saved):
        if n in saved or n not in part or graph.node(n)["op"] in ("input", "const"):
            continue
        later = any(c in readers[j] for j in range(part[n] + 1, last + 1)
                    for c in graph.g.successors(n) if c not in saved)
        if later and n not in targets and not cheap(n):
            if not stageable(graph, n):
                return [tuple(targets)]
            handed.append(n)
    stored = [*targets, *handed]
    return [tuple(n for n in graph.order() if n in stored and part[n] == j)
            for j in range(last + 1)]


def tile_dtype(graph: Graph, x: str, need) -> str:
    """The dtype a tile loads in: that of the matmul operands (DOT) where the kernel (its nodes
    `need`) uses it only as one, or reads it only for the rows' flags (`nonfinite_rows` takes
    them so), exact and half the registers at bf16; else ACC."""
    uses = [n for n in graph.g.successors(x) if n in need]
    return "DOT" if all(graph.node(n)["op"] == "dot" for n in uses) else "ACC"


def _rounds_alike(graph: Graph, n: str, x: str) -> bool:
    """Whether elementwise node n of tile x commutes with rounding x: in every branch it is x,
    -x or a constant, under conditions that do not read x (a sign, a select against NaN)."""
    node = graph.node(n)
    if node["op"] != "ew" or list(node["inputs"]).count(x) != 1:
        return False
    sym = node["symbols"][list(node["inputs"]).index(x)]
    pieces = node["expr"].args if isinstance(node["expr"], sp.Piecewise) else ((node["expr"], True),)
    return all(sym not in sp.sympify(cond).free_symbols and
               (value in (sym, -sym) or sym not in value.free_symbols) for value, cond in pieces)


def _only_summed(graph: Graph, n: str, need) -> bool:
    """Whether node n reaches the kernel's results only through sums (and elementwise nodes)."""
    uses = [c for c in graph.g.successors(n) if c in need]
    return bool(uses) and all(graph.node(c)["op"] == "sum" or (
        graph.node(c)["op"] == "ew" and _only_summed(graph, c, need)) for c in uses)


def operand_only(graph: Graph, x: str, need, into_sums: bool = False) -> bool:
    """Whether the kernel computing `need` uses tile x only as a matmul operand, directly or
    through nodes that commute with rounding it (`_rounds_alike`): held in the operands' dtype,
    it then computes the same values. With `into_sums`, also through elementwise nodes whose
    results are only summed (each summand then rounded as a matmul operand would be)."""
    uses = [n for n in graph.g.successors(x) if n in need]
    return bool(uses) and all(graph.node(n)["op"] == "dot" or (
        _rounds_alike(graph, n, x) and operand_only(graph, n, need, into_sums)) or (
        into_sums and graph.node(n)["op"] == "ew" and _only_summed(graph, n, need))
        for n in uses)
