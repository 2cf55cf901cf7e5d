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
    gam = gr.cumsum(la, name="gam")
    gam_end = gr.sum(la, 0, name="gam_end")
    beta = ew(gr, sp.exp, gam, name="beta")
    decay_mat = decay_matrix(gr, "causal", gam, gr.trans(gam, name="gam_row"), name="decay") \
        if matrix else None
    return la, gam, gam_end, beta, decay_mat


def decayed_to_end(gr: Graph, gam_end: str | None, x: str, name: str | None = None) -> str:
    """A chunk-start value decayed to the chunk end, exp(gamma_T) x (x itself without a decay)."""
    return x if gam_end is None else ew(gr, lambda e, a: sp.exp(e) * a, gam_end, x, name=name)


LOG_FLOOR = -110.0  # log_alpha below it (down to -inf, alpha = 0: a full reset) counts as it


def log_gate(gr: Graph, gates: dict, arg: str, rowmask: str, name: str) -> str | None:
    """log of a multiplicative gate per row (the op takes log_alpha, but the momentum as is).
    log_alpha is raised to LOG_FLOOR: exp(-110) is 0 in float32 and 2e-48 in float64, so the
    decay is the same to the precision of either, and the prefix sums of the decays stay finite
    (-inf - -inf would be NaN); the gradient there is 0, as d alpha / d log_alpha = alpha."""
    gate = gates.get(arg)
    if gate is None:
        return None
    if gate.is_input:
        if arg == "log_alpha":
            return ew(gr, lambda a: sp.Piecewise((a, a > LOG_FLOOR), (LOG_FLOOR, True)), arg,
                      name=name)
        return ew(gr, sp.log, arg, name=name)
    return ew(gr, lambda m: m * sp.log(sp.Float(gate.value)), rowmask, name=name)


def decay_matrix(gr: Graph, causal: str, cum: str, cum_row: str, name: str) -> str:
    """exp(cum_t - cum_i) below the diagonal, 1 on it (a constant: its +-1 terms in the
    gradients of cum_t and cum_i would cancel only to rounding, which swamps the gradient of
    a large decay), 0 above."""
    return ew(gr, lambda c, s, a, b: sp.Piecewise((sp.exp(a - b), s > 0), (1, c > 0), (0, True)),
              causal, strict_mask(gr), cum, cum_row, name=name)


def previous_decays(gr: Graph, kk: str, strict: str, lag: str, gam_row: str) -> str:
    """kk_ti exp(lag_t - gamma_i) for t > i, lag the exclusive prefix sum: 1 for t = i + 1 (a
    constant, as in `decay_matrix`), 0 on and above the diagonal."""
    band = gr.const("strict2", ("T", "T"), "strict2")  # t > i + 1
    return ew(gr, lambda a, s, s2, x, y: a * sp.Piecewise((sp.exp(x - y), s2 > 0), (1, s > 0),
                                                          (0, True)),
              kk, strict, band, lag, gam_row, name="kk_decay")


def exclusive_cumsum(gr: Graph, la: str) -> str:
    """The exclusive prefix sum sum_(s < t) la_s (not gamma_t - la_t, whose gradients cancel to
    rounding at the first row)."""
    if gr.shape(la)[1] == 1:
        return gr.sum(ew(gr, lambda s, a: s * a, strict_mask(gr), gr.trans(la)), 1, name="gam_prev")
    return gr.dot(strict_mask(gr), la, name="gam_prev")


def tail_decays(gr: Graph, la: str, rowmask: str, name: str = "tail") -> str:
    """The decay from each real row to the chunk end, exp(sum_(s > i) la_s), by a sum over the
    later rows (not gamma_T - gamma_i, whose gradients cancel to rounding at the last row)."""
    if gr.shape(la)[1] == 1:
        later = gr.trans(gr.sum(ew(gr, lambda s, a: s * a, strict_mask(gr), la), 0))
    else:
        later = gr.dot(strict_mask(gr), la, ta=True)
    return ew(gr, lambda m, x: m * sp.exp(x), rowmask, later, name=name)


def momentum_mixing(gr: Graph, d: Derivation, decay_mat: str, rowmask: str):
    """The momentum's mixing of a chunk's updates (see `memories.matrix._momentum_terms`), shared
    by all layers: C = decay @ exp(mu_t - mu_i), s_t = sum_(j<=t, real rows) decay_tj exp(mu_j),
    their values at the chunk's last real row, and exp(mu_T - mu)."""
    lastrow = lastrow_mask(gr)
    lm = log_gate(gr, d.op_gates(), "momentum", rowmask, name="lm")
    mu = gr.cumsum(lm, name="mu")
    mu_end = gr.sum(lm, 0, name="mu_end")
    mix = gr.dot(decay_mat, decay_matrix(gr, "causal", mu, gr.trans(mu), name="mom"), name="mix")
    s_vec = gr.sum(ew(gr, lambda a, b, m: a * sp.exp(b) * m, decay_mat, gr.trans(mu),
                      gr.trans(rowmask)), 1, name="s_vec")  # no step at masked rows
    mix_end = gr.trans(gr.sum(ew(gr, lambda a, b: a * b, mix, lastrow), 0), name="mix_end")
    s_end = gr.sum(ew(gr, lambda a, b: a * b, s_vec, lastrow), 0, name="s_end")
    m_tail = tail_decays(gr, lm, rowmask, name="m_tail")
    return mix, s_vec, mix_end, s_end, m_tail, mu_end
