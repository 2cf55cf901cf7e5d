"""The kernel schedule of a chunk step, as data: which kernels run, in which order, over which
grid, what each computes (flat, or as passes over blocks of a dim), what each loads from and
stores to the buffers between kernels, and how each is tuned.

Forward: per direction a stage kernel per chunk computes the state-free tiles (`stages`), the
pass walks the chunks carrying the state, and an output kernel per chunk computes the outputs
from the stored chunk-start states. Backward likewise, the pass carrying the state's gradient
and the output kernels writing the inputs' gradients (grouped by what they read)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mirasc import tuning
from mirasc.graph import plan
from mirasc.memories import ChunkStep, step_adjoint
from mirasc.schedule import stages
from mirasc.schedule.streams import (
    Stream,
    ValueWalk,
    key_shares,
    separable,
    stream,
    value_walk,
)


@dataclass(frozen=True)
class Buffer:
    """A tile one kernel stores per chunk (segment) and head for the kernels after it: [chunks *
    SEGMENTS, H, rows * cols], `dims` = (rows, cols); `operand`: every reader takes it only as a
    matmul operand, so it is held in the operands' dtype."""

    node: str
    dims: tuple
    operand: bool


@dataclass(frozen=True)
class KernelPlan:
    """One kernel. `kind`: 'stage' (per chunk, state-free tiles), 'pass' (per sequence, walks the
    chunks) or 'out' (per chunk, from the stored states). It computes `targets` from the tiles of
    `loads` (read from buffers, not recomputed), flat or as `passes` over blocks of `dim`;
    `stores` are the tiles it writes to buffers, `reads` the state tiles (and their gradients)
    it reads whole, `needs` the nodes whose inputs it loads before its body. An output kernel
    writes the gradients of `grads` (of `blocked` inside its passes over key blocks); one with
    a `walk` runs a program per key block that walks the value blocks (`streams.ValueWalk`)."""

    name: str
    kind: str
    direction: str
    targets: tuple[str, ...]
    loads: tuple[str, ...]
    needs: frozenset
    reads: tuple[str, ...]
    stores: tuple[str, ...] = ()
    passes: Stream | None = None
    dim: str | None = None
    block_loads: tuple[str, ...] = ()
    grads: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    pads_nonfinite: bool = True
    configs: list = field(default_factory=list)
    walk: ValueWalk | None = None


@dataclass(frozen=True)
class Schedule:
    """The kernels of a chunk step (`kernels`, by name, in launch order) and what connects them: the
    tiles each direction's stage stores (`staged`), those the forward pass keeps (`kept`), those
    the backward pass keeps (`carried`), those a stage's kernels hand each other (`handover`),
    every buffer (`buffers`, by writer), and the layout choices: `split_v` (blocks of value
    columns run as programs of their own), `streamed` (states pass over blocks of hidden units),
    `summed` (gradients summed over value blocks), `walks_v` (output kernels whose program walks
    every value block), `key_blocks` (output kernels that pass over key blocks: their widest
    block), `operand_states` (the stored states' buffers held in the matmul operands' dtype, by
    the rule of the function of that name)."""

    step: ChunkStep
    adjoint: dict
    kernels: dict[str, KernelPlan]
    groups: dict[str, tuple[str, ...]]
    staged: dict[str, tuple[str, ...]]
    kept: tuple[str, ...]
    carried: tuple[str, ...]
    handover: dict[str, tuple[str, ...]]
    buffers: dict[str, list[Buffer]]
    split_v: bool
    streamed: bool
    summed: tuple[str, ...]
    walks_v: tuple[str, ...]
    key_blocks: dict[str, int]
    operand_states: tuple[str, ...] = ()

    @property
    def state_dtypes(self) -> dict[str, str]:
        """The dtype every kernel loads each stored states' buffer in ("hs", "dhs"): the
        operands' ("DOT") where it is held so (`operand_states`), else the accumulators'."""
        return {b: "DOT" if b in self.operand_states else "ACC" for b in ("hs", "dhs")}

    @property
    def stage_order(self) -> dict[str, list[str]]:
        """Per direction, its stage kernels in launch order."""
        return {d: [k for k, p in self.kernels.items() if p.kind == "stage" and p.direction == d]
                for d in self.staged}


def gradient_groups(step: ChunkStep, adjoint: dict, streamed: bool) -> dict[str, tuple[str, ...]]:
    """The backward's output kernels, each with the inputs whose gradients it writes. A matrix
    memory's split by the columns of the gradient: value columns ("bwd_dv": v, value-channel
    gates, per-head parameters), key columns ("bwd_dqk": q, k, key-channel gates) and one per row
    ("bwd_dg": per-head gates), so that each kernel holds only what its gradients read (sm_90,
    D=128, bf16, 8 warps: gated DeltaNet's single kernel spilled 1152 B per thread, simple GLA's
    664; their three spill none). An MLP memory passing over hidden blocks (`streamed`) splits
    what never reads the gradient of the step-end state (the query's gradient, which reaches only
    the outputs: "bwd_dq") from what does ("bwd_out"), each recomputing the memory over the
    hidden units (Memora, D=64: one kernel spilled 2160 B, these two 760 and 1352 B, for 1.3x
    the tensor-core instructions; by the columns as well, four kernels, 2.2x). An MLP memory held
    whole keeps one ("bwd_out")."""
    graph = step.graph
    inputs = ("q", "k", "v", *step.gates, *step.params)
    if any("DH" in graph.shape(s) for s in step.states):
        carried = {f"d{s}_new" for s in step.states}
        free = tuple(x for x in inputs if streamed and adjoint[x] is not None
                     and not carried & set(plan(graph, [adjoint[x]])))
        rest = tuple(x for x in inputs if x not in free)
        return {k: xs for k, xs in (("bwd_dq", free), ("bwd_out", rest)) if xs}
    kernel = {"DV": "bwd_dv", "DK": "bwd_dqk", 1: "bwd_dg"}
    groups = {}
    for x in inputs:
        groups.setdefault(kernel[graph.shape(x)[1]], []).append(x)
    return {k: tuple(groups[k]) for k in kernel.values() if k in groups}


def _hidden_streams(step, targets: dict, loads: dict, adjoint: dict) -> dict | None:
    """Each kernel's step as passes over blocks of hidden units (`stream`), stopping at the
    kernel's `loads`, when a state has hidden units and every kernel's step runs so; else
    None."""
    graph = step.graph
    if not any("DH" in graph.shape(s) for s in step.states) or \
            any(adjoint[s] is None for s in step.states):
        return None
    streams = {k: stream(graph, t, stop=loads[k]) for k, t in targets.items()}
    return None if None in streams.values() else streams


def _key_passes(step, stop, adjoint, grads) -> tuple | None:
    """An output kernel (writing the gradients of `grads`) as passes over blocks of key columns
    (`stream` on DK), so that it holds a block of q, k, the states and their gradients at a time
    rather than all DK columns (fla's gradient kernels block the keys so): the stream, the
    inputs and states loaded per block, and the inputs whose gradients are written per block.
    None where the step does not pass so (a tile with DK twice) or a key-column input of `grads`
    has no gradient to write per block."""
    graph = step.graph
    keyed = [x for x in ("q", "k", *step.gates) if "DK" in graph.shape(x)]
    if not keyed or any(adjoint[x] is None for x in keyed if x in grads):
        return None
    targets = [adjoint[x] for x in grads if adjoint[x] is not None]
    passes = stream(graph, targets, dim="DK", stop=stop)
    if passes is None or not passes.loops:
        return None
    states = [n for s in step.states for n in (s, f"d{s}_new") if "DK" in graph.shape(s)]
    return passes, (*keyed, *states), tuple(x for x in keyed if x in grads)


def _handed(graph, producers: dict[str, KernelPlan], targets, stop) -> dict[str, str]:
    """The tiles an output kernel (computing `targets` from `stop`) loads from those before it
    (`producers`: kernels that run per block of value columns), by the kernel that stores them:
    the [T, DV] tiles a producer computes whose computation contracts the key columns (dv's
    kernel contracts them once per value block, where a kernel per key block would over every
    key column, in each of its programs), the ones nearest the targets."""
    able = {}
    for name, producer in producers.items():
        for n in graph.order():
            if n in producer.needs and n not in stop and graph.shape(n) == ("T", "DV") and any(
                    graph.node(m)["op"] in stages.COSTLY for m in plan(graph, [n], stop)):
                able.setdefault(n, name)
    return {n: able[n] for n in plan(graph, targets, (*stop, *able)) if n in able}


def _holds_pairs(graph, nodes) -> bool:
    """Whether a kernel computing `nodes` holds pair tiles (a product under per-channel decays,
    `gmix`): its key blocks are `tuning.BK_PAIRS`."""
    return any(graph.node(n)["op"] == "gmix" for n in nodes)


def _join_shares(step, name, groups, targets, stop, producers, adjoint) -> tuple | None:
    """Where kernel `name` runs a program per key block walking the value blocks, the kernels
    after it writing only gradients without key columns (per-head gates) join it as
    `streams.KeyShares` (their separate kernel recomputed q k^T and q W^T over every key column,
    once per value block), its groups and targets updated: (their targets, the joint walk); None
    where they do not join, would add more than `tuning.SHARE_PRODUCTS` products to each value
    block's step, or the kernel holds pair tiles (its key blocks of `tuning.BK_PAIRS`: KDA's
    eight programs per chunk at D=128 each computed what its gate kernel computes once, bf16,
    sm_90, (8, 4096, 16): its backward ran 3971 M warp-instructions joined, 3893 apart)."""
    graph = step.graph
    joining = [k for k in groups if k != name and k not in producers
               and all(graph.shape(x)[1] == 1 for x in groups[k])]
    if not joining:
        return None
    own = list(targets[name])
    theirs = [n for k in joining for n in targets[k]]
    full = (*stop, *_handed(graph, producers, own + theirs, stop))
    if _key_passes(step, full, adjoint, groups[name]) is None or \
            _holds_pairs(graph, plan(graph, own, full)):
        return None
    walk = value_walk(graph, own, full)
    shares = None if walk is None else key_shares(graph, walk, theirs, own, full)
    if shares is None or sum(graph.node(n)["op"] == "dot" for n in shares.inner) > \
            tuning.SHARE_PRODUCTS:
        return None
    for k in joining:
        groups[name] = (*groups[name], *groups.pop(k))
        del targets[k]
    return tuple(theirs), replace(walk, shares=shares)


def _operand_reads(graph, stop, need, operands: dict[str, bool]) -> None:
    """Record in `operands` whether a kernel computing `need` reads each tile of `stop` only as
    a matmul operand (a tile it does not read leaves its record as it is)."""
    for n in stop:
        if any(c in need for c in graph.g.successors(n)):
            operands[n] = operands.get(n, True) and stages.tile_dtype(graph, n, need) == "DOT"


def operand_states(graph, kernels: dict[str, KernelPlan], states, streamed: bool) -> tuple:
    """The stored states' buffers ("hs": each chunk-start state, written by the forward pass;
    "dhs": the gradient of each step-end state, written by the backward pass) that every other
    kernel reads only as a matmul operand (`stages.operand_only`; into sums too where
    `tuning.STATES_INTO_SUMS`): they are stored in the operands' dtype, which every reader
    rounds them to anyway (fla stores its states so too). Streamed states stay in the
    accumulators' dtype: the backward pass sums the gradient's blocks in place."""
    if streamed:
        return ()
    held = []
    for buffer, writer, names in (("hs", "fwd", states), ("dhs", "bwd", [f"d{s}_new" for s in states])):
        readers = [(p, n) for k, p in kernels.items() if k != writer for n in names
                   if any(c in p.needs for c in graph.g.successors(n))]
        if readers and all(stages.operand_only(graph, n, p.needs, tuning.STATES_INTO_SUMS)
                           for p, n in readers):
            held.append(buffer)
    return tuple(held)


def _stage_targets(step, targets, adjoint) -> tuple[dict, dict, tuple, bool]:
    """The tiles each direction's stage computes, each kernel's loads, the tiles the forward and
    the backward pass keep, and whether the step streams hidden blocks."""
    graph = step.graph
    states = list(step.states)
    dstates = [f"d{s}_new" for s in states]
    staged = {"fwd": stages.frontier(graph, targets["fwd"], states),
              "bwd": stages.frontier(graph, targets["bwd"], states + dstates)}
    nonlinear = stages.nonlinear_states(graph, states), \
        stages.nonlinear_states(graph, states + dstates)
    first = stages.stops(graph, targets, staged, *nonlinear)[0]
    # The rows' flags read every input: the forward stage computes them once, and every kernel
    # after it loads them (and its inputs' flagged rows as padding, testing no entry).
    read = {n for k in ("fwd_out", "bwd", "bwd_out") for n in plan(graph, targets[k], first[k])}
    staged["fwd"] += tuple(c for c in stages.STAGED_CONSTS if c in read and c not in staged["fwd"])
    first = stages.stops(graph, targets, staged, *nonlinear)[0]
    products = [n for k in ("fwd_out", "bwd_out") for n in stages.decayed_products(
        graph, targets[k], states + dstates, first[k]) if n not in staged["fwd"]]
    staged["fwd"] += tuple(dict.fromkeys(products))
    first = stages.stops(graph, targets, staged, *nonlinear)[0]
    streamed = _hidden_streams(step, targets, first, adjoint) is not None
    if streamed:
        # The backward stage passes over the hidden blocks of the stored states too: what reads
        # them but not their gradients leaves the backward pass and output kernel (a
        # state-shaped tile among it stays there, recomputed per block).
        wide = stages.frontier(graph, targets["bwd"] + targets["bwd_out"], dstates)
        if stream(graph, wide, stop=first["fwd_out"]) is not None:
            staged["bwd"] = wide
    else:
        # The stored states are at hand: the backward pass carries dW alone. The state-shaped
        # tiles nonlinear in them (the iterates of Newton-Schulz, whose reverse reads them last
        # to first) are the stage's too, rather than recomputed, and held, in the pass.
        staged["bwd"] = stages.frontier(graph, targets["bwd"], dstates, nonlinear[0])
    loads, kept, _ = stages.stops(graph, targets, staged, *nonlinear)
    staged["bwd"] = tuple(n for n in staged["bwd"] if n not in (*staged["fwd"], *kept))
    # what the backward's output kernels compute an elementwise stage tile from
    rows = [m for n in loads["bwd"] if stages.recomputed(graph, n)
            for m in stages.row_operands(graph, n) if m not in loads["bwd"]]
    staged["bwd"] += tuple(dict.fromkeys(rows))
    loads, _, carried = stages.stops(graph, targets, staged, *nonlinear)
    return staged, loads, (kept, carried), streamed


def _key_stage(graph, nodes, stop) -> tuple | None:
    """The products under per-channel decays among a stage's tiles (`nodes`), as passes over
    blocks of key columns (each a sum over them), so that a kernel of their own holds a block of
    q, k and the gates at a time rather than every key column (GLA, D=128: the stage that held
    all 128 spilled 2.4 KB per thread): (the stream, the key-column inputs it loads per block,
    the products, whether it runs first: where the stage's other tiles read a product, they
    load it), or None where there are none or they do not pass so."""
    products = tuple(n for n in nodes if graph.node(n)["op"] == "gdot")
    if not products or len(products) == len(nodes):
        return None
    passes = stream(graph, products, dim="DK", stop=stop)
    if passes is None or not passes.loops or any(loop.store for loop in passes.loops):
        return None
    blocked = {n for loop in passes.loops for n in loop.nodes}
    inputs = tuple(n for n in graph.order() if n in blocked and graph.node(n)["op"] == "input")
    rest = [n for n in nodes if n not in products]
    return passes, inputs, products, bool(set(products) & set(plan(graph, rest, stop)))


def _stage_kernels(step, staged, loads, streams, split_v, kernels, operands, key_blocks) -> dict:
    """Add each direction's stage kernels to `kernels` (one, or one per pass over hidden blocks
    where the stage streams them, and one more for the products under per-channel decays where
    they pass over key blocks: `_key_stage`, recorded in `key_blocks`) and record the tiles they
    read only as operands; returns the tiles each direction's stage kernels hand each other."""
    graph, states = step.graph, list(step.states)
    handover = {}
    for direction, nodes in staged.items():
        saved = loads["fwd_out"] if direction == "bwd" else ()
        streamed_stage = streams is not None and any(
            s in plan(graph, nodes, saved) for s in states)
        parts = stages.stage_parts(graph, nodes, saved) if streamed_stage else \
            [nodes] if nodes else []
        handover[direction] = tuple(n for part in parts for n in part if n not in nodes)
        keyed = None if streamed_stage else _key_stage(graph, nodes, saved)
        if keyed is not None:
            rest = tuple(n for n in nodes if n not in keyed[2])
            parts = [keyed[2], rest] if keyed[3] else [rest, keyed[2]]
        done = ()
        for j, part in enumerate(parts):
            stop = (*saved, *done)
            part_nodes = plan(graph, part, stop)
            reads = tuple(s for s in states if s in part_nodes)
            passes = stream(graph, part, stop=stop) if reads and streams is not None else None
            name = f"{direction}_stage{j + 1 if j else ''}"
            dim, block_loads = ("DH" if passes is not None else None), ()
            if keyed is not None and part == keyed[2]:
                passes, block_loads = keyed[:2]
                dim, key_blocks[name] = "DK", tuning.BK_STAGE
            _operand_reads(graph, stop, set(part_nodes) - set(stop), operands)
            kernels[name] = KernelPlan(
                name=name, kind="stage", direction=direction, targets=part, loads=stop,
                needs=frozenset(set(part_nodes) - set(stop) - set(block_loads)), reads=reads,
                stores=part, passes=passes, dim=dim, block_loads=block_loads,
                configs=tuning.configs(name, split_v, streams is not None))
            done += part
    return handover


def schedule(step: ChunkStep) -> Schedule:
    """The kernels of `step`, forward and backward, and the buffers between them."""
    graph = step.graph
    _, wrt, adjoint = step_adjoint(step)
    states = list(step.states)
    dstates = [f"d{s}_new" for s in states]
    targets = {
        "fwd": [step.outputs[s] for s in states],
        "fwd_out": [step.outputs["o"]],
        "bwd": [adjoint[s] for s in states if adjoint[s] is not None],
        "bwd_out": [adjoint[x] for x in wrt if x not in states and adjoint[x] is not None],
    }
    staged, loads, (kept, carried), streamed = _stage_targets(step, targets, adjoint)
    groups = gradient_groups(step, adjoint, streamed)
    del targets["bwd_out"]
    for name, grads in groups.items():
        targets[name] = [adjoint[x] for x in grads if adjoint[x] is not None]
        loads[name] = loads["bwd_out"]
    streams = _hidden_streams(step, targets, loads, adjoint) if streamed else None
    split_v = separable(step)
    # the inputs not along the value columns (a vector memory's q and k, delta, v_prev are)
    summed = tuple(x for x in ("q", "k", *step.gates) if graph.shape(x)[1] != "DV") \
        if split_v else ()
    # The kernel of the q and k gradients walks the DV blocks, summing them (no partial copies
    # per block): in place where it runs as no `ValueWalk`, holding what each block reuses, so
    # with narrower key blocks. Any other kernel of gradients summed over the blocks that runs
    # as a `ValueWalk` walks them too.
    in_place = tuple(k for k, xs in groups.items() if summed and "q" in xs)
    walkers = tuple(k for k, xs in groups.items() if set(xs) & set(summed))
    kernels, operands, key_blocks, handed = {}, {}, {}, {}
    for name, t in list(targets.items()):
        if name not in targets:
            continue  # its gradients joined another kernel's (`_join_shares`)
        stop, keyed = loads[name], groups.get(name, ())
        direction = name[:3]
        kind = "pass" if name in ("fwd", "bwd") else "out"
        joined = None
        if name in groups and streams is None:
            producers = {k: kernels[k] for k in groups if k in kernels and kernels[k].walk is None}
            joined = _join_shares(step, name, groups, targets, stop, producers, adjoint) \
                if name in walkers else None
            if joined is not None:
                t = targets[name] = [*t, *joined[0]]
            taken = _handed(graph, producers, t, stop)
            handed |= taken
            stop = (*stop, *taken)
        keys = _key_passes(step, stop, adjoint, keyed) \
            if name in groups and streams is None else None
        need = set(plan(graph, t, stop)) - set(stop)
        _operand_reads(graph, stop, need, operands)
        passes, dim, block_loads, blocked, walk = None, None, (), (), None
        if keys is not None:
            passes, block_loads, blocked = keys
            dim, need = "DK", need - set(block_loads)
            key_blocks[name] = tuning.BK_WALKING_V if name in in_place else tuning.BK
            walk = joined[1] if joined is not None else \
                value_walk(graph, t, stop) if name in walkers else None
            if walk is not None and walk.per_key_block:
                key_blocks[name] = tuning.BK_PAIRS if _holds_pairs(graph, need) \
                    else tuning.BK_PER_PROGRAM
        elif streams is not None:
            passes, dim = streams[name], "DH"
        stored = {"fwd": kept, "bwd": carried}.get(name, ())
        kernels[name] = KernelPlan(
            name=name, kind=kind, direction=direction, targets=tuple(t), loads=stop,
            needs=frozenset(need), reads=tuple(s for s in states + dstates if s in need),
            stores=stored, passes=passes, dim=dim, block_loads=block_loads,
            grads=groups.get(name, ()), blocked=blocked,
            # A forward pass that writes only the next states (NaN wholesale after a tainted
            # row, memories.taints.poisoned) and scalars of them needs no padding in place of a
            # non-finite input.
            pads_nonfinite=name != "fwd" or any("T" in graph.shape(n) for n in stored),
            configs=tuning.configs(name, split_v, streams is not None),
            walk=walk)
    for k in dict.fromkeys(handed.values()):  # a producer stores its handed tiles once computed
        kernels[k] = replace(kernels[k], stores=tuple(n for n in graph.order() if handed.get(n) == k))
    handover = _stage_kernels(step, staged, loads, streams, split_v, kernels, operands,
                              key_blocks)
    # Tiles read only as matmul operands are stored in the operands' dtype: every reader rounds
    # them so anyway. Bf16, D=128, (8, 4096, 16), sm_90: GLA's forward moves 4.6 GB rather than
    # 6.2 and its backward 7.7 rather than 10.8, in 0.95x and 0.93x the instructions; at D=64
    # Moneta's pass needs 98 KiB of shared memory rather than 138.
    halves = {n for n, only in operands.items() if only}
    buffers = {key: [Buffer(n, (1, "DV") if graph.node(n)["op"] in stages.ACROSS_V
                            else graph.shape(n), n in halves) for n in nodes]
               for key, nodes in [*staged.items(), ("fwd_pass", kept), ("bwd_pass", carried),
                                  ("bwd_out", tuple(handed)),
                                  *((f"{k}_handover", n) for k, n in handover.items() if n)]}
    order = [*(k for k, p in kernels.items() if p.kind == "stage" and p.direction == "fwd"),
             "fwd", "fwd_out",
             *(k for k, p in kernels.items() if p.kind == "stage" and p.direction == "bwd"),
             "bwd", *groups]
    kernels = {k: kernels[k] for k in order}  # in launch order
    walks_v = tuple(k for k in groups if k in in_place or kernels[k].walk is not None)
    return Schedule(step=step, adjoint=adjoint, kernels=kernels, groups=groups, staged=staged,
                    kept=kept, carried=carried, handover=handover, buffers=buffers, split_v=split_v,
                    streamed=streams is not None, summed=summed, walks_v=walks_v,
                    key_blocks=key_blocks,
                    operand_states=operand_states(graph, kernels, states, streams is not None))
