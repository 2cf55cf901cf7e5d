"""A second oracle for mirasc, sharing no code with it: the losses are the paper's formulas (or a
spec's expression walked from Python's `ast` straight into torch), the inner gradient is
torch.autograd.grad of that loss through the memory's forward, and the recurrence is restated
from the paper's chunk form (PAPER_NOTES.md §5) with explicit sums over the chunk's tokens.

Per chunk [s, e) with dual state Z_s (the memory W itself for L2 / no retention, the proximal
elastic net's W): W_s = phi^-1(Z_s), D(i, t) = alpha_i ... alpha_t,
    g_i = grad_W l(M_W(k_i) - v_i) at W = W_s (grad_at previous) or phi^-1(D(s, i) Z_s) (retained)
          (a window of c tokens, Atlas's Omega rule: sum_(j=i-c+1..i, j>=0) gamma_j grad_W
          l(M_W(k_j) - v_j) at i's W, the window reaching back before s)
    u_i = eta_i g_i (key) | g_i (eta_at query) | S_i = m_i S_(i-1) + eta_i g_i (momentum)
          | eta_i NS_k(S_i), S_i = m_i S_(i-1) + g_i (muon; apply: chunk: at i = e-1 only, else 0)
    P_t = D(s, t) W_s - step_t,   step_t = [eta_t] sum_(s<=i<=t) D(i+1, t) u_i
    Z_e = D(s, e-1) Z_s - step_(e-1), and o_t = M_(P_t)(q_t) (the chunk's last row reads phi^-1(Z_e)).
Chunk size 1 is the token recurrence; with a lag token each chunk's first token is a chunk alone.
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict

import torch

NORM_EPS = 1e-12  # ||r|| = sqrt(sum_j r_j^2 + 1e-12), the spec language's convention


class Tally:
    """For each where() met, the count of entries on its first branch and the count of all."""

    def __init__(self):
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def where(self, name: str, cond: torch.Tensor, a, b):
        cond = torch.broadcast_to(cond, torch.broadcast_shapes(cond.shape, *(
            x.shape for x in (a, b) if isinstance(x, torch.Tensor))))
        self.counts[name][0] += int(cond.sum())
        self.counts[name][1] += cond.numel()
        return torch.where(cond, a, b)

    def shares(self) -> dict[str, float]:
        """The share of entries on the first branch of each where()."""
        return {name: first / total for name, (first, total) in self.counts.items()}


# ---- expressions: spec text -> torch by walking Python's syntax tree -----------------------------


FUNCTIONS = {"abs": torch.abs, "sign": torch.sign, "sqrt": torch.sqrt, "exp": torch.exp,
             "log": torch.log, "tanh": torch.tanh, "sinh": torch.sinh, "cosh": torch.cosh,
             "atan": torch.atan, "erf": torch.erf, "sigmoid": torch.sigmoid,
             "softplus": lambda x: torch.logaddexp(x, torch.zeros_like(x))}


def evaluate(text: str, env: dict, tally: Tally):
    """The expression `text` (the spec grammar: numbers, names, + - * / **, < <= > >=, calls) on
    the tensors of `env`; where(c, a, b) is counted in `tally`."""
    compare = {ast.Lt: torch.lt, ast.LtE: torch.le, ast.Gt: torch.gt, ast.GtE: torch.ge}
    binary = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
              ast.Pow: lambda a, b: a ** b}

    def walk(node):
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return math.pi if node.id == "pi" else env[node.id]
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp):
            return binary[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Compare):
            left, right = walk(node.left), walk(node.comparators[0])
            left = left if isinstance(left, torch.Tensor) else torch.tensor(left)
            return compare[type(node.ops[0])](left, right)
        if isinstance(node, ast.Call) and node.func.id == "where":
            cond, a, b = (walk(arg) for arg in node.args)
            like = next(x for x in (a, b, env["r"]) if isinstance(x, torch.Tensor))
            a, b = (x if isinstance(x, torch.Tensor) else like.new_tensor(x) for x in (a, b))
            return tally.where(ast.unparse(node.args[0]), cond, a, b)
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](walk(node.args[0]))
        raise TypeError(f"not in the spec grammar: {ast.unparse(node)}")

    return walk(ast.parse(text.strip(), mode="eval").body)


# ---- the attentional biases, from the paper (PAPER_NOTES.md §1, DESIGN.md §2) --------------------


def _huber(a, delta, tally, name):
    """H(a) = a^2 / 2 if |a| <= delta, else delta (|a| - delta / 2)."""
    return tally.where(name, a.abs() <= delta, a.square() / 2, delta * (a.abs() - delta / 2))


def builtin_loss(bias, r, v, rnorm, delta, tally: Tally):
    """The paper's l(r) = sum_j f(r_j) + h(||r||) for a built-in bias, as (f(r_j), h(||r||))."""
    kind = bias.kind
    if kind == "dot_product":  # -<M(k), v> with M(k) = r + v
        return -(r + v) * v, 0.0
    if kind == "l2":
        return r.square() / 2, 0.0
    if kind == "lp":  # ||r||_p^p
        return r.abs() ** bias.p, 0.0
    if kind == "robust":  # 1/2 ||r||^2 + Delta ||r|| (+ Delta^2 / 2, no gradient)
        return r.square() / 2, delta * rnorm
    if bias.variant == "coordinate":
        return _huber(r, delta, tally, "huber |r_j| <= delta"), 0.0
    if bias.variant == "norm":
        return 0.0, _huber(rnorm, delta, tally, "huber ||r|| <= delta")
    # switch (Yaad, eq. 26): the l2 step while ||r|| <= delta, else delta times the l1 step
    return tally.where("yaad ||r|| <= delta", rnorm <= delta, r.square() / 2, delta * r.abs()), 0.0


def loss(bias, r, v, delta, tally: Tally):
    """sum over (batch, head, value channel) of f(r_j) plus sum over (batch, head) of h(||r||)."""
    rnorm = (r.square().sum(-1, keepdim=True) + NORM_EPS).sqrt()
    if bias.kind == "expression":
        env = {"r": r, "v": v, "rnorm": rnorm, "delta": delta, **bias.params}
        elem, norm = evaluate(bias.loss, env, tally), evaluate(bias.norm_loss, env, tally)
    else:
        elem, norm = builtin_loss(bias, r, v, rnorm, delta, tally)
    return (torch.zeros_like(r) + elem).sum() + (torch.zeros_like(rnorm) + norm).sum()


def bias_gradient(bias, r, v, delta, tally: Tally, create_graph: bool):
    """g = dl/dr by autograd of `loss`; a smoothed bias is the paper's surrogate of the formula
    for g instead (Remark §5.4): lp's p tanh(T r) (r^2 + eps)^((p - 1) / 2)."""
    if getattr(bias, "smooth", False):
        if bias.kind != "lp":
            raise NotImplementedError("the paper states the smoothed gradient of lp only")
        return bias.p * torch.tanh(bias.temperature * r) * (r.square() + bias.eps) ** ((bias.p - 1) / 2)
    leaf = r if r.requires_grad else r.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss(bias, leaf, v, delta, tally), leaf, create_graph=create_graph)
    return g


# ---- retention: the read map W = phi^-1(Z) (PAPER_NOTES.md §2) -----------------------------------

MIRROR_INVERSES = {  # (f')^-1 for potentials the tests use, by hand
    "w*log(w) - w": torch.exp,
    "w**4": lambda z: torch.sign(z) * (z.abs() / 4) ** (1 / 3),
}


def _slices(z: torch.Tensor, axis: str) -> tuple[int, ...]:
    """The dims of one slice of a per-head tensor z [B, H, ...] (a 1-D tensor is one slice)."""
    if z.dim() == 3:
        return (-1,)
    return {"matrix": (-2, -1), "row": (-1,), "column": (-2,)}[axis]


def read_map(ret, z: torch.Tensor, tally: Tally) -> torch.Tensor:
    """W = phi^-1(Z) for one memory tensor."""
    kind = ret.kind
    if kind in ("none", "l2"):
        return z
    if kind == "lq":  # W = A / ||A||_q^(q-2) (eq. 24), or the p-norm link sign(A)|A|^(q-1) / ...
        dims = _slices(z, ret.scope)
        norm = (z.abs().pow(ret.q).sum(dims, keepdim=True) + ret.eps).pow(1 / ret.q)
        top = z if ret.link == "scale" else torch.sign(z) * z.abs().pow(ret.q - 1)
        return top / norm.pow(ret.q - 2)
    if kind == "kl":  # W = c softmax(Z) over each slice (eq. 21)
        dims = _slices(z, ret.axis)
        shifted = z - z.amax(dims, keepdim=True).detach()
        e = shifted.exp()
        return ret.scale * e / e.sum(dims, keepdim=True)
    if kind == "elastic_net":  # S_gamma(z) = sign(z) max(0, |z| - gamma), or the smooth surrogate
        if ret.smooth:
            return z.abs() * torch.atan(z / ret.gamma) / (math.pi / 2)
        kept = tally.where("elastic net |z| > gamma", z.abs() > ret.gamma, z, torch.zeros_like(z))
        return kept - ret.gamma * torch.sign(kept)
    if kind == "mirror":
        return MIRROR_INVERSES[ret.potential](z)
    raise NotImplementedError(kind)


def dual(ret) -> bool:
    """Whether the state carries the dual variable Z (else it carries W: proximal elastic net)."""
    return not (ret.kind == "elastic_net" and ret.form == "proximal")


# ---- the memory ---------------------------------------------------------------------------------

ACTIVATIONS = {
    "gelu": lambda x: x * (1 + torch.erf(x / math.sqrt(2))) / 2,
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": lambda x: x.clamp_min(0),
    "tanh": torch.tanh,
}


def forward(mem, weights, x, ln, read: bool = False):
    """M_W(x) for x [B, H, Dk]: weights [B, H, out, in] per layer (vector: [B, H, D]), then the
    biases [B, H, out]; ln = (weight, bias) [H, Dv] of an affine layer norm."""
    layers = mem.depth if mem.kind == "mlp" else 1
    biases = weights[layers:] if mem.bias else [None] * layers
    y = x
    for i in range(layers):
        w = weights[i]
        y = w * y if mem.kind == "vector" else (w @ y.unsqueeze(-1)).squeeze(-1)
        if biases[i] is not None:
            y = y + biases[i]
        if i < layers - 1:
            y = ACTIVATIONS[mem.activation](y)
    z = y
    norm = mem.norm
    if norm is not None:
        centred = y - y.mean(-1, keepdim=True)
        y = centred / (centred.square().mean(-1, keepdim=True) + norm.eps).sqrt()
        if ln is not None:
            y = y * ln[0] + ln[1]
    if mem.residual:
        y = (z if read and mem.read_residual == "output" else x) + y
    return y


def inner_grad(spec, point, k, v, delta, ln, tally: Tally):
    """grad_W l(M_W(k) - v) at W = `point`: autograd's vjp of the memory with g = dl/dr, per batch
    and head (their losses are separate). Differentiable when the point or inputs need grads."""
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = tuple(p if p.requires_grad else p.detach().requires_grad_() for p in point)
        r = forward(spec.memory, leaves, k, ln) - v
        g = bias_gradient(spec.bias, r, v, delta, tally, create_graph=outer)
        grads = torch.autograd.grad(r, leaves, grad_outputs=g, create_graph=outer)
    return grads if outer else tuple(x.detach() for x in grads)


# ---- the recurrence -----------------------------------------------------------------------------


def _gate(x, t: int, like: torch.Tensor):
    """Gate x [B, H, T] or [B, H, T, D] (a channel gate on the input dim) at token t, broadcast
    onto like [B, H, ...]; a constant as is; None as None."""
    if x is None or not isinstance(x, torch.Tensor):
        return x
    x = x[:, :, t]
    if x.dim() == 2:
        return x.reshape(*x.shape, *([1] * (like.dim() - 2)))
    return x.reshape(*x.shape[:2], *([1] * (like.dim() - 3)), x.shape[-1])


def _bounds(length: int, chunk: int, lag: bool) -> list[tuple[int, int]]:
    spans = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        spans += [(s, s + 1), (s + 1, e)] if lag and e - s > 1 else [(s, e)]
    return spans


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's orthogonalisation of each [B, H] matrix: on the orientation with no more rows than
    columns, X_0 = X / (||X||_F + 1e-7), X_(j+1) = p(X_j X_j^T) X_j with p(A) = 3.4445 I - 4.775 A
    + 2.0315 A^2; a vector x / (||x|| + 1e-7)."""
    if x.dim() == 3:
        return x / (x.square().sum(-1, keepdim=True).sqrt() + 1e-7)
    if x.shape[-2] > x.shape[-1]:
        return newton_schulz(x.transpose(-1, -2), steps).transpose(-1, -2)
    y = x / (x.square().sum((-2, -1), keepdim=True).sqrt() + 1e-7)
    eye = torch.eye(y.shape[-2], dtype=y.dtype)
    for _ in range(steps):
        a = torch.einsum("bhik,bhjk->bhij", y, y)
        y = torch.einsum("bhij,bhjk->bhik", 3.4445 * eye - 4.775 * a + 2.0315 * (a @ a), y)
    return y


def run(spec, q, k, v, *, log_alpha=None, eta=None, delta=None, momentum=None,
        window_weight=None, ln_weight=None, ln_bias=None, initial_state, chunk_size: int | None,
        tally: Tally | None = None):
    """o [B, T, H, Dv] and the final state tuple (memory tensors, then momentum) for the op's
    inputs ([B, T, H, D], gates [B, T, H(, D)]); chunk_size None is the token recurrence."""
    tally = tally or Tally()
    heads_first = lambda x: x if x is None else x.transpose(1, 2)  # noqa: E731
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    given = {"log_alpha": log_alpha, "eta": eta, "delta": delta, "momentum": momentum,
             "window_weight": window_weight}
    window = spec.bias.window
    gates = {}
    for name, gate in (("log_alpha", getattr(spec.retention, "decay", None)),
                       ("eta", getattr(spec.learner, "eta", None)),
                       ("delta", getattr(spec.bias, "delta", None)),
                       ("momentum", getattr(spec.learner, "momentum", None)),
                       ("window_weight", None if window is None else window.weight)):
        if gate is not None:
            x = gate.value if gate.value is not None else heads_first(given[name])
            gates[name] = x.exp() if name == "log_alpha" and isinstance(x, torch.Tensor) else x
    ln = None if ln_weight is None else (ln_weight, ln_bias)
    ret, learner = spec.retention, spec.learner
    layers = (spec.memory.depth if spec.memory.kind == "mlp" else 1) * (1 + spec.memory.bias)
    z, mom = tuple(initial_state[:layers]), tuple(initial_state[layers:])
    by_query = learner.kind == "gd" and learner.eta_at == "query"
    length = q.shape[2]

    def phi_inv(state):
        return tuple(read_map(ret, x, tally) for x in state) if dual(ret) else state

    def decay(a: int, b: int, state):
        """D(a, b) applied: alpha_a ... alpha_b (the identity when a > b)."""
        for i in range(a, b + 1):
            state = tuple(x if gates.get("log_alpha") is None else x * _gate(gates["log_alpha"], i, x)
                          for x in state)
        return state

    outputs = []
    for s, e in _bounds(length, chunk_size or 1, spec.lag_token):
        w_s = phi_inv(z)
        updates = []
        for t in range(s, e):
            point = w_s if learner.grad_at == "previous" else phi_inv(decay(s, t, z))
            g = tuple(torch.zeros_like(x) for x in point)
            for j in range(max(0, t - (1 if window is None else window.size) + 1), t + 1):
                d_j = _gate(gates.get("delta"), j, v[:, :, 0]) if "delta" in gates else None
                g_j = inner_grad(spec, point, k[:, :, j], v[:, :, j], d_j, ln, tally)
                gamma = gates.get("window_weight")
                g = tuple(a + (b if gamma is None else _gate(gamma, j, b) * b)
                          for a, b in zip(g, g_j, strict=True))
            if learner.kind == "momentum":
                mom = tuple(_gate(gates["momentum"], t, m) * m + _gate(gates["eta"], t, x) * x
                            for m, x in zip(mom, g, strict=True))
                updates.append(mom)
            elif learner.kind == "muon":
                mom = tuple(_gate(gates["momentum"], t, m) * m + x
                            for m, x in zip(mom, g, strict=True))
                applied = learner.apply == "token" or t == e - 1
                updates.append(tuple(_gate(gates["eta"], t, m) * newton_schulz(m, learner.ns_steps)
                                     if applied else torch.zeros_like(m) for m in mom))
            else:
                updates.append(g if by_query else tuple(_gate(gates["eta"], t, x) * x for x in g))
            step = updates[-1]
            for i in range(s, t):
                step = tuple(a + b for a, b in zip(step, decay(i + 1, t, updates[i - s]), strict=True))
            if by_query:
                step = tuple(_gate(gates["eta"], t, x) * x for x in step)
            if t < e - 1:
                primal = tuple(a - b for a, b in zip(decay(s, t, w_s), step, strict=True))
            else:
                end = tuple(a - b for a, b in zip(decay(s, t, z), step, strict=True))
                z = end if dual(ret) else tuple(read_map(ret, x, tally) for x in end)
                primal = phi_inv(z)
            outputs.append(forward(spec.memory, primal, q[:, :, t], ln, read=True))
    o = torch.stack(outputs, 2) if outputs else v[:, :, :0]
    return o.transpose(1, 2), z + mom


# ---- checking an op against the oracle ----------------------------------------------------------


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; infinite when either holds a NaN or an infinity."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.inf
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale or 1.0)


def _outputs_and_grads(fn, inputs: dict, seed: int) -> dict[str, torch.Tensor]:
    """o, the final states and the gradient of every input under <o, do> + sum <S, dS> (random
    cotangents drawn from `seed`)."""
    leaves = {name: tuple(s.detach().clone().requires_grad_() for s in x) if isinstance(x, tuple)
              else x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o, final = fn(leaves)
    gen = torch.Generator().manual_seed(seed)
    objective = sum((y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
                    for y in (o, *final))
    flat = [(f"d{name}[{i}]" if isinstance(x, tuple) else f"d{name}", leaf) for name, x in
            leaves.items() for i, leaf in (enumerate(x) if isinstance(x, tuple) else [(0, x)])]
    grads = torch.autograd.grad(objective, [leaf for _, leaf in flat], allow_unused=True)
    out = {"o": o.detach()} | {f"final_state[{i}]": s.detach() for i, s in enumerate(final)}
    return out | {name: torch.zeros_like(leaf) if g is None else g
                  for (name, leaf), g in zip(flat, grads, strict=True)}


def errors_against_oracle(subject, spec, inputs: dict, chunk_size: int | None, seed: int = 7,
                          tally: Tally | None = None) -> dict[str, float]:
    """Relative errors of subject(**inputs, output_final_state=True) against the oracle (float64
    inputs): the output, every final state and every input's gradient."""
    got = _outputs_and_grads(lambda x: subject(**x, output_final_state=True), inputs, seed)
    want = _outputs_and_grads(lambda x: run(spec, **x, chunk_size=chunk_size, tally=tally),
                              inputs, seed)
    assert set(got) == set(want)
    return {name: relative_error(got[name], want[name]) for name in want}
