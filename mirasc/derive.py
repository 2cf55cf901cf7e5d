"""Derivation with sympy: from a spec, the bias gradient g = dl/dr, its partial derivatives (for
the backward), the retention's read map W = phi^-1(Z), and a readable statement of the update.

A bias is l(r) = sum_j f(r_j, v_j) + h(||r||), so g_j = f'(r_j) + (h'(n)/n) r_j with n = ||r||.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import sympy as sp

from mirasc import spec as S
from mirasc.expr import parse_expression
from mirasc.spec import FieldError

R = sp.Symbol("r", real=True)
V = sp.Symbol("v", real=True)
RNORM = sp.Symbol("rnorm", positive=True)
DELTA = sp.Symbol("delta", positive=True)
Z = sp.Symbol("z", real=True)
W = sp.Symbol("w", real=True)

BUILTIN_BIASES: dict[str, tuple[str, str]] = {
    "dot_product": ("-(r + v) * v", "0"),
    "l2": ("r**2 / 2", "0"),
    "lp": ("abs(r)**p", "0"),
    "huber.coordinate": ("where(abs(r) <= delta, r**2 / 2, delta * (abs(r) - delta / 2))", "0"),
    "huber.norm": ("0", "where(rnorm <= delta, rnorm**2 / 2, delta * (rnorm - delta / 2))"),
    "huber.switch": ("where(rnorm <= delta, r**2 / 2, delta * abs(r))", "0"),
    "robust": ("r**2 / 2", "delta * rnorm"),
}

RNORM_EPS = 1e-12  # rnorm = sqrt(||r||^2 + RNORM_EPS)
OP_ARGUMENTS = {"retention.decay": "log_alpha", "learner.eta": "eta", "bias.delta": "delta",
                "learner.momentum": "momentum"}
ACTIVATIONS = {"gelu": "GELU", "silu": "SiLU", "relu": "ReLU", "tanh": "tanh"}


@dataclass(frozen=True)
class BiasRule:
    """g_j = elem(r_j, v_j, n, delta) + norm(n, delta) * r_j, with its partial derivatives."""

    loss: sp.Expr
    norm_loss: sp.Expr
    elem: sp.Expr
    norm: sp.Expr
    d_elem: dict[str, sp.Expr]
    d_norm: dict[str, sp.Expr]
    kind: Literal["state_free", "affine", "general"]
    uses_delta: bool
    smoothing: str = ""


@dataclass(frozen=True)
class RetentionRule:
    """The read map W = phi^-1(Z); `dual` states carry Z, primal (proximal) states carry W."""

    kind: str
    linear: bool
    dual: bool
    text: str
    elementwise: sp.Expr | None = None


@dataclass(frozen=True)
class Derivation:
    spec: S.Spec
    bias: BiasRule
    retention: RetentionRule
    gates: dict[str, S.Gate] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Whether chunking is exact (the token recurrence): a bias whose gradient ignores the
        state, or a quadratic one (solved by the WY/UT transform), on a plain matrix memory
        without a bias, with linear retention and GD stepping at the key. Otherwise chunks take
        mini-batch gradients at their start."""
        mem, learner = self.spec.memory, self.spec.learner
        return (self.bias.kind in ("state_free", "affine") and mem.kind == "matrix"
                and not mem.residual and not mem.layer_norm and not mem.bias
                and self.retention.linear and learner.kind == "gd" and learner.eta_at == "key")

    def op_gates(self) -> dict[str, S.Gate]:
        """The spec's gates by the op's keyword argument (log_alpha, eta, delta, momentum)."""
        return {OP_ARGUMENTS[name]: gate for name, gate in self.gates.items()}


def _smooth(expr: sp.Expr, temperature: float, eps: float) -> sp.Expr:
    """The paper's surrogates: sign(x) -> tanh(temperature x), |x| -> sqrt(x^2 + eps)."""
    expr = expr.replace(sp.sign, lambda x: sp.tanh(temperature * x))
    return expr.replace(sp.Abs, lambda x: sp.sqrt(x**2 + eps))


def _ae(expr: sp.Expr) -> sp.Expr:
    """The almost-everywhere derivative: drop the Dirac deltas of jumps (as autograd does)."""
    return sp.piecewise_fold(expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0)))


def _check_continuous(expr: sp.Expr, field: str) -> None:
    """Refuse a where() whose branches disagree on its boundary (a jump makes g a Dirac delta)."""
    for piece in expr.atoms(sp.Piecewise):
        if len(piece.args) != 2 or not isinstance(piece.args[0][1], sp.core.relational.Relational):
            continue
        (inside, cond), (outside, _) = piece.args
        edge = cond.lhs - cond.rhs
        for sym in (R, RNORM, V, DELTA):
            if edge.has(sym):
                break
        else:
            continue
        for point in sp.solve(edge, sym):
            gap = sp.simplify((inside - outside).subs(sym, point))
            if gap != 0:
                raise FieldError(field, f"is not differentiable in r: where({cond}, ...) jumps by "
                                        f"{gap} at {sym} = {point}; make the branches meet")


def _real_inverse_branches(candidates: list, samples=(-1.3, 0.4, 2.1)) -> list:
    """The solutions of f'(w) = z that are real-valued at sample points z."""
    real = []
    for sol in candidates:
        values = [complex(sol.subs(Z, z).evalf()) for z in samples]
        if all(abs(v.imag) < 1e-9 for v in values):
            real.append(sol)
    return real


def derive_bias(bias: S.Bias) -> BiasRule:
    if bias.kind in ("dot_product", "l2", "robust"):
        loss_text, norm_text = BUILTIN_BIASES[bias.kind]
    elif bias.kind == "huber":
        loss_text, norm_text = BUILTIN_BIASES[f"huber.{bias.variant}"]
    elif bias.kind == "lp":
        loss_text, norm_text = BUILTIN_BIASES["lp"]
    else:
        loss_text, norm_text = bias.loss, bias.norm_loss
    param_values = {"p": bias.p} if bias.kind == "lp" else dict(getattr(bias, "params", {}))
    for name in param_values:
        if name in ("r", "v", "rnorm", "delta", "pi"):
            raise FieldError(f"bias.params.{name}", "shadows a variable; pick another name")
    params = {name: sp.Symbol(name, real=True) for name in param_values}
    delta_gate = getattr(bias, "delta", None)
    common = dict(params, **({"delta": DELTA} if delta_gate is not None else {}))
    loss = parse_expression(loss_text, {"r": R, "v": V, "rnorm": RNORM, **common}, "bias.loss")
    norm_loss = parse_expression(norm_text, {"rnorm": RNORM, **common}, "bias.norm_loss")

    if bias.kind == "expression":  # the built-in Yaad switch is discontinuous by design
        _check_continuous(loss, "bias.loss")
        _check_continuous(norm_loss, "bias.norm_loss")
    if sp.simplify(sp.diff(loss, RNORM)) != 0:
        raise FieldError("bias.loss", "may use rnorm only inside a where() condition; "
                                      "put terms of the norm in bias.norm_loss")
    elem = sp.powsimp(sp.diff(loss, R), force=True)
    norm = sp.piecewise_fold(sp.diff(norm_loss, RNORM) / RNORM)
    for part, name in ((elem, "bias.loss"), (norm, "bias.norm_loss")):
        if part.has(sp.DiracDelta, sp.Derivative, sp.Subs, sp.zoo, sp.nan):
            raise FieldError(name, f"is not differentiable in r: its derivative is {part}; "
                                   "use continuous functions (abs is fine, sign is not)")
    smoothing = ""
    if getattr(bias, "smooth", False):
        elem = _smooth(elem, bias.temperature, bias.eps)
        norm = _smooth(norm, bias.temperature, bias.eps)
        smoothing = f"sign(x) ~ tanh({bias.temperature:g} x), |x| ~ sqrt(x^2 + {bias.eps:g})"
    values = {params[k]: sp.nsimplify(v) if float(v).is_integer() else sp.Float(v)
              for k, v in param_values.items()}
    if delta_gate is not None and delta_gate.value is not None:
        values[DELTA] = sp.Float(delta_gate.value)
    elem = elem.subs(values)
    norm = norm.subs(values)
    if elem == 0 and norm == 0:
        raise FieldError("bias.loss" if bias.kind == "expression" else "bias",
                         "the loss has a zero gradient in r (it does not depend on r): the memory "
                         "would never learn")

    d_elem = {name: _ae(sp.diff(elem, sym)) for name, sym in
              (("r", R), ("v", V), ("rnorm", RNORM), ("delta", DELTA))}
    d_norm = {name: _ae(sp.diff(norm, sym)) for name, sym in (("rnorm", RNORM), ("delta", DELTA))}
    uses_delta = elem.has(DELTA) or norm.has(DELTA)
    if delta_gate is not None and delta_gate.shape == "channel" and norm.has(DELTA):
        raise FieldError("bias.delta.shape", "'channel' needs delta only in the elementwise loss; "
                                             "it enters the norm term here; allowed: 'head'")
    if not (elem.has(R) or elem.has(RNORM) or norm != 0):
        kind = "state_free"
    elif norm == 0 and not elem.has(RNORM) and d_elem["r"].is_number:
        kind = "affine"
    else:
        kind = "general"
    return BiasRule(loss=loss.subs(values), norm_loss=norm_loss.subs(values), elem=elem, norm=norm,
                    d_elem=d_elem, d_norm=d_norm, kind=kind, uses_delta=uses_delta,
                    smoothing=smoothing)


def derive_retention(ret: S.Retention) -> RetentionRule:
    if ret.kind in ("none", "l2"):
        return RetentionRule(kind=ret.kind, linear=True, dual=True, text="the state is W")
    if ret.kind == "lq":
        norm = f"||A||_{ret.q:g}"
        core = "A" if ret.link == "scale" else f"sign(A)|A|^{ret.q - 1:g}"
        return RetentionRule(kind="lq", linear=ret.q == 2 and ret.link == "scale", dual=True,
                             text=f"W = {core} / {norm}^{ret.q - 2:g}   (norm over each {ret.scope})")
    if ret.kind == "kl":
        return RetentionRule(kind="kl", linear=False, dual=True,
                             text=f"W = {ret.scale:g} * softmax(Z) over each {ret.axis}"
                                  "  (Z = log W up to a constant per slice)")
    if ret.kind == "elastic_net":
        gamma = sp.Float(ret.gamma)
        if ret.smooth:
            shrink = sp.Abs(Z) * sp.atan(Z / gamma) / (sp.pi / 2)
        else:
            shrink = sp.Piecewise((Z - gamma, gamma < Z), (Z + gamma, -gamma > Z), (0, True))
        letter = "A" if ret.form == "dual" else "W"
        return RetentionRule(kind="elastic_net", linear=False, dual=ret.form == "dual",
                             elementwise=shrink,
                             text=f"W_t = S({letter}_t), S(z) = {_plain(shrink)}  (soft threshold)")
    params = {name: sp.Symbol(name, real=True) for name in ret.params}
    potential = parse_expression(ret.potential, {"w": W, **params}, "retention.potential")
    potential = potential.subs({params[k]: sp.Float(v) for k, v in ret.params.items()})
    slope = sp.diff(potential, W)
    if slope.has(sp.DiracDelta) or not slope.has(W):
        raise FieldError("retention.potential", f"f'(w) = {slope} must depend on w smoothly "
                                                "(a strictly convex potential)")
    solutions = _real_inverse_branches(sp.solve(sp.Eq(slope, Z), W))
    if len(solutions) != 1:
        raise FieldError("retention.potential", f"sympy found {len(solutions)} real solutions of "
                         f"f'(w) = z for f'(w) = {slope}; the potential must be strictly convex "
                         "with an invertible derivative")
    rising = [complex(sp.diff(solutions[0], Z).subs(Z, z).evalf()).real for z in (-1.3, 0.4, 2.1)]
    if not all(x > 0 for x in rising):
        raise FieldError("retention.potential", f"f(w) = {potential} is not strictly convex: "
                         f"(f')^-1(z) = {solutions[0]} does not increase with z")
    return RetentionRule(kind="mirror", linear=False, dual=True, elementwise=solutions[0],
                         text=f"W = (f')^-1(Z) = {_plain(solutions[0])},  f(w) = {potential}")


_derived: dict[str, Derivation] = {}


def derive(spec: S.Spec) -> Derivation:
    """Derive (and memoise by spec hash) everything the reference and code generator need."""
    key = spec.digest()
    if key not in _derived:
        _derived[key] = Derivation(spec=spec, bias=derive_bias(spec.bias),
                                   retention=derive_retention(spec.retention), gates=spec.gates())
    return _derived[key]


# ---- readable statement of the rule ------------------------------------------------------------


def _plain(expr: sp.Expr) -> str:
    return sp.sstr(expr)


def _state_letter(rule: RetentionRule) -> str:
    """The letter the update is written in: W when the state is the memory itself."""
    if rule.linear or not rule.dual:
        return "W"
    return "A" if rule.kind == "lq" else "Z"


def _gate_text(gate: S.Gate | None, symbol: str) -> str:
    if gate is None:
        return "1"
    if gate.value is not None:
        return f"{gate.value:g}"
    return f"{symbol}_t" + ("[channel]" if gate.shape == "channel" else "")


def _memory_text(mem: S.Memory) -> str:
    plus_b = " + b{}" if mem.bias else ""
    if mem.kind == "mlp":
        inner = "x"
        for i in range(1, mem.depth + 1):
            inner = f"W{i} {inner}" if i == 1 else f"W{i} {ACTIVATIONS[mem.activation]}({inner})"
            inner += plus_b.format(i)
    else:
        inner = ("W x" if mem.kind == "matrix" else "w * x") + plus_b.format("")
    norm = mem.norm
    if norm is not None:
        affine = " * ln_weight + ln_bias" if norm.affine else ""
        eps = f"  (LN eps {norm.eps:g})" if norm.eps != S.LayerNorm().eps else ""
        inner = f"LN({inner}){affine}{eps}"
    learned = "  (the biases are state, learned with the weights)" if mem.bias else ""
    return (f"M(x) = x + {inner}" if mem.residual else f"M(x) = {inner}") + learned


def _read_text(mem: S.Memory) -> str:
    if mem.read_residual == "output":
        return ("o_t = z_t + LN(z_t) with the memory's layer norm, z_t = the memory's pre-norm "
                "output at q_t under W_t")
    return "o_t = M_(W_t)(q_t)"


def explain(spec: S.Spec, latex: bool = False) -> str:
    """The derived update rule of a spec as plain text (or LaTeX for the sympy expressions)."""
    d = derive(spec)
    show = sp.latex if latex else _plain
    b, ret, learner = d.bias, d.retention, spec.learner
    alpha = _gate_text(getattr(spec.retention, "decay", None), "alpha")
    eta = _gate_text(learner.eta, "eta")
    grad_point = "W_{t-1}" if learner.grad_at == "previous" else "retained state"
    loss_terms = [f"sum_j {show(b.loss)}" if b.loss != 0 else "",
                  show(b.norm_loss) if b.norm_loss != 0 else ""]
    grad_terms = [show(b.elem) if b.elem != 0 else "",
                  f"({show(b.norm)}) * r" if b.norm != 0 else ""]
    lines = [
        f"{spec.name}: {spec.description}".rstrip(": "),
        "",
        f"memory      {_memory_text(spec.memory)}",
        f"bias        l(r) = {' + '.join(t for t in loss_terms if t)}"
        "   (r = M(k) - v, rnorm = ||r||, sums over value channels j)",
        f"  g = dl/dr   g = {' + '.join(t for t in grad_terms if t)}",
    ]
    if b.smoothing:
        lines.append(f"  smoothing {b.smoothing}")
    lines += [
        f"  dg/dr     {show(b.d_elem['r'])}  (elementwise part)",
        f"  class     {b.kind}"
        + {"state_free": " (g does not depend on the state",
           "affine": " (quadratic loss", "general": " (a general loss"}[b.kind]
        + ({"state_free": ": exact chunking)", "affine": ": exact WY/UT chunking)"}[b.kind]
           if d.exact else "; mini-batch chunking: gradients at the chunk-start state)"),
        f"retention   {spec.retention.kind}: {_state_letter(ret)}_t = {alpha} * "
        f"{_state_letter(ret)}_(t-1) - U_t;  {ret.text}",
    ]
    if learner.kind == "momentum":
        mom = _gate_text(learner.momentum, "m")
        lines.append(f"learner     momentum: S_t = {mom} * S_(t-1) + {eta} * grad_t;  U_t = S_t")
    elif learner.eta_at == "query":
        lines.append(f"learner     gd: U_t = {eta} * grad_t; inside a chunk the step is the reading "
                     f"token's: W_t = W_s - {eta} * sum_(i<=t) grad_i")
    else:
        lines.append(f"learner     gd: U_t = {eta} * grad_t")
    lines += [
        f"  grad_t = dl(M_W(k_t), v_t)/dW at W = {grad_point}"
        + ("  (matrix memory: g_t k_t^T)" if spec.memory.kind == "matrix" else ""),
        f"output      {_read_text(spec.memory)}",
        f"chunking    chunk_size {spec.chunk_size}"
        + (", first token of each chunk exact (lag token)" if spec.lag_token else ""),
    ]
    return "\n".join(lines)
