"""The muon learner with `apply: chunk` (LaCT): a chunk's momentum summed at its end and
orthogonalised once, by the Newton-Schulz iteration on the state tile."""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from mirasc.derive import NS_COEFFICIENTS, NS_EPS, Derivation
from mirasc.graph import Graph, ew
from mirasc.memories.decay import log_gate, tail_decays


def by_chunk(d: Derivation) -> bool:
    """Whether the learner is muon applied once per chunk, at its last token."""
    learner = d.spec.learner
    return learner.kind == "muon" and learner.apply == "chunk"


def chunk_momentum(gr: Graph, d: Derivation, s_in: str, rowmask: str, name: str,
                   update: Callable[[str], str]) -> str:
    """S_e = (m_(s+1) .. m_e) S_s + sum_i (m_(i+1) .. m_e) grad_i at the chunk's last row e:
    `update` maps the momentum's tail decays m_tail [T, 1 or DK] to the decayed sum of the
    chunk's gradients (`decayed_gradients`, or a window's regrouping of them)."""
    lm = log_gate(gr, d.op_gates(), "momentum", rowmask, name="lm")
    m_tail = "m_tail" if "m_tail" in gr.g else tail_decays(gr, lm, rowmask, name="m_tail")
    mu_end = "mu_end" if "mu_end" in gr.g else \
        gr.sum(lm, 0, name="mu_end", formula="mu_end = sum_t lm_t")
    summed = update(m_tail)
    return ew(gr, lambda e, x, u: sp.exp(e) * x + u, mu_end, s_in, summed, name=f"{name}_end",
              formula=f"{name}_end = exp(mu_end) {s_in} + {summed}")


def decayed_gradients(gr: Graph, grads: str, keys: str, m_tail: str, name: str) -> str:
    """sum_i (m_(i+1) .. m_e) grad_i for a layer whose chunk gradients are grads^T keys (`grads`
    [T, out] the rows' raw gradients, no step): one dot, the tail decays on the gradients (a
    per-head momentum) or on the keys (a per-channel one)."""
    if gr.shape(m_tail)[1] == 1:
        grads = ew(gr, lambda a, b: a * b, grads, m_tail, name=f"{grads}_m_tail")
    else:
        keys = ew(gr, lambda a, b: a * b, keys, m_tail, name=f"{keys}_m_tail")
    return gr.dot(grads, keys, ta=True, name=f"{name}_update",
                  formula=f"{name}_update = {grads}^T {keys}")


def newton_schulz(gr: Graph, x: str, steps: int, name: str) -> str:
    """NS_k(X) of a state tile [rows, cols]: X / (||X||_F + eps), then k steps
    X <- a X + (b A + c A^2) X, A = X X^T, each a product of state tiles. A layer with hidden
    rows (an MLP's first, DH >= DK) runs on X^T, whose Gram matrix is the smaller (as the
    reference does for a tall matrix); else on X, the Gram matrix over the rows. For a matrix
    with more rows than columns the two orientations are the same polynomial,
    p(X X^T) X = X p(X^T X), so only the rounding differs from the reference's choice."""
    a, b, c = NS_COEFFICIENTS
    rows = gr.sum(ew(gr, lambda u: u * u, x, name=f"{name}_sq"), 1, name=f"{name}_rowsq")
    total = gr.sum(rows, 0, name=f"{name}_normsq", formula=f"{name}_normsq = ||{x}||_F^2")
    # selected, not added: the norm's derivative is infinite at a zero momentum
    scale = ew(gr, lambda s: sp.Piecewise((1 / (sp.sqrt(s) + NS_EPS), s > 0), (1 / NS_EPS, True)),
               total, name=f"{name}_scale", formula=f"{name}_scale = 1 / (||{x}||_F + {NS_EPS:g})")
    y = ew(gr, lambda u, s: u * s, x, scale, name=f"{name}0")
    tall = gr.shape(x)[0] == "DH"
    for j in range(1, steps + 1):
        gram = gr.dot(y, y, ta=tall, tb=not tall, name=f"{name}_gram{j}",
                      formula=f"{name}_gram{j} = " + (f"{y}^T {y}" if tall else f"{y} {y}^T"))
        square = gr.dot(gram, gram, name=f"{name}_gram{j}_sq")
        poly = ew(gr, lambda g, h: b * g + c * h, gram, square, name=f"{name}_poly{j}",
                  formula=f"{name}_poly{j} = {b} A + {c} A^2")
        moved = gr.dot(y, poly, name=f"{name}_moved{j}") if tall else \
            gr.dot(poly, y, name=f"{name}_moved{j}")
        y = ew(gr, lambda u, m: a * u + m, y, moved, name=f"{name}{j}",
               formula=f"{name}{j} = {a} {y} + {name}_moved{j}")
    return y
