"""The learner's step size eta: whether it is the reading token's (learner.eta_at 'query'), its
value at the chunk end, and its factor in the updates."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import DELTA, Derivation
from mirasc.graph import Graph, ew
from mirasc.memories.muon import by_chunk
from mirasc.memories.step import lastrow_mask
from mirasc.memories.window import banded


def by_query(d: Derivation) -> bool:
    """Whether the step is indexed by the reading token (learner.eta_at 'query' with a
    data-dependent eta); a constant step is the same either way."""
    learner = d.spec.learner
    return learner.kind == "gd" and learner.eta_at == "query" and learner.eta.is_input


def raw_updates(d: Derivation) -> bool:
    """Whether a row's update is its raw gradient, the step applied to a sum of them: the reading
    token's (eta_at 'query'), or muon's eta_t NS_k(S_t)."""
    return by_query(d) or d.spec.learner.kind == "muon"


def last_row_eta(gr: Graph, d: Derivation) -> str | None:
    """eta at the chunk's last real row [1, 1] when the step is the reading token's or muon's
    applied at the chunk end (a data-dependent eta), else None."""
    if not (by_query(d) or by_chunk(d) and d.spec.learner.eta.is_input):
        return None
    last = ew(gr, lambda e, m: e * m, "eta", lastrow_mask(gr), name="eta_last")
    return gr.sum(last, 0, name="eta_end", formula="eta_end = eta at the last real row")


def gate_args(gr: Graph, d: Derivation, ctx: dict) -> tuple[dict, sp.Expr]:
    """Symbols bound to the masks and gates, and the factor gamma * eta * rowmask * vmask (gamma
    the window's weight, 1 without; ctx names the rows' tiles of delta and gamma when they are
    not the chunk's own: the previous chunk's)."""
    eta_sym, mask_sym = sp.Symbol("eta", real=True), sp.Symbol("rowmask", real=True)
    vmask_sym, gamma_sym = sp.Symbol("vmask", real=True), sp.Symbol("gamma", real=True)
    args = {mask_sym: ctx["rowmask"], vmask_sym: ctx["vmask"]}
    if "delta" in gr.g:
        args[DELTA] = ctx.get("delta", "delta")
    eta_gate, window = d.spec.learner.eta, d.spec.bias.window
    if eta_gate.shape == "channel" or raw_updates(d) or banded(d):
        eta = sp.Integer(1)  # folded into the keys, applied to a sum, or into the window's band
    elif eta_gate.is_input:
        args[eta_sym] = "eta"
        eta = eta_sym
    else:
        eta = sp.Float(eta_gate.value)
    gamma = sp.Integer(1) if window is None or window.weight is None else \
        sp.Float(window.weight.value) if not window.weight.is_input else gamma_sym
    if gamma == gamma_sym:
        args[gamma_sym] = ctx.get("window_weight", "window_weight")
    return args, gamma * eta * mask_sym * vmask_sym


def step_text(d: Derivation) -> str:
    """The factor of a row's gradient in its update, as a formula reads it ("eta * ", or with a
    window "gamma * eta * ", "gamma * " over more than one token, where eta enters through the
    band); none where the update is the raw gradient (`raw_updates`)."""
    eta = "" if raw_updates(d) else "eta * "
    if d.spec.bias.window is None:
        return eta
    return "gamma * " if banded(d) else f"gamma * {eta}"
