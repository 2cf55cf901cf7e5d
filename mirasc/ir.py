"""The IR: one chunk step of a spec as a networkx DAG of tile operations, and its reverse mode.

Every value is a 2-D tile whose dims are symbolic ("T" chunk rows, "DK", "DV", or 1). Node ops:
  input    a tile loaded by the kernel (q, k, v, gates, the chunk-start state W)
  const    a tile the kernel builds (row mask, causal mask)
  dot      a @ b with optional transposes (tl.dot)
  ew       an elementwise sympy expression of its inputs (broadcasting, like numpy)
  sum      a reduction over one axis, keeping dims
  cumsum   an inclusive prefix sum over the rows
  trans    a transpose
  tri_inv  (I + A)^-1 for a strictly lower-triangular A (forward substitution)
  max      a reduction by max over one axis, keeping dims; used only as a constant offset (a
           softmax's stabiliser), so it passes no gradient
  gdot     a causal product under per-channel decays: out[t, i] = sum_d a[t, d] b[i, d]
           exp(ga[t, d] - gb[i, d]) for the pairs t - i >= offset, 0 elsewhere
  gmix     its companion: out[t, d] = sum_i m[t, i] x[i, d] exp(ga[t, d] - gb[i, d]) over the
           same pairs, or with `ta` out[i, d] = sum_t m[t, i] x[t, d] exp(ga[t, d] - gb[i, d])
           (every pair's exponent is selected before exp: exact for any decay, no overflow).
           `flat`: the exponent of the nearest pairs (t - i = offset) is 0 whatever the gates
  nonfinite  how many entries of a tile are NaN or +-inf, as [1, 1]; it passes no gradient
The backward is derived here, on the graph: `backward(graph, outputs, seeds)` adds the adjoint
nodes by reverse mode, with sympy differentiating every `ew` node, so no rule is written per model.
`separable` and `stream` read the graph for the kernels' layout: whether blocks of value columns can
run as programs of their own, and how a step passes over blocks of hidden units one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

from mirasc.derive import DELTA, RNORM, RNORM_EPS, Derivation, R, V, Z


@dataclass
class Graph:
    """A DAG of named tile nodes (insertion order is a topological order)."""

    g: nx.DiGraph = field(default_factory=nx.DiGraph)
    counter: int = 0

    def add(self, op: str, shape: tuple, inputs: tuple[str, ...] = (), name: str | None = None,
            **attrs) -> str:
        if name is None:
            self.counter += 1
            name = f"t{self.counter}"
        assert name not in self.g, name
        self.g.add_node(name, op=op, shape=shape, inputs=inputs, **attrs)
        for src in inputs:
            self.g.add_edge(src, name)
        return name

    def node(self, name: str) -> dict:
        return self.g.nodes[name]

    def shape(self, name: str) -> tuple:
        return self.node(name)["shape"]

    # -- builders ---------------------------------------------------------------------------

    def input(self, name: str, shape: tuple, differentiable: bool = True) -> str:
        return self.add("input", shape, name=name, differentiable=differentiable)

    def const(self, name: str, shape: tuple, kind: str) -> str:
        return self.add("const", shape, name=name, kind=kind)

    def dot(self, a: str, b: str, ta: bool = False, tb: bool = False, name=None) -> str:
        rows = self.shape(a)[1 if ta else 0]
        cols = self.shape(b)[0 if tb else 1]
        return self.add("dot", (rows, cols), (a, b), name=name, ta=ta, tb=tb)

    def ew(self, expr: sp.Expr, args: dict[sp.Symbol, str], name=None) -> str:
        """An elementwise node computing `expr` with each symbol bound to a node."""
        used = {s: n for s, n in args.items() if expr.has(s)}
        symbols = tuple(used)
        inputs = tuple(used[s] for s in symbols)
        shape = broadcast(*(self.shape(n) for n in inputs)) if inputs else (1, 1)
        return self.add("ew", shape, inputs, name=name, expr=expr, symbols=symbols)

    def sum(self, x: str, axis: int, name=None) -> str:
        shape = tuple(1 if i == axis else d for i, d in enumerate(self.shape(x)))
        return self.add("sum", shape, (x,), name=name, axis=axis)

    def cumsum(self, x: str, name=None) -> str:
        return self.add("cumsum", self.shape(x), (x,), name=name)

    def trans(self, x: str, name=None) -> str:
        return self.add("trans", self.shape(x)[::-1], (x,), name=name)

    def gdot(self, a: str, b: str, ga: str, gb: str, offset: int = 0, flat: bool = False,
             name=None) -> str:
        flat = flat or (ga == gb and offset == 0)
        return self.add("gdot", ("T", "T"), (a, b, ga, gb), name=name, offset=offset, flat=flat)

    def gmix(self, m: str, x: str, ga: str, gb: str, offset: int = 0, ta: bool = False,
             flat: bool = False, name=None) -> str:
        flat = flat or (ga == gb and offset == 0)
        return self.add("gmix", self.shape(x), (m, x, ga, gb), name=name, offset=offset, ta=ta,
                        flat=flat)

    def order(self) -> list[str]:
        return list(nx.topological_sort(self.g))


def broadcast(*shapes: tuple) -> tuple:
    out = []
    for dims in zip(*shapes, strict=True):
        sized = {d for d in dims if d != 1}
        assert len(sized) <= 1, f"cannot broadcast {shapes}"
        out.append(sized.pop() if sized else 1)
    return tuple(out)


def _x(i: int) -> sp.Symbol:
    return sp.Symbol(f"x{i}", real=True)


def ew(graph: Graph, text_expr, *nodes: str, name=None) -> str:
    """Shorthand: an elementwise node from a function of sympy symbols x0, x1, ..."""
    symbols = [_x(i) for i in range(len(nodes))]
    return graph.ew(text_expr(*symbols), dict(zip(symbols, nodes, strict=True)), name=name)


# ---- the forward chunk step of a matrix memory --------------------------------------------------


@dataclass(frozen=True)
class ChunkStep:
    """The forward graph of one chunk and the names of its inputs and outputs."""

    graph: Graph
    gates: tuple[str, ...]       # the data-dependent gates, in kernel argument order
    states: tuple[str, ...]      # the carried state tiles ("W", "b" for a bias, "S" for momentum)
    outputs: dict[str, str]      # "o" and each state -> the node computing it at the chunk end
    params: tuple[str, ...] = ()  # per-head inputs [1, DV] (the layer norm's affine)


def matrix_chunk_step(d: Derivation) -> ChunkStep:
    """One chunk of a matrix memory W [DV, DK]: with gamma = cumsum(log alpha), beta = exp(gamma)
    and U the chunk's updates (eta_i g_i per row),
        O = beta * Q W^T - (QK^T * exp(gamma_t - gamma_i) * causal) U,
        W_new = exp(gamma_T) W - (U * exp(gamma_T - gamma))^T K.
    U comes from mini-batch gradients at W (`_minibatch_updates`) or, for a quadratic bias, from
    the exact recurrence solved by the WY/UT transform (`_exact_updates`). A momentum learner
    (`_momentum_terms`) mixes the updates through the momentum's decay as well. A bias b [1, DV]
    is a weight on a constant input 1: QK^T + 1 above, b_new = exp(gamma_T) b - sum of U * tail.
    With eta_at 'query', U holds the raw g_i and row t of the mix (and the chunk end) is scaled
    by eta_t (eta of the last row)."""
    gates = d.op_gates()
    gr = Graph()
    dk = "DV" if d.spec.memory.residual else "DK"  # a residual memory needs DK == DV
    data_gates, rowmask = _chunk_inputs(gr, d, dk)
    q, k, v, vmask = "q", "k", "v", "vmask"
    state = gr.input("W", ("DV", dk))  # the retention's state: Z (dual) or W (proximal)
    w = _read_map(gr, d, state) if d.retention.dual else state
    b_state = gr.input("b", (1, "DV")) if d.spec.memory.bias else None
    b = _read_map(gr, d, b_state) if b_state is not None and d.retention.dual else b_state
    channel_decay = gates.get("log_alpha") is not None and gates["log_alpha"].shape == "channel"
    # A channel-wise step scales the key channels of each update: u_i (k_i * eta_i)^T.
    k_upd = ew(gr, lambda a, b: a * b, k, "eta", name="k_eta") \
        if gates["eta"].shape == "channel" and gates["eta"].is_input else k

    la, gam, gam_end, beta, decay_mat = _decay(gr, d, rowmask, matrix=not channel_decay)
    gam_row = "gam_row" if decay_mat not in (None, "causal") else None
    if channel_decay:  # decay per key channel: attn_ti = sum_d q_td k_id exp(gamma_td - gamma_id)
        q_dec = ew(gr, lambda a, b: a * b, q, beta, name="q_dec")
        attn = gr.gdot(q, k_upd, gam, gam, name="attn")
        read = gr.dot(q_dec, w, tb=True, name="read")
    else:
        qk = gr.dot(q, k_upd, tb=True, name="qk")
        qw = gr.dot(q, w, tb=True, name="qw")
        if b is not None:
            qk = ew(gr, lambda a: a + 1, qk, name="qk1")
            qw = ew(gr, lambda a, c: a + c, qw, b, name="qwb")
        read = qw if beta is None else ew(gr, lambda b_, a: b_ * a, beta, qw, name="read")
    ctx = dict(q=q, k=k, k_upd=k_upd, v=v, w=w, b=b, rowmask=rowmask, vmask=vmask, la=la,
               gam=gam, gam_row=gam_row, beta=beta, dk=dk, gates=tuple(data_gates),
               channel=channel_decay)
    updates = _exact_updates(gr, d, ctx) if d.exact and d.bias.kind == "affine" \
        else _minibatch_updates(gr, d, ctx)

    def kept(x, name):
        return x if gam_end is None else ew(gr, lambda e, a: sp.exp(e) * a, gam_end, x, name=name)

    keep = kept(state, "keep")
    eta_end = _eta_end(gr, d)

    if d.spec.learner.kind == "momentum":
        z_o, acc, extra = _momentum_terms(gr, d, ctx, updates, decay_mat, qk, read, keep)
    else:
        if not channel_decay:
            attn = ew(gr, lambda a, b_: a * b_, qk, decay_mat, name="attn")
        mixed = gr.dot(attn, updates, name="mixed")
        if eta_end is not None:
            mixed = ew(gr, lambda a, e: a * e, mixed, "eta", name="mixed_eta")
        z_o = ew(gr, lambda a, m: a - m, read, mixed, name="z_o")
        if gam_end is not None:  # each update decays from its row to the chunk end
            tail = _tail(gr, la, rowmask)
            if channel_decay:
                k_upd = ew(gr, lambda a, b_: a * b_, k_upd, tail, name="k_tail")
            else:
                updates = ew(gr, lambda a, b_: a * b_, updates, tail, name="u_tail")
        update = gr.dot(updates, k_upd, ta=True, name="update")
        b_update = gr.sum(updates, 0, name="b_update") if b is not None else None
        if eta_end is not None:
            update = ew(gr, lambda a, e: a * e, update, eta_end, name="update_eta")
            if b_update is not None:
                b_update = ew(gr, lambda a, e: a * e, b_update, eta_end, name="b_update_eta")
        acc, extra = ew(gr, lambda a, u: a - u, keep, update, name="acc"), {}
        if b is not None:
            extra["b"] = ew(gr, lambda a, u: a - u, kept(b_state, "keep_b"), b_update,
                            name="b_acc")
    o = _finish(gr, d, z_o, q, vmask, name="o_chunk", read=True)
    states = ("W", *extra)
    params = _params(gr)
    if d.retention.linear:
        return ChunkStep(gr, tuple(data_gates), states, {"o": o, "W": acc, **extra}, params)
    # A nonlinear retention maps the state at the chunk end only; the chunk's last row reads it.
    w_end = _read_map(gr, d, acc)
    z_end = gr.dot(q, w_end, tb=True)
    if b is not None:
        b_end = _read_map(gr, d, extra["b"])
        z_end = ew(gr, lambda a, c: a + c, z_end, b_end)
        extra["b"] = extra["b"] if d.retention.dual else b_end
    o_end = _finish(gr, d, z_end, q, vmask, name="o_end", read=True)
    o = _last_row_reads(gr, o, o_end, name="o")
    new_state = acc if d.retention.dual else w_end
    return ChunkStep(gr, tuple(data_gates), states, {"o": o, "W": new_state, **extra}, params)


def _lastrow(gr: Graph) -> str:
    """The [T, 1] mask of the chunk's last real row (one const node per graph)."""
    return "lastrow" if "lastrow" in gr.g else gr.const("lastrow", ("T", 1), "lastrow")


def _last_row_reads(gr: Graph, o: str, o_end: str, name: str | None = None) -> str:
    """The rows' outputs o, but the chunk's last real row reads o_end (the chunk-end state)."""
    return ew(gr, lambda a, b, m: a * (1 - m) + b * m, o, o_end, _lastrow(gr), name=name)


def _params(gr: Graph) -> tuple[str, ...]:
    """The per-head parameter inputs present in the graph, in kernel argument order."""
    return tuple(p for p in ("ln_weight", "ln_bias") if p in gr.g)


def _by_query(d: Derivation) -> bool:
    """Whether the step is indexed by the reading token (learner.eta_at 'query' with a
    data-dependent eta); a constant step is the same either way."""
    learner = d.spec.learner
    return learner.kind == "gd" and learner.eta_at == "query" and learner.eta.is_input


def _eta_end(gr: Graph, d: Derivation) -> str | None:
    """eta at the chunk's last real row [1, 1] when the step is the reading token's, else None."""
    if not _by_query(d):
        return None
    return gr.sum(ew(gr, lambda e, m: e * m, "eta", _lastrow(gr)), 0, name="eta_end")


def _chunk_inputs(gr: Graph, d: Derivation, key_dim: str) -> tuple[list[str], str]:
    """The loaded tiles every chunk step starts from: q, k [T, key_dim], v [T, DV], the masks,
    and the data-dependent gates (returned in kernel argument order, with the row mask)."""
    gates = d.op_gates()
    for name in ("q", "k"):
        gr.input(name, ("T", key_dim))
    gr.input("v", ("T", "DV"))
    gr.const("causal", ("T", "T"), "causal")
    _dim_mask(gr, "DV")  # the padding of DV up to a power of two
    data_gates = [a for a in ("log_alpha", "eta", "delta", "momentum")
                  if gates.get(a) is not None and gates[a].is_input]
    for arg in data_gates:
        width = {"delta": "DV"}.get(arg, key_dim) if gates[arg].shape == "channel" else 1
        gr.input(arg, ("T", width))
    norm = d.spec.memory.norm
    if norm is not None and norm.affine:
        gr.input("ln_weight", (1, "DV"))
        gr.input("ln_bias", (1, "DV"))
    return data_gates, gr.const("rowmask", ("T", 1), "rowmask")


def _decay(gr: Graph, d: Derivation, rowmask: str, matrix: bool = True) -> tuple:
    """log alpha per row, gamma = its cumsum, gamma at the chunk end, beta = exp(gamma) and (for
    a per-head decay, with `matrix`) the causal decay matrix; Nones (and the plain causal mask)
    without a decay."""
    la = _log_gate(gr, d.op_gates(), "log_alpha", rowmask, name="la")
    if la is None:
        return None, None, None, None, "causal"
    gam = gr.cumsum(la, name="gam")
    gam_end = gr.sum(la, 0, name="gam_end")
    beta = ew(gr, sp.exp, gam, name="beta")
    decay_mat = _decay_matrix(gr, "causal", gam, gr.trans(gam, name="gam_row"), name="decay") \
        if matrix else None
    return la, gam, gam_end, beta, decay_mat


LOG_FLOOR = -110.0  # log_alpha below it (down to -inf, alpha = 0: a full reset) counts as it


def _log_gate(gr: Graph, gates: dict, arg: str, rowmask: str, name: str) -> str | None:
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


def _decay_matrix(gr: Graph, causal: str, cum: str, cum_row: str, name: str) -> str:
    """exp(cum_t - cum_i) below the diagonal, 1 on it (a constant: its +-1 terms in the
    gradients of cum_t and cum_i would cancel only to rounding, which swamps the gradient of
    a large decay), 0 above."""
    return ew(gr, lambda c, s, a, b: sp.Piecewise((sp.exp(a - b), s > 0), (1, c > 0), (0, True)),
              causal, _strict(gr), cum, cum_row, name=name)


def _previous_decays(gr: Graph, kk: str, strict: str, lag: str, gam_row: str) -> str:
    """kk_ti exp(lag_t - gamma_i) for t > i, lag the exclusive prefix sum: 1 for t = i + 1 (a
    constant, as in `_decay_matrix`), 0 on and above the diagonal."""
    band = gr.const("strict2", ("T", "T"), "strict2")  # t > i + 1
    return ew(gr, lambda a, s, s2, x, y: a * sp.Piecewise((sp.exp(x - y), s2 > 0), (1, s > 0),
                                                          (0, True)),
              kk, strict, band, lag, gam_row, name="kk_decay")


def _strict(gr: Graph) -> str:
    """The [T, T] mask of the pairs t > i (one const node per graph)."""
    return "strict" if "strict" in gr.g else gr.const("strict", ("T", "T"), "strict")


def _before(gr: Graph, la: str) -> str:
    """The exclusive prefix sum sum_(s < t) la_s (not gamma_t - la_t, whose gradients cancel to
    rounding at the first row)."""
    if gr.shape(la)[1] == 1:
        return gr.sum(ew(gr, lambda s, a: s * a, _strict(gr), gr.trans(la)), 1, name="gam_prev")
    return gr.dot(_strict(gr), la, name="gam_prev")


def _tail(gr: Graph, la: str, rowmask: str, name: str = "tail") -> str:
    """The decay from each real row to the chunk end, exp(sum_(s > i) la_s), by a sum over the
    later rows (not gamma_T - gamma_i, whose gradients cancel to rounding at the last row)."""
    if gr.shape(la)[1] == 1:
        later = gr.trans(gr.sum(ew(gr, lambda s, a: s * a, _strict(gr), la), 0))
    else:
        later = gr.dot(_strict(gr), la, ta=True)
    return ew(gr, lambda m, x: m * sp.exp(x), rowmask, later, name=name)


def _momentum_terms(gr: Graph, d: Derivation, ctx: dict, updates: str, decay_mat: str, qk: str,
                    read: str, keep: str) -> tuple[str, str, dict]:
    """S_t = m_t S_{t-1} + u_t, W_t = alpha_t W_{t-1} - S_t over a chunk, with mu = cumsum(log m):
    C = decay @ exp(mu_t - mu_i) (causal), s = decay @ exp(mu),
        z_O = read - s * Q S^T - (QK^T * C) U,
        W_new = keep - s_T S - (U * C_T)^T K,   S_new = exp(mu_T) S + (U * exp(mu_T - mu))^T K."""
    k, rowmask = ctx["k"], ctx["rowmask"]
    s_in = gr.input("S", ("DV", ctx["dk"]))
    mix, s_vec, mix_end, s_end, m_tail, mu_end = _momentum_mixing(gr, d, decay_mat, rowmask)
    attn = ew(gr, lambda a, b: a * b, qk, mix, name="attn")
    mixed = gr.dot(attn, updates, name="mixed")
    qs = gr.dot(ctx["q"], s_in, tb=True, name="qs")
    z_o = ew(gr, lambda a, s, x, m: a - s * x - m, read, s_vec, qs, mixed, name="z_o")
    w_update = gr.dot(ew(gr, lambda a, b: a * b, updates, mix_end), k, ta=True, name="w_update")
    acc = ew(gr, lambda a, s, x, u: a - s * x - u, keep, s_end, s_in, w_update, name="acc")
    s_update = gr.dot(ew(gr, lambda a, b: a * b, updates, m_tail), k, ta=True, name="s_update")
    s_new = ew(gr, lambda e, x, u: sp.exp(e) * x + u, mu_end, s_in, s_update, name="S_new")
    return z_o, acc, {"S": s_new}


MASKS = {"DK": "kmask", "DV": "vmask", "DH": "hmask"}


def _dim_mask(gr: Graph, dim: str) -> str:
    """The [1, dim] tile of ones over a dimension's real (unpadded) entries."""
    name = MASKS[dim]
    return name if name in gr.g else gr.const(name, (1, dim), name)


def _read_map(gr: Graph, d: Derivation, z: str) -> str:
    """W = phi^-1(Z), the retention's map, over the real (unpadded) entries of the state."""
    ret, rule = d.spec.retention, d.retention
    if rule.linear:
        return z
    rows, cols = gr.shape(z)
    smask = f"smask_{rows}_{cols}"
    if rows == 1:  # a vector memory: its norm or softmax runs over the whole vector
        smask = _dim_mask(gr, cols)
    elif smask not in gr.g:
        ew(gr, lambda a, b: a * b, gr.trans(_dim_mask(gr, rows)), _dim_mask(gr, cols), name=smask)
    if rule.elementwise is not None:  # selected, not multiplied: phi^-1' may be inf at a padded 0
        return ew(gr, lambda a, m: sp.Piecewise((rule.elementwise.subs(Z, a), m > 0), (0, True)),
                  z, smask)
    axes = {"matrix": (1, 0), "row": (1,), "column": (0,)} if rows != 1 else dict.fromkeys(
        ("matrix", "row", "column"), (1,))
    if rule.kind == "lq":  # Z / (sum |Z|^q + eps)^((q-2)/q), or the p-norm link's sign(Z)|Z|^(q-1)
        q = sp.nsimplify(ret.q)
        powered = ew(gr, lambda a: sp.Abs(a) ** q, z)
        for axis in axes[ret.scope]:
            powered = gr.sum(powered, axis)
        scale = ew(gr, lambda s: (s + ret.eps) ** (-(q - 2) / q), powered, name=None)
        core = (lambda a: a) if ret.link == "scale" else (lambda a: sp.sign(a) * sp.Abs(a) ** (q - 1))
        return ew(gr, lambda a, s: core(a) * s, z, scale)
    # kl: c * softmax over the axis; the max is a constant offset (it cancels in the softmax)
    masked = ew(gr, lambda a, m: sp.Piecewise((a, m > 0), (-1e30, True)), z, smask)
    peak = masked
    for axis in axes[ret.axis]:
        peak = gr.add("max", tuple(1 if i == axis else s for i, s in enumerate(gr.shape(peak))),
                      (peak,), axis=axis)
    expo = ew(gr, lambda a, p, m: sp.Piecewise((sp.exp(a - p), m > 0), (0, True)), z, peak, smask)
    total = expo
    for axis in axes[ret.axis]:
        total = gr.sum(total, axis)
    return ew(gr, lambda e, t: sp.Piecewise((ret.scale * e / t, t > 0), (0, True)), expo, total)


def vector_chunk_step(d: Derivation) -> ChunkStep:
    """One chunk of a vector (diagonal) memory M(x) = [x +] [LN](w * x), w [1, D], D = DK = DV.
    Token gradients are elementwise, u_i = eta_i delta_i * k_i, so the chunk reads
        w_t = beta_t w - sum_(i<=t) (beta_t / beta_i) u_i    (a decay-weighted prefix sum)
    and o_t = [q_t +] [LN](q_t * w_t); per-channel decays weigh each pair by exp(gamma_t - gamma_i).
    With eta_at 'query' the sum holds the raw delta_i * k_i and row t scales it by eta_t."""
    gates = d.op_gates()
    gr = Graph()
    data_gates, rowmask = _chunk_inputs(gr, d, "DV")
    q, k, v, vmask = "q", "k", "v", "vmask"
    state = gr.input("W", (1, "DV"))
    w = _read_map(gr, d, state) if d.retention.dual else state
    channel = gates.get("log_alpha") is not None and gates["log_alpha"].shape == "channel"
    la, gam, gam_end, beta, decay_mat = _decay(gr, d, rowmask, matrix=not channel)

    pred_w = w if d.spec.learner.grad_at == "previous" or beta is None \
        else ew(gr, lambda a, b: a * b, w, beta, name="w_point")
    kz = ew(gr, lambda a, b: a * b, k, pred_w, name="kz")
    pred = _finish(gr, d, kz, k, vmask, name="pred_m")
    g = _bias_gradient(gr, d, pred, v, vmask)
    delta = g if pred == kz else backward(gr, {pred: g}, (kz,))[kz]
    eta_gate = d.spec.learner.eta
    eta = "eta" if eta_gate.is_input else ew(gr, lambda m: m * sp.Float(eta_gate.value), rowmask)
    eta_end = _eta_end(gr, d)
    if eta_end is not None:  # the step scales the reads below, not the updates
        eta, row_eta = rowmask, eta
    u = ew(gr, lambda a, b, e, m, c: a * b * e * m * c, delta, k, eta, rowmask, vmask, name="u")

    def decayed_sum(x):
        """sum_(i<=t) (beta_t / beta_i) x_i for every row t."""
        if channel:
            return gr.gmix("causal", x, gam, gam)
        return gr.dot(decay_mat, x)

    keep = state if gam_end is None else ew(gr, lambda e, a: sp.exp(e) * a, gam_end, state)
    read = w if beta is None else ew(gr, lambda b, a: b * a, beta, w, name="read")
    outputs = {}
    if d.spec.learner.kind == "momentum":
        s_in = gr.input("S", (1, "DV"))
        mix, s_vec, mix_end, s_end, m_tail, mu_end = _momentum_mixing(gr, d, decay_mat, rowmask)
        w_rows = ew(gr, lambda a, s, x, m: a - s * x - m, read, s_vec, s_in, gr.dot(mix, u))
        acc = ew(gr, lambda a, s, x, c: a - s * x - c, keep, s_end, s_in,
                 gr.sum(ew(gr, lambda a, b: a * b, u, mix_end), 0))
        outputs["S"] = ew(gr, lambda e, x, c: sp.exp(e) * x + c, mu_end, s_in,
                          gr.sum(ew(gr, lambda a, b: a * b, u, m_tail), 0), name="S_new")
    else:
        mixed = decayed_sum(u)
        tail = rowmask if gam_end is None else _tail(gr, la, rowmask)
        update = gr.sum(ew(gr, lambda a, b: a * b, u, tail), 0)
        if eta_end is not None:
            mixed = ew(gr, lambda a, e: a * e, mixed, row_eta)
            update = ew(gr, lambda a, e: a * e, update, eta_end)
        w_rows = ew(gr, lambda a, m: a - m, read, mixed, name="w_rows")
        acc = ew(gr, lambda a, c: a - c, keep, update)
    acc = ew(gr, lambda a: a, acc, name="acc")
    o = _finish(gr, d, ew(gr, lambda a, b: a * b, q, w_rows), q, vmask, name="o_chunk", read=True)
    new_state = acc
    if not d.retention.linear:  # the map at the chunk end; the last row reads the mapped vector
        w_end = _read_map(gr, d, acc)
        o_end = _finish(gr, d, ew(gr, lambda a, b: a * b, q, w_end), q, vmask, name="o_end",
                        read=True)
        o = _last_row_reads(gr, o, o_end)
        new_state = acc if d.retention.dual else w_end
    names = ("W", *outputs)
    return ChunkStep(gr, tuple(data_gates), names,
                     {"o": ew(gr, lambda a: a, o, name="o"), "W": new_state, **outputs},
                     _params(gr))


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
    and row t of the mix (and the chunk end) is scaled by eta_t."""
    mem = d.spec.memory
    gr = Graph()
    dk = "DV" if mem.residual else "DK"
    data_gates, rowmask = _chunk_inputs(gr, d, dk)
    q, k, v, vmask, hmask = "q", "k", "v", "vmask", _dim_mask(gr, "DH")
    dims = [dk] + ["DH"] * (mem.depth - 1) + ["DV"]
    states = [gr.input(f"W{i + 1}", (dims[i + 1], dims[i])) for i in range(mem.depth)]
    act = ACTIVATIONS[mem.activation]
    weights = [_read_map(gr, d, w) if d.retention.dual else w for w in states]
    la, gam, gam_end, beta, decay_mat = _decay(gr, d, rowmask)

    # the key path at the chunk-start weights, and the rank-one gradients of every layer
    x, keys, pre = k, [], []
    for i, w in enumerate(weights):
        keys.append(x)
        pre.append(gr.dot(x, w, tb=True, name=f"kz{i + 1}"))
        if i < len(weights) - 1:
            x = ew(gr, lambda a, m: act(a) * m, pre[-1], hmask, name=f"kh{i + 1}")
    pred = _finish(gr, d, pre[-1], k, vmask, name="pred_m")
    g = _bias_gradient(gr, d, pred, v, vmask)
    deltas = backward(gr, {pred: g}, tuple(pre))
    args, factor = _gate_args(gr, d, {"rowmask": rowmask, "vmask": vmask})
    factor = factor.subs(sp.Symbol("vmask", real=True), 1)
    x_sym, m_sym = sp.Symbol("x", real=True), sp.Symbol("m", real=True)
    updates = [gr.ew(x_sym * factor * m_sym, args | {x_sym: deltas[z], m_sym: _dim_mask(gr, dim)},
                     name=f"u{i + 1}") for i, (z, dim) in enumerate(zip(pre, dims[1:], strict=True))]

    momentum = d.spec.learner.kind == "momentum"
    if momentum:
        mom_in = [gr.input(f"S{i + 1}", gr.shape(w)) for i, w in enumerate(states)]
        mix, s_vec, mix_end, s_end, m_tail, mu_end = _momentum_mixing(gr, d, decay_mat, rowmask)
    eta_end = _eta_end(gr, d)
    tail = None if gam_end is None else _tail(gr, la, rowmask)
    attn_mask = mix if momentum else decay_mat

    def read_chain(x, layers, name):
        """The query path through the layers, each read as a matrix memory."""
        for i, (w, key, u) in enumerate(zip(layers, keys, updates, strict=True)):
            z = gr.dot(x, w, tb=True)
            if beta is not None and layers is weights:
                z = ew(gr, lambda b, a: b * a, beta, z)
            if layers is weights:  # inside the chunk: minus the decayed updates so far
                attn = ew(gr, lambda a, b: a * b, gr.dot(x, key, tb=True), attn_mask)
                mixed = gr.dot(attn, u)
                if eta_end is not None:
                    mixed = ew(gr, lambda a, e: a * e, mixed, "eta")
                z = ew(gr, lambda a, m: a - m, z, mixed)
                if momentum:
                    z = ew(gr, lambda a, s, y: a - s * y, z, s_vec, gr.dot(x, mom_in[i], tb=True))
            if i < len(layers) - 1:
                x = ew(gr, lambda a, m: act(a) * m, z, hmask)
        return _finish(gr, d, z, q, vmask, name=name, read=True)

    o = read_chain(q, weights, "o_chunk")
    outputs, new_acc = {}, []
    for i, (state, key, u) in enumerate(zip(states, keys, updates, strict=True)):
        keep = state if gam_end is None else ew(gr, lambda e, a: sp.exp(e) * a, gam_end, state)
        if momentum:
            w_upd = gr.dot(ew(gr, lambda a, b: a * b, u, mix_end), key, ta=True)
            acc = ew(gr, lambda a, s, y, c: a - s * y - c, keep, s_end, mom_in[i], w_upd)
            s_upd = gr.dot(ew(gr, lambda a, b: a * b, u, m_tail), key, ta=True)
            outputs[f"S{i + 1}"] = ew(gr, lambda e, y, c: sp.exp(e) * y + c, mu_end, mom_in[i],
                                      s_upd, name=f"S{i + 1}_new")
        else:
            scaled = u if tail is None else ew(gr, lambda a, b: a * b, u, tail)
            update = gr.dot(scaled, key, ta=True)
            if eta_end is not None:
                update = ew(gr, lambda a, e: a * e, update, eta_end)
            acc = ew(gr, lambda a, c: a - c, keep, update)
        new_acc.append(ew(gr, lambda a: a, acc, name=f"acc{i + 1}"))
    if d.retention.linear:
        outputs |= {f"W{i + 1}": a for i, a in enumerate(new_acc)}
    else:  # the map at the chunk end; the last row reads the mapped weights
        ends = [_read_map(gr, d, a) for a in new_acc]
        o_end = read_chain(q, ends, "o_end")
        o = _last_row_reads(gr, o, o_end)
        outputs |= {f"W{i + 1}": (a if d.retention.dual else e)
                    for i, (a, e) in enumerate(zip(new_acc, ends, strict=True))}
    names = [f"W{i + 1}" for i in range(mem.depth)] + \
        ([f"S{i + 1}" for i in range(mem.depth)] if momentum else [])
    outputs = {"o": ew(gr, lambda a: a, o, name="o")} | {n: outputs[n] for n in names}
    return ChunkStep(gr, tuple(data_gates), tuple(names), outputs, _params(gr))


def _momentum_mixing(gr: Graph, d: Derivation, decay_mat: str, rowmask: str):
    """The momentum's mixing of a chunk's updates (see `_momentum_terms`), shared by all layers:
    C = decay @ exp(mu_t - mu_i), s_t = sum_(j<=t, real rows) decay_tj exp(mu_j), their values at
    the chunk's last real row, and exp(mu_T - mu)."""
    lastrow = _lastrow(gr)
    lm = _log_gate(gr, d.op_gates(), "momentum", rowmask, name="lm")
    mu = gr.cumsum(lm, name="mu")
    mu_end = gr.sum(lm, 0, name="mu_end")
    mix = gr.dot(decay_mat, _decay_matrix(gr, "causal", mu, gr.trans(mu), name="mom"), name="mix")
    s_vec = gr.sum(ew(gr, lambda a, b, m: a * sp.exp(b) * m, decay_mat, gr.trans(mu),
                      gr.trans(rowmask)), 1, name="s_vec")  # no step at masked rows
    mix_end = gr.trans(gr.sum(ew(gr, lambda a, b: a * b, mix, lastrow), 0), name="mix_end")
    s_end = gr.sum(ew(gr, lambda a, b: a * b, s_vec, lastrow), 0, name="s_end")
    m_tail = _tail(gr, lm, rowmask, name="m_tail")
    return mix, s_vec, mix_end, s_end, m_tail, mu_end


def _finish(gr: Graph, d: Derivation, z: str, x: str, vmask: str, name: str,
            read: bool = False) -> str:
    """M(x) from its pre-activation z = W x: [x +] [LN](z), LN over DV (times ln_weight plus
    ln_bias when affine); on the `read` path read_residual 'output' adds z instead of x."""
    mem = d.spec.memory
    norm = mem.norm
    out = z
    if norm is not None:
        dv = sp.Symbol("DV", positive=True)
        mean = ew(gr, lambda s: s / dv, gr.sum(ew(gr, lambda a, m: a * m, z, vmask), 1))
        centred = ew(gr, lambda a, b, m: (a - b) * m, z, mean, vmask)
        var = ew(gr, lambda s: s / dv, gr.sum(ew(gr, lambda a: a * a, centred), 1))
        out = ew(gr, lambda c, s: c / sp.sqrt(s + norm.eps), centred, var)
        if norm.affine:
            out = ew(gr, lambda a, w, b: a * w + b, out, "ln_weight", "ln_bias")
    if mem.residual:
        skip = z if read and mem.read_residual == "output" else x
        out = ew(gr, lambda a, b: a + b, skip, out)
    return ew(gr, lambda a: a, out, name=name)


def _gate_args(gr: Graph, d: Derivation, ctx: dict) -> tuple[dict, sp.Expr]:
    """Symbols bound to the masks and gates, and the factor eta * rowmask * vmask."""
    eta_sym, mask_sym = sp.Symbol("eta", real=True), sp.Symbol("rowmask", real=True)
    vmask_sym = sp.Symbol("vmask", real=True)
    args = {mask_sym: ctx["rowmask"], vmask_sym: ctx["vmask"]}
    if "delta" in gr.g:
        args[DELTA] = "delta"
    eta_gate = d.spec.learner.eta
    if eta_gate.shape == "channel" or _by_query(d):  # folded into the keys, or into the reads
        eta = sp.Integer(1)
    elif eta_gate.is_input:
        args[eta_sym] = "eta"
        eta = eta_sym
    else:
        eta = sp.Float(eta_gate.value)
    return args, eta * mask_sym * vmask_sym


def _minibatch_updates(gr: Graph, d: Derivation, ctx: dict) -> str:
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
    pred = _finish(gr, d, kw, ctx["k"], ctx["vmask"], name="pred_m") \
        if mem.layer_norm or mem.residual else kw
    g = _bias_gradient(gr, d, pred, ctx["v"], ctx["vmask"])
    # J^T g: the bias gradient pulled back through LN/residual
    through = g if pred == kw else backward(gr, {pred: g}, (kw,))[kw]
    args, factor = _gate_args(gr, d, ctx)
    x = sp.Symbol("x", real=True)
    return gr.ew(x * factor, args | {x: through}, name="u")


def _bias_gradient(gr: Graph, d: Derivation, pred: str, v: str, vmask: str) -> str:
    """g = dl/dr at r = M(k) - v, rnorm = ||r|| over the real DV columns (sympy's rule).

    Padding (rows past the sequence, columns past DV) is loaded as v = 1 so that r != 0 there and
    every derivative of g stays finite; the masks then zero its contributions."""
    r = ew(gr, lambda a, b: a - b, pred, v, name="r")
    rsq = gr.sum(ew(gr, lambda a, m: a * a * m, r, vmask), 1, name="rsq")
    rnorm = ew(gr, lambda s: sp.sqrt(s + RNORM_EPS), rsq, name="rnorm")
    args = {R: r, V: v, RNORM: rnorm} | ({DELTA: "delta"} if "delta" in gr.g else {})
    return gr.ew(d.bias.elem + d.bias.norm * R, args, name="g")


def _exact_updates(gr: Graph, d: Derivation, ctx: dict) -> str:
    """The exact recurrence for a quadratic bias g = c r + e(v): each row's gradient at its own
    state. With p_i the decay from the chunk start to the gradient point of row i,
        (I + A) U = eta (c p K W^T + e(v) - c v),  A_ij = eta_i c (k_i . k_j) p_i / beta_j (j < i),
    solved with the unit lower-triangular inverse (the WY/UT transform)."""
    c = d.bias.d_elem["r"]
    e = d.bias.elem.subs(R, 0) - c * V
    strict = _strict(gr)
    k, k_upd = ctx["k"], ctx["k_upd"]
    lag = None
    if ctx["gam"] is not None:
        lag = ctx["gam"] if d.spec.learner.grad_at == "retained" \
            else _before(gr, ctx["la"])
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
                _previous_decays(gr, kk, strict, lag, ctx["gam_row"])
            pred = ew(gr, lambda x, g: x * sp.exp(g), kw, lag, name="pred")
    args, factor = _gate_args(gr, d, ctx)
    eta_row = gr.ew(factor.subs(sp.Symbol("vmask", real=True), 1) * c, args, name="eta_c")
    a = ew(gr, lambda x, y: x * y, eta_row, kk, name="A")
    inverse = gr.add("tri_inv", ("T", "T"), (a,), name="A_inv")
    p_sym = sp.Symbol("pred", real=True)
    rhs = gr.ew((c * p_sym + e) * factor, args | {p_sym: pred, V: ctx["v"]}, name="rhs")
    return gr.dot(inverse, rhs, name="u")


# ---- reverse mode --------------------------------------------------------------------------------


def _ae(expr: sp.Expr) -> sp.Expr:
    return expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0))


def backward(graph: Graph, seeds: dict[str, str], wrt: tuple[str, ...]) -> dict[str, str]:
    """Add adjoint nodes for d(sum <output, seed>)/d(wrt) to `graph`; returns {wrt: adjoint}.

    `seeds` maps forward outputs to the input nodes holding their cotangents."""
    forward = [n for n in graph.order() if n not in seeds.values()]
    needed = set()
    for n in wrt:
        needed |= nx.descendants(graph.g, n) | {n}
    contributions: dict[str, list[str]] = {n: [] for n in forward}
    for out, seed in seeds.items():
        contributions[out].append(seed)
    adjoint: dict[str, str] = {}
    for n in reversed(forward):
        if n not in needed or not contributions.get(n):
            continue
        adjoint[n] = _accumulate(graph, n, contributions[n])
        node = graph.node(n)
        for src, grad in _vjp(graph, n, node, adjoint[n]):
            if src in needed:
                contributions[src].append(grad)
    return {n: adjoint.get(n) for n in wrt}


def _accumulate(graph: Graph, n: str, parts: list[str]) -> str:
    shape = graph.shape(n)
    total = parts[0] if len(parts) == 1 else ew(graph, lambda *xs: sp.Add(*xs), *parts)
    if graph.shape(total) != shape:
        total = graph.add("broadcast", shape, (total,))
    return total


def _reduce_to(graph: Graph, grad: str, shape: tuple) -> str:
    for axis, (have, want) in enumerate(zip(graph.shape(grad), shape, strict=True)):
        if want == 1 and have != 1:
            grad = graph.sum(grad, axis)
    return grad


def _vjp(graph: Graph, n: str, node: dict, dy: str):
    op, inputs = node["op"], node["inputs"]
    if op == "dot":
        a, b = inputs
        ta, tb = node["ta"], node["tb"]
        da = graph.dot(b, dy, ta=tb, tb=True) if ta else graph.dot(dy, b, tb=not tb)
        db = graph.dot(dy, a, ta=True, tb=ta) if tb else graph.dot(a, dy, ta=not ta)
        yield a, da
        yield b, db
    elif op == "ew":
        expr, symbols = node["expr"], node["symbols"]
        dsym = sp.Symbol(f"d_{n}", real=True)  # fresh: the expression may be an adjoint itself
        for sym, src in zip(symbols, inputs, strict=True):
            partial = _ae(sp.diff(expr, sym))
            if partial == 0:
                continue
            args = {s: i for s, i in zip(symbols, inputs, strict=True)} | {dsym: dy}
            grad = graph.ew(_chain(graph, dsym, partial, args), args)
            yield src, _reduce_to(graph, grad, graph.shape(src))
    elif op == "sum":
        yield inputs[0], graph.add("broadcast", graph.shape(inputs[0]), (dy,))
    elif op == "cumsum":
        yield inputs[0], graph.add("revcumsum", graph.shape(dy), (dy,))
    elif op == "trans":
        yield inputs[0], graph.trans(dy)
    elif op == "broadcast":
        yield inputs[0], _reduce_to(graph, dy, graph.shape(inputs[0]))
    elif op == "tri_inv":  # X = (I + A)^-1: dA = -X^T dX X^T
        left = graph.dot(n, dy, ta=True)
        yield inputs[0], ew(graph, lambda m: -m, graph.dot(left, n, tb=True))
    elif op in ("gdot", "gmix"):
        yield from _decayed_vjp(graph, n, node, dy)


def _chain(graph: Graph, dy: sp.Symbol, partial: sp.Expr, args: dict) -> sp.Expr:
    """dy * partial; a partial that is a where on a per-step flag ([1, 1], e.g. whether a state
    is spoiled) between constants selects dy instead, so that a NaN dy (a spoiled state's
    gradient) does not pass as 0 * NaN. (A where on bits of another shape may feed a tl.dot,
    whose operand layouts Triton cannot give to bits; such cotangents are finite.)"""
    chain = dy * partial
    if isinstance(partial, sp.Piecewise) and all(v.is_number for v, _ in partial.args):
        flags = set().union(*(c.free_symbols for _, c in partial.args))
        if all(graph.shape(args[f]) == (1, 1) for f in flags):
            return sp.piecewise_fold(chain)
    return chain


def _decayed_vjp(graph: Graph, n: str, node: dict, dy: str):
    """Reverse mode of gdot and gmix (E_tid = exp(ga_td - gb_id) on the causal pairs): each
    adjoint of a or b (m or x) is the other op with dy in its place; with y the node's output,
    dga = a * da and dgb = -b * db for gdot; dga = dy * y, dgb = -x * dx for gmix (dga = x * dx,
    dgb = -dy * y for its transpose)."""
    ga, gb, offset, flat = *node["inputs"][2:], node["offset"], node["flat"]
    # The nearest pairs of a flat node have the exponent 0: their terms in dga and dgb cancel,
    # so the gates' gradients sum the farther pairs only (the cancellation would leave rounding,
    # which swamps the gradient of a large decay).
    far = dict(offset=offset + 1) if flat else None
    same = dict(offset=offset, flat=flat)
    if node["op"] == "gdot":
        a, b = node["inputs"][:2]
        da = graph.gmix(dy, b, ga, gb, **same)
        db = graph.gmix(dy, a, ga, gb, ta=True, **same)
        da_g = da if far is None else graph.gmix(dy, b, ga, gb, **far)
        db_g = db if far is None else graph.gmix(dy, a, ga, gb, ta=True, **far)
        grads = [(a, da), (b, db), (ga, ew(graph, lambda x, y: x * y, a, da_g)),
                 (gb, ew(graph, lambda x, y: -x * y, b, db_g))]
    else:
        m, x = node["inputs"][:2]
        ta = node["ta"]
        if ta:  # y_i = sum_t m_ti x_t E_ti
            dm, dx = graph.gdot(x, dy, ga, gb, **same), graph.gmix(m, dy, ga, gb, **same)
        else:  # y_t = sum_i m_ti x_i E_ti
            dm, dx = graph.gdot(dy, x, ga, gb, **same), graph.gmix(m, dy, ga, gb, ta=True, **same)
        y = n if far is None else graph.gmix(m, x, ga, gb, ta=ta, **far)
        dx_g = dx if far is None else graph.gmix(m, dy, ga, gb, ta=not ta, **far)
        if ta:
            dga, dgb = ew(graph, lambda u, w: u * w, x, dx_g), ew(graph, lambda u, w: -u * w, dy, y)
        else:
            dga, dgb = ew(graph, lambda u, w: u * w, dy, y), ew(graph, lambda u, w: -u * w, x, dx_g)
        grads = [(m, dm), (x, dx), (ga, dga), (gb, dgb)]
    for src, grad in grads:
        yield src, _reduce_to(graph, grad, graph.shape(src))


def chunk_step(d: Derivation) -> ChunkStep:
    """The chunk step of the spec's memory kind."""
    builders = {"matrix": matrix_chunk_step, "vector": vector_chunk_step, "mlp": mlp_chunk_step}
    step = builders[d.spec.memory.kind](d)
    return _poisoned(_kept_when_empty(step) if d.spec.lag_token else step)


def _poisoned(step: ChunkStep) -> ChunkStep:
    """Non-finite inputs, causally. The loader replaces a row's non-finite k, v or gate
    (log_alpha -inf is a decay to 0, not an error) by padding and marks `tainted` [T, 1] the rows
    from the first such row on, and `qbad` the rows with a non-finite q: those rows read NaN, as
    does the new state after a tainted chunk, and a step whose state holds a NaN passes it on to
    all its rows and its new state (a retention map's or activation's `where` would turn it
    into a finite value). The rows before compute on finite values only, as if the rest of the
    sequence were finite; the selection keeps their gradients finite too."""
    gr = step.graph
    tainted, qbad = gr.const("tainted", ("T", 1), "tainted"), gr.const("qbad", ("T", 1), "qbad")
    nan = gr.const("nanfill", (1, 1), "nanfill")
    counts = [gr.add("nonfinite", (1, 1), (s,)) for s in step.states]
    inherited = ew(gr, lambda *c: sp.Add(*c), *counts, name="inherited")
    spoiled = ew(gr, lambda a, b: a + b, gr.sum(tainted, 0), inherited, name="spoiled")

    def poison(flag, x, name):
        return ew(gr, lambda f, n, a: sp.Piecewise((n, f > 0), (a, True)), flag, nan, x, name=name)

    bad_rows = ew(gr, lambda a, b, c: a + b + c, tainted, qbad, inherited, name="bad_rows")
    outputs = {"o": poison(bad_rows, step.outputs["o"], "o_out")}
    outputs |= {s: poison(spoiled, step.outputs[s], f"{s}_out") for s in step.states}
    return ChunkStep(gr, step.gates, step.states, outputs, step.params)


def _kept_when_empty(step: ChunkStep) -> ChunkStep:
    """With a lag token, a chunk of one token leaves its second segment without rows. That step
    must keep the states, but a proximal retention's map (a soft threshold, a softmax) would
    apply once more: every new state is the old one where the step has no rows."""
    gr = step.graph
    rows = gr.sum("rowmask", 0, name="rows")
    kept = {s: ew(gr, lambda n, new, old: sp.Piecewise((new, n > 0), (old, True)), rows,
                  step.outputs[s], s, name=f"{s}_kept") for s in step.states}
    return ChunkStep(gr, step.gates, step.states, step.outputs | kept, step.params)


def separable(step: ChunkStep, dim: str = "DV") -> bool:
    """Whether the forward step never mixes entries along `dim`: no sum or max over it, no dot
    contracting it. Then blocks of `dim` columns run apart (one program each), and only the
    gradients of inputs without `dim` are partial sums over the blocks."""
    graph = step.graph
    if any(dim not in graph.shape(s) for s in (*step.states, *step.params)):
        return False  # a tile without the dim would be written whole by every block
    return not any(_folds(graph, n, dim) for n in plan(graph, list(step.outputs.values())))


def _folds(graph: Graph, n: str, dim: str) -> bool:
    """Whether node n combines entries along its input's `dim`: a sum or max over it, or a dot
    contracting it."""
    node = graph.node(n)
    if node["op"] in ("sum", "max"):
        return graph.shape(node["inputs"][0])[node["axis"]] == dim
    if node["op"] == "gdot":
        return graph.shape(node["inputs"][0])[1] == dim
    if node["op"] == "nonfinite":  # a block of DV columns counts its own: they run apart
        return dim != "DV" and dim in graph.shape(node["inputs"][0])
    return node["op"] == "dot" and graph.shape(node["inputs"][0])[0 if node["ta"] else 1] == dim


def step_adjoint(step: ChunkStep) -> tuple[dict[str, str], tuple[str, ...], dict[str, str | None]]:
    """Reverse mode through a chunk step: the cotangent inputs d_o and d<state>_new seed o and
    every new state. Returns (seeds, wrt: q, k, v, the states, gates and params in kernel argument
    order, the gradient node of each, None where it is zero)."""
    graph = step.graph
    seeds = {step.outputs["o"]: graph.input("d_o", ("T", "DV"))}
    for state in step.states:
        seeds[step.outputs[state]] = graph.input(f"d{state}_new", graph.shape(step.outputs[state]))
    wrt = ("q", "k", "v", *step.states, *step.gates, *step.params)
    return seeds, wrt, backward(graph, seeds, wrt)


def evaluate(graph: Graph, values: dict, sizes: dict, nodes=None) -> dict:
    """Run the graph (or the `nodes` of a `plan`, in order) on torch tiles [..., rows, cols] with
    any leading batch dims: the oracle for the emitted code and the reverse mode, and the CPU
    path (`mirasc.torch_chunk`). `values` holds the input and const nodes needed; `sizes` the
    kernel constants (e.g. {"T": 64, "DV": 5})."""
    import torch

    from mirasc.expr import to_torch

    env = dict(values)
    constants = {sp.Symbol(n, positive=True): v for n, v in sizes.items()}
    like = next(iter(values.values()))
    for n in graph.order() if nodes is None else nodes:
        if n in env:
            continue
        node = graph.node(n)
        x = [env[i] for i in node["inputs"]]
        op = node["op"]
        if op == "dot":
            a = x[0].transpose(-1, -2) if node["ta"] else x[0]
            b = x[1].transpose(-1, -2) if node["tb"] else x[1]
            out = a @ b
        elif op == "ew":
            scope = dict(zip(node["symbols"], x, strict=True)) | constants
            out = to_torch(node["expr"], scope)
            if not isinstance(out, torch.Tensor):
                out = like.new_full((1, 1), float(out))
        elif op == "sum":
            out = x[0].sum(node["axis"] - 2, keepdim=True)
        elif op == "nonfinite":
            out = (~torch.isfinite(x[0])).sum((-2, -1), keepdim=True).to(x[0].dtype)
        elif op == "max":  # a stabiliser: no gradient flows through it
            out = x[0].amax(node["axis"] - 2, keepdim=True).detach()
        elif op == "cumsum":
            out = x[0].cumsum(-2)
        elif op == "revcumsum":
            out = x[0].flip(-2).cumsum(-2).flip(-2)
        elif op == "trans":
            out = x[0].transpose(-1, -2)
        elif op == "gdot":
            out = torch.einsum("...td,...id,...tid->...ti", x[0], x[1], _pair_decays(*x[2:], node))
        elif op == "gmix":
            pattern = "...ti,...id,...tid->...td" if not node["ta"] else "...ti,...td,...tid->...id"
            out = torch.einsum(pattern, x[0], x[1], _pair_decays(*x[2:], node))
        elif op == "tri_inv":  # (I + A)^-1, A strictly lower triangular
            eye = torch.eye(x[0].shape[-1], dtype=x[0].dtype, device=x[0].device)
            out = torch.linalg.solve_triangular(eye + x[0], eye.expand_as(x[0]), upper=False,
                                                unitriangular=True)
        else:  # broadcast
            dims = [1 if d == 1 else sizes[d] for d in node["shape"]]
            out = x[0].expand(*x[0].shape[:-2], *dims)
        env[n] = out
    return env


def _pair_decays(ga, gb, node):
    """E [..., t, i, d] = exp(ga_td - gb_id) for t - i >= offset, else 0; the exponent is
    selected before exp, so the masked pairs never overflow."""
    import torch

    ga, gb = torch.broadcast_tensors(ga, gb)
    rows = torch.arange(ga.shape[-2], device=ga.device)
    pairs = rows[:, None] - rows[None, :] >= node["offset"]
    diff = ga.unsqueeze(-2) - gb.unsqueeze(-3)
    return torch.where(pairs[:, :, None], diff, diff.new_tensor(float("-inf"))).exp()


def plan(graph: Graph, targets, stop=()) -> tuple[str, ...]:
    """The nodes `targets` depend on, in topological order (what `evaluate` must run); a node in
    `stop` is taken as given (its inputs are not needed for it)."""
    keep, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            if n not in stop:
                todo.extend(graph.g.predecessors(n))
    return tuple(n for n in graph.order() if n in keep)


@dataclass(frozen=True)
class Loop:
    """One pass over the blocks of a dimension: `nodes` are recomputed for each block (tiles with
    the dim, from the states and values ready before the pass), `reduce` are reductions over the
    dim summed (or maxed) across the blocks, `store` the blocked targets written per block."""

    nodes: tuple[str, ...]
    reduce: tuple[str, ...]
    store: tuple[str, ...]


@dataclass(frozen=True)
class Stream:
    """A chunk step run over blocks of a dimension, one block at a time: `whole[j]` are the nodes
    without the dim computed before `loops[j]` (`whole[-1]` after the last)."""

    whole: tuple[tuple[str, ...], ...]
    loops: tuple[Loop, ...]


def stream(graph: Graph, targets, dim: str = "DH", stop=()) -> Stream | None:
    """The step of `targets` as passes over blocks of `dim`, so that a program holds one block of
    each tile with `dim` at a time (an MLP memory's hidden units): a tile reduced over `dim` is
    complete only after a pass, so whatever depends on it waits for the next pass, which
    recomputes the blocked tiles it needs; a tile without `dim` waits for the part before its
    first reader. None when some tile has `dim` twice or a node mixes `dim` otherwise than by
    these reductions; `stop` as for `plan`."""
    nodes = plan(graph, targets, stop)
    blocked = {n for n in nodes if dim in graph.shape(n)}
    if any(graph.shape(n).count(dim) > 1 for n in blocked):
        return None
    ready: dict[str, int] = {}  # the pass from which a node's value (or a block of it) exists
    reductions = []  # tiles without `dim` computed from tiles with it: complete after a pass
    for n in nodes:
        inputs = () if n in stop else graph.node(n)["inputs"]
        ready[n] = max((ready[i] for i in inputs), default=0)
        if n not in blocked and any(i in blocked for i in inputs):
            if not _folds(graph, n, dim):
                return None
            ready[n] += 1
            reductions.append(n)
    stores = [t for t in dict.fromkeys(targets) if t in blocked]
    last = max([ready[n] - 1 for n in reductions] + [ready[t] for t in stores], default=-1)
    loops = []
    for j in range(last + 1):
        reduce = tuple(n for n in reductions if ready[n] == j + 1)
        store = tuple(t for t in stores if ready[t] == j)
        need, todo = set(), [*store, *(i for n in reduce for i in graph.node(n)["inputs"])]
        while todo:  # the blocked tiles these use, back to the states and the ready values
            n = todo.pop()
            if n in blocked and n not in need:
                need.add(n)
                todo.extend(graph.node(n)["inputs"])
        loops.append(Loop(tuple(n for n in nodes if n in need), reduce, store))
    # A tile without the dim is computed (or loaded) in the last whole part before its first
    # reader, so that it holds no registers across passes that do not read it; one no node
    # reads (a target) as soon as it is ready.
    first = {n: min(j for j, loop in enumerate(loops) if n in loop.nodes) for n in blocked}
    first |= {n: ready[n] - 1 for n in reductions}
    for n in reversed(nodes):
        if n not in first:
            readers = [c for c in graph.g.successors(n) if c in first and c not in stop]
            first[n] = min((first[c] for c in readers), default=ready[n])
    whole = tuple(tuple(n for n in nodes if n not in blocked and n not in reductions
                        and first[n] == j) for j in range(last + 2))
    return Stream(whole, tuple(loops))
