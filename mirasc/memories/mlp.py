"""The chunk step of an MLP memory."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, backward, ew
from mirasc.memories.decay import chunk_decays, decayed_to_end, momentum_mixing, tail_decays
from mirasc.memories.eta import by_query, gate_args, last_row_eta, step_text
from mirasc.memories.maps import finish, read_map
from mirasc.memories.step import ChunkStep, chunk_inputs, dim_mask, last_row_reads, param_inputs
from mirasc.memories.updates import bias_gradient
from mirasc.memories.window import banded, eta_rows, previous_rows, window_mix, window_weights

ACTIVATIONS = {
    "gelu": lambda x: x / 2 * (1 + sp.erf(x / sp.sqrt(2))),
    "silu": lambda x: x * (1 + sp.tanh(x / 2)) / 2,  # x sigmoid(x), with no exp overflow
    "relu": lambda x: sp.Piecewise((x, x > 0), (0, True)),
    "tanh": sp.tanh,
}


def mlp_chunk_step(d: Derivation) -> ChunkStep:
    """One chunk of an MLP memory M(x) = [x +] [LN](W_L act(... act(W_1 x))) by mini-batch
    gradients at the chunk-start weights. Per layer l with input x_l (k on the key path), the
    token gradients are rank one, delta_l x_l^T (delta_l by reverse mode through the memory), so
    each layer reads like a matrix memory:
        z_l = beta * X_l W_l^T - (X_l K_l^T * decay) U_l,   U_l = eta delta_l, K_l = key inputs,
    with X_l = act(z_(l-1)) along the query path. With eta_at 'query', U_l holds the raw delta_l
    and row t of the mix (and the chunk end) is scaled by eta_t. A window of c > 1 tokens mixes
    each layer's U_l = gamma delta_l, and the previous chunk's rows', as a matrix memory does."""
    gr = Graph()
    ctx = _inputs(gr, d)
    ctx |= _key_gradients(gr, d, ctx)
    if banded(d):
        rows = previous_rows(gr, d, ctx, ctx["dims"][0])
        prev = _key_gradients(gr, d, ctx, rows)
        ctx |= dict(keys_prev=prev["keys"], updates_prev=prev["updates"],
                    eta_rows=eta_rows(gr, d, ctx["rowmask"], by_query(d)))
    ctx |= _mixing(gr, d, ctx)
    o = _read_chain(gr, d, ctx, ctx["weights"], "o_chunk", inside=True)
    outputs, new_acc = _new_states(gr, ctx)
    return _chunk_end(gr, d, ctx, o, outputs, new_acc)


def _inputs(gr: Graph, d: Derivation) -> dict:
    """The loaded tiles (q, k, v, the gates, the masks), the weights W_l [dims[l + 1], dims[l]]
    as read (through the retention's map when dual), and the chunk's decays."""
    mem = d.spec.memory
    dk = "DV" if mem.residual else "DK"
    data_gates, rowmask = chunk_inputs(gr, d, dk)
    hmask = dim_mask(gr, "DH")
    dims = [dk] + ["DH"] * (mem.depth - 1) + ["DV"]
    states = [gr.input(f"W{i + 1}", (dims[i + 1], dims[i])) for i in range(mem.depth)]
    weights = [read_map(gr, d, w, f"{w}_read") if d.retention.dual else w for w in states]
    la, _, gam_end, beta, decay_mat = chunk_decays(gr, d, rowmask)
    return dict(q="q", k="k", v="v", vmask="vmask", hmask=hmask, rowmask=rowmask,
                gates=tuple(data_gates), dims=dims, states=states, weights=weights,
                act=ACTIVATIONS[mem.activation], la=la, gam_end=gam_end, beta=beta,
                decay_mat=decay_mat)


def _key_gradients(gr: Graph, d: Derivation, ctx: dict, rows: dict | None = None) -> dict:
    """The key path at the chunk-start weights (each layer's input: its `keys`), and the
    rank-one gradients of every layer: its `updates` U_l = eta delta_l (gamma delta_l with a
    window of c > 1 tokens); of the previous chunk's rows named by `rows`, when given."""
    act, hmask, vmask, weights = ctx["act"], ctx["hmask"], ctx["vmask"], ctx["weights"]
    own, sfx = ctx | (rows or {}), "" if rows is None else "_prev"
    x, keys, pre = own["k"], [], []
    for i, w in enumerate(weights):
        keys.append(x)
        pre.append(gr.dot(x, w, tb=True, name=f"kz{i + 1}{sfx}",
                          formula=f"kz{i + 1}{sfx} = {x} {w}^T"))
        if i < len(weights) - 1:
            x = ew(gr, lambda a, m: act(a) * m, pre[-1], hmask, name=f"kh{i + 1}{sfx}",
                   formula=f"kh{i + 1}{sfx} = act(kz{i + 1}{sfx})")
    pred = finish(gr, d, pre[-1], own["k"], vmask, name=f"pred_m{sfx}")
    g = bias_gradient(gr, d, pred, own["v"], vmask, own.get("delta", "delta"), sfx)
    deltas = backward(gr, {pred: g}, tuple(pre), prefix="g_")
    args, factor = gate_args(gr, d, own)
    factor = factor.subs(sp.Symbol("vmask", real=True), 1)
    x_sym, m_sym = sp.Symbol("x", real=True), sp.Symbol("m", real=True)
    updates = [gr.ew(x_sym * factor * m_sym, args | {x_sym: deltas[z], m_sym: dim_mask(gr, dim)},
                     name=f"u{i + 1}{sfx}", formula=f"u{i + 1}{sfx} = {step_text(d)}{deltas[z]}")
               for i, (z, dim) in enumerate(zip(pre, ctx["dims"][1:], strict=True))]
    return dict(keys=keys, updates=updates)


MOMENTUM_TERMS = ("mix", "s_vec", "mix_end", "s_end", "m_tail", "mu_end")


def _mixing(gr: Graph, d: Derivation, ctx: dict) -> dict:
    """What the reads and the new states of all layers share: the momentum's states S_l and its
    mixing (`momentum_mixing`), eta at the chunk end (eta_at 'query'), the decay from each row
    to the chunk end, and the mask of the reads' mix (`attn_mask`)."""
    momentum = d.spec.learner.kind == "momentum"
    out = dict(momentum=momentum, attn_mask=ctx["decay_mat"])
    if momentum:
        out["mom_in"] = [gr.input(f"S{i + 1}", gr.shape(w)) for i, w in enumerate(ctx["states"])]
        out |= dict(zip(MOMENTUM_TERMS, momentum_mixing(gr, d, ctx["decay_mat"], ctx["rowmask"]),
                        strict=True))
        out["attn_mask"] = out["mix"]
    out["eta_end"] = last_row_eta(gr, d)
    out["tail"] = None if ctx["gam_end"] is None else tail_decays(gr, ctx["la"], ctx["rowmask"])
    if "keys_prev" in ctx:  # a window: the mixes regrouped onto the gradient rows (both chunks')
        out["attn_mask"], out["attn_mask_prev"] = window_mix(
            gr, out["attn_mask"], ctx["eta_rows"], f"{out['attn_mask']}_win")
        weights = {"tail": out["tail"] or ctx["rowmask"]}
        if momentum:
            weights = {"mix_end": out["mix_end"], "m_tail": out["m_tail"]}
        for key, x in weights.items():
            out[key], out[f"{key}_prev"] = window_weights(gr, x, ctx["eta_rows"], f"{x}_win")
    return out


def _read_chain(gr: Graph, d: Derivation, ctx: dict, layers: list[str], name: str,
                inside: bool) -> str:
    """The query path through the layers, each read as a matrix memory; `inside` the chunk (the
    chunk-start weights): decayed to each row, minus the decayed updates so far."""
    act, hmask, beta = ctx["act"], ctx["hmask"], ctx["beta"]
    x = ctx["q"]
    end = "" if inside else "_end"  # the chunk-end chain: the names of the rows' with _end
    for i, (w, key, u) in enumerate(zip(layers, ctx["keys"], ctx["updates"], strict=True)):
        j = i + 1
        z = gr.dot(x, w, tb=True, name=f"qw{j}{end}", formula=f"qw{j}{end} = {x} {w}^T")
        if beta is not None and inside:
            z = ew(gr, lambda b, a: b * a, beta, z, name=f"read{j}", formula=f"read{j} = beta * {z}")
        if inside:
            attn = ew(gr, lambda a, b: a * b, gr.dot(x, key, tb=True, name=f"qk{j}"),
                      ctx["attn_mask"], name=f"attn{j}",
                      formula=f"attn{j} = ({x} {key}^T) * {ctx['attn_mask']}")
            mixed = gr.dot(attn, u, name=f"mixed{j}", formula=f"mixed{j} = attn{j} {u}")
            if "keys_prev" in ctx:  # the window's previous rows, through their band
                attn_prev = ew(gr, lambda a, b: a * b,
                               gr.dot(x, ctx["keys_prev"][i], tb=True, name=f"qk{j}_prev"),
                               ctx["attn_mask_prev"], name=f"attn{j}_prev")
                mixed = ew(gr, lambda a, c: a + c, mixed,
                           gr.dot(attn_prev, ctx["updates_prev"][i], name=f"mixed{j}_prev"),
                           name=f"mixed{j}_all", formula=f"mixed{j}_all = mixed{j} + mixed{j}_prev")
            if ctx["eta_end"] is not None:
                mixed = ew(gr, lambda a, e: a * e, mixed, "eta", name=f"mixed{j}_eta")
            momentum = ctx["momentum"]
            z = ew(gr, lambda a, m: a - m, z, mixed, name=f"qz{j}_gd" if momentum else f"qz{j}",
                   formula=None if momentum else f"qz{j} = {z} - {mixed}")
            if momentum:
                z = ew(gr, lambda a, s, y: a - s * y, z, ctx["s_vec"],
                       gr.dot(x, ctx["mom_in"][i], tb=True, name=f"qs{j}"), name=f"qz{j}",
                       formula=f"qz{j} = {z} - s_vec * qs{j}")
        if i < len(layers) - 1:
            x = ew(gr, lambda a, m: act(a) * m, z, hmask, name=f"qh{j}{end}",
                   formula=f"qh{j}{end} = act({z})")
    return finish(gr, d, z, ctx["q"], ctx["vmask"], name=name, read=True)


def _new_states(gr: Graph, ctx: dict) -> tuple[dict, list[str]]:
    """Each layer's state at the chunk end, acc_l = keep_l - (U_l * tail)^T K_l (and the
    momentum's S_l), before the retention's map: ({"S1": ..}, [acc1, ..])."""
    outputs, new_acc = {}, []
    for i, (state, key, u) in enumerate(zip(ctx["states"], ctx["keys"], ctx["updates"],
                                            strict=True)):
        j = i + 1
        keep = decayed_to_end(gr, ctx["gam_end"], state, f"keep{j}")
        if ctx["momentum"]:
            s_in = ctx["mom_in"][i]
            u_mix = ew(gr, lambda a, b: a * b, u, ctx["mix_end"], name=f"{u}_mix_end")
            w_upd = _with_previous(gr, ctx, i, "mix_end", gr.dot(
                u_mix, key, ta=True, name=f"w_update{j}", formula=f"w_update{j} = {u_mix}^T {key}"))
            acc = ew(gr, lambda a, s, y, c: a - s * y - c, keep, ctx["s_end"], s_in, w_upd,
                     name=f"acc{j}_raw", formula=f"acc{j}_raw = {keep} - s_end {s_in} - w_update{j}")
            u_tail = ew(gr, lambda a, b: a * b, u, ctx["m_tail"], name=f"{u}_m_tail")
            s_upd = _with_previous(gr, ctx, i, "m_tail", gr.dot(
                u_tail, key, ta=True, name=f"s_update{j}", formula=f"s_update{j} = {u_tail}^T {key}"))
            outputs[f"S{j}"] = ew(gr, lambda e, y, c: sp.exp(e) * y + c, ctx["mu_end"], s_in,
                                  s_upd, name=f"S{j}_new",
                                  formula=f"S{j}_new = exp(mu_end) {s_in} + s_update{j}")
        else:
            scaled = u if ctx["tail"] is None else ew(gr, lambda a, b: a * b, u, ctx["tail"],
                                                      name=f"{u}_tail")
            update = _with_previous(gr, ctx, i, "tail", gr.dot(
                scaled, key, ta=True, name=f"update{j}", formula=f"update{j} = {scaled}^T {key}"))
            if ctx["eta_end"] is not None:
                update = ew(gr, lambda a, e: a * e, update, ctx["eta_end"], name=f"update{j}_eta")
            acc = ew(gr, lambda a, c: a - c, keep, update, name=f"acc{j}_raw",
                     formula=f"acc{j}_raw = {keep} - {update}")
        new_acc.append(ew(gr, lambda a: a, acc, name=f"acc{j}"))
    return outputs, new_acc


def _with_previous(gr: Graph, ctx: dict, i: int, weight: str, update: str) -> str:
    """A layer's chunk-end sum `update`, plus with a window the previous chunk's rows' part,
    (U_prev * w_prev)^T K_prev with w_prev their `weight`s regrouped through the band."""
    if "keys_prev" not in ctx:
        return update
    u = ctx["updates_prev"][i]
    scaled = ew(gr, lambda a, b: a * b, u, ctx[f"{weight}_prev"], name=f"{u}_{weight}")
    part = gr.dot(scaled, ctx["keys_prev"][i], ta=True, name=f"{update}_prev")
    return ew(gr, lambda a, c: a + c, update, part, name=f"{update}_all",
              formula=f"{update}_all = {update} + {update}_prev")


def _chunk_end(gr: Graph, d: Derivation, ctx: dict, o: str, outputs: dict,
               new_acc: list[str]) -> ChunkStep:
    """The step's outputs: o and the new states. A nonlinear retention maps the weights at the
    chunk end only; the chunk's last row reads the mapped weights."""
    depth = len(new_acc)
    if d.retention.linear:
        outputs |= {f"W{i + 1}": a for i, a in enumerate(new_acc)}
    else:
        ends = [read_map(gr, d, a, f"W{i + 1}_end") for i, a in enumerate(new_acc)]
        o_end = _read_chain(gr, d, ctx, ends, "o_end", inside=False)
        o = last_row_reads(gr, o, o_end)
        outputs |= {f"W{i + 1}": (a if d.retention.dual else e)
                    for i, (a, e) in enumerate(zip(new_acc, ends, strict=True))}
    names = [f"W{i + 1}" for i in range(depth)] + \
        ([f"S{i + 1}" for i in range(depth)] if ctx["momentum"] else [])
    outputs = {"o": ew(gr, lambda a: a, o, name="o")} | {n: outputs[n] for n in names}
    return ChunkStep(gr, ctx["gates"], tuple(names), outputs, param_inputs(gr))
