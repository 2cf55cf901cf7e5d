"""A chunk's updates: the bias gradient g, and U from mini-batch gradients at the chunk-start
state or from the exact recurrence (the WY/UT transform)."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import DELTA, RNORM, RNORM_EPS, Derivation, R, V
from mirasc.graph import Graph, backward, ew
from mirasc.memories.decay import exclusive_cumsum, previous_decays
from mirasc.memories.eta import gate_args, step_text
from mirasc.memories.maps import finish
from mirasc.memories.step import strict_mask


def bias_gradient(gr: Graph, d: Derivation, pred: str, v: str, vmask: str, delta: str = "delta",
                  suffix: str = "") -> str:
    """g = dl/dr at r = M(k) - v, rnorm = ||r|| over the real DV columns (sympy's rule).

    Padding (rows past the sequence, columns past DV) is loaded as v = 1 so that r != 0 there and
    every derivative of g stays finite; the masks then zero its contributions. `delta` names the
    rows' threshold tile, `suffix` the nodes of rows other than the chunk's own."""
    r = ew(gr, lambda a, b: a - b, pred, v, name=f"r{suffix}", formula=f"r = {pred} - {v}")
    rsq = gr.sum(ew(gr, lambda a, m: a * a * m, r, vmask, name=f"r_sq{suffix}"), 1,
                 name=f"rsq{suffix}")
    rnorm = ew(gr, lambda s: sp.sqrt(s + RNORM_EPS), rsq, name=f"rnorm{suffix}",
               formula="rnorm = sqrt(sum_DV r^2 + eps)")
    args = {R: r, V: v, RNORM: rnorm} | ({DELTA: delta} if "delta" in gr.g else {})
    expr = d.bias.elem + d.bias.norm * R
    text = sp.sstr(expr)
    return gr.ew(expr, args, name=f"g{suffix}", formula=f"g = dl/dr = {text}" if len(text) <= 60
                 else "g = dl/dr (r, v, rnorm)")


def minibatch_updates(gr: Graph, d: Derivation, ctx: dict, rows: dict | None = None) -> str:
    """U = eta * g(r), r = M_W(k) - v at the chunk-start W (decayed to row t when grad_at is
    'retained'); g = elem(r, v, rnorm, delta) + norm(rnorm, delta) * r from sympy. With a window
    of c > 1 tokens U = gamma * g (eta enters through the band); `rows` names the tiles of the
    previous chunk's rows (`window.previous_rows`) to take their U at the same W."""
    own, suffix = ctx | (rows or {}), "" if rows is None else "_prev"
    k = own["k"]
    retained = d.spec.learner.grad_at == "retained" and ctx["beta"] is not None
    if retained and ctx["channel"]:
        k_point = ew(gr, lambda a, b: a * b, k, ctx["beta"], name="k_point")
        kw = gr.dot(k_point, ctx["w"], tb=True, name="kw", formula=f"kw = k_point {ctx['w']}^T")
    else:
        kw = gr.dot(k, ctx["w"], tb=True, name=f"kw{suffix}", formula=f"kw = {k} {ctx['w']}^T")
        if ctx.get("b") is not None:
            kw = ew(gr, lambda a, b: a + b, kw, ctx["b"], name=f"kwb{suffix}",
                    formula=f"kwb = kw + {ctx['b']}")
        if retained:
            kw = ew(gr, lambda a, b: a * b, kw, ctx["beta"], name="pred", formula=f"pred = beta * {kw}")
    mem = d.spec.memory
    pred = finish(gr, d, kw, k, ctx["vmask"], name=f"pred_m{suffix}") \
        if mem.layer_norm or mem.residual else kw
    g = bias_gradient(gr, d, pred, own["v"], ctx["vmask"], own.get("delta", "delta"), suffix)
    # J^T g: the bias gradient pulled back through LN/residual
    through = g if pred == kw else backward(gr, {pred: g}, (kw,), prefix="g_")[kw]
    args, factor = gate_args(gr, d, own)
    x = sp.Symbol("x", real=True)
    return gr.ew(x * factor, args | {x: through}, name=f"u{suffix}",
                 formula=f"u{suffix} = {step_text(d)}{through}")


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
        k_point = ew(gr, lambda a, g: a * sp.exp(g), k, lag, name="k_point",
                     formula=f"k_point = k * exp({lag})")
        kk = gr.gdot(k, k_upd, lag, ctx["gam"], offset=1, flat=lag != ctx["gam"], name="kk",
                     formula=f"kk_ti = sum_d k_td {k_upd}_id exp({lag}_td - gam_id) (t > i)")
        pred = gr.dot(k_point, ctx["w"], tb=True, name="pred", formula=f"pred = k_point {ctx['w']}^T")
    else:
        kk = gr.dot(k, k_upd, tb=True, name="kk", formula=f"kk = k {k_upd}^T")
        kw = gr.dot(k, ctx["w"], tb=True, name="kw", formula=f"kw = k {ctx['w']}^T")
        if lag is None:
            kk = ew(gr, lambda a, s: a * s, kk, strict, name="kk_strict",
                    formula="kk_strict = kk * strict")
            pred = kw
        else:
            kk = ew(gr, lambda a, s, x, y: a * sp.Piecewise((sp.exp(x - y), s > 0), (0, True)),
                    kk, strict, lag, ctx["gam_row"], name="kk_decay",
                    formula="kk_decay_ti = kk_ti exp(gam_t - gam_i) (t > i), 0 (t <= i)") \
                if lag == ctx["gam"] else previous_decays(gr, kk, strict, lag, ctx["gam_row"])
            pred = ew(gr, lambda x, g: x * sp.exp(g), kw, lag, name="pred",
                      formula=f"pred = kw * exp({lag})")
    args, factor = gate_args(gr, d, ctx)
    eta_expr = factor.subs(sp.Symbol("vmask", real=True), 1) * c
    eta_row = gr.ew(eta_expr, args, name="eta_c", formula=f"eta_c = {sp.sstr(eta_expr)}")
    a = ew(gr, lambda x, y: x * y, eta_row, kk, name="A", formula=f"A = diag(eta_c) {kk}")
    inverse = gr.add("tri_inv", ("T", "T"), (a,), name="A_inv", formula="A_inv = (I + A)^-1")
    p_sym = sp.Symbol("pred", real=True)
    rhs = gr.ew((c * p_sym + e) * factor, args | {p_sym: pred, V: ctx["v"]}, name="rhs",
                formula=f"rhs = {sp.sstr(sp.Symbol('eta') * (c * sp.Symbol(pred) + e))}")
    return gr.dot(inverse, rhs, name="u", formula="u = A_inv rhs")
