"""The sympy derivation: g = dl/dr against autograd of the loss itself, the chunking class, the
retention maps, and the readable rule."""

from __future__ import annotations

import time

import pytest
import sympy as sp
import torch
from conftest import axis_spec

from mirasc.catalog import checked_spec, load_spec
from mirasc.derive import DELTA, RNORM, R, V, Z, derive, derive_bias, explain
from mirasc.errors import SpecError
from mirasc.expr import to_torch
from mirasc.reference import bias_grad, residual_norm
from mirasc.spec import parse_spec

SMOOTH_BIASES = {
    "l2": "{kind: l2}",
    "dot_product": "{kind: dot_product}",
    "lp-exact": "{kind: lp, p: 3, smooth: false}",
    "lp-2.5": "{kind: lp, p: 2.5, smooth: false}",
    "huber-coordinate": "{kind: huber, variant: coordinate, delta: {}}",
    "huber-norm": "{kind: huber, variant: norm, delta: {}}",
    "robust": "{kind: robust, delta: {}}",
    "logcosh": "{kind: expression, loss: 'log(cosh(r))'}",
    "mixed": "{kind: expression, loss: 'exp(-v) * softplus(r) + r*v', norm_loss: 'rnorm**3 / 3'}",
    "sign-times-r": "{kind: expression, loss: 'sign(r) * r'}",  # |r|: a kink, no jump
    "jump-in-v": "{kind: expression, loss: 'where(v > 0, r**2, 2 * r**2)'}",  # smooth in r
    "transcendental-kink": "{kind: expression, loss: 'where(tanh(r) + r > 1, tanh(r) + r, "
                           "2 - tanh(r) - r)'}",  # meets at tanh(r) + r = 1, found numerically
    "many-wheres": "{kind: expression, loss: '"
                   + " + ".join(f"where(r > {k / 4}, (r - {k / 4})**2, 0)" for k in range(-5, 6))
                   + "'}",  # 11 where()s: too many to fold into one (2^11 branches)
}


@pytest.mark.parametrize("name", sorted(SMOOTH_BIASES))
def test_bias_gradient_is_the_derivative_of_the_loss(name):
    """Evaluate l(r) = sum f(r_j) + h(||r||) with torch and compare autograd's dl/dr with g."""
    d = derive(parse_spec(axis_spec(bias=SMOOTH_BIASES[name])))
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64)
    delta = 0.2 + torch.rand(3, 2, 1, generator=gen, dtype=torch.float64)
    env = {R: r, V: v, RNORM: residual_norm(r), DELTA: delta}
    loss = (torch.zeros_like(r) + to_torch(d.bias.loss, env)).sum() \
        + (torch.zeros_like(delta) + to_torch(d.bias.norm_loss, env)).sum()
    (expected,) = torch.autograd.grad(loss, r)
    assert torch.allclose(bias_grad(d, r.detach(), v, delta), expected, rtol=1e-9, atol=1e-12)


def test_lp_smoothing_is_the_papers_surrogate():
    d = derive(parse_spec(axis_spec(bias="{kind: lp, p: 3, temperature: 7, eps: 0.001}")))
    expected = 3 * sp.tanh(sp.Float(7) * R) * (R**2 + sp.Float(0.001))
    assert sp.simplify(d.bias.elem - expected) == 0
    assert "tanh(7 x)" in d.bias.smoothing


@pytest.mark.parametrize(("bias", "kind"), [
    ("{kind: dot_product}", "state_free"),
    ("{kind: l2}", "affine"),
    ("{kind: expression, loss: '3*r**2 + r*v'}", "affine"),
    ("{kind: lp, p: 3}", "general"),
    ("{kind: huber, delta: {}}", "general"),
    ("{kind: robust, delta: {value: 0.1}}", "general"),
    ("{kind: expression, loss: 'log(cosh(r))'}", "general"),
])
def test_quadratic_and_state_free_biases_are_detected(bias, kind):
    assert derive(parse_spec(axis_spec(bias=bias))).bias.kind == kind


def test_second_derivative_is_derived_for_the_backward():
    d = derive(parse_spec(axis_spec(bias="{kind: expression, loss: 'log(cosh(r))'}")))
    assert sp.simplify(d.bias.d_elem["r"] - (1 - sp.tanh(R) ** 2)) == 0
    huber = derive(parse_spec(axis_spec(bias="{kind: huber, delta: {}}")))
    assert huber.bias.d_elem["delta"] != 0  # a data-dependent threshold gets a gradient


def test_mirror_potential_is_inverted_by_sympy():
    d = derive(parse_spec(axis_spec(retention="{kind: mirror, potential: 'w*log(w) - w'}")))
    assert sp.simplify(d.retention.elementwise - sp.exp(Z)) == 0
    d = derive(parse_spec(axis_spec(retention="{kind: mirror, potential: 'c*w**2', "
                                               "params: {c: 2}}")))
    assert sp.simplify(d.retention.elementwise - Z / 4) == 0


@pytest.mark.parametrize(("potential", "inverse"), [
    ("cosh(w)", sp.asinh(Z)),
    ("w**2/2 + w**4/4", None),  # a cubic: one real root of w + w^3 = z
    ("w**4 / 4", sp.sign(Z) * sp.Abs(Z) ** sp.Rational(1, 3)),  # solved over the reals
])
def test_convex_potentials_with_complex_branches_are_inverted(potential, inverse):
    d = derive(parse_spec(axis_spec(retention=f"{{kind: mirror, potential: '{potential}'}}")))
    g = d.retention.elementwise
    for z in (-1.5, 0.2, 3.0):
        w = complex(g.subs(Z, z).evalf())
        assert abs(w.imag) < 1e-9
        if inverse is not None:
            assert abs(w.real - float(inverse.subs(Z, z))) < 1e-9
        else:
            assert abs(w.real + w.real**3 - z) < 1e-9


def test_elastic_net_soft_threshold():
    d = derive(parse_spec(axis_spec(retention="{kind: elastic_net, gamma: 0.5}")))
    z = torch.tensor([-2.0, -0.4, 0.0, 0.3, 1.5], dtype=torch.float64)
    got = to_torch(d.retention.elementwise, {Z: z})
    assert torch.equal(got, torch.tensor([-1.5, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(("spec", "needles"), [
    ("moneta", ["tanh(10.0*r)", "3*", "||A||_4^2", "A_t = alpha_t * A_(t-1)"]),
    ("yaad", ["Piecewise", "delta", "rnorm", "sign(r)"]),
    ("memora", ["softmax", "lag token", "Z_t = alpha_t * Z_(t-1)"]),
    ("gated_deltanet", ["g = r", "affine", "retained state"]),
])
def test_explain_states_the_rule(spec, needles):
    text = explain(load_spec(f"specs/{spec}.yaml"))
    for needle in needles:
        assert needle in text, (needle, text)


def test_explain_latex():
    text = explain(load_spec("specs/moneta.yaml"), latex=True)
    assert "\\tanh" in text


def _nested(function: str, depth: int) -> str:
    return f"{function}(" * depth + "r" + ")" * depth


def test_many_wheres_derive_fast():
    """Eleven where()s in one loss: linear work, not a fold into 2^11 branches (derive_bias, not
    the memoised derive, so the time is this derivation's own)."""
    spec = parse_spec(axis_spec(bias=SMOOTH_BIASES["many-wheres"]))
    start = time.perf_counter()
    rule = derive_bias(spec.bias)
    assert time.perf_counter() - start < 5.0
    assert len(rule.elem.atoms(sp.Piecewise)) == 11


@pytest.mark.parametrize(("loss", "message"), [
    (_nested("softplus", 12), "expands to over 1000 terms"),  # sympy never finished this one
    (_nested("sigmoid", 23), "allowed: at most 20000"),  # the derivatives outgrow the bound
])
def test_derivation_is_bounded(loss, message):
    """A short loss whose derivation grows exponentially is refused by a size bound, fast."""
    start = time.perf_counter()
    with pytest.raises(SpecError, match=message):
        checked_spec(axis_spec(bias=f"{{kind: expression, loss: '{loss}'}}"))
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("name", ["r", "v", "rnorm", "delta", "pi"])
def test_a_parameter_may_not_shadow_a_variable(name):
    """Each name the loss reads (and pi) is refused as a parameter name (mutation testing found
    only r checked)."""
    with pytest.raises(SpecError, match=rf"bias\.params\.{name}: shadows a variable"):
        checked_spec(axis_spec(bias=f"{{kind: expression, loss: 'r**2', params: {{{name}: 2.0}}}}"))


def test_a_channel_delta_in_the_norm_term_is_refused():
    """The robust loss's delta multiplies ||r||, one number per head: a delta per value channel
    is refused, with the field and what is allowed."""
    with pytest.raises(SpecError) as refused:
        checked_spec(axis_spec(bias="{kind: robust, delta: {shape: channel}}"))
    assert str(refused.value).endswith(
        "bias.delta.shape: 'channel' needs delta only in the elementwise loss; it enters the norm "
        "term here; allowed: 'head'")


def test_explain_states_a_smoothing_only_when_there_is_one():
    assert "smoothing" not in explain(load_spec("specs/yaad.yaml"))
    assert "smoothing" in explain(load_spec("specs/moneta.yaml"))
