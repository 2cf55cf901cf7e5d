"""The chunk step of a matrix memory."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, ew
from mirasc.memories.decay import chunk_decays, decayed_to_end, momentum_mixing, tail_decays
from mirasc.memories.eta import last_row_eta, raw_updates
from mirasc.memories.maps import finish, read_map
from mirasc.memories.muon import by_chunk, chunk_momentum, decayed_gradients, newton_schulz
from mirasc.memories.step import ChunkStep, chunk_inputs, last_row_reads, param_inputs
from mirasc.memories.updates import exact_updates, minibatch_updates
from mirasc.memories.window import banded, eta_rows, previous_rows, window_mix, window_weights


def matrix_chunk_step(d: Derivation) -> ChunkStep:
    """One chunk of a matrix memory W [DV, DK]: with gamma = cumsum(log alpha), beta = exp(gamma)
    and U the chunk's updates (eta_i g_i per row),
        O = beta * Q W^T - (QK^T * exp(gamma_t - gamma_i) * causal) U,
        W_new = exp(gamma_T) W - (U * exp(gamma_T - gamma))^T K.
    U comes from mini-batch gradients at W (`minibatch_updates`) or, for a quadratic bias, from
    the exact recurrence solved by the WY/UT transform (`exact_updates`). A momentum learner
    (`_momentum_terms`) mixes the updates through the momentum's decay as well; muon applied per
    chunk (`_muon_end`) leaves the rows on beta * Q W^T and moves the state at the chunk end by
    eta_e NS_k(S_e), which the chunk's last row reads. A bias b [1, DV]
    is a weight on a constant input 1: QK^T + 1 above, b_new = exp(gamma_T) b - sum of U * tail.
    With eta_at 'query', U holds the raw g_i and row t of the mix (and the chunk end) is scaled
    by eta_t (eta of the last row). A window of c > 1 tokens (`memories.window`) mixes U = gamma g
    through the band, and the previous chunk's last c - 1 rows' U_prev through its own band:
    O -= (Q K_prev^T * mix') U_prev, W_new -= (U_prev * tail')^T K_prev."""
    gr = Graph()
    ctx = _inputs(gr, d)
    ctx |= _decays(gr, d, ctx)
    qk, attn, read = _reads(gr, ctx)
    updates = exact_updates(gr, d, ctx) if d.exact and d.bias.kind == "affine" \
        else minibatch_updates(gr, d, ctx)
    if banded(d):
        ctx |= _previous(gr, d, ctx)
    keep = decayed_to_end(gr, ctx["gam_end"], ctx["state"], "keep")
    if d.spec.learner.kind == "momentum":
        z_o, acc, extra = _momentum_terms(gr, d, ctx, updates, ctx["decay_mat"], qk, read, keep)
    elif by_chunk(d):
        z_o, (acc, extra) = read, _muon_end(gr, d, ctx, updates, keep)
    else:
        z_o, acc, extra = _gradient_terms(gr, d, ctx, updates, attn, qk, read, keep)
    o = finish(gr, d, z_o, ctx["q"], ctx["vmask"], name="o_chunk", read=True)
    return _chunk_end(gr, d, ctx, o, acc, extra)


def _inputs(gr: Graph, d: Derivation) -> dict:
    """The loaded tiles (q, k, v, the gates, the masks), the state W [DV, DK] and a bias b [1, DV]
    as read (through the retention's map when dual), and the keys of the updates (`k_upd`)."""
    gates = d.op_gates()
    dk = "DV" if d.spec.memory.residual else "DK"  # a residual memory needs DK == DV
    data_gates, rowmask = chunk_inputs(gr, d, dk)
    state = gr.input("W", ("DV", dk))  # the retention's state: Z (dual) or W (proximal)
    w = read_map(gr, d, state, "W_read") if d.retention.dual else state
    b_state = gr.input("b", (1, "DV")) if d.spec.memory.bias else None
    b = read_map(gr, d, b_state, "b_read") if b_state is not None and d.retention.dual else b_state
    channel_decay = gates.get("log_alpha") is not None and gates["log_alpha"].shape == "channel"
    # A channel-wise step scales the key channels of each update: u_i (k_i * eta_i)^T.
    k_upd = ew(gr, lambda a, b: a * b, "k", "eta", name="k_eta", formula="k_eta = k * eta") \
        if gates["eta"].shape == "channel" and gates["eta"].is_input else "k"
    return dict(q="q", k="k", k_upd=k_upd, v="v", w=w, b=b, rowmask=rowmask, vmask="vmask",
                dk=dk, gates=tuple(data_gates), channel=channel_decay, state=state,
                b_state=b_state)


def _decays(gr: Graph, d: Derivation, ctx: dict) -> dict:
    """The chunk's decays (`chunk_decays`), a per-channel decay without its matrix."""
    la, gam, gam_end, beta, decay_mat = chunk_decays(gr, d, ctx["rowmask"],
                                                     matrix=not ctx["channel"])
    gam_row = "gam_row" if decay_mat not in (None, "causal") else None
    return dict(la=la, gam=gam, gam_end=gam_end, beta=beta, decay_mat=decay_mat, gam_row=gam_row)


def _previous(gr: Graph, d: Derivation, ctx: dict) -> dict:
    """The window's previous rows: their tiles, U_prev at the chunk-start W, the products
    Q K_prev^T (+ 1 with a bias) and eta per row for the band."""
    rows = previous_rows(gr, d, ctx, ctx["dk"])
    u_prev = minibatch_updates(gr, d, ctx, rows)
    qk_prev = gr.dot(ctx["q"], rows["k"], tb=True, name="qk_prev", formula="qk_prev = q k_prev^T")
    if ctx["b"] is not None:
        qk_prev = ew(gr, lambda a: a + 1, qk_prev, name="qk1_prev", formula="qk1_prev = qk_prev + 1")
    return dict(k_prev=rows["k"], u_prev=u_prev, qk_prev=qk_prev,
                eta_rows=eta_rows(gr, d, ctx["rowmask"], raw_updates(d)))


def _reads(gr: Graph, ctx: dict) -> tuple[str | None, str | None, str]:
    """The rows' reads of the chunk-start state, beta * Q W^T (+ b), and the query-key products:
    (qk, None, read), or (None, attn, read) with a per-channel decay inside attn (a gdot):
    attn_ti = sum_d q_td k_id exp(gamma_td - gamma_id)."""
    q, k_upd, w, b, beta = ctx["q"], ctx["k_upd"], ctx["w"], ctx["b"], ctx["beta"]
    if ctx["channel"]:
        q_dec = ew(gr, lambda a, b: a * b, q, beta, name="q_dec", formula="q_dec = q * beta")
        attn = gr.gdot(q, k_upd, ctx["gam"], ctx["gam"], name="attn",
                       formula=f"attn_ti = sum_d q_td {k_upd}_id exp(gam_td - gam_id) (t >= i)")
        return None, attn, gr.dot(q_dec, w, tb=True, name="read", formula=f"read = q_dec {w}^T")
    qk = gr.dot(q, k_upd, tb=True, name="qk", formula=f"qk = q {k_upd}^T")
    qw = gr.dot(q, w, tb=True, name="qw", formula=f"qw = q {w}^T")
    if b is not None:
        qk = ew(gr, lambda a: a + 1, qk, name="qk1", formula="qk1 = qk + 1")
        qw = ew(gr, lambda a, c: a + c, qw, b, name="qwb", formula=f"qwb = qw + {b}")
    read = qw if beta is None else ew(gr, lambda b_, a: b_ * a, beta, qw, name="read",
                                      formula=f"read = beta * {qw}")
    return qk, None, read


def _gradient_terms(gr: Graph, d: Derivation, ctx: dict, updates: str, attn: str | None,
                    qk: str | None, read: str, keep: str) -> tuple[str, str, dict]:
    """The plain gradient step over a chunk: z_O = read - (QK^T * decay) U and
    W_new = keep - (U * tail)^T K (b_new = keep_b - sum of U * tail), with the rows of the mix
    and the chunk end scaled by eta_t when the step is the reading token's."""
    channel, rowmask, k_upd, b = ctx["channel"], ctx["rowmask"], ctx["k_upd"], ctx["b"]
    eta_end = last_row_eta(gr, d)
    window = "u_prev" in ctx
    if window:
        mixed = _window_read(gr, ctx, qk, ctx["decay_mat"], updates)
    else:
        if not channel:
            attn = ew(gr, lambda a, b_: a * b_, qk, ctx["decay_mat"], name="attn",
                      formula=f"attn = {qk} * {ctx['decay_mat']}")
        mixed = gr.dot(attn, updates, name="mixed", formula=f"mixed = attn {updates}")
    if eta_end is not None:
        mixed = ew(gr, lambda a, e: a * e, mixed, "eta", name="mixed_eta")
    z_o = ew(gr, lambda a, m: a - m, read, mixed, name="z_o", formula=f"z_o = {read} - {mixed}")
    tail = None if ctx["gam_end"] is None else tail_decays(gr, ctx["la"], rowmask)
    if window:
        update, b_update = _window_end(gr, ctx, updates, tail or rowmask)
    else:
        if tail is not None:  # each update decays from its row to the chunk end
            if channel:
                k_upd = ew(gr, lambda a, b_: a * b_, k_upd, tail, name="k_tail")
            else:
                updates = ew(gr, lambda a, b_: a * b_, updates, tail, name="u_tail")
        update = gr.dot(updates, k_upd, ta=True, name="update",
                        formula=f"update = {updates}^T {k_upd}")
        b_update = gr.sum(updates, 0, name="b_update") if b is not None else None
    if eta_end is not None:
        update = ew(gr, lambda a, e: a * e, update, eta_end, name="update_eta")
        if b_update is not None:
            b_update = ew(gr, lambda a, e: a * e, b_update, eta_end, name="b_update_eta")
    acc, extra = ew(gr, lambda a, u: a - u, keep, update, name="acc",
                    formula=f"acc = {keep} - {update}"), {}
    if b is not None:
        keep_b = decayed_to_end(gr, ctx["gam_end"], ctx["b_state"], "keep_b")
        extra["b"] = ew(gr, lambda a, u: a - u, keep_b, b_update, name="b_acc",
                        formula=f"b_acc = {keep_b} - {b_update}")
    return z_o, acc, extra


def _window_read(gr: Graph, ctx: dict, qk: str, mat: str, updates: str) -> str:
    """A window's reads of the updates mixed by `mat` [T, T] (the decays or the momentum's mix)
    per (reading row, updating row), regrouped onto the gradient rows of this chunk and the
    previous one: (QK^T * mat diag(eta) B) U + (Q K_prev^T * mat diag(eta) B') U_prev."""
    mix, mix_prev = window_mix(gr, mat, ctx["eta_rows"], f"{mat}_win")
    attn = ew(gr, lambda a, b_: a * b_, qk, mix, name="attn", formula=f"attn = {qk} * {mix}")
    attn_prev = ew(gr, lambda a, b_: a * b_, ctx["qk_prev"], mix_prev, name="attn_prev",
                   formula=f"attn_prev = {ctx['qk_prev']} * {mix_prev}")
    return ew(gr, lambda a, c: a + c, gr.dot(attn, updates, name="mixed_own"),
              gr.dot(attn_prev, ctx["u_prev"], name="mixed_prev"), name="mixed",
              formula=f"mixed = attn {updates} + attn_prev u_prev")


def _window_end(gr: Graph, ctx: dict, updates: str, weights: str) -> tuple[str, str | None]:
    """The chunk end's sum of a window's updates, each row's `weights` [T, 1] (its decay to the
    chunk end, or its momentum mix) regrouped onto the gradient rows of this chunk and the
    previous one: (sum of (U * w)^T K, and with a bias sum of U * w)."""
    ends = window_weights(gr, weights, ctx["eta_rows"], f"{weights}_win")
    parts = [(ew(gr, lambda a, b_: a * b_, u, w, name=f"{u}_{w}"), key) for (u, key), w in
             zip(((updates, ctx["k_upd"]), (ctx["u_prev"], ctx["k_prev"])), ends, strict=True)]
    dots = [gr.dot(u, key, ta=True, name=f"{u}_k") for u, key in parts]
    update = ew(gr, lambda a, c: a + c, *dots, name=f"{weights}_update",
                formula=f"{weights}_update = (U w)^T K + (U_prev w_prev)^T K_prev")
    if ctx["b"] is None:
        return update, None
    sums = [gr.sum(u, 0, name=f"{u}_sum") for u, _ in parts]
    return update, ew(gr, lambda a, c: a + c, *sums, name=f"b_{weights}_update")


def _chunk_end(gr: Graph, d: Derivation, ctx: dict, o: str, acc: str, extra: dict) -> ChunkStep:
    """The step's outputs: o and the new states. A nonlinear retention maps the state at the
    chunk end only; the chunk's last row reads it (as it reads muon's chunk-end step)."""
    gates, q, vmask = ctx["gates"], ctx["q"], ctx["vmask"]
    states = ("W", *extra)
    params = param_inputs(gr)
    if d.retention.linear and not by_chunk(d):
        return ChunkStep(gr, gates, states, {"o": o, "W": acc, **extra}, params)
    w_end = read_map(gr, d, acc, "W_end")
    z_end = gr.dot(q, w_end, tb=True, name="z_end", formula="z_end = q W_end^T")
    if ctx["b"] is not None:
        b_end = read_map(gr, d, extra["b"], "b_end")
        z_end = ew(gr, lambda a, c: a + c, z_end, b_end, name="z_end_b")
        extra["b"] = extra["b"] if d.retention.dual else b_end
    o_end = finish(gr, d, z_end, q, vmask, name="o_end", read=True)
    o = last_row_reads(gr, o, o_end, name="o")
    new_state = acc if d.retention.dual else w_end
    return ChunkStep(gr, gates, states, {"o": o, "W": new_state, **extra}, params)


def _momentum_terms(gr: Graph, d: Derivation, ctx: dict, updates: str, decay_mat: str, qk: str,
                    read: str, keep: str) -> tuple[str, str, dict]:
    """S_t = m_t S_{t-1} + u_t, W_t = alpha_t W_{t-1} - S_t over a chunk, with mu = cumsum(log m):
    C = decay @ exp(mu_t - mu_i) (causal), s = decay @ exp(mu),
        z_O = read - s * Q S^T - (QK^T * C) U,
        W_new = keep - s_T S - (U * C_T)^T K,   S_new = exp(mu_T) S + (U * exp(mu_T - mu))^T K."""
    k, rowmask = ctx["k"], ctx["rowmask"]
    s_in = gr.input("S", ("DV", ctx["dk"]))
    mix, s_vec, mix_end, s_end, m_tail, mu_end = momentum_mixing(gr, d, decay_mat, rowmask)
    window = "u_prev" in ctx
    if window:
        mixed = _window_read(gr, ctx, qk, mix, updates)
    else:
        attn = ew(gr, lambda a, b: a * b, qk, mix, name="attn", formula=f"attn = {qk} * mix")
        mixed = gr.dot(attn, updates, name="mixed", formula=f"mixed = attn {updates}")
    qs = gr.dot(ctx["q"], s_in, tb=True, name="qs", formula="qs = q S^T")
    z_o = ew(gr, lambda a, s, x, m: a - s * x - m, read, s_vec, qs, mixed, name="z_o",
             formula=f"z_o = {read} - s_vec * qs - mixed")
    if window:
        w_update = _window_end(gr, ctx, updates, mix_end)[0]
    else:
        u_mix = ew(gr, lambda a, b: a * b, updates, mix_end, name=f"{updates}_mix_end")
        w_update = gr.dot(u_mix, k, ta=True, name="w_update", formula=f"w_update = {u_mix}^T k")
    acc = ew(gr, lambda a, s, x, u: a - s * x - u, keep, s_end, s_in, w_update, name="acc",
             formula=f"acc = {keep} - s_end S - w_update")
    if window:
        s_update = _window_end(gr, ctx, updates, m_tail)[0]
    else:
        u_tail = ew(gr, lambda a, b: a * b, updates, m_tail, name=f"{updates}_m_tail")
        s_update = gr.dot(u_tail, k, ta=True, name="s_update", formula=f"s_update = {u_tail}^T k")
    s_new = ew(gr, lambda e, x, u: sp.exp(e) * x + u, mu_end, s_in, s_update, name="S_new",
               formula="S_new = exp(mu_end) S + s_update")
    return z_o, acc, {"S": s_new}


def _muon_end(gr: Graph, d: Derivation, ctx: dict, grads: str, keep: str) -> tuple[str, dict]:
    """Muon applied at the chunk end (LaCT): the momentum S_e = (m_(s+1)..m_e) S + sum_i
    (m_(i+1)..m_e) g_i k_i^T of the rows' raw gradients at W (`chunk_momentum`; with a window,
    regrouped through its band) and W_new = keep - eta_e NS_k(S_e) (`newton_schulz`, eta_e the
    last row's step)."""
    s_in = gr.input("S", ("DV", ctx["dk"]))
    if "u_prev" in ctx:
        def update(tail):
            return _window_end(gr, ctx, grads, tail)[0]
    else:
        def update(tail):
            return decayed_gradients(gr, grads, ctx["k"], tail, "S")
    s_end = chunk_momentum(gr, d, s_in, ctx["rowmask"], "S", update)
    ortho = newton_schulz(gr, s_end, d.spec.learner.ns_steps, "ns")
    eta_end, eta = last_row_eta(gr, d), d.spec.learner.eta
    if eta_end is None:
        step = ew(gr, lambda x: sp.Float(eta.value) * x, ortho, name="ns_step")
    else:
        step = ew(gr, lambda e, x: e * x, eta_end, ortho, name="ns_step")
    acc = ew(gr, lambda a, u: a - u, keep, step, name="acc",
             formula=f"acc = {keep} - eta_end NS_k({s_end})")
    return acc, {"S": s_end}
