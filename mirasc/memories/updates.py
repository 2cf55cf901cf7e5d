"""A chunk's updates: the bias gradient g, and U from mini-batch gradients at the chunk-start
state or from the exact recurrence (the WY/UT transform)."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import DELTA, RNORM, RNORM_EPS, Derivation, R, V
from mirasc.graph import Graph, backward, ew
from mirasc.memories.decay import exclusive_cumsum, previous_decays
from mirasc.memories.eta import gate_args
from mirasc.memories.maps import finish
from mirasc.memories.step import strict_mask


def bias_gradient(gr: Graph, d: Derivation, pred: str, v: str, vmask: str) -> str:
    """g = dl/dr at r = M(k) - v, rnorm = ||r|| over the real DV columns (sympy's rule).

    Padding (rows past the sequence, columns past DV) is loaded as v = 1 so that r != 0 there and
    every derivative of g stays finite; the masks then zero its contributions."""
    r = ew(gr, lambda a, b: a - b, pred, v, name="r")
    rsq = gr.sum(ew(gr, lambda a, m: a * a * m, r, vmask), 1, name="rsq")
    rnorm = ew(gr, lambda s: sp.sqrt(s + RNORM_EPS), rsq, name="rnorm")
    args = {R: r, V: v, RNORM: rnorm} | ({DELTA: "delta"} if "delta" in gr.g else {})
    return gr.ew(d.bias.elem + d.bias.norm * R, args, name="g")


def minibatch_updates(gr: Graph, d: Derivation, ctx: dict) -> str:
    """U = eta * g(r), r = M_W(k) - v at the chunk-start W (decayed to row t when grad_at is
    'retained'); g = elem(r, v, rnorm, delta) + norm(rnorm, delta) * r from sympy."""
    retained = d.spec.learner.grad_at == "retained" and ctx["beta"] is not None
    if retained and ctx["channel"]:
        k_point = ew(gr, lambda a, b: a * b, ctx["k"], ctx["beta"], name="k_point")
        kw = gr.dot(k_point, ctx["w"], tb=True, name="kw")
    else:
        kw = gr.dot(ctx["k"], ctx["w"], tb=True, name="kw")
        if ctx.get("b") is not None:
            kw = ew(gr, lambda a, b: a + b, kw, ctx["b"], name="kwb")
        if retained:
            kw = ew(gr, lambda a, b: a * b, kw, ctx["beta"], name="pred")
    mem = d.spec.memory
    pred = finish(gr, d, kw, ctx["k"], ctx["vmask"], name="pred_m") \
        if mem.layer_norm or mem.residual else kw
    g = bias_gradient(gr, d, pred, ctx["v"], ctx["vmask"])
    # J^T g: the bias gradient pulled back through LN/residual
    through = g if pred == kw else backward(gr, {pred: g}, (kw,))[kw]
    args, factor = gate_args(gr, d, ctx)
    x = sp.Symbol("x", real=True)
    return gr.ew(x * factor, args | {x: through}, name="u")


def exact_updates(gr: Graph, d: Derivation, ctx: dict) -> str:
    """The exact recurrence for a quadratic bias g = c r + e(v): each row's gradient at its own
    state. With p_i the decay from the chunk start to the gradient point of row i,
        (I + A) U = eta (c p K W^T + e(v) - c v),  A_ij = eta_i c (k_i . k_j) p_i / beta_j (j < i),
    solved with the unit lower-triangular inverse (the WY/UT transform)."""
    c = d.bias.d_elem["r"]
    e = d.bias.elem.subs(R, 0) - c * V
    strict = strict_mask(gr)
    k, k_upd = ctx["k"], ctx["k_upd"]
    lag = None
    if ctx["gam"] is not None:
        lag = ctx["gam"] if d.spec.learner.grad_at == "retained" \
            else exclusive_cumsum(gr, ctx["la"])
    if lag is not None and ctx["channel"]:  # per key channel: k_t k_i e^(lag_t - gamma_i), t > i
        k_point = ew(gr, lambda a, g: a * sp.exp(g), k, lag, name="k_point")
        kk = gr.gdot(k, k_upd, lag, ctx["gam"], offset=1, flat=lag != ctx["gam"], name="kk")
        pred = gr.dot(k_point, ctx["w"], tb=True, name="pred")
    else:
        kk = gr.dot(k, k_upd, tb=True, name="kk")
        kw = gr.dot(k, ctx["w"], tb=True, name="kw")
        if lag is None:
            kk = ew(gr, lambda a, s: a * s, kk, strict, name="kk_strict")
            pred = kw
        else:
            kk = ew(gr, lambda a, s, x, y: a * sp.Piecewise((sp.exp(x - y), s > 0), (0, True)),
                    kk, strict, lag, ctx["gam_row"], name="kk_decay") if lag == ctx["gam"] else \
                previous_decays(gr, kk, strict, lag, ctx["gam_row"])
            pred = ew(gr, lambda x, g: x * sp.exp(g), kw, lag, name="pred")
    args, factor = gate_args(gr, d, ctx)
    eta_row = gr.ew(factor.subs(sp.Symbol("vmask", real=True), 1) * c, args, name="eta_c")
    a = ew(gr, lambda x, y: x * y, eta_row, kk, name="A")
    inverse = gr.add("tri_inv", ("T", "T"), (a,), name="A_inv")
    p_sym = sp.Symbol("pred", real=True)
    rhs = gr.ew((c * p_sym + e) * factor, args | {p_sym: pred, V: ctx["v"]}, name="rhs")
    return gr.dot(inverse, rhs, name="u")
