"""The oracle: a slow, plain PyTorch statement of a spec's recurrence, token by token.

For token t (per batch and head), with the state carrying Z (the retention's dual variable):
    W = phi^-1(Z_{t-1}),  r = M_W(k_t) - v_t,  grad_t = dl/dW = vjp of M_W(k_t) with g(r)
    (with bias.window of c tokens: grad_t = sum_(i=t-c+1..t, i >= 0) gamma_i dl(M_W(k_i), v_i)/dW)
    U_t = eta_t grad_t (GD) or S_t = m_t S_{t-1} + eta_t grad_t (momentum)
    or S_t = m_t S_{t-1} + grad_t, U_t = eta_t NS_k(S_t) (muon: `newton_schulz` per memory tensor)
    Z_t = alpha_t Z_{t-1} - U_t,   o_t = M_{phi^-1(Z_t)}(q_t)
W stands for every tensor of the memory (the weights, then the biases with `memory.bias`).
`chunked` is the same recurrence with mini-batch gradients at each chunk's start state (the form
the kernels compute); with chunk_size 1 it is the token recurrence. Muon's `apply: chunk` exists
in the chunked form only: one U = eta_e NS_k(S_e) per chunk, at its last token e. Autograd gives
the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mirasc.derive import DELTA, NS_COEFFICIENTS, NS_EPS, RNORM, RNORM_EPS, Derivation, R, V, Z
from mirasc.expr import to_torch

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


@dataclass
class Inputs:
    """Head-major views of the op's inputs: q, k [B,H,T,Dk], v [B,H,T,Dv]; gates [B,H,T(,D)];
    `ln` the affine layer norm's (ln_weight, ln_bias) [H, Dv], None for the identity."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: dict[str, torch.Tensor | float]
    ln: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_op(cls, d: Derivation, q, k, v, gates: dict[str, torch.Tensor | None],
                ln: tuple[torch.Tensor, torch.Tensor] | None = None) -> Inputs:
        values: dict[str, torch.Tensor | float] = {}
        for name, gate in d.op_gates().items():
            if gate.value is not None:
                values[name] = gate.value
            else:
                values[name] = gates[name].transpose(1, 2)
        if "log_alpha" in values:  # the decay enters the reference as alpha = exp(log_alpha)
            alpha = values.pop("log_alpha")
            values["alpha"] = alpha.exp() if isinstance(alpha, torch.Tensor) else alpha
        return cls(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), values, ln)

    def gate(self, name: str, t: int, like: torch.Tensor):
        """Gate `name` at token t shaped to broadcast onto `like` ([B,H,...]); a channel-wise gate
        runs along the last (input) dimension. None when the spec has no such gate."""
        g = self.gates.get(name)
        if g is None or isinstance(g, float):
            return g
        g = g[:, :, t]
        if g.dim() == 2:
            return g.reshape(*g.shape, *([1] * (like.dim() - 2)))
        return g.reshape(*g.shape[:2], *([1] * (like.dim() - 3)), g.shape[-1])


# ---- the memory ------------------------------------------------------------------------------


def memory_apply(d: Derivation, weights: tuple[torch.Tensor, ...], x: torch.Tensor,
                 ln: tuple[torch.Tensor, torch.Tensor] | None = None, read: bool = False):
    """M_W(x) for x [B,H,Dk]: `weights` holds the per-layer weights [B,H,out,in] (a vector memory:
    [B,H,D]) then, with memory.bias, the per-layer biases [B,H,out]; `ln` the layer norm's affine
    (ln_weight, ln_bias) [H, Dv]. With `read` and read_residual 'output' the skip connection
    carries the pre-norm output z instead of x: o = z + LN(z)."""
    mem = d.spec.memory
    layers = len(weights) // 2 if mem.bias else len(weights)
    biases = weights[layers:]
    if mem.kind == "vector":
        y = weights[0] * x
        y = y + biases[0] if biases else y
    else:
        y = x
        for i, w in enumerate(weights[:layers]):
            y = torch.einsum("bhoi,bhi->bho", w, y)
            y = y + biases[i] if biases else y
            if i < layers - 1:
                y = ACTIVATIONS[mem.activation](y)
    z = y
    norm = mem.norm
    if norm is not None:
        y = F.layer_norm(y, y.shape[-1:], eps=norm.eps)
        y = y if ln is None else y * ln[0] + ln[1]
    if not mem.residual:
        return y
    return (z if read and mem.read_residual == "output" else x) + y


def memory_shapes(d: Derivation, dk: int, dv: int) -> list[tuple[int, ...]]:
    """The per-head shapes of the memory's tensors: the weights, then the biases."""
    mem = d.spec.memory
    if mem.kind == "matrix":
        shapes = [(dv, dk)]
    elif mem.kind == "vector":
        shapes = [(dk,)]
    else:
        hidden = mem.expansion * dk
        widths = [dk] + [hidden] * (mem.depth - 1) + [dv]
        shapes = [(widths[i + 1], widths[i]) for i in range(mem.depth)]
    return shapes + ([(s[0],) for s in shapes] if mem.bias else [])


def residual_norm(r: torch.Tensor) -> torch.Tensor:
    """rnorm = sqrt(||r||^2 + 1e-12) over the value channels, kept as a trailing dim of 1."""
    return (r.square().sum(-1, keepdim=True) + RNORM_EPS).sqrt()


def bias_grad(d: Derivation, r, v, delta) -> torch.Tensor:
    """g = dl/dr for r, v [B,H,Dv] (delta broadcastable), evaluating the sympy rule directly."""
    env = {R: r, V: v, RNORM: residual_norm(r), DELTA: delta}
    return torch.zeros_like(r) + to_torch(d.bias.elem, env) + to_torch(d.bias.norm, env) * r


def memory_grad(d: Derivation, weights, k, v, delta, g=bias_grad,
                ln=None) -> tuple[torch.Tensor, ...]:
    """grad_W l(M_W(k), v) per memory tensor: the vjp of the memory with the bias gradient g."""
    out, pullback = torch.func.vjp(lambda *w: memory_apply(d, w, k, ln), *weights)
    return pullback(g(d, out - v, v, delta))


def window_grad(d: Derivation, inputs: Inputs, t: int, weights, g=bias_grad):
    """grad_t at `weights`: token t's gradient of the bias, or with bias.window of c tokens the
    sum over i = t-c+1..t (not before the sequence's first token) of gamma_i times token i's."""
    window = d.spec.bias.window
    size = 1 if window is None else window.size
    total = None
    for i in range(max(0, t - size + 1), t + 1):
        k, v = inputs.k[:, :, i], inputs.v[:, :, i]
        grads = memory_grad(d, weights, k, v, inputs.gate("delta", i, v), g, inputs.ln)
        if window is not None and window.weight is not None:
            grads = tuple(x * inputs.gate("window_weight", i, x) for x in grads)
        total = grads if total is None else tuple(a + b for a, b in zip(total, grads, strict=True))
    return total


# ---- retention --------------------------------------------------------------------------------


def _scope_dims(scope: str, w: torch.Tensor) -> tuple[int, ...]:
    if w.dim() == 3:
        return (-1,)
    return {"matrix": (-2, -1), "row": (-1,), "column": (-2,)}[scope]


def read(d: Derivation, z: torch.Tensor) -> torch.Tensor:
    """W = phi^-1(Z) for one layer's dual variable."""
    ret, rule = d.spec.retention, d.retention
    if rule.kind in ("none", "l2"):
        return z
    if rule.kind == "lq":
        dims = _scope_dims(ret.scope, z)
        norm = (z.abs().pow(ret.q).sum(dims, keepdim=True) + ret.eps).pow(1.0 / ret.q)
        core = z if ret.link == "scale" else z.sign() * z.abs().pow(ret.q - 1)
        return core / norm.pow(ret.q - 2)
    if rule.kind == "kl":
        dims = _scope_dims(ret.axis, z)
        flat = z.flatten(-len(dims)) if len(dims) == 2 else z.movedim(dims[0], -1)
        soft = ret.scale * flat.softmax(-1)
        return soft.reshape(z.shape) if len(dims) == 2 else soft.movedim(-1, dims[0])
    return to_torch(rule.elementwise, {Z: z})


def _decay(inputs: Inputs, t: int, zs: tuple[torch.Tensor, ...]):
    return tuple(z if (a := inputs.gate("alpha", t, z)) is None else z * a for z in zs)


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """NS_k(X) per [B, H] of a matrix [B, H, m, n]: X / (||X||_F + eps), then k steps
    X <- a X + (b A + c A^2) X, A = X X^T (on X^T when m > n: the smaller Gram matrix). A vector
    [B, H, d] (the vector memory's w, a bias) is a one-row matrix, whose polar factor the
    iteration approaches is x / ||x||: it is normalised, and the iteration not run."""
    if x.dim() == 3:
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + NS_EPS)
    tall = x.shape[-2] > x.shape[-1]
    y = x.mT if tall else x
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if tall else y


def _learn(d: Derivation, inputs: Inputs, t: int, grads, momentum, apply: bool = True):
    """The learner: U_t = eta_t grad_t, or S_t = m_t S_{t-1} + eta_t grad_t with U_t = S_t, or
    (muon) S_t = m_t S_{t-1} + grad_t with U_t = eta_t NS_k(S_t), 0 where not `apply`."""
    learner = d.spec.learner
    if learner.kind == "muon":
        momentum = tuple(inputs.gate("momentum", t, s) * s + g
                         for s, g in zip(momentum, grads, strict=True))
        if not apply:
            return tuple(torch.zeros_like(s) for s in momentum), momentum
        return tuple(newton_schulz(s, learner.ns_steps) * inputs.gate("eta", t, s)
                     for s in momentum), momentum
    steps = tuple(g * inputs.gate("eta", t, g) for g in grads)
    if momentum is None:
        return steps, None
    momentum = tuple(inputs.gate("momentum", t, s) * s + u for s, u in zip(momentum, steps, strict=True))
    return momentum, momentum


# ---- the two recurrences ----------------------------------------------------------------------


def initial_state(d: Derivation, inputs: Inputs, state):
    """Split a user state tuple into (memory layers, momentum layers or None), zeros if absent."""
    b, h, _, dk = inputs.k.shape
    shapes = memory_shapes(d, dk, inputs.v.shape[-1])
    n = len(shapes)
    if state is None:
        like = inputs.k
        state = tuple(like.new_zeros(b, h, *s) for s in shapes)
        if d.spec.has_momentum:
            state = state + tuple(like.new_zeros(b, h, *s) for s in shapes)
    memory = tuple(state[:n])
    momentum = tuple(state[n:]) if d.spec.has_momentum else None
    return memory, momentum


def recurrent(d: Derivation, inputs: Inputs, state=None):
    """The token recurrence. Returns o [B,H,T,Dv] and the final state tuple."""
    zs, momentum = initial_state(d, inputs, state)
    dual = d.retention.dual
    outputs = []
    for t in range(inputs.q.shape[2]):
        retained = _decay(inputs, t, zs)
        point = zs if d.spec.learner.grad_at == "previous" else retained
        weights = tuple(read(d, z) for z in point) if dual else point
        grads = window_grad(d, inputs, t, weights)
        update, momentum = _learn(d, inputs, t, grads, momentum)
        zs = tuple(z - u for z, u in zip(retained, update, strict=True))
        if not dual:
            zs = tuple(read(d, z) for z in zs)
        current = tuple(read(d, z) for z in zs) if dual else zs
        outputs.append(memory_apply(d, current, inputs.q[:, :, t], inputs.ln, read=True))
    return _stacked(outputs, inputs), zs + (momentum or ())


def chunk_starts(length: int, chunk_size: int, lag_token: bool) -> list[int]:
    """Chunk boundaries; with a lag token the first token of every chunk is a chunk of its own."""
    starts = list(range(0, length, chunk_size))
    if lag_token:
        starts = sorted(set(starts) | {s + 1 for s in starts if s + 1 < length})
    return starts + [length]


def chunked(d: Derivation, inputs: Inputs, state=None, chunk_size: int | None = None,
            g=bias_grad):
    """Mini-batch chunking: gradients at the chunk-start state W_s; inside a chunk the primal
    weights move linearly from W_s, and the retention's map is applied at the chunk end only.
    A window reaches back across the chunk's start: those tokens' gradients are taken at W_s too.
    With learner.eta_at 'query' row t reads W_t = W_s - eta_t sum_(i<=t) grad_i (decayed); with
    muon's `apply: chunk` the rows read the decayed A_t W_s until the last, e, which applies
    U_e = eta_e NS_k(S_e)."""
    zs, momentum = initial_state(d, inputs, state)
    dual, learner = d.retention.dual, d.spec.learner
    by_query = learner.kind == "gd" and learner.eta_at == "query"
    by_chunk = learner.kind == "muon" and learner.apply == "chunk"
    bounds = chunk_starts(inputs.q.shape[2], chunk_size or d.spec.chunk_size, d.spec.lag_token)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        start_weights = tuple(read(d, z) for z in zs) if dual else zs
        base_z, base_w, summed = zs, start_weights, None  # the start state decayed to row t
        for t in range(start, end):
            base_z, base_w = _decay(inputs, t, base_z), _decay(inputs, t, base_w)
            if learner.grad_at == "previous":
                point = start_weights
            else:
                retained = _decay_span(inputs, start, t, zs)
                point = tuple(read(d, z) for z in retained) if dual else retained
            grads = window_grad(d, inputs, t, point, g)
            if by_query:  # the decayed sum of raw gradients, scaled by this row's step
                new = grads
            else:
                new, momentum = _learn(d, inputs, t, grads, momentum,
                                       apply=not by_chunk or t == end - 1)
            summed = new if summed is None else tuple(
                s + n for s, n in zip(_decay(inputs, t, summed), new, strict=True))
            step = tuple(s * inputs.gate("eta", t, s) for s in summed) if by_query else summed
            decayed_z = tuple(z - u for z, u in zip(base_z, step, strict=True))
            primal = tuple(w - u for w, u in zip(base_w, step, strict=True))
            if t == end - 1:
                zs = decayed_z if dual else tuple(read(d, z) for z in decayed_z)
                primal = tuple(read(d, z) for z in zs) if dual else zs
            outputs.append(memory_apply(d, primal, inputs.q[:, :, t], inputs.ln, read=True))
    return _stacked(outputs, inputs), zs + (momentum or ())


def _stacked(outputs: list[torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """The rows' outputs [B, H, Dv] as o [B, H, T, Dv]; a sequence of no tokens has none."""
    return torch.stack(outputs, 2) if outputs else inputs.v[:, :, :0].clone()


def _decay_span(inputs: Inputs, start: int, t: int, zs):
    for s in range(start, t + 1):
        zs = _decay(inputs, s, zs)
    return zs
