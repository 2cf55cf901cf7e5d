"""The chunk step of a vector (diagonal) memory."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, backward, ew
from mirasc.memories.decay import chunk_decays, decayed_to_end, momentum_mixing, tail_decays
from mirasc.memories.eta import by_query, last_row_eta
from mirasc.memories.maps import finish, read_map
from mirasc.memories.step import ChunkStep, chunk_inputs, last_row_reads, param_inputs
from mirasc.memories.updates import bias_gradient
from mirasc.memories.window import banded, eta_rows, previous_rows, window_mix, window_weights


def vector_chunk_step(d: Derivation) -> ChunkStep:
    """One chunk of a vector (diagonal) memory M(x) = [x +] [LN](w * x), w [1, D], D = DK = DV.
    Token gradients are elementwise, u_i = eta_i delta_i * k_i, so the chunk reads
        w_t = beta_t w - sum_(i<=t) (beta_t / beta_i) u_i    (a decay-weighted prefix sum)
    and o_t = [q_t +] [LN](q_t * w_t); per-channel decays weigh each pair by exp(gamma_t - gamma_i).
    With eta_at 'query' the sum holds the raw delta_i * k_i and row t scales it by eta_t."""
    gates = d.op_gates()
    gr = Graph()
    data_gates, rowmask = chunk_inputs(gr, d, "DV")
    q, vmask = "q", "vmask"
    state = gr.input("W", (1, "DV"))
    w = read_map(gr, d, state, "W_read") if d.retention.dual else state
    channel = gates.get("log_alpha") is not None and gates["log_alpha"].shape == "channel"
    la, gam, gam_end, beta, decay_mat = chunk_decays(gr, d, rowmask, matrix=not channel)

    u, eta_end, row_eta = _token_updates(gr, d, w, beta, rowmask)
    window = None
    if banded(d):  # the previous chunk's rows' updates, and eta per row for the band
        rows = previous_rows(gr, d, {"gates": data_gates}, "DV")
        window = dict(u=_token_updates(gr, d, w, beta, rows["rowmask"], rows)[0],
                      eta=eta_rows(gr, d, rowmask, by_query(d)))

    def decayed_sum(x):
        """sum_(i<=t) (beta_t / beta_i) x_i for every row t."""
        formula = f"mixed_t = sum_(i<=t) (beta_t / beta_i) {x}_i"
        if channel:
            return gr.gmix("causal", x, gam, gam, name="mixed", formula=formula)
        if window is not None:
            return _window_read(gr, window, decay_mat, x)
        return gr.dot(decay_mat, x, name="mixed", formula=formula)

    keep = decayed_to_end(gr, gam_end, state, "keep")
    read = w if beta is None else ew(gr, lambda b, a: b * a, beta, w, name="read",
                                     formula=f"read = beta * {w}")
    outputs = {}
    if d.spec.learner.kind == "momentum":
        s_in = gr.input("S", (1, "DV"))
        mix, s_vec, mix_end, s_end, m_tail, mu_end = momentum_mixing(gr, d, decay_mat, rowmask)
        mixed = gr.dot(mix, u, name="mixed", formula="mixed = mix u") if window is None \
            else _window_read(gr, window, mix, u)
        w_rows = ew(gr, lambda a, s, x, m: a - s * x - m, read, s_vec, s_in, mixed, name="w_rows",
                    formula=f"w_rows = {read} - s_vec * S - mixed")
        update = gr.sum(ew(gr, lambda a, b: a * b, u, mix_end, name="u_mix_end"), 0, name="update") \
            if window is None else _window_end(gr, window, u, mix_end)
        acc = ew(gr, lambda a, s, x, c: a - s * x - c, keep, s_end, s_in, update, name="acc_raw",
                 formula=f"acc_raw = {keep} - s_end * S - update")
        s_update = gr.sum(ew(gr, lambda a, b: a * b, u, m_tail, name="u_m_tail"), 0,
                          name="s_update") if window is None else _window_end(gr, window, u, m_tail)
        outputs["S"] = ew(gr, lambda e, x, c: sp.exp(e) * x + c, mu_end, s_in, s_update,
                          name="S_new", formula="S_new = exp(mu_end) * S + s_update")
    else:
        mixed = decayed_sum(u)
        tail = rowmask if gam_end is None else tail_decays(gr, la, rowmask)
        update = gr.sum(ew(gr, lambda a, b: a * b, u, tail, name="u_tail"), 0, name="update",
                        formula=f"update = sum_i u_i * {tail}_i") if window is None \
            else _window_end(gr, window, u, tail)
        if eta_end is not None:
            mixed = ew(gr, lambda a, e: a * e, mixed, row_eta, name="mixed_eta")
            update = ew(gr, lambda a, e: a * e, update, eta_end, name="update_eta")
        w_rows = ew(gr, lambda a, m: a - m, read, mixed, name="w_rows",
                    formula=f"w_rows = {read} - {mixed}")
        acc = ew(gr, lambda a, c: a - c, keep, update, name="acc_raw",
                 formula=f"acc_raw = {keep} - {update}")
    acc = ew(gr, lambda a: a, acc, name="acc")
    z_o = ew(gr, lambda a, b: a * b, q, w_rows, name="z_o", formula="z_o = q * w_rows")
    o = finish(gr, d, z_o, q, vmask, name="o_chunk", read=True)
    new_state = acc
    if not d.retention.linear:  # the map at the chunk end; the last row reads the mapped vector
        w_end = read_map(gr, d, acc, "W_end")
        z_end = ew(gr, lambda a, b: a * b, q, w_end, name="z_end", formula="z_end = q * W_end")
        o_end = finish(gr, d, z_end, q, vmask, name="o_end", read=True)
        o = last_row_reads(gr, o, o_end)
        new_state = acc if d.retention.dual else w_end
    names = ("W", *outputs)
    return ChunkStep(gr, tuple(data_gates), names,
                     {"o": ew(gr, lambda a: a, o, name="o"), "W": new_state, **outputs},
                     param_inputs(gr))


def _token_updates(gr: Graph, d: Derivation, w: str, beta: str | None, rowmask: str,
                   rows: dict | None = None) -> tuple[str, str | None, str | None]:
    """The elementwise token updates u_i = eta_i delta_i * k_i at the chunk-start vector (decayed
    to row i when grad_at is 'retained'), with eta at the chunk end and eta per row when the step
    is the reading token's (then u holds the raw delta_i * k_i): (u, eta_end, row_eta). With a
    window u_i is gamma_i eta_i delta_i * k_i (gamma_i delta_i * k_i for c > 1: eta enters
    through the band); `rows` names the previous chunk's rows' tiles to take their u instead."""
    own, sfx = {"k": "k", "v": "v", "delta": "delta", "window_weight": "window_weight"} \
        | (rows or {}), "" if rows is None else "_prev"
    k, v, vmask = own["k"], own["v"], "vmask"
    pred_w = w if d.spec.learner.grad_at == "previous" or beta is None \
        else ew(gr, lambda a, b: a * b, w, beta, name="w_point", formula=f"w_point = {w} * beta")
    kz = ew(gr, lambda a, b: a * b, k, pred_w, name=f"kz{sfx}", formula=f"kz = {k} * {pred_w}")
    pred = finish(gr, d, kz, k, vmask, name=f"pred_m{sfx}")
    g = bias_gradient(gr, d, pred, v, vmask, own["delta"], sfx)
    delta = g if pred == kz else backward(gr, {pred: g}, (kz,), prefix="g_")[kz]
    eta_gate = d.spec.learner.eta
    eta = "eta" if eta_gate.is_input else ew(gr, lambda m: m * sp.Float(eta_gate.value), rowmask,
                                             name="eta_const")
    eta_end = last_row_eta(gr, d)
    row_eta = None
    if eta_end is not None:  # the step scales the reads below, not the updates
        eta, row_eta = rowmask, eta
    if banded(d):
        eta = rowmask
    window = d.spec.bias.window
    if window is None or window.weight is None:
        return ew(gr, lambda a, b, e, m, c: a * b * e * m * c, delta, k, eta, rowmask, vmask,
                  name=f"u{sfx}", formula=f"u = {eta} * {delta} * k"), eta_end, row_eta
    gamma = own["window_weight"] if window.weight.is_input else \
        ew(gr, lambda m: m * sp.Float(window.weight.value), rowmask, name=f"gamma_const{sfx}")
    u = ew(gr, lambda a, b, e, m, c, y: a * b * e * m * c * y, delta, k, eta, rowmask, vmask,
           gamma, name=f"u{sfx}", formula=f"u{sfx} = gamma * {eta} * {delta} * {k}")
    return u, eta_end, row_eta


def _window_read(gr: Graph, window: dict, mat: str, u: str) -> str:
    """The reads' decayed sums of a window's updates, `mat` [T, T] (the decays or the momentum's
    mix) regrouped onto the gradient rows: (mat diag(eta) B) u + (mat diag(eta) B') u_prev."""
    own, prev = window_mix(gr, mat, window["eta"], f"{mat}_win")
    return ew(gr, lambda a, c: a + c, gr.dot(own, u, name="mixed_own"),
              gr.dot(prev, window["u"], name="mixed_prev"), name="mixed",
              formula=f"mixed = {own} {u} + {prev} u_prev")


def _window_end(gr: Graph, window: dict, u: str, weights: str) -> str:
    """The chunk end's sum of a window's updates with the rows' `weights` [T, 1] regrouped onto
    the gradient rows: sum_i u_i w_i + sum_i u_prev_i w_prev_i."""
    own, prev = window_weights(gr, weights, window["eta"], f"{weights}_win")
    parts = [gr.sum(ew(gr, lambda a, b: a * b, x, y, name=f"{x}_{y}"), 0, name=f"{x}_{y}_sum")
             for x, y in ((u, own), (window["u"], prev))]
    return ew(gr, lambda a, c: a + c, *parts, name=f"{weights}_update",
              formula=f"{weights}_update = sum u {own} + sum u_prev {prev}")
