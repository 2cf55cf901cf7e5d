"""The graph's reverse mode against torch autograd, evaluating the graph itself with
`graph.evaluate` (independent of Triton): for every matrix-memory shape of chunk step the compiler
builds."""

from __future__ import annotations

import copy

import pytest
import sympy as sp
import torch
from conftest import axis_spec

from mirasc.catalog import load_spec
from mirasc.derive import derive
from mirasc.graph import (
    Graph,
    PairDecays,
    backward,
    decayed_pairs,
    evaluate,
    ew,
    held_by_inputs,
    symmetric,
)
from mirasc.memories import step_adjoint
from mirasc.memories.matrix import matrix_chunk_step
from mirasc.memories.step import fold_masked_operands, masked_input
from mirasc.spec import parse_spec

CASES = {
    "gated_deltanet (exact WY)": "specs/gated_deltanet.yaml",
    "titans (momentum)": "specs/titans.yaml",
    "ttt_linear (LN + residual)": "specs/ttt_linear.yaml",
    "yaad-like bias, retained": axis_spec(bias="{kind: huber, variant: switch, delta: {}}",
                                          learner="{kind: gd, eta: {}, grad_at: retained}"),
    "robust + LN": axis_spec(memory="{kind: matrix, layer_norm: true}",
                             bias="{kind: robust, delta: {}}"),
    "lp + momentum + constant decay": axis_spec(
        bias="{kind: lp, p: 3}", retention="{kind: l2, decay: {value: 0.9}}",
        learner="{kind: momentum, eta: {}, momentum: {}}"),
    "muon per chunk (Newton-Schulz)": axis_spec(
        learner="{kind: muon, eta: {}, momentum: {}, apply: chunk, ns_steps: 3}"),
}


def _spec(text):
    return load_spec(text) if text.endswith(".yaml") else parse_spec(text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reverse_mode_matches_autograd(case):
    d = derive(_spec(CASES[case]))
    step = matrix_chunk_step(d)
    graph = step.graph
    t, dk, dv = 6, 5, 5
    sizes = {"T": t, "DK": dk, "DV": dv}
    gen = torch.Generator().manual_seed(0)
    values = {}
    for name in graph.g:
        node = graph.node(name)
        if node["op"] == "input":
            shape = [1 if s == 1 else sizes[s] for s in node["shape"]]
            x = torch.randn(*shape, generator=gen, dtype=torch.float64)
            if name in ("eta", "delta", "momentum"):
                x = 0.1 + 0.5 * x.abs()
            if name == "log_alpha":
                x = -0.2 * x.abs()
            values[name] = x.requires_grad_()
    ones = torch.ones(t, t, dtype=torch.float64)
    last = torch.zeros(t, 1, dtype=torch.float64)
    last[-1] = 1
    values |= {"rowmask": torch.ones(t, 1, dtype=torch.float64), "causal": ones.tril(),
               "strict": ones.tril(-1), "strict2": ones.tril(-2),
               "vmask": torch.ones(1, dv, dtype=torch.float64),
               "lastrow": last}
    env = evaluate(graph, values, sizes)
    outputs = [env[step.outputs[n]] for n in ("o", *step.states)]
    cotangents = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in outputs]
    wrt = ("q", "k", "v", *step.states, *step.gates)
    loss = sum((x * c).sum() for x, c in zip(outputs, cotangents, strict=True))
    expected = torch.autograd.grad(loss, [values[n] for n in wrt], allow_unused=True)

    seeds = {step.outputs["o"]: graph.input("d_o", ("T", "DV"))}
    for state in step.states:
        seeds[step.outputs[state]] = graph.input(f"d{state}_new", graph.shape(step.outputs[state]))
    adjoint = backward(graph, seeds, wrt)
    cot = dict(zip(["d_o", *(f"d{s}_new" for s in step.states)], cotangents, strict=True))
    env = evaluate(graph, {k: v.detach() for k, v in values.items()} | cot, sizes)
    for name, want in zip(wrt, expected, strict=True):
        got = env[adjoint[name]] if adjoint[name] is not None else torch.zeros_like(values[name])
        want = torch.zeros_like(got) if want is None else want
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


def _direct_pairs(kind, u, w, ga, gb, offset):
    """The op written as a sum over pairs in float64: E_tid = exp(ga_td - gb_id) for
    t - i >= offset, 0 elsewhere; gdot sum_d u_td w_id E_tid, gmix sum_i u_ti w_id E_tid,
    gmix_t (out_i) sum_t u_ti w_td E_tid."""
    u, w, ga, gb = (x.double() for x in (u, w, ga, gb))
    t = torch.arange(ga.shape[0])
    paired = (t[:, None] - t[None, :] >= offset)[..., None]
    exponent = ga[:, None, :] - gb[None, :, :]
    weights = torch.where(paired, exponent, -torch.inf).exp()
    if kind == "gdot":
        return (u[:, None, :] * w[None, :, :] * weights).sum(-1)
    if kind == "gmix":
        return (u[:, :, None] * w[None, :, :] * weights).sum(1)
    return (u[:, :, None] * w[:, None, :] * weights).sum(0)


def _decays(kind: str, length: int, cols: int, gen) -> torch.Tensor:
    """log alpha per row: -20 per token or random in (-3, 0), each with resets (-inf, floored to
    -110 as `memories.decay.log_gate` loads them); or mixed, from -8 to 0."""
    if kind == "strong":
        la = torch.full((length, cols), -20.0, dtype=torch.float64)
        la[5::11] = -torch.inf
        return la.clamp(min=-110.0)
    la = -3 * torch.rand(length, cols, generator=gen, dtype=torch.float64)
    if kind == "resets":
        la[::7] = -torch.inf
        return la.clamp(min=-110.0)
    return la * torch.rand(length, 1, generator=gen, dtype=torch.float64) * 8 / 3


@pytest.mark.parametrize("length", [64, 37])
@pytest.mark.parametrize("decay", ["strong", "resets", "mixed"])
@pytest.mark.parametrize("gates", ["channel", "head", "lagged"])
def test_decayed_pairs_equal_the_sum_over_pairs(gates, decay, length):
    """gdot, gmix and gmix_t by sub-chunks (factored across them) against the sum over pairs, for
    the gates the graphs pass: gamma against itself ([T, D], or a head's [T, 1]) with offsets 0 and
    1, and the exclusive prefix sum against gamma with offsets 1 and 2 (a flat node's far
    pairs), one PairDecays shared by the ops; float64 to 1e-12 of the largest entry, float32
    finite and to 1e-5 of the sum over pairs of its rounded inputs."""
    gen = torch.Generator().manual_seed(3)
    d = 5
    la = _decays(decay, length, 1 if gates == "head" else d, gen)
    gamma = la.cumsum(0)
    ga, gb = (gamma - la, gamma) if gates == "lagged" else (gamma, gamma)
    a, b = (torch.randn(length, d, generator=gen, dtype=torch.float64) for _ in range(2))
    m = torch.randn(length, length, generator=gen, dtype=torch.float64)
    decays, decays32 = PairDecays(ga, gb), PairDecays(ga.float(), gb.float())  # shared by ops
    for offset in (1, 2) if gates == "lagged" else (0, 1):
        for kind in ("gdot", "gmix", "gmix_t"):
            u = a if kind == "gdot" else m
            want = _direct_pairs(kind, u, b, ga, gb, offset)
            got = decayed_pairs(kind, u, b, decays, offset)
            assert (got - want).abs().max() <= 1e-12 * want.abs().max(), (kind, offset)
            got32 = decayed_pairs(kind, u.float(), b.float(), decays32, offset)
            want32 = _direct_pairs(kind, u.float(), b.float(), ga.float(), gb.float(), offset)
            assert torch.isfinite(got32).all(), (kind, offset)
            assert (got32 - want32).abs().max() <= 1e-5 * want32.abs().max(), (kind, offset)


def test_held_by_inputs_follows_selections_among_inputs_and_half_constants():
    """A tile is held by the inputs' dtype where each value is an input's or a constant of at
    most 8 significant bits in float16's normal range (so a product by 0s and 1s is exact on
    tensor cores); any arithmetic, or a constant bfloat16 rounds, is not."""
    gr = Graph()
    a, b = gr.input("a", ("T", "DK")), gr.input("b", ("T", "DK"))
    floor = ew(gr, lambda x: sp.Piecewise((x, x > -110.0), (-110.0, True)), a, name="floor")
    assert held_by_inputs(gr, a) and held_by_inputs(gr, floor)
    assert held_by_inputs(gr, ew(gr, lambda x, y: sp.Max(x, y, 0.5), floor, b))
    assert held_by_inputs(gr, ew(gr, lambda x: sp.Piecewise((x, x > 0), (2.0 ** -14, True)), a))
    assert not held_by_inputs(gr, ew(gr, lambda x: sp.Piecewise((x, x > 0), (0.1, True)), a))
    assert not held_by_inputs(gr, ew(gr, lambda x: sp.Piecewise((x, x > 0), (257.0, True)), a))
    assert not held_by_inputs(gr, ew(gr, lambda x: sp.Piecewise((x, x > 0), (2.0 ** -15, True)), a))
    assert not held_by_inputs(gr, ew(gr, lambda x: 2 * x, floor))
    assert not held_by_inputs(gr, ew(gr, lambda x, y: sp.Max(x + y, y), a, b))
    assert not held_by_inputs(gr, gr.cumsum(floor))


def test_an_adjoints_pair_sums_along_one_axis_reduce_once():
    """Gated DeltaNet's gate gradient takes row and column sums of [T, T] tiles from both decay
    matrices (the output's and the WY system's): each adjoint reduces each axis once, over the
    sum of its tiles (the values are test_reverse_mode_matches_autograd's)."""
    step = matrix_chunk_step(derive(_spec(CASES["gated_deltanet (exact WY)"])))
    graph = step.graph
    before = set(graph.g)
    step_adjoint(step)

    def pair_sum(n):
        node = graph.node(n)
        return node["op"] == "sum" and graph.shape(node["inputs"][0]) == ("T", "T")

    merged = 0
    for n in set(graph.g) - before:
        sums = [graph.node(i)["axis"] for i in graph.node(n)["inputs"] if pair_sum(i)]
        assert len(sums) == len(set(sums)), n
        if pair_sum(n):
            summed = graph.node(graph.node(n)["inputs"][0])
            merged += summed["op"] == "ew" and isinstance(summed["expr"], sp.Add) and \
                all(graph.shape(i) == ("T", "T") for i in summed["inputs"])
    assert merged == 2  # the gate's row sums, and its transpose's column sums


def test_a_products_masked_input_operand_keeps_what_the_step_computes():
    """Linear attention's u = eta * (-v), eta = 1, feeds the products u^T k and attn u: after
    `fold_masked_operands` both read v under its masks and -1 moves into their readers (W -
    u^T k = W + v_masked^T k), and the step's outputs are what they were, with a padded row
    and a padded value column (graph.evaluate, float64)."""
    step = matrix_chunk_step(derive(load_spec("specs/linear_attention.yaml")))
    unfolded = copy.deepcopy(step)
    graph = fold_masked_operands(step).graph
    masked = [n for n in graph.g if masked_input(graph, n) == "v"]
    assert len(masked) == 1
    assert sorted(graph.node(c)["op"] for c in graph.g.successors(masked[0])) == ["dot", "dot"]
    t, dk, dv = 6, 5, 4
    sizes = {"T": t, "DK": dk, "DV": dv}
    gen = torch.Generator().manual_seed(1)
    values = {n: torch.randn(*[sizes.get(s, 1) for s in graph.shape(n)], generator=gen,
                             dtype=torch.float64)
              for n in graph.g if graph.node(n)["op"] == "input"}
    ones = torch.ones(t, t, dtype=torch.float64)
    rowmask, vmask = torch.ones(t, 1, dtype=torch.float64), torch.ones(1, dv, dtype=torch.float64)
    rowmask[-1], vmask[0, -1] = 0, 0
    values |= {"rowmask": rowmask, "vmask": vmask, "causal": ones.tril(), "strict": ones.tril(-1)}
    for before, after in zip(unfolded.outputs.values(), step.outputs.values(), strict=True):
        want = evaluate(unfolded.graph, values, sizes)[before]
        got = evaluate(graph, values, sizes)[after]
        assert torch.allclose(got, want, rtol=1e-13, atol=1e-14), after


def test_newton_schulz_reverse_reads_its_symmetric_tiles_one_way_round():
    """Newton-Schulz's A = X X^T, A^2 and b A + c A^2 are symmetric: no product of the reverse
    reads one transposed (each transposed copy is another operand in shared memory), and each
    Gram matrix passes its adjoint to X as one product, (dA + dA^T) X, not two (the values are
    test_reverse_mode_matches_autograd's)."""
    step = matrix_chunk_step(derive(_spec(CASES["muon per chunk (Newton-Schulz)"])))
    graph = step.graph
    before = set(graph.g)
    grams = [n for n in graph.order() if graph.node(n)["op"] == "dot"
             and len(set(graph.node(n)["inputs"])) == 1 and graph.shape(n) == ("DV", "DV")]
    assert len(grams) == 6 and all(symmetric(graph, n) for n in grams)  # 3 steps: A and A^2
    step_adjoint(step)
    for n in set(graph.g) - before:
        node = graph.node(n)
        if node["op"] == "dot":
            flags = (node["ta"], node["tb"])
            assert not any(f and symmetric(graph, x) for f, x in zip(flags, node["inputs"],
                                                                     strict=True)), n
    for gram in grams[::2]:
        x = graph.node(gram)["inputs"][0]
        from_gram = [n for n in set(graph.g) - before if n.startswith(f"d{x}_from_{gram}")]
        assert len(from_gram) == 1 and graph.node(from_gram[0])["op"] == "dot", from_gram


def test_symmetric_by_construction_only():
    """x x^T and functions of it are symmetric; x y^T, x x (not a Gram product) and a masked
    Gram matrix are not."""
    graph = Graph()
    x, y = graph.input("x", ("DV", "DK")), graph.input("y", ("DV", "DK"))
    mask = graph.input("m", ("DV", "DV"))
    gram = graph.dot(x, x, tb=True)
    assert symmetric(graph, gram) and symmetric(graph, graph.dot(gram, gram))
    assert symmetric(graph, ew(graph, lambda a, b: 2 * a + b ** 2, gram, graph.dot(gram, gram)))
    assert not symmetric(graph, graph.dot(x, y, tb=True))
    assert not symmetric(graph, ew(graph, lambda a, b: a * b, gram, mask))
    square = graph.input("s", ("DV", "DV"))
    assert not symmetric(graph, graph.dot(square, square))
