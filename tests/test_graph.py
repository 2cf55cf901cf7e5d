"""The graph's reverse mode against torch autograd, evaluating the graph itself with
`graph.evaluate` (independent of Triton): for every matrix-memory shape of chunk step the compiler
builds."""

from __future__ import annotations

import pytest
import torch
from conftest import axis_spec

from mirasc.catalog import load_spec
from mirasc.derive import derive
from mirasc.graph import backward, evaluate
from mirasc.memories.matrix import matrix_chunk_step
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
