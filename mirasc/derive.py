"""Derivation with sympy: from a spec, the bias gradient g = dl/dr, its partial derivatives (for
the backward), the retention's read map W = phi^-1(Z), and a readable statement of the update.

A bias is l(r) = sum_j f(r_j, v_j) + h(||r||), so g_j = f'(r_j) + (h'(n)/n) r_j with n = ||r||.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import sympy as sp

from mirasc import spec as S
from mirasc.errors import MAX_EXPONENT, FieldError
from mirasc.expr import check_derived, finite_real, parse_expression

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

MAX_FOLDED = 6  # where()s folded into one (2^6 branches at most)
RNORM_EPS = 1e-12  # rnorm = sqrt(||r||^2 + RNORM_EPS)
OP_ARGUMENTS = {"retention.decay": "log_alpha", "learner.eta": "eta", "bias.delta": "delta",
                "learner.momentum": "momentum", "bias.window.weight": "window_weight"}
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz step (a, b, c)
NS_EPS = 1e-7  # NS_k starts from X / (||X||_F + NS_EPS): a zero momentum makes a zero update
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
    """The read map W = phi^-1(Z); `dual` states carry Z, primal (proximal) states carry W.
    `text` states it in plain text, `latex` in LaTeX."""

    kind: str
    linear: bool
    dual: bool
    text: str
    elementwise: sp.Expr | None = None
    latex: str = ""


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
        without a bias, with linear retention and GD stepping at the key, and no bias.window (each
        token's update would have rank c). Otherwise chunks take mini-batch gradients at their
        start."""
        mem, learner = self.spec.memory, self.spec.learner
        return (self.bias.kind in ("state_free", "affine") and self.spec.bias.window is None
                and mem.kind == "matrix"
                and not mem.residual and not mem.layer_norm and not mem.bias
                and self.retention.linear and learner.kind == "gd" and learner.eta_at == "key")

    def op_gates(self) -> dict[str, S.Gate]:
        """The spec's gates by the op's keyword argument (log_alpha, eta, delta, momentum)."""
        return {OP_ARGUMENTS[name]: gate for name, gate in self.gates.items()}


def _smooth(expr: sp.Expr, temperature: float, eps: float) -> sp.Expr:
    """The paper's surrogates: sign(x) -> tanh(temperature x), |x| -> sqrt(x^2 + eps)."""
    expr = expr.replace(sp.sign, lambda x: sp.tanh(temperature * x))
    return expr.replace(sp.Abs, lambda x: sp.sqrt(x**2 + eps))


def _fold(expr: sp.Expr) -> sp.Expr:
    """Nested where()s folded into one, when there are at most MAX_FOLDED of them: the folded
    form has a branch per combination of their conditions."""
    return sp.piecewise_fold(expr) if len(expr.atoms(sp.Piecewise)) <= MAX_FOLDED else expr


def _ae(expr: sp.Expr) -> sp.Expr:
    """The almost-everywhere derivative: drop the Dirac deltas of jumps (as autograd does)."""
    return _fold(expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0)))


# Values for the variables a check holds fixed: two draws, so that branches that agree at one
# value of r (where(rnorm <= 1, r**2, abs(r)) at r = 1) still differ at the other.
_DRAWS = ({R: 0.45, V: 0.37, RNORM: 1.3, DELTA: 0.61}, {R: -0.8, V: -1.3, RNORM: 0.4, DELTA: 1.7})
_SCAN = {R: (-10.0, 10.0), RNORM: (1e-6, 10.0)}  # where switch points are sought numerically
_SIDE = 1e-9  # the one-sided limits are read this far either side of a switch point


def _switch_points(f: sp.Expr, x: sp.Symbol) -> list[float]:
    """The points where f of x alone may jump: where a where() condition switches, a sign or
    step function changes, or a denominator, log or root argument crosses zero."""
    edges = [rel.lhs - rel.rhs for piece in f.atoms(sp.Piecewise) for _, cond in piece.args
             for rel in cond.atoms(sp.core.relational.Relational)]
    edges += [a.args[0] for a in f.atoms(sp.sign, sp.Heaviside, sp.log)]
    edges += [a.base for a in f.atoms(sp.Pow) if not (a.exp.is_integer and a.exp > 0)]
    points = set()
    for edge in set(edges):
        if edge.has(x) and not (edge.is_positive or edge.is_negative):
            points.update(_roots(edge, x))
    return sorted(points)


@functools.lru_cache(maxsize=256)
def _roots(edge: sp.Expr, x: sp.Symbol) -> list[float]:
    """The real roots of edge(x) = 0: sympy's for a polynomial of degree at most 4 (in abs()
    too), else the sign changes found on a grid over _SCAN, bisected (tanh(r) + r - 1)."""
    found = None
    bare = edge.replace(sp.Abs, lambda a: a)
    if bare.is_polynomial(x) and sp.degree(bare, x) <= 4:  # in closed form; others take minutes
        with contextlib.suppress(NotImplementedError):
            found = sp.solve(edge, x)
    if isinstance(found, list):
        return [p for p in map(finite_real, found) if p is not None]
    low, high = _SCAN[x]
    grid = [low + (high - low) * i / 400 for i in range(401)]
    values = [finite_real(edge, {x: a}) for a in grid]
    roots = []
    for a, b, fa, fb in zip(grid, grid[1:], values, values[1:], strict=False):
        if fa is None or fb is None or (fa > 0) == (fb > 0):
            continue
        for _ in range(60):
            mid = (a + b) / 2
            fm = finite_real(edge, {x: mid})
            if fm is None:
                break
            a, b, fa = (mid, b, fm) if (fm > 0) == (fa > 0) else (a, mid, fa)
        roots.append(0.0 if abs(a + b) < 1e-12 else (a + b) / 2)
    return roots


def _check_continuous(expr: sp.Expr, field: str) -> None:
    """Refuse a loss that jumps in r (or in rnorm, a function of r): its gradient would be a
    Dirac delta, which autograd and the kernels drop, so the memory would learn another rule.
    At each switch point the limits from either side must agree and be finite. The other
    variables hold drawn values: a jump in v or delta is not differentiated and is allowed."""
    for draw in _DRAWS:
        for x in (R, RNORM):
            fixed = ", ".join(f"{s} = {v:g}" for s, v in draw.items() if s != x and expr.has(s))
            try:
                f = expr.subs({s: sp.Float(value) for s, value in draw.items() if s != x})
            except (OverflowError, ValueError, ZeroDivisionError):
                raise FieldError(field, f"is not finite in float64 at {fixed} (it overflows)") from None
            if not f.has(x):
                continue
            for point in _switch_points(f, x):
                left, right = (finite_real(f, {x: point + side}) for side in (-_SIDE, _SIDE))
                at = f"{x} = {point:.4g}" + (f" (with {fixed})" if fixed else "")
                if left is None or right is None:
                    raise FieldError(field, f"is not finite and real on both sides of {at}; "
                                            "use functions defined for every real r")
                farther = [finite_real(f, {x: point + 1000 * side}) for side in (-_SIDE, _SIDE)]
                if _infinite(f, x, point) or any(
                        b is None or abs(a) > 10 * (abs(b) + 1)
                        for a, b in zip((left, right), farther, strict=True)):
                    raise FieldError(field, f"is infinite at {at} (it grows without bound "
                                            "there); use functions finite for every real r")
                if abs(right - left) > 1e-6 * max(1.0, abs(left), abs(right)):
                    raise FieldError(field, f"is not differentiable in r: it jumps by "
                                            f"{right - left:.4g} at {at}; make the branches meet "
                                            "(abs is fine, sign is not)")


def _infinite(f: sp.Expr, x: sp.Symbol, point: float) -> bool:
    """Whether f is infinite at the point itself (log(0), 1/0), not merely undefined (0/0)."""
    try:
        return f.subs(x, point).has(sp.zoo, sp.oo, -sp.oo)
    except (OverflowError, ValueError, ZeroDivisionError):
        return True


def _check_real(expr: sp.Expr, field: str, what: str) -> None:
    """Refuse a derived expression that is not a finite real number at the drawn values."""
    for draw in _DRAWS:
        if finite_real(expr, draw) is None:
            at = ", ".join(f"{s} = {v:g}" for s, v in draw.items() if expr.has(s))
            raise FieldError(field, f"{what} = {expr} is not a finite real number in float64 at "
                                    f"{at} (it overflows or leaves the reals there)")


def _outside_conditions(expr: sp.Basic, sym: sp.Symbol) -> bool:
    """Whether `sym` occurs in `expr` other than in the condition of a where()."""
    if isinstance(expr, sp.Piecewise):
        return any(_outside_conditions(value, sym) for value, _ in expr.args)
    return expr == sym or any(_outside_conditions(a, sym) for a in expr.args)


def _inverses(slope: sp.Expr) -> list:
    """The real solutions w(z) of f'(w) = z: sympy's solution over the reals when it finds one
    (sign(z)|z/4|^(1/3) for f = w^4), else its solutions that are real at sample points z."""
    equation = sp.Eq(slope, Z)
    try:
        real = sp.solveset(equation, W, sp.S.Reals)
        if isinstance(real, sp.FiniteSet) and len(real) == 1:
            return list(real)
        candidates = sp.solve(equation, W)
    except NotImplementedError:
        raise FieldError("retention.potential", f"sympy cannot solve f'(w) = z for f'(w) = "
                         f"{slope}; allowed: a strictly convex potential whose derivative sympy "
                         "can invert") from None
    return [sol for sol in candidates
            if all(_nearly_real(sol, z) is not None for z in (-1.3, 0.4, 2.1))]


def _nearly_real(expr: sp.Expr, z: float) -> float | None:
    """expr at Z = z when it is real to rounding (sympy's cubic roots pass through complex
    numbers) and finite, else None."""
    try:
        value = complex(expr.subs(Z, z).evalf())
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    return value.real if abs(value.imag) < 1e-9 and math.isfinite(value.real) else None


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
    user = bias.kind == "expression"
    loss_field, norm_field = ("bias.loss", "bias.norm_loss") if user else ("bias", "bias")
    loss = parse_expression(loss_text, {"r": R, "v": V, "rnorm": RNORM, **common}, loss_field)
    norm_loss = parse_expression(norm_text, {"rnorm": RNORM, **common}, norm_field)
    values = {params[k]: sp.Integer(v) if float(v).is_integer() and abs(v) <= MAX_EXPONENT
              else sp.Float(v) for k, v in param_values.items()}  # no exact huge powers
    if delta_gate is not None and delta_gate.value is not None:
        values[DELTA] = sp.Float(delta_gate.value)
    for expr, name in ((loss, loss_field), (norm_loss, norm_field)):
        check_derived(expr.subs(values), name, "the loss with its parameters")
        if user:  # the built-in Yaad switch is discontinuous by design
            _check_continuous(expr.subs(values), name)
    if _outside_conditions(loss, RNORM):
        raise FieldError(loss_field, "may use rnorm only inside a where() condition; "
                                     "put terms of the norm in bias.norm_loss")
    elem = check_derived(sp.powsimp(sp.diff(loss, R), force=True), loss_field, "dl/dr")
    norm = check_derived(_fold(sp.diff(norm_loss, RNORM) / RNORM), norm_field,
                         "dh/drnorm / rnorm")
    if user:  # continuous in r: the Dirac deltas of its kinks carry no weight (2 r delta(r))
        elem, norm = _ae(elem), _ae(norm)
    for part, name in ((elem, loss_field), (norm, norm_field)):
        if part.has(sp.DiracDelta, sp.Derivative, sp.Subs, sp.zoo, sp.nan):
            raise FieldError(name, f"is not differentiable in r: its derivative is {part}; "
                                   "use continuous functions (abs is fine, sign is not)")
    smoothing = ""
    if getattr(bias, "smooth", False):
        elem = _smooth(elem, bias.temperature, bias.eps)
        norm = _smooth(norm, bias.temperature, bias.eps)
        smoothing = f"sign(x) ~ tanh({bias.temperature:g} x), |x| ~ sqrt(x^2 + {bias.eps:g})"
    elem = check_derived(elem.subs(values), loss_field, "dl/dr")
    norm = check_derived(norm.subs(values), norm_field, "dh/drnorm / rnorm")
    _check_real(elem, loss_field, "dl/dr")
    _check_real(norm, norm_field, "dh/drnorm / rnorm")
    if elem == 0 and norm == 0:
        raise FieldError("bias.loss" if bias.kind == "expression" else "bias",
                         "the loss has a zero gradient in r (it does not depend on r): the memory "
                         "would never learn")

    d_elem = {name: check_derived(_ae(sp.diff(elem, sym)), loss_field, f"d(dl/dr)/d{name}")
              for name, sym in (("r", R), ("v", V), ("rnorm", RNORM), ("delta", DELTA))}
    d_norm = {name: check_derived(_ae(sp.diff(norm, sym)), norm_field, f"d(dh/drnorm)/d{name}")
              for name, sym in (("rnorm", RNORM), ("delta", DELTA))}
    uses_delta = elem.has(DELTA) or norm.has(DELTA)
    if delta_gate is not None and delta_gate.shape == "channel" and norm.has(DELTA):
        raise FieldError("bias.delta.shape", "'channel' needs delta only in the elementwise loss; "
                                             "it enters the norm term here; allowed: 'head'")
    if not (elem.has(R) or elem.has(RNORM) or norm != 0):
        kind = "state_free"
    elif (norm == 0 and not elem.has(RNORM) and d_elem["r"].is_number
          and not sp.expand(elem - d_elem["r"] * R).has(R)):  # g = c r + e(v), not sign(r)
        kind = "affine"
    else:
        kind = "general"
    return BiasRule(loss=loss.subs(values), norm_loss=norm_loss.subs(values), elem=elem, norm=norm,
                    d_elem=d_elem, d_norm=d_norm, kind=kind, uses_delta=uses_delta,
                    smoothing=smoothing)


def derive_retention(ret: S.Retention) -> RetentionRule:
    if ret.kind in ("none", "l2"):
        return RetentionRule(kind=ret.kind, linear=True, dual=True, text="the state is W",
                             latex=r"\text{the state is } W")
    if ret.kind == "lq":
        norm = f"||A||_{ret.q:g}"
        core = "A" if ret.link == "scale" else f"sign(A)|A|^{ret.q - 1:g}"
        tex_core = "A" if ret.link == "scale" else \
            rf"\operatorname{{sign}}(A)\,|A|^{{{ret.q - 1:g}}}"
        return RetentionRule(kind="lq", linear=ret.q == 2 and ret.link == "scale", dual=True,
                             text=f"W = {core} / {norm}^{ret.q - 2:g}   (norm over each {ret.scope})",
                             latex=rf"W = {tex_core} / \|A\|_{{{ret.q:g}}}^{{{ret.q - 2:g}}}"
                                   rf"\quad\text{{(norm over each {ret.scope})}}")
    if ret.kind == "kl":
        return RetentionRule(kind="kl", linear=False, dual=True,
                             text=f"W = {ret.scale:g} * softmax(Z) over each {ret.axis}"
                                  "  (Z = log W up to a constant per slice)",
                             latex=rf"W = {ret.scale:g}\,\operatorname{{softmax}}(Z)\quad"
                                   rf"\text{{over each {ret.axis} (}}Z = \log W"
                                   r"\text{ up to a constant per slice)}")
    if ret.kind == "elastic_net":
        gamma = sp.Float(ret.gamma)
        if ret.smooth:
            shrink = sp.Abs(Z) * sp.atan(Z / gamma) / (sp.pi / 2)
        else:
            shrink = sp.Piecewise((Z - gamma, gamma < Z), (Z + gamma, -gamma > Z), (0, True))
        letter = "A" if ret.form == "dual" else "W"
        return RetentionRule(kind="elastic_net", linear=False, dual=ret.form == "dual",
                             elementwise=shrink,
                             text=f"W_t = S({letter}_t), S(z) = {_plain(shrink)}  (soft threshold)",
                             latex=rf"W_t = S({letter}_t),\quad S(z) = {sp.latex(shrink)}"
                                   r"\quad\text{(soft threshold)}")
    params = {name: sp.Symbol(name, real=True) for name in ret.params}
    potential = parse_expression(ret.potential, {"w": W, **params}, "retention.potential")
    potential = potential.subs({params[k]: sp.Float(v) for k, v in ret.params.items()})
    check_derived(potential, "retention.potential", "the potential with its parameters")
    slope = check_derived(sp.diff(potential, W), "retention.potential", "f'(w)")
    if slope.has(sp.DiracDelta) or not slope.has(W):
        raise FieldError("retention.potential", f"f'(w) = {slope} must depend on w smoothly "
                                                "(a strictly convex potential)")
    solutions = _inverses(slope)
    if len(solutions) != 1:
        raise FieldError("retention.potential", f"sympy found {len(solutions)} real solutions of "
                         f"f'(w) = z for f'(w) = {slope}; the potential must be strictly convex "
                         "with an invertible derivative")
    inverse = check_derived(solutions[0], "retention.potential", "(f')^-1(z)")
    rising = [_nearly_real(sp.diff(inverse, Z), z) for z in (-1.3, 0.4, 2.1)]
    if not all(x is not None and x > 0 for x in rising):
        raise FieldError("retention.potential", f"f(w) = {potential} is not strictly convex: "
                         f"(f')^-1(z) = {inverse} does not increase with z")
    return RetentionRule(kind="mirror", linear=False, dual=True, elementwise=inverse,
                         text=f"W = (f')^-1(Z) = {_plain(inverse)},  f(w) = {potential}",
                         latex=rf"W = (f')^{{-1}}(Z) = {sp.latex(inverse)},\quad "
                               rf"f(w) = {sp.latex(potential)}")


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


def _memory_latex(mem: S.Memory) -> str:
    """M(x) in LaTeX, as `_memory_text` states it."""
    plus_b = " + b_{{{}}}" if mem.bias else ""
    if mem.kind == "mlp":
        inner = "x"
        act = rf"\operatorname{{{ACTIVATIONS[mem.activation]}}}"
        for i in range(1, mem.depth + 1):
            inner = f"W_{{{i}}} {inner}" if i == 1 else f"W_{{{i}}}\\,{act}({inner})"
            inner += plus_b.format(i)
    else:
        inner = ("W x" if mem.kind == "matrix" else r"w \odot x") + plus_b.format("")
    norm = mem.norm
    if norm is not None:
        affine = r" \odot \gamma_{\mathrm{ln}} + \beta_{\mathrm{ln}}" if norm.affine else ""
        inner = rf"\operatorname{{LN}}({inner}){affine}"
    return f"M(x) = x + {inner}" if mem.residual else f"M(x) = {inner}"


def _gate_latex(gate: S.Gate | None, symbol: str) -> str:
    if gate is None:
        return "1"
    if gate.value is not None:
        return f"{gate.value:g}"
    return f"{symbol}_t" + (r"^{(\text{channel})}" if gate.shape == "channel" else "")


def _read_text(mem: S.Memory) -> str:
    if mem.read_residual == "output":
        return ("o_t = z_t + LN(z_t) with the memory's layer norm, z_t = the memory's pre-norm "
                "output at q_t under W_t")
    return "o_t = M_(W_t)(q_t)"


def explain(spec: S.Spec, latex: bool = False) -> str:
    """The derived update rule of a spec as plain text, or with `latex` its formulas (memory,
    bias, gradient, retention, learner, output) in LaTeX."""
    d = derive(spec)
    if latex:
        return _explain_latex(spec, d)
    show = _plain
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
        _class_line(d),
        f"retention   {spec.retention.kind}: {_state_letter(ret)}_t = {alpha} * "
        f"{_state_letter(ret)}_(t-1) - U_t;  {ret.text}",
    ]
    if learner.kind == "momentum":
        mom = _gate_text(learner.momentum, "m")
        lines.append(f"learner     momentum: S_t = {mom} * S_(t-1) + {eta} * grad_t;  U_t = S_t")
    elif learner.kind == "muon":
        mom, k = _gate_text(learner.momentum, "m"), learner.ns_steps
        lines += [f"learner     muon: S_t = {mom} * S_(t-1) + grad_t;  U_t = {eta} * NS_{k}(S_t)"
                  + ("  at a chunk's last token only (apply: chunk; the rows before read the "
                     "decayed chunk-start state)" if learner.apply == "chunk" else ""),
                  f"  NS_{k}(X)   X / ||X||_F, then {k} steps X <- a X + (b A + c A^2) X, A = X X^T "
                  f"(on X^T when X has more rows), (a, b, c) = {NS_COEFFICIENTS}, per matrix; a "
                  "vector (a bias, the vector memory) x / ||x||"]
    elif learner.eta_at == "query":
        lines.append(f"learner     gd: U_t = {eta} * grad_t; inside a chunk the step is the reading "
                     f"token's: W_t = W_s - {eta} * sum_(i<=t) grad_i")
    else:
        lines.append(f"learner     gd: U_t = {eta} * grad_t")
    window = spec.bias.window
    if window is None:
        grad = f"  grad_t = dl(M_W(k_t), v_t)/dW at W = {grad_point}" \
            + ("  (matrix memory: g_t k_t^T)" if spec.memory.kind == "matrix" else "")
    else:
        gamma = _gate_text(window.weight, "gamma")
        gamma_i = gamma.replace("_t", "_i")
        grad = (f"  grad_t = sum_(i=t-{window.size - 1}..t) {gamma_i} dl(M_W(k_i), v_i)/dW at "
                f"W = {grad_point}  (window of {window.size} tokens of t's sequence, weight "
                f"{gamma}; Omega rule)")
    lines += [
        grad,
        f"output      {_read_text(spec.memory)}",
        f"chunking    chunk_size {spec.chunk_size}"
        + (", first token of each chunk exact (lag token)" if spec.lag_token else ""),
    ]
    return "\n".join(lines)


def _class_line(d: Derivation) -> str:
    b = d.bias
    return (f"  class     {b.kind}"
            + {"state_free": " (g does not depend on the state",
               "affine": " (quadratic loss", "general": " (a general loss"}[b.kind]
            + ({"state_free": ": exact chunking)", "affine": ": exact WY/UT chunking)"}[b.kind]
               if d.exact else "; mini-batch chunking: gradients at the chunk-start state)"))


def _explain_latex(spec: S.Spec, d: Derivation) -> str:
    """`explain` with every formula in LaTeX (one per line, after its plain label)."""
    b, ret, learner = d.bias, d.retention, spec.learner
    alpha = _gate_latex(getattr(spec.retention, "decay", None), r"\alpha")
    eta = _gate_latex(learner.eta, r"\eta")
    letter = _state_letter(ret)
    loss = " + ".join(t for t in (rf"\sum_j {sp.latex(b.loss)}" if b.loss != 0 else "",
                                  sp.latex(b.norm_loss) if b.norm_loss != 0 else "") if t)
    grad = " + ".join(t for t in (sp.latex(b.elem) if b.elem != 0 else "",
                                  rf"\left({sp.latex(b.norm)}\right) r" if b.norm != 0 else "")
                      if t)
    lines = [f"{spec.name}: {spec.description}".rstrip(": "), "",
             f"memory      {_memory_latex(spec.memory)}",
             f"bias        \\ell(r) = {loss}\\quad\\text{{(}}r = M(k) - v,\\ "
             r"r_{\mathrm{norm}} = \|r\|\text{, sums over value channels } j\text{)}",
             f"  g = dl/dr   g = {grad}"]
    if b.smoothing:
        lines.append(f"  smoothing {b.smoothing}")
    lines += [f"  dg/dr     {sp.latex(b.d_elem['r'])}  (elementwise part)", _class_line(d),
              f"retention   {letter}_t = {alpha} {letter}_{{t-1}} - U_t;\\quad {ret.latex}"]
    if learner.kind == "momentum":
        m = _gate_latex(learner.momentum, "m")
        lines.append(f"learner     S_t = {m} S_{{t-1}} + {eta} \\nabla_t;\\quad U_t = S_t")
    elif learner.kind == "muon":
        m = _gate_latex(learner.momentum, "m")
        lines.append(f"learner     S_t = {m} S_{{t-1}} + \\nabla_t;\\quad U_t = {eta} "
                     f"\\operatorname{{NS}}_{{{learner.ns_steps}}}(S_t)"
                     + (r"\ \text{at a chunk's last token only}" if learner.apply == "chunk"
                        else ""))
    elif learner.eta_at == "query":
        lines.append(f"learner     U_t = {eta} \\nabla_t;\\quad W_t = W_s - {eta} "
                     r"\sum_{i \le t} \nabla_i \text{ inside a chunk}")
    else:
        lines.append(f"learner     U_t = {eta} \\nabla_t")
    point = "W_{t-1}" if learner.grad_at == "previous" else r"\text{the retained state}"
    read = (r"o_t = z_t + \operatorname{LN}(z_t),\ z_t = \text{the pre-norm output at } q_t"
            if spec.memory.read_residual == "output" else "o_t = M_{W_t}(q_t)")
    window = spec.bias.window
    if window is None:
        grad = rf"  \nabla_t = \partial \ell(M_W(k_t), v_t) / \partial W \text{{ at }} W = {point}"
    else:
        gamma = _gate_latex(window.weight, r"\gamma").replace("_t", "_i")
        grad = (rf"  \nabla_t = \sum_{{i=t-{window.size - 1}}}^{{t}} {gamma} \partial \ell(M_W(k_i),"
                rf" v_i) / \partial W \text{{ at }} W = {point}")
    lines += [grad,
              f"output      {read}",
              f"chunking    chunk_size {spec.chunk_size}"
              + (", first token of each chunk exact (lag token)" if spec.lag_token else "")]
    return "\n".join(lines)
