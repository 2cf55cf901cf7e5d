"""Bad specs must fail with a `SpecError` that names the file, the YAML line, the dotted field and
what is allowed. Each case edits one place of a valid base spec, so its line numbers are known."""

from __future__ import annotations

from pathlib import Path

import pytest

import mirasc
from mirasc.catalog import checked_spec
from mirasc.errors import SpecError

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))

BASE = """\
name: base
description: a valid spec that each case below breaks in one place
memory:
  kind: matrix
bias:
  kind: lp
  p: 3
retention:
  kind: l2
  decay: {shape: head}
learner:
  kind: gd
  eta: {shape: head}
chunk_size: 16
"""
# line:  1 name, 3 memory, 4 memory.kind, 5 bias, 6 bias.kind, 7 bias.p, 8 retention,
#        9 retention.kind, 10 retention.decay, 11 learner, 12 learner.kind, 13 learner.eta,
#        14 chunk_size

BIAS_LP = "  kind: lp\n  p: 3\n"
RETENTION_L2 = "  kind: l2\n  decay: {shape: head}\n"
MLP = ("  kind: matrix\n", "  kind: mlp\n")
BIAS_KINDS = "'dot_product', 'l2', 'lp', 'huber', 'robust', 'expression'"
RETENTION_KINDS = "'none', 'l2', 'lq', 'kl', 'elastic_net', 'mirror'"
SPEC_FIELDS = "allowed: name, description, memory, bias, retention, learner, chunk_size, lag_token"
FUNCTIONS = "the functions abs, sign, sqrt, exp, log, tanh, sinh, cosh, atan, erf, sigmoid"


def edit(*replacements: tuple[str, str]) -> str:
    """BASE with each `old` (which must occur exactly once) replaced by `new`."""
    text = BASE
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} is not a unique part of the base spec"
        text = text.replace(old, new)
    return text


def loss(expression: str) -> str:
    return edit((BIAS_LP, f'  kind: expression\n  loss: "{expression}"\n'))  # loss on line 7


def potential(expression: str) -> str:
    return edit((RETENTION_L2, f'  kind: mirror\n  potential: "{expression}"\n'))  # line 10


def window(mapping: str) -> str:
    return edit((BIAS_LP, f"{BIAS_LP}  window: {mapping}\n"))  # bias.window on line 8


def muon(fields: str) -> str:
    """A muon learner with `fields` (one per line, from line 15)."""
    return edit(("  kind: gd\n  eta: {shape: head}\n",
                 f"  kind: muon\n  eta: {{}}\n  momentum: {{}}\n{fields}"))


def case(id, text, line, field, *hints, marks=()):
    return pytest.param(text, line, field, hints, id=id, marks=marks)


CASES = [
    # ---- unknown and misspelt fields
    case("field-typo-decya", edit(("  decay:", "  decya:")), 10, "retention.decya",
         "unknown field", "did you mean 'decay'?", "allowed: decay"),
    case("top-level-typo", edit(("chunk_size: 16", "chunk_sise: 16")), 14, "chunk_sise",
         "unknown field", "did you mean 'chunk_size'?", SPEC_FIELDS),
    case("mlp-field-typo", edit(MLP, ("  kind: mlp\n", "  kind: mlp\n  expnasion: 2\n")), 5,
         "memory.expnasion", "did you mean 'expansion'?", "depth, expansion, activation"),
    # ---- unknown kinds: the line of the `kind` key, and the allowed kinds
    case("unknown-bias-kind", edit((BIAS_LP, "  kind: l3\n")), 6, "bias.kind",
         "'l3' is not known", f"allowed: {BIAS_KINDS}"),
    case("unknown-retention-kind", edit((RETENTION_L2, "  kind: forget\n  decay: {}\n")), 9,
         "retention.kind", "'forget' is not known", f"allowed: {RETENTION_KINDS}"),
    case("unknown-memory-kind", edit(("  kind: matrix", "  kind: tensor")), 4, "memory.kind",
         "'tensor' is not known", "allowed: 'matrix', 'vector', 'mlp'"),
    case("unknown-learner-kind", edit(("  kind: gd", "  kind: adam")), 12, "learner.kind",
         "'adam' is not known", "allowed: 'gd', 'momentum', 'muon'"),
    # ---- values out of range
    case("lp-p-below-1", edit(("  p: 3", "  p: 0.5")), 7, "bias.p",
         "0.5 is not allowed", "greater than or equal to 1"),
    case("lq-q-equal-1", edit((RETENTION_L2, "  kind: lq\n  q: 1\n  decay: {}\n")), 10,
         "retention.q", "1 is not allowed", "greater than 1"),
    case("lq-q-below-1", edit((RETENTION_L2, "  kind: lq\n  decay: {}\n  q: 0.5\n")), 11,
         "retention.q", "0.5 is not allowed", "greater than 1"),
    case("chunk-size-too-big", edit(("chunk_size: 16", "chunk_size: 4096")), 14, "chunk_size",
         "4096 is not allowed", "less than or equal to 1024"),
    case("gate-shape", edit(("  eta: {shape: head}", "  eta: {shape: row}")), 13,
         "learner.eta.shape", "'row' is not allowed", "'head' or 'channel'"),
    case("bad-name", edit(("name: base", "name: 2fast")), 1, "name",
         "'2fast' is not allowed", "pattern"),
    # ---- missing fields
    case("missing-learner-eta", edit(("  eta: {shape: head}\n", "")), 11, "learner.eta",
         "required field is missing"),
    case("missing-bias-kind", edit(("  kind: lp\n", "")), 5, "bias",
         "needs a 'kind' field", f"allowed: {BIAS_KINDS}"),
    case("missing-name", edit(("name: base\n", "")), 1, "name", "required field is missing"),
    case("missing-retention", edit(("retention:\n" + RETENTION_L2, "")), 1, "retention",
         "required field is missing"),
    # ---- wrong types
    case("chunk-size-string", edit(("chunk_size: 16", 'chunk_size: "big"')), 14, "chunk_size",
         "'big' is not allowed", "valid integer"),
    case("mlp-depth-1", edit(MLP, ("  kind: mlp\n", "  kind: mlp\n  depth: 1\n")), 5,
         "memory.depth", "1 is not allowed", "greater than or equal to 2"),
    case("gate-value-string", edit(("  eta: {shape: head}", "  eta: {value: fast}")), 13,
         "learner.eta.value", "'fast' is not allowed", "valid number"),
    case("gate-not-a-mapping", edit(("  eta: {shape: head}", "  eta: 0.5")), 13, "learner.eta",
         "0.5 is not allowed: a gate is a mapping {shape: head | channel, value: number}",
         "a constant is {value: 0.5}"),
    case("bias-not-a-mapping", edit(("bias:\n" + BIAS_LP, "bias: lp\n")), 5, "bias",
         "'lp' is not allowed", "valid dictionary"),
    # ---- YAML itself
    case("duplicate-key", edit(("chunk_size: 16", "chunk_size: 16\nchunk_size: 32")), 15,
         "chunk_size", "duplicate key", "first given on line 14"),
    case("duplicate-nested-key", edit(("  p: 3\n", "  p: 3\n  p: 4\n")), 8, "bias.p",
         "duplicate key", "first given on line 7"),
    case("not-a-mapping-list", "- name: base\n- memory: {kind: matrix}\n", 1, None,
         "a spec is a YAML mapping", "name, memory, bias, retention, learner"),
    case("not-a-mapping-scalar", "just a sentence\n", 1, None, "a spec is a YAML mapping"),
    case("empty-file", "", 1, None, "a spec is a YAML mapping"),
    case("yaml-mapping-in-value", edit(("  p: 3", "  p: 3: 4")), 7, None,
         "not valid YAML", "mapping values are not allowed"),
    case("yaml-tab-indent", edit(("  p: 3", "\tp: 3")), 7, None, "not valid YAML", "'\\t'"),
    case("yaml-unclosed-bracket", edit(("  p: 3", "  p: [3")), 8, None,
         "not valid YAML", "while parsing a flow sequence on line 7"),
    # ---- cross-axis rules
    case("channel-gate-on-mlp", edit(MLP, ("  eta: {shape: head}", "  eta: {shape: channel}")),
         13, "learner.eta.shape", "'channel' is not allowed with memory.kind 'mlp'",
         "allowed: 'head'"),
    case("channel-decay-on-mlp", edit(MLP, ("  decay: {shape: head}", "  decay: {shape: channel}")),
         10, "retention.decay.shape", "'channel' is not allowed with memory.kind 'mlp'"),
    case("read-residual-output-without-residual",
         edit(("  kind: matrix\n", "  kind: matrix\n  read_residual: output\n")), 5,
         "memory.read_residual", "'output' is not allowed without memory.residual: true",
         "allowed: 'input'"),
    case("read-residual-unknown", edit(("  kind: matrix\n", "  kind: matrix\n  read_residual: q\n")),
         5, "memory.read_residual", "'q' is not allowed", "'input' or 'output'"),
    case("memory-bias-with-channel-decay",
         edit(("  kind: matrix\n", "  kind: matrix\n  bias: true\n"),
              ("  decay: {shape: head}", "  decay: {shape: channel}")),
         11, "retention.decay.shape", "'channel' is not allowed with memory.bias",
         "allowed: 'head'"),
    case("memory-bias-with-channel-eta",
         edit(("  kind: matrix\n", "  kind: matrix\n  bias: true\n"),
              ("  eta: {shape: head}", "  eta: {shape: channel}")),
         14, "learner.eta.shape", "'channel' is not allowed with memory.bias", "allowed: 'head'"),
    case("eta-at-unknown", edit(("  eta: {shape: head}\n", "  eta: {shape: head}\n  eta_at: t\n")),
         14, "learner.eta_at", "'t' is not allowed", "'key' or 'query'"),
    case("eta-at-on-momentum",
         edit(("  kind: gd\n  eta: {shape: head}\n",
               "  kind: momentum\n  eta: {}\n  momentum: {}\n  eta_at: query\n")),
         15, "learner.eta_at", "unknown field", "allowed: eta, momentum, grad_at"),
    case("layer-norm-eps-zero",
         edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: {affine: true, eps: 0}\n")),
         5, "memory.layer_norm.eps", "0 is not allowed", "greater than 0"),
    case("layer-norm-field-typo",
         edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: {afine: true}\n")),
         5, "memory.layer_norm.afine", "did you mean 'affine'?", "allowed: affine, eps"),
    case("layer-norm-not-a-flag", edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: 3\n")),
         5, "memory.layer_norm", "3 is not allowed",
         "allowed: true, false, or a mapping with fields affine, eps"),
    # ---- user expressions (bias.loss on line 7, retention.potential on line 10)
    case("loss-sign", loss("sign(r)"), 7, "bias.loss",
         "not differentiable", "jumps by 2 at r = 0", "abs is fine, sign is not"),
    case("loss-step-where", loss("where(r > 0, 1, 0)"), 7, "bias.loss", "not differentiable",
         "jumps by 1"),
    case("loss-jump-where", loss("where(r > 0, r**2 / 2, r**2 / 2 + 1)"), 7, "bias.loss",
         "not differentiable", "jumps by -1"),
    case("loss-without-r", loss("v**2"), 7, "bias.loss", "does not depend on r", "never learn"),
    case("loss-constant", loss("1"), 7, "bias.loss", "does not depend on r", "never learn"),
    case("loss-unknown-name", loss("r**2 / 2 + beta * r"), 7, "bias.loss",
         "unknown name 'beta'", "the variables r, rnorm, v", FUNCTIONS),
    case("loss-unknown-function", loss("floor(r)"), 7, "bias.loss",
         "the call floor(...) is not allowed", FUNCTIONS),
    case("loss-xor", loss("r ^ 2"), 7, "bias.loss", "use ** for powers"),
    case("loss-rnorm-term", loss("rnorm * r"), 7, "bias.loss",
         "rnorm only inside a where() condition", "bias.norm_loss"),
    case("norm-loss-uses-r", edit((BIAS_LP, '  kind: expression\n  loss: "r**2"\n'
                                            '  norm_loss: "r"\n')),
         8, "bias.norm_loss", "unknown name 'r'", "the variables rnorm,"),
    case("param-shadows-r", edit((BIAS_LP, '  kind: expression\n  loss: "a * r**2"\n'
                                           "  params: {a: 1, r: 2}\n")),
         8, "bias.params.r", "shadows a variable"),
    case("mirror-quartic", potential("w**4 - w**2"), 10, "retention.potential",
         "real solutions", "4*w**3 - 2*w", "strictly convex"),
    case("mirror-cubic", potential("w**3"), 10, "retention.potential",
         "real solutions", "3*w**2", "strictly convex"),
    case("mirror-linear", potential("2 * w"), 10, "retention.potential",
         "f'(w) = 2 must depend on w", "strictly convex"),
    case("mirror-unknown-name", potential("w**2 / 2 + c * w"), 10, "retention.potential",
         "unknown name 'c'", "the variables w,"),
    case("mirror-concave", potential("-w**2 / 2"), 10, "retention.potential", "convex",
         "does not increase"),
    # ---- constants and parameters: finite real float64 numbers, powers of at most 64
    case("loss-overflowing-product", loss("1e308 * 10 * r**2"), 7, "bias.loss",
         "1e+308 * 10 is not a finite real number in float64"),
    case("loss-exp-overflow", loss("exp(1000) * r**2"), 7, "bias.loss",
         "exp(1000) is not a finite real number in float64"),
    case("loss-exp-tower", loss("exp(exp(exp(exp(10)))) * r**2"), 7, "bias.loss",
         "exp(exp(10)) is not a finite real number in float64"),
    case("loss-sqrt-of-negative", loss("sqrt(-1) * r**2"), 7, "bias.loss",
         "sqrt(-1) is not a finite real number"),
    case("loss-log-of-negative", loss("log(-1) * r**2"), 7, "bias.loss",
         "log(-1) is not a finite real number"),
    case("loss-param-exponent", edit((BIAS_LP, "  kind: expression\n  loss: abs(r)**c\n"
                                               "  params: {c: 1.0e300}\n")), 7, "bias.loss",
         "raises to the power 1.000E+300", "exponents of at most 64"),
    case("loss-param-overflow", edit((BIAS_LP, "  kind: expression\n  loss: c * c * r**2\n"
                                               "  params: {c: 1.0e200}\n")), 7, "bias.loss",
         "holds 1.000E+400, not a finite real number in float64"),
    case("mirror-param-exponent", edit((RETENTION_L2, "  kind: mirror\n  potential: abs(w)**c\n"
                                                      "  params: {c: 1.0e300}\n")), 10,
         "retention.potential", "raises to the power 1.000E+300"),
    # ---- losses that jump in r, or are not finite and real on either side of a point
    case("loss-abs-over-r", loss("abs(r) / r"), 7, "bias.loss", "jumps by 2 at r = 0"),
    case("loss-transcendental-switch", loss("where(tanh(r) + r > 1, r**2, r**2 + 1)"), 7,
         "bias.loss", "jumps by -1 at r = 0.5213"),
    case("loss-jump-in-rnorm", loss("where(rnorm <= 1, r**2, abs(r))"), 7, "bias.loss",
         "jumps by 0.2475 at rnorm = 1 (with r = 0.45)"),
    case("loss-pole", loss("1 / r"), 7, "bias.loss", "is infinite at r = 0"),
    case("loss-log-pole", loss("log(abs(r))"), 7, "bias.loss", "is infinite at r = 0"),
    case("loss-sqrt-of-r", loss("sqrt(r)"), 7, "bias.loss",
         "is not finite and real on both sides of r = 0"),
    case("loss-overflows-at-a-draw", loss("exp(exp(exp(exp(exp(r)))))"), 7, "bias.loss",
         "is not a finite real number in float64 at r = 0.45"),
    case("loss-deep-nesting", loss("tanh(" * 30 + "r" + ")" * 30), 7, "bias.loss",
         "nests operations more than 24 deep"),
    case("mirror-abs", potential("abs(w)"), 10, "retention.potential",
         "sympy cannot solve f'(w) = z for f'(w) = sign(w)"),
    # ---- YAML that would be expensive or ambiguous to walk
    case("yaml-anchor", edit(("  p: 3", "  p: &three 3")), 7, "bias.p",
         "anchors and aliases", "write the value out"),
    case("yaml-alias", edit(("chunk_size: 16", "chunk_size: 16\nlag_token: *flag"),
                            ("name: base", "name: &flag base")), 1, "name", "anchors and aliases"),
    case("yaml-deep-nesting", edit(("  p: 3", "  p: " + "[" * 5000 + "]" * 5000)), 7,
         "bias.p.0.0.0.0.0.0.0.0.0.0", "nested more than 12 levels deep"),
    case("yaml-complex-key", edit(("chunk_size: 16", "? [chunk_size]\n: 16")), 14, "<spec>",
         "a key must be a plain name"),
    case("yaml-lone-surrogate", edit(("description: a valid", 'description: "\\ud800 valid'),
                                     ("in one place", 'in one place"')), 2, "description",
         "'\\ud800' at character 0 is not Unicode text", "allowed: UTF-8 text"),
    # ---- numbers: finite, of the right type, in their range
    *[case(f"non-finite-{field}-{value}", text, line, field, f"{value} is not allowed",
           "finite number")
      for value in ("inf", "nan")
      for field, text, line in [
          ("bias.p", edit(("  p: 3", f"  p: .{value}")), 7),
          ("bias.temperature", edit(("  p: 3", f"  p: 3\n  temperature: .{value}")), 8),
          ("retention.q", edit((RETENTION_L2, f"  kind: lq\n  q: .{value}\n")), 10),
          ("retention.scale", edit((RETENTION_L2, f"  kind: kl\n  scale: .{value}\n")), 10),
          ("retention.gamma", edit((RETENTION_L2, f"  kind: elastic_net\n  gamma: .{value}\n")),
           10),
          ("memory.layer_norm.eps", edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: "
                                                            f"{{eps: .{value}}}\n")), 5),
          ("learner.eta.value", edit(("  eta: {shape: head}", f"  eta: {{value: .{value}}}")), 13),
          ("bias.params.c", edit((BIAS_LP, "  kind: expression\n  loss: c * r**2\n"
                                           f"  params: {{c: .{value}}}\n")), 8),
          ("retention.params.c", edit((RETENTION_L2, "  kind: mirror\n  potential: c * w**2\n"
                                                     f"  params: {{c: .{value}}}\n")), 11),
      ]],
    case("lp-p-huge", edit(("  p: 3", "  p: 1.0e9")), 7, "bias.p", "less than or equal to 64"),
    case("lq-q-huge", edit((RETENTION_L2, "  kind: lq\n  q: 1.0e9\n")), 10, "retention.q",
         "less than or equal to 64"),
    case("chunk-size-true", edit(("chunk_size: 16", "chunk_size: true")), 14, "chunk_size",
         "True is not allowed", "valid integer"),
    case("mlp-depth-float", edit(MLP, ("  kind: mlp\n", "  kind: mlp\n  depth: 2.5\n")), 5,
         "memory.depth", "2.5 is not allowed", "valid integer"),
    case("lp-p-true", edit(("  p: 3", "  p: true")), 7, "bias.p", "a number, not true or false"),
    case("residual-number", edit(("  kind: matrix\n", "  kind: matrix\n  residual: 1\n")), 5,
         "memory.residual", "1 is not allowed", "valid boolean"),
    case("name-too-long", edit(("name: base", "name: " + "n" * 300)), 1, "name",
         "(300 characters) is not allowed", "at most 64 characters"),
    case("decay-negative", edit(("  decay: {shape: head}", "  decay: {value: -0.5}")), 10,
         "retention.decay.value", "-0.5 is not allowed", "allowed: 0 < value <= 1"),
    case("decay-zero", edit(("  decay: {shape: head}", "  decay: {value: 0}")), 10,
         "retention.decay.value", "0.0 is not allowed", "allowed: 0 < value <= 1"),
    case("decay-above-1", edit(("  decay: {shape: head}", "  decay: {value: 2}")), 10,
         "retention.decay.value", "2.0 is not allowed", "allowed: 0 < value <= 1"),
    case("eta-negative", edit(("  eta: {shape: head}", "  eta: {value: -1}")), 13,
         "learner.eta.value", "-1.0 is not allowed", "allowed: value > 0"),
    case("momentum-above-1", edit(("  kind: gd\n  eta: {shape: head}\n",
                                   "  kind: momentum\n  eta: {}\n  momentum: {value: 2}\n")), 14,
         "learner.momentum.value", "2.0 is not allowed", "allowed: 0 <= value <= 1"),
    case("huber-delta-negative", edit((BIAS_LP, "  kind: huber\n  delta: {value: -1}\n")), 7,
         "bias.delta.value", "-1.0 is not allowed", "allowed: value > 0"),
    *(case(f"boolean-word-{word}", edit(("chunk_size: 16", f"chunk_size: 16\nlag_token: {word}")),
           15, "lag_token", f"{word!r} is not allowed", "booleans are true and false only",
           "write true or false") for word in ("yes", "No", "ON", "off", "oFF")),
    case("boolean-word-in-a-flow-mapping",
         edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: {affine: Yes}\n")), 5,
         "memory.layer_norm.affine", "'Yes' is not allowed", "quote it ('Yes') for the text"),
    case("boolean-word-as-text", edit(("name: base", "name: off")), 1, "name",
         "'off' is not allowed", "quote it"),
    # ---- bias.window (on line 8)
    case("window-wider-than-a-chunk", window("{size: 17}"), 8, "bias.window.size",
         "17 is not allowed with chunk_size 16", "allowed: 1 <= size <= chunk_size"),
    case("window-of-no-tokens", window("{size: 0}"), 8, "bias.window.size", "0 is not allowed",
         "greater than or equal to 1"),
    case("window-size-not-an-integer", window("{size: 2.5}"), 8, "bias.window.size",
         "2.5 is not allowed", "valid integer"),
    case("window-field-typo", window("{size: 2, wieght: {}}"), 8, "bias.window.wieght",
         "did you mean 'weight'?", "allowed: size, weight"),
    case("window-weight-negative", window("{size: 2, weight: {value: -1}}"), 8,
         "bias.window.weight.value", "-1.0 is not allowed", "allowed: value >= 0"),
    case("window-weight-per-channel", window("{size: 2, weight: {shape: channel}}"), 8,
         "bias.window.weight.shape", "'channel' is not allowed", "allowed: 'head'"),
    case("window-with-a-lag-token", window("{size: 2}") + "lag_token: true\n", 8,
         "bias.window.size", "2 is not allowed with lag_token: true", "allowed: 1, or lag_token"),
    case("window-with-grad-at-retained",
         window("{size: 3}").replace("  eta: {shape: head}\n",
                                     "  eta: {shape: head}\n  grad_at: retained\n"), 15,
         "learner.grad_at", "'retained' is not allowed with bias.window.size 3",
         "allowed: 'previous', or size 1"),
    # ---- learner muon (its fields from line 15)
    case("muon-no-ns-steps", muon("  ns_steps: 0\n"), 15, "learner.ns_steps", "0 is not allowed",
         "greater than or equal to 1"),
    case("muon-too-many-ns-steps", muon("  ns_steps: 11\n"), 15, "learner.ns_steps",
         "11 is not allowed", "less than or equal to 10"),
    case("muon-ns-steps-not-an-integer", muon("  ns_steps: 2.5\n"), 15, "learner.ns_steps",
         "2.5 is not allowed", "valid integer"),
    case("muon-apply-unknown", muon("  apply: sequence\n"), 15, "learner.apply",
         "'sequence' is not allowed", "'token' or 'chunk'"),
    case("muon-eta-per-channel", muon("").replace("eta: {}", "eta: {shape: channel}"), 13,
         "learner.eta.shape", "'channel' is not allowed with learner.kind 'muon'",
         "allowed: 'head'"),
    case("muon-eta-at", muon("  eta_at: query\n"), 15, "learner.eta_at", "unknown field",
         "allowed: eta, momentum, ns_steps, apply, grad_at"),
]


def test_base_spec_is_valid():
    spec = checked_spec(BASE, source="base.yaml")
    assert (spec.memory.kind, spec.bias.kind, spec.bias.p) == ("matrix", "lp", 3)
    assert (spec.retention.kind, spec.learner.kind, spec.chunk_size) == ("l2", "gd", 16)


@pytest.mark.parametrize(("text", "line", "field", "hints"), CASES)
def test_bad_spec(text, line, field, hints):
    with pytest.raises(SpecError) as info:
        checked_spec(text, source="bad.yaml")
    message = str(info.value)
    # one line of the message places the problem: "bad.yaml:<line>: <field>: ..."
    prefix = f"bad.yaml:{line}: " + (f"{field}: " if field else "")
    assert any(row.startswith(prefix) for row in message.splitlines()), (prefix, message)
    if field is None:
        assert message.startswith(prefix) and "\n" not in message
    for hint in hints:
        assert hint in message, (hint, message)


def test_errors_are_clean_spec_errors():
    """A SpecError is a ValueError raised without a chained traceback (`from None`)."""
    with pytest.raises(ValueError) as info:
        checked_spec(loss("floor(r)"), source="bad.yaml")
    assert isinstance(info.value, SpecError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_specs_load(path):
    spec = mirasc.load_spec(path)
    assert spec.name == path.stem


def test_specs_are_shipped():
    assert len(SPECS) >= 10


def test_load_spec_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.yaml"
    with pytest.raises(SpecError) as info:
        mirasc.load_spec(path)
    assert str(info.value).startswith(f"{path}: cannot read the spec")
    assert "No such file" in str(info.value)


def test_load_spec_reports_the_file_and_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(edit(("  p: 3", "  p: 0.5")))
    with pytest.raises(SpecError) as info:
        mirasc.load_spec(path)
    assert str(info.value).startswith(f"{path}:7: bias.p: 0.5 is not allowed")


def test_booleans_are_true_and_false_and_quoted_words_are_text():
    spec = checked_spec(edit(("chunk_size: 16", "chunk_size: 16\nlag_token: true"),
                             ("name: base\ndescription: a valid spec that each case below "
                              "breaks in one place", "name: base\ndescription: 'yes'")))
    assert spec.lag_token is True and spec.description == "yes"


def test_numbers_in_exponent_notation_are_numbers():
    """YAML 1.1 reads 1e-3 (no dot) as a string; it is still the number it spells."""
    spec = checked_spec(edit(("  kind: matrix\n", "  kind: matrix\n  layer_norm: {eps: 1e-3}\n")))
    assert spec.memory.layer_norm.eps == 1e-3


def test_alias_bomb_is_refused_before_it_expands():
    """Nine levels of nine aliases each: 9^9 leaves if anything walked it."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = BASE + "extra:\n" + "".join(f"  {line}\n" for line in levels)
    with pytest.raises(SpecError, match=r"bad.yaml:16: extra.l0: YAML anchors and aliases"):
        checked_spec(text, source="bad.yaml")


def test_binary_spec_file_is_a_clean_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: x\n\xff\xfe\x00\x01")
    with pytest.raises(SpecError) as info:
        mirasc.load_spec(path)
    assert str(info.value) == (f"{path}:2: not UTF-8 text (byte 0xff at offset 8); a spec is a "
                               "YAML text file")


def test_oversized_spec_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"<spec>:1: the spec has 100001 characters; allowed: at "
                                        r"most 100000"):
        checked_spec(BASE + "#" * (100_001 - len(BASE)))
