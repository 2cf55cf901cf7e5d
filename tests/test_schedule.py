"""Kernel schedules, checked on the plan (`mirasc.schedule`): which kernels run, what each
computes, loads and stores, and how a step passes over blocks of a dim."""

from __future__ import annotations

import pytest
import sympy as sp

from mirasc import tuning
from mirasc.catalog import resolve
from mirasc.derive import derive
from mirasc.graph import plan
from mirasc.memories import chunk_step, step_adjoint
from mirasc.schedule import schedule
from mirasc.schedule.streams import stream

MLP_SPECS = ["ttt_mlp", "moneta", "yaad", "memora"]


def _schedule(name: str):
    return schedule(chunk_step(derive(resolve(name))))


def _computes(sched, kernel) -> set[str]:
    """The nodes a kernel computes (what it needs and does not load from a buffer)."""
    return set(plan(sched.step.graph, kernel.targets, kernel.loads)) - set(kernel.loads)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_the_passes_only_load_the_inverse(name):
    """The exact path's (I + A)^-1 reads no state: a stage kernel computes it per chunk and the
    passes load it rather than invert in their sequential step."""
    sched = _schedule(name)
    graph = sched.step.graph
    inverse = [n for n in graph.order() if graph.node(n)["op"] == "tri_inv"]
    assert inverse
    for kernel in (sched.kernels["fwd"], sched.kernels["bwd"]):
        assert not any(graph.node(n)["op"] == "tri_inv" for n in _computes(sched, kernel))
        assert set(inverse) <= set(kernel.loads) and set(inverse) & kernel.needs == set()
    assert set(inverse) <= set(sched.kernels["fwd_stage"].stores)


@pytest.mark.parametrize("name", MLP_SPECS)
def test_mlp_backward_pass_holds_only_what_reads_the_state_gradient(name):
    """An MLP memory's backward stage passes over the stored states' hidden blocks, so every
    pass over them left in the sequential backward kernel reads the state's gradient (what
    reads the state alone, such as recomputing the chunk's outputs, runs per chunk)."""
    sched = _schedule(name)
    dstates = {f"d{s}_new" for s in sched.step.states}
    backward = sched.kernels["bwd"]
    assert backward.dim == "DH" and backward.passes.loops
    assert all(dstates & set(loop.nodes) for loop in backward.passes.loops)
    stage = sched.kernels["bwd_stage"]
    assert stage.reads and stage.dim == "DH"


@pytest.mark.parametrize("name", MLP_SPECS)
def test_streamed_backward_stage_runs_a_kernel_per_pass(name):
    """An MLP memory's backward stage runs as one kernel per pass over the hidden blocks: each
    stage tile is stored by one of them, and a tile one hands over to a later one is stored
    before any kernel loads it and loaded by no kernel after the stage (it is not held across
    the passes in registers)."""
    sched = _schedule(name)
    stages = [sched.kernels[k] for k in sched.stage_order["bwd"]]
    assert len(stages) > 1
    assert all(k.passes is not None and len(k.passes.loops) == 1 for k in stages)
    later = [sched.kernels[k] for k in ("bwd", *sched.groups)]
    for n in sched.staged["bwd"]:
        assert sum(n in k.stores for k in stages) == 1, n
    for n in sched.handover["bwd"]:
        stored = [i for i, k in enumerate(stages) if n in k.stores]
        loaded = [i for i, k in enumerate(stages) if n in k.loads and n in plan(
            sched.step.graph, k.targets, k.loads)]
        assert len(stored) == 1 and loaded and min(loaded) > stored[0], (n, stored, loaded)
        assert not any(n in k.loads for k in later), n
    handed = {b.node for b in sched.buffers.get("bwd_handover", [])}
    assert handed == set(sched.handover["bwd"])


@pytest.mark.parametrize("name", MLP_SPECS)
def test_query_gradient_runs_apart_from_the_state_gradient(name):
    """An MLP memory's backward output kernels: the query's gradient (it reaches only the
    outputs) runs in a kernel of its own that never reads the gradient of the step-end state,
    the other inputs' in one that does. A matrix memory's split by gradient columns instead."""
    sched = _schedule(name)
    dstates = {f"d{s}_new" for s in sched.step.states}
    assert list(sched.groups) == ["bwd_dq", "bwd_out"] and sched.groups["bwd_dq"] == ("q",)
    assert {"k", "v"} <= set(sched.groups["bwd_out"])
    assert not dstates & sched.kernels["bwd_dq"].needs
    assert dstates & sched.kernels["bwd_out"].needs
    matrix = _schedule("gated_deltanet")
    assert matrix.groups == {"bwd_dv": ("v",), "bwd_dqk": ("q", "k"),
                             "bwd_dg": ("log_alpha", "eta")}  # per-head gates: one per row


@pytest.mark.parametrize("name", ["gated_deltanet", "simple_gla", "titans"])
def test_matrix_gradients_pass_over_key_blocks(name):
    """A matrix memory's dq/dk kernel passes over blocks of key columns, loading q, k and the
    state's key columns per block and writing dq, dk per block. It runs a program per key block
    that walks the value blocks (`ValueWalk`): what contracts the value columns is summed over
    them (no sum has a value column), the state's products on the program's own key block
    last; what follows from the sums (dq, dk among it) runs after the walk, and reads no tile
    with a value column."""
    sched = _schedule(name)
    graph = sched.step.graph
    dqk = sched.kernels["bwd_dqk"]
    assert dqk.dim == "DK" and {"q", "k"} <= set(dqk.block_loads)
    assert set(dqk.blocked) == {"q", "k"} and not {"q", "k"} & dqk.needs
    assert "bwd_dqk" in sched.walks_v and {"q", "k"} <= set(sched.summed)
    assert sched.key_blocks["bwd_dqk"] == tuning.BK_PER_PROGRAM
    walk = dqk.walk
    assert walk is not None and walk.sums and set(dqk.targets) <= set(walk.after)
    assert not any("DV" in graph.shape(n) for n in (*walk.sums, *walk.after))
    keyed = {n for n in walk.sums if "DK" in graph.shape(n)}
    own = walk.walk.loops[-1]
    assert keyed and set(own.store) == keyed and not own.reduce
    for n in walk.after:  # nothing after the walk reads a tile of one value block
        assert not any("DV" in graph.shape(i) for i in graph.node(n)["inputs"]), n


@pytest.mark.parametrize("name", ["gated_deltanet", "simple_gla"])
def test_gate_gradients_walk_the_value_blocks_once(name):
    """The per-head gates' kernel runs one program per chunk and head that walks the value
    blocks (`ValueWalk` without key blocks): the key-side products (q k^T, and k k^T where the
    step has them) over every key block once before the walk, the sums over value blocks kept
    in registers (a sum over the state's entries summed over its key blocks too), and the
    gates' gradients (reverse cumulative sums among them) once after it, from tiles with
    neither key nor value columns."""
    sched = _schedule(name)
    graph = sched.step.graph
    dg = sched.kernels["bwd_dg"]
    walk = dg.walk
    assert walk is not None and not walk.per_key_block and "bwd_dg" in sched.walks_v
    assert "qk" in {r for loop in walk.before.loops for r in loop.reduce}
    assert not any("DV" in graph.shape(n) or "DK" in graph.shape(n)
                   for n in (*walk.sums, *walk.after))
    assert set(dg.targets) <= set(walk.after)
    assert any(graph.node(n)["op"] == "revcumsum" for n in walk.after)
    summed_over_keys = {r for loop in walk.walk.loops for r in loop.reduce} & set(walk.sums)
    assert summed_over_keys == {"dgam_end"}


def test_kernels_launch_order_and_kinds():
    """Every direction: its stage kernels, then its pass, then its output kernels; stage and
    output kernels per chunk, the passes per sequence."""
    sched = _schedule("gated_deltanet")
    kinds = {name: k.kind for name, k in sched.kernels.items()}
    assert kinds == {"fwd": "pass", "fwd_out": "out", "bwd": "pass", "bwd_dv": "out",
                     "bwd_dqk": "out", "bwd_dg": "out", "fwd_stage": "stage",
                     "bwd_stage": "stage"}
    assert sched.stage_order == {"fwd": ["fwd_stage"], "bwd": ["bwd_stage"]}
    assert list(sched.kernels) == ["fwd_stage", "fwd", "fwd_out", "bwd_stage", "bwd", "bwd_dv",
                                   "bwd_dqk", "bwd_dg"]
    assert all(k.direction == k.name[:3] for k in sched.kernels.values())


@pytest.mark.parametrize("name", MLP_SPECS)
def test_streamed_tiles_wait_for_their_first_reader(name):
    """Over hidden blocks, a tile without them is computed (or loaded from its stage buffer) in
    the part of the step just before its first reader, not held across passes that do not
    read it."""
    step = chunk_step(derive(resolve(name)))
    graph = step.graph
    _, _, adjoint = step_adjoint(step)
    targets = [a for a in adjoint.values() if a is not None]  # the whole backward step
    passes = stream(graph, targets)
    nodes = set(plan(graph, targets))
    waited = 0
    for j, whole in enumerate(passes.whole):
        after = {n for part in passes.whole[j:] for n in part}
        after |= {n for loop in passes.loops[j:] for n in (*loop.nodes, *loop.reduce)}
        here = set(whole) | ({*passes.loops[j].nodes, *passes.loops[j].reduce}
                             if j < len(passes.loops) else set())
        for n in whole:
            readers = [c for c in graph.g.successors(n) if c in nodes and c in after]
            assert not readers or any(c in here for c in readers), (n, j)
            waited += j > 0 and bool(readers)
    assert waited  # some tile does wait past the first pass


@pytest.mark.parametrize("name", ["gated_deltanet", "simple_gla", "titans", "moneta", "memora"])
def test_flags_are_computed_once(name):
    """The rows' flags (every input scanned for non-finite entries) are the forward stage's,
    the count of a state's non-finite entries the forward pass's: every other kernel loads them,
    and a kernel that pads non-finite inputs loads the flagged rows as padding rather than test
    each entry (`KernelPrinter.row_masks`)."""
    sched = _schedule(name)
    graph = sched.step.graph
    flags = {n for n in graph.order() if graph.node(n).get("kind") in ("tainted", "qbad")}
    counts = {n for n in graph.order() if graph.node(n)["op"] == "nonfinite"}
    assert flags and counts
    for kernel in sched.kernels.values():
        computed = _computes(sched, kernel)
        assert kernel.name == "fwd_stage" or not computed & flags, kernel.name
        assert kernel.name == "fwd" or not computed & counts, kernel.name
    assert flags <= set(sched.staged["fwd"])
    kept = {b.node: b.dims for b in sched.buffers["fwd_pass"] if b.node in counts}
    assert kept and set(kept.values()) == {(1, "DV")}
    readers = [k for k in sched.kernels.values() if k.kind == "out" and k.pads_nonfinite]
    assert readers and all({"tainted", "qbad"} <= set(k.loads) for k in readers)


@pytest.mark.parametrize("name", ["gla", "kda"])
def test_decayed_key_tiles_are_computed_once_per_chunk(name):
    """Under per-channel decays the tiles of rows by key columns that pass through an exp (the
    decays, q and k scaled by them) are the forward stage's: no output kernel, whose programs
    each take a block of value or key columns, computes one."""
    sched = _schedule(name)
    graph = sched.step.graph
    live = {m for s in sched.step.states for m in (s, f"d{s}_new")}

    def decayed(n):
        node = graph.node(n)
        return node["op"] == "ew" and graph.shape(n) == ("T", "DK") and \
            node["expr"].has(sp.exp) and not live & set(plan(graph, [n]))

    staged = [n for n in sched.staged["fwd"] if decayed(n)]
    assert staged
    for kernel in sched.kernels.values():
        if kernel.kind == "out":
            assert not any(decayed(n) for n in _computes(sched, kernel)), kernel.name
    readers = {n: [k for k in sched.kernels.values() if n in k.loads] for n in staged}
    assert all(readers.values())


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "moneta"])
def test_tiles_read_only_by_products_are_stored_as_operands(name):
    """A buffer is held in the matmul operands' dtype exactly when every kernel that reads it
    takes it only as a dot's operand (the readers round it so anyway)."""
    sched = _schedule(name)
    graph = sched.step.graph
    flags = set()
    for buffers in sched.buffers.values():
        for b in buffers:
            uses = [graph.node(c)["op"] for k in sched.kernels.values() if b.node in k.loads
                    for c in graph.g.successors(b.node) if c in k.needs]
            assert uses, b.node
            assert b.operand == all(op == "dot" for op in uses), b.node
            flags.add(b.operand)
    assert flags == {True, False}


@pytest.mark.parametrize(("name", "dqk", "stages"), [
    ("gla", tuning.BK_PAIRS, {"fwd_stage2": tuning.BK_STAGE}),
    ("kda", tuning.BK_PAIRS, {"fwd_stage": tuning.BK_STAGE}),
    ("gated_deltanet", tuning.BK_PER_PROGRAM, {})])
def test_key_blocks_by_what_the_kernel_holds(name, dqk, stages):
    """The dq/dk kernel's programs take key blocks of BK_PAIRS where they hold products under
    per-channel decays (their pair tiles), else BK_PER_PROGRAM; a stage passing over the key
    columns takes BK_STAGE (its width at head dims up to 64)."""
    sched = _schedule(name)
    assert sched.kernels["bwd_dqk"].walk.per_key_block
    assert sched.key_blocks["bwd_dqk"] == dqk
    assert {k: b for k, b in sched.key_blocks.items() if sched.kernels[k].kind == "stage"} == stages


@pytest.mark.parametrize("name", ["gla", "kda", "gated_deltanet", "ttt_mlp"])
def test_warps_are_left_to_the_spill_pruning_autotuner(name):
    """Every kernel offers the autotuner 4 and 8 warps (the passes also 8 with a prefetching
    stage), and `launch.least_spilling` drops those that spill more (GLA's stages and dq/dk
    kernel spill at 4 warps, the head-decay specs' dq/dk kernels do not). A memory that streams
    hidden blocks keeps 8 warps outside its passes."""
    sched = _schedule(name)
    streamed = name == "ttt_mlp"
    for kernel in sched.kernels.values():
        if kernel.name in ("fwd", "bwd"):
            assert kernel.configs == ([(4, 1), (8, 1)] if streamed else
                                      [(4, 1), (8, 1), (8, 2)]), kernel.name
        else:
            assert kernel.configs == ([(8, 1)] if streamed else [(4, 1), (8, 1)]), kernel.name
