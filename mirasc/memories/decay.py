"""Decays over a chunk: the log gates, their prefix sums and the causal decay matrices, the decay
from each row to the chunk end, and the momentum's mixing of the updates."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, ew
from mirasc.memories.step import lastrow_mask, strict_mask


def chunk_decays(gr: Graph, d: Derivation, rowmask: str, matrix: bool = True) -> tuple:
    """log alpha per row, gamma = its cumsum, gamma at the chunk end, beta = exp(gamma) and (for
    a per-head decay, with `matrix`) the causal decay matrix; Nones (and the plain causal mask)
    without a decay."""
    la = log_gate(gr, d.op_gates(), "log_alpha", rowmask, name="la")
    if la is None:
        return None, None, None, None, "causal"
    gam = gr.cumsum(la, name="gam", formula="gam_t = sum_(s<=t) la_s")
    gam_end = gr.sum(la, 0, name="gam_end", formula="gam_end = sum_t la_t")
    beta = ew(gr, sp.exp, gam, name="beta", formula="beta = exp(gam)")
    decay_mat = decay_matrix(gr, "causal", gam, gr.trans(gam, name="gam_row"), name="decay") \
        if matrix else None
    return la, gam, gam_end, beta, decay_mat


def decayed_to_end(gr: Graph, gam_end: str | None, x: str, name: str) -> str:
    """A chunk-start value decayed to the chunk end, exp(gamma_T) x (x itself without a decay)."""
    return x if gam_end is None else ew(gr, lambda e, a: sp.exp(e) * a, gam_end, x, name=name,
                                        formula=f"{name} = exp(gam_end) {x}")


LOG_FLOOR = -110.0  # log_alpha below it (down to -inf, alpha = 0: a full reset) counts as it
MOMENTUM_EPS = 1e-20  # the momentum enters the logs as m + 1e-20 (exact to float64's precision)


def log_gate(gr: Graph, gates: dict, arg: str, rowmask: str, name: str) -> str | None:
    """log of a multiplicative gate per row (the op takes log_alpha, but the momentum as is).
    log_alpha is raised to LOG_FLOOR: exp(-110) is 0 in float32 and 2e-48 in float64, so the
    decay is the same to the precision of either, and the prefix sums of the decays stay finite
    (-inf - -inf would be NaN); the gradient there is 0, as d alpha / d log_alpha = alpha. The
    momentum is log(m + MOMENTUM_EPS): finite at m = 0, and d exp(lm) / dm = 1 exactly, so a
    momentum of 0 has the recurrence's gradient (with `pair_decays`, not a quotient of noise)."""
    gate = gates.get(arg)
    if gate is None:
        return None
    if gate.is_input:
        if arg == "log_alpha":
            return ew(gr, lambda a: sp.Piecewise((a, a > LOG_FLOOR), (LOG_FLOOR, True)), arg,
                      name=name, formula=f"{name} = max(log_alpha, {LOG_FLOOR:g})")
        return ew(gr, lambda m: sp.log(m + MOMENTUM_EPS), arg, name=name,
                  formula=f"{name} = log({arg} + {MOMENTUM_EPS:g})")
    value = gate.value + (MOMENTUM_EPS if arg == "momentum" else 0.0)
    return ew(gr, lambda m: m * sp.log(sp.Float(value)), rowmask, name=name,
              formula=f"{name} = log({value:g}) on real rows")


def decay_matrix(gr: Graph, causal: str, cum: str, cum_row: str, name: str) -> str:
    """exp(cum_t - cum_i) below the diagonal, 1 on it (a constant: its +-1 terms in the
    gradients of cum_t and cum_i would cancel only to rounding, which swamps the gradient of
    a large decay), 0 above."""
    return ew(gr, lambda c, s, a, b: sp.Piecewise((sp.exp(a - b), s > 0), (1, c > 0), (0, True)),
              causal, strict_mask(gr), cum, cum_row, name=name,
              formula=f"{name}_ti = exp({cum}_t - {cum}_i) (t > i), 1 (t = i), 0 (t < i)")


def previous_decays(gr: Graph, kk: str, strict: str, lag: str, gam_row: str) -> str:
    """kk_ti exp(lag_t - gamma_i) for t > i, lag the exclusive prefix sum: 1 for t = i + 1 (a
    constant, as in `decay_matrix`), 0 on and above the diagonal."""
    band = gr.const("strict2", ("T", "T"), "strict2")  # t > i + 1
    return ew(gr, lambda a, s, s2, x, y: a * sp.Piecewise((sp.exp(x - y), s2 > 0), (1, s > 0),
                                                          (0, True)),
              kk, strict, band, lag, gam_row, name="kk_decay",
              formula=f"kk_decay_ti = kk_ti exp({lag}_t - gam_i) (t > i + 1), kk_ti (t = i + 1), 0")


def exclusive_cumsum(gr: Graph, la: str) -> str:
    """The exclusive prefix sum sum_(s < t) la_s (not gamma_t - la_t, whose gradients cancel to
    rounding at the first row)."""
    formula = "gam_prev_t = sum_(s<t) la_s"
    if gr.shape(la)[1] == 1:
        before = ew(gr, lambda s, a: s * a, strict_mask(gr), gr.trans(la, name=f"{la}_row"),
                    name=f"{la}_before")
        return gr.sum(before, 1, name="gam_prev", formula=formula)
    return gr.dot(strict_mask(gr), la, name="gam_prev", formula=formula)


def tail_decays(gr: Graph, la: str, rowmask: str, name: str = "tail") -> str:
    """The decay from each real row to the chunk end, exp(sum_(s > i) la_s), by a sum over the
    later rows (not gamma_T - gamma_i, whose gradients cancel to rounding at the last row)."""
    if gr.shape(la)[1] == 1:
        after = ew(gr, lambda s, a: s * a, strict_mask(gr), la, name=f"{la}_after")
        later = gr.trans(gr.sum(after, 0, name=f"log_{name}_row"), name=f"log_{name}")
    else:
        later = gr.dot(strict_mask(gr), la, ta=True, name=f"log_{name}")
    return ew(gr, lambda m, x: m * sp.exp(x), rowmask, later, name=name,
              formula=f"{name}_i = exp(sum_(s>i) {la}_s) on real rows")


def pair_decays(gr: Graph, lm: str, name: str) -> str:
    """exp(sum_(i<s<=t) lm_s) below the diagonal, 1 on it, 0 above, for a per-head log gate
    [T, 1]: the exponent is a sum over the rows between each pair (a dot with the strict mask),
    not a difference of prefix sums, so the gradient of each lm_s sums only the pairs it lies
    between, each a multiple of its gate, and d/dm = (d/dlm) / m keeps its precision as m -> 0."""
    between = ew(gr, lambda c, m: c * m, "causal", gr.trans(lm, name=f"{lm}_row"),
                 name=f"{lm}_upto", formula=f"{lm}_upto_ts = {lm}_s (s <= t)")
    exponent = gr.dot(between, strict_mask(gr), name=f"{lm}_pairs",
                      formula=f"{lm}_pairs_ti = sum_(i<s<=t) {lm}_s")
    return ew(gr, lambda c, s, a: sp.Piecewise((sp.exp(a), s > 0), (1, c > 0), (0, True)),
              "causal", strict_mask(gr), exponent, name=name,
              formula=f"{name}_ti = exp({lm}_pairs_ti) (t > i), 1 (t = i), 0 (t < i)")


def momentum_mixing(gr: Graph, d: Derivation, decay_mat: str, rowmask: str):
    """The momentum's mixing of a chunk's updates (see `memories.matrix._momentum_terms`), shared
    by all layers: C = decay @ exp(mu_t - mu_i) (`pair_decays`),
    s_t = sum_(j<=t, real rows) decay_tj exp(mu_j), their values at the chunk's last real row,
    and exp(mu_T - mu)."""
    lastrow = lastrow_mask(gr)
    lm = log_gate(gr, d.op_gates(), "momentum", rowmask, name="lm")
    mu = gr.cumsum(lm, name="mu", formula="mu_t = sum_(s<=t) lm_s")
    mu_end = gr.sum(lm, 0, name="mu_end", formula="mu_end = sum_t lm_t")
    mom = pair_decays(gr, lm, name="mom")
    mix = gr.dot(decay_mat, mom, name="mix", formula="mix = decay mom")
    s_terms = ew(gr, lambda a, b, m: a * sp.exp(b) * m, decay_mat, gr.trans(mu, name="mu_row"),
                 gr.trans(rowmask, name="rowmask_row"), name="s_terms")
    s_vec = gr.sum(s_terms, 1, name="s_vec",  # no step at masked rows
                   formula="s_vec_t = sum_(j<=t, real j) decay_tj exp(mu_j)")
    mix_last = ew(gr, lambda a, b: a * b, mix, lastrow, name="mix_last")
    mix_end = gr.trans(gr.sum(mix_last, 0, name="mix_end_row"), name="mix_end")
    s_end = gr.sum(ew(gr, lambda a, b: a * b, s_vec, lastrow, name="s_last"), 0, name="s_end")
    m_tail = tail_decays(gr, lm, rowmask, name="m_tail")
    return mix, s_vec, mix_end, s_end, m_tail, mu_end
