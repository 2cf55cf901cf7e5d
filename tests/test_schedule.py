"""Kernel schedules, checked on the plan (`mirasc.schedule`): which kernels run, what each
computes, loads and stores, and how a step passes over blocks of a dim."""

from __future__ import annotations

import copy
import re

import pytest
import sympy as sp
import torch
from conftest import axis_spec

from mirasc import tuning
from mirasc.catalog import checked_spec, resolve
from mirasc.codegen import render_triton_module
from mirasc.derive import derive
from mirasc.graph import evaluate, plan
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
    matrix = _schedule("gated_deltanet")  # the per-head gates' join the dq/dk kernel
    assert matrix.groups == {"bwd_dv": ("v",), "bwd_dqk": ("q", "k", "log_alpha", "eta")}


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
    shared = walk.shares.targets if walk.shares else ()
    assert walk is not None and walk.sums and set(dqk.targets) - set(shared) <= set(walk.after)
    assert not any("DV" in graph.shape(n) for n in (*walk.sums, *walk.after))
    keyed = {n for n in walk.sums if "DK" in graph.shape(n)}
    own = walk.walk.loops[-1]
    assert keyed and set(own.store) == keyed and not own.reduce
    for n in walk.after:  # nothing after the walk reads a tile of one value block
        assert not any("DV" in graph.shape(i) for i in graph.node(n)["inputs"]), n


@pytest.mark.parametrize("name", ["gated_deltanet", "simple_gla", "deltanet", "titans", "omega"])
def test_gate_gradients_join_the_dq_dk_kernel_as_key_block_shares(name, monkeypatch):
    """The per-head gates' gradients run in the dq/dk kernel (no kernel of their own), from its
    program's key block alone (`KeyShares`): no share has a key column, the products over key
    columns they read (q k^T, q W^T, ...) are shares computed on that block, not over every key
    block before the walk, their sums over value blocks have no value column (a key column is
    the program's block), and each gradient is a share or (Titans' eta) reads no
    sum over key columns. Where they would add more than `tuning.SHARE_PRODUCTS` products to
    each value block's step (Titans, Omega), they keep their kernel."""
    joins = _products(name) <= tuning.SHARE_PRODUCTS
    assert joins == (name not in ("titans", "omega"))
    if not joins:
        assert "bwd_dg" in _schedule(name).kernels
        monkeypatch.setattr(tuning, "SHARE_PRODUCTS", _products(name))
    sched = _schedule(name)
    graph = sched.step.graph
    assert "bwd_dg" not in sched.kernels
    dqk = sched.kernels["bwd_dqk"]
    heads = [x for x in sched.groups["bwd_dqk"] if graph.shape(x)[1] == 1]
    assert heads and not set(heads) & set(dqk.blocked)
    shares = dqk.walk.shares
    assert set(shares.targets) == {sched.adjoint[x] for x in heads}
    assert not any("DK" in graph.shape(n) for n in shares.shares)
    folds = {n for n in shares.shares if graph.node(n)["op"] == "dot" and "DK" in graph.shape(
        graph.node(n)["inputs"][0])}
    assert folds and folds <= set(shares.inner) | set(shares.after)
    assert not folds & {r for loop in dqk.walk.before.loops for r in loop.reduce}
    assert shares.sums and not any("DV" in graph.shape(n) for n in shares.sums)
    assert set(shares.constants) <= shares.shares
    assert all(graph.node(n)["op"] == "ew" for n in shares.constants)


def test_gates_keep_their_kernel_beside_pair_tiles():
    """KDA's dq/dk kernel holds pair tiles (key blocks of `tuning.BK_PAIRS`: eight programs per
    chunk at D=128): its per-head gate's gradient keeps a kernel of its own."""
    sched = _schedule("kda")
    assert sched.key_blocks["bwd_dqk"] == tuning.BK_PAIRS
    assert sched.groups["bwd_dg"] == ("eta",) and sched.kernels["bwd_dqk"].walk.shares is None


def _products(name) -> int:
    """The products per value block the per-head gates' gradients of spec `name` would add to
    its dq/dk kernel's walk, joined."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "SHARE_PRODUCTS", 99)
        sched = _schedule(name)
    graph = sched.step.graph
    return sum(graph.node(n)["op"] == "dot" for n in sched.kernels["bwd_dqk"].walk.shares.inner)


def _tiles(graph, sizes, seed=0) -> dict:
    """Random float64 inputs for every input node of `graph` (decays in (-1, 0), rates in
    (0.1, 0.6)) and the chunk's masks for its consts, every row real and clean."""
    gen = torch.Generator().manual_seed(seed)
    t = sizes["T"]
    ones = torch.ones(t, t, dtype=torch.float64)
    masks = {"causal": ones.tril(), "strict": ones.tril(-1), "strict2": ones.tril(-2),
             "rowmask": torch.ones(t, 1, dtype=torch.float64),
             "vmask": torch.ones(1, sizes["DV"], dtype=torch.float64),
             "lastrow": torch.eye(t, dtype=torch.float64)[:, -1:],
             "tainted": torch.zeros(t, 1, dtype=torch.float64),
             "qbad": torch.zeros(t, 1, dtype=torch.float64),
             "nanfill": torch.full((1, 1), float("nan"), dtype=torch.float64)}
    values = {}
    for n in graph.g:
        node = graph.node(n)
        if node["op"] == "const":
            values[n] = masks[n]
        elif node["op"] == "input":
            x = torch.randn(*[1 if d == 1 else sizes[d] for d in node["shape"]], generator=gen,
                            dtype=torch.float64)
            values[n] = -x.abs().clamp(max=1) if n.startswith("log_") else \
                0.1 + 0.5 * torch.rand_like(x) if graph.shape(n)[1] == 1 else x
    return values


def _key_columns(graph, n, x, cols):
    """The tile of node n restricted to the key columns `cols` (along each dim that is DK)."""
    for axis, d in enumerate(graph.shape(n)):
        if d == "DK":
            x = x.index_select(axis - 2, cols)
    return x


@pytest.mark.parametrize("name", ["gated_deltanet", "simple_gla", "titans"])
def test_key_block_shares_add_up_to_the_gradients(name, monkeypatch):
    """What makes the joint kernel right, on the graph itself (`graph.evaluate`, float64): each
    key block's shares of the per-head gates' gradients, computed from the block's key columns
    (the walk's own tiles whole, as the kernel holds them), each constant term counted by the
    first block alone, add up over the blocks to the gradients of the whole step; counted by
    every block instead, they do not (Titans' joined as well, past `tuning.SHARE_PRODUCTS`)."""
    monkeypatch.setattr(tuning, "SHARE_PRODUCTS", 99)
    sched = _schedule(name)
    graph = sched.step.graph
    dqk = sched.kernels["bwd_dqk"]
    shares = dqk.walk.shares
    assert shares.constants
    sizes = {"T": 8, "DK": 7, "DV": 5}
    values = _tiles(graph, sizes)
    whole = evaluate(graph, values, sizes)
    walked = set(plan(graph, [t for t in dqk.targets if t not in shares.targets], dqk.loads))
    first = sp.Symbol("FIRST", positive=True)
    counted = copy.deepcopy(graph)
    for n, c in shares.constants.items():
        counted.node(n)["expr"] = graph.node(n)["expr"] - c + first * c
    mine = [n for n in plan(graph, shares.targets, dqk.loads) if n not in walked]
    for once in (True, False):
        total = dict.fromkeys(shares.targets, 0.0)
        for b, cols in enumerate(torch.arange(7).split(3)):  # blocks of 3, 3 and 1 key columns
            held = {n: _key_columns(graph, n, whole[n], cols) for n in walked | set(dqk.loads)}
            held |= {n: _key_columns(graph, n, values[n], cols) for n in values}
            env = evaluate(counted, held, sizes | {"DK": len(cols), "FIRST": int(b == 0 or not once)},
                           [n for n in mine if n not in held])
            for t in shares.targets:  # a gradient that is no share: the first block's
                total[t] = total[t] + env[t] if t in shares.shares or b == 0 else total[t]
        close = all(torch.allclose(total[t], whole[t], rtol=1e-9, atol=1e-11) for t in shares.targets)
        assert close == once, once


def test_kernels_launch_order_and_kinds():
    """Every direction: its stage kernels, then its pass, then its output kernels; stage and
    output kernels per chunk, the passes per sequence."""
    sched = _schedule("gated_deltanet")
    kinds = {name: k.kind for name, k in sched.kernels.items()}
    assert kinds == {"fwd": "pass", "fwd_out": "out", "bwd": "pass", "bwd_dv": "out",
                     "bwd_dqk": "out", "fwd_stage": "stage", "bwd_stage": "stage"}
    assert sched.stage_order == {"fwd": ["fwd_stage"], "bwd": ["bwd_stage"]}
    assert list(sched.kernels) == ["fwd_stage", "fwd", "fwd_out", "bwd_stage", "bwd", "bwd_dv",
                                   "bwd_dqk"]
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


@pytest.mark.parametrize("name", ["linear_attention", "simple_gla", "gated_deltanet", "titans"])
def test_output_kernels_compute_the_elementwise_stage_tiles(name):
    """A stage tile of rows by columns made elementwise of inputs and the stage's per-row tiles
    (simple GLA's u exp(gamma_end - gamma), the masked output cotangent) is loaded by the
    sequential passes and the forward's output kernel and computed by the backward's output
    kernels, from per-row tiles they load;
    a stage tile made through a product or a reduction is loaded by every kernel that reads
    it."""
    sched = _schedule(name)
    graph = sched.step.graph
    staged = sched.staged["fwd"] + sched.staged["bwd"]
    rows = [n for n in staged if 1 in graph.shape(n)]

    def elementwise(n, stop):
        return all(graph.node(m)["op"] in ("input", "const", "broadcast", "ew")
                   for m in plan(graph, [n], stop) if m not in stop)

    wide = [n for n in staged if n not in rows]
    cheap = [n for n in wide if elementwise(n, rows)]
    assert cheap
    seen = set()
    for kernel in sched.kernels.values():
        reads = set(plan(graph, kernel.targets, kernel.loads))
        for n in set(wide) & reads:
            if kernel.kind == "out" and kernel.direction == "bwd" and n in cheap:
                assert n not in kernel.loads and elementwise(n, kernel.loads), (kernel.name, n)
            else:
                assert n in kernel.loads or kernel.kind == "stage", (kernel.name, n)
            seen.add((kernel.kind, n in cheap))
    assert {("pass", True), ("out", True)} <= seen


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
    """Every kernel offers the autotuner 4 and 8 warps (the stages and the passes over value
    blocks also 2, those passes also 8 with a prefetching stage), and `launch.least_spilling`
    drops those that spill more (GLA's stages and dq/dk kernel spill at 4 warps, the head-decay
    specs' dq/dk kernels do not). A memory that streams hidden blocks keeps 8 warps outside its
    passes."""
    sched = _schedule(name)
    streamed = name == "ttt_mlp"
    for kernel in sched.kernels.values():
        if kernel.name in ("fwd", "bwd"):
            assert kernel.configs == ([(4, 1), (8, 1)] if streamed else
                                      [(2, 1), (4, 1), (8, 1), (8, 2)]), kernel.name
        elif kernel.kind == "stage":
            assert kernel.configs == ([(8, 1)] if streamed else [(2, 1), (4, 1), (8, 1)]), \
                kernel.name
        else:
            assert kernel.configs == ([(8, 1)] if streamed else [(4, 1), (8, 1)]), kernel.name


def test_kernels_load_the_values_under_their_masks():
    """Linear attention's u = eta * (-v), eta = 1: its products read v under its masks
    (`memories.step.fold_masked_operands`), a tile no stage stores (u was the forward stage's
    one [T, DV] buffer) and every kernel reading it loads, padded with 0, in the operands'
    dtype, rather than computes."""
    sched = _schedule("linear_attention")
    graph = sched.step.graph
    assert not [n for n in sched.staged["fwd"] if graph.shape(n) == ("T", "DV")]
    text = render_triton_module(resolve("linear_attention"))
    loads = re.findall(r"v_masked = load_rows\(v_ptr, .*\)", text)
    assert len(loads) == 3  # the forward pass, its output kernel, the dq/dk kernel's walk
    assert all(line.endswith(", 0.0, DOT)") for line in loads)
    assert "v_masked = (" not in text and "v_masked_ptr" not in text


def _state_products(sched, kernel) -> list[str]:
    """The products of two tiles without the chunk's rows that a kernel computes (Newton-Schulz's
    Gram matrices, its moves, their reverse)."""
    graph = sched.step.graph
    return [n for n in _computes(sched, kernel) if graph.node(n)["op"] == "dot"
            and all("T" not in graph.shape(m) for m in graph.node(n)["inputs"])]


@pytest.mark.parametrize("momentum", ["{}", "{shape: channel}"])
def test_newton_schulz_runs_in_the_passes_and_the_backward_stage(momentum):
    """Muon per chunk: the forward pass stores NS_k(S_e) and the backward pass the gradient of
    S_e, so no output kernel runs the iteration or its reverse (each ran both, from the stored
    chunk-start states); the backward's stage computes the iterates per chunk from the stored
    states, and the backward pass loads them for its reverse rather than recompute them."""
    learner = f"{{kind: muon, eta: {{}}, momentum: {momentum}, apply: chunk}}"
    sched = schedule(chunk_step(derive(checked_spec(axis_spec(learner=learner)))))
    graph = sched.step.graph
    shapes = {graph.shape(s) for s in sched.step.states}
    for name in ("fwd", "bwd_stage", "bwd"):
        assert _state_products(sched, sched.kernels[name]), name
    for name, kernel in sched.kernels.items():
        if kernel.kind == "out":
            assert not _state_products(sched, kernel), name
    assert sched.carried and all(graph.shape(n) in shapes for n in sched.carried)
    assert set(sched.carried) <= set(sched.kernels["bwd"].stores)
    assert [n for n in sched.kept if graph.shape(n) in shapes]
    for name in sched.groups:
        assert set(sched.carried) <= set(sched.kernels[name].loads)
    iterates = [n for n in sched.staged["bwd"] if graph.shape(n) in shapes]
    assert len(iterates) == 4 and set(iterates) <= set(sched.kernels["bwd"].loads)
    assert not set(iterates) & set(_computes(sched, sched.kernels["bwd"]))


@pytest.mark.parametrize("name", ["gated_deltanet", "moneta", "ttt_mlp", "kda"])
def test_no_pass_keeps_a_state_shaped_tile_without_newton_schulz(name):
    """Without a product of state-shaped tiles the passes keep what they kept before: the
    backward pass nothing, the forward pass no state-shaped tile; and no stage stores one."""
    sched = _schedule(name)
    graph = sched.step.graph
    shapes = {graph.shape(s) for s in sched.step.states}
    assert sched.carried == () and not sched.kernels["bwd"].stores
    staged = [n for nodes in sched.staged.values() for n in nodes]
    assert not [n for n in (*sched.kept, *staged) if graph.shape(n) in shapes]
