"""mirasc against the second oracle (tests/oracle.py: the paper's losses, autograd's inner
gradient, the chunk form restated), in float64 with relative errors: the shipped specs through
the kernels (Triton's interpreter), the torch path and the reference; every axis value the tests
use through the reference; each where() of a loss on both sides; and the derivation's g, dg/dr
and retention maps against autograd and the paper's formulas."""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import axis_spec, op_from_yaml, run_generated
from test_triton_kernels import BIASES, LEARNERS, MEMORIES, OPTION_CASES, RETENTIONS

from mirasc import torch_chunk
from mirasc.check import cover_branches
from mirasc.codegen import render_module, triton_unsupported
from mirasc.derive import DELTA, RNORM, R, V, Z
from mirasc.errors import SpecError
from mirasc.expr import to_torch
from mirasc.op import MirasOp
from mirasc.reference import bias_grad

SPECS = Path(__file__).parent.parent / "specs"
SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml"))
RANGES = {"log_alpha": (-0.6, -0.02), "eta": (0.1, 1.5), "delta": (0.05, 1.0),
          "momentum": (0.1, 0.95), "window_weight": (0.2, 1.0)}


def draw(op, seed: int, length: int = 29, heads: int = 2, dk: int = 5, dv: int = 5,
         ranges: dict | None = None) -> dict:
    """Random float64 inputs (nothing zero): unit q and k, gates in `ranges` (eta up to 1.5), a
    random initial state and, for an affine layer norm, its parameters around the identity."""
    ranges = RANGES | (ranges or {})
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": F.normalize(randn(2, length, heads, dk), dim=-1),
         "k": F.normalize(randn(2, length, heads, dk), dim=-1), "v": randn(2, length, heads, dv)}
    for name, gate in op.derivation.op_gates().items():
        if gate.is_input:
            width = (dv if name == "delta" else dk,) if gate.shape == "channel" else ()
            low, high = ranges[name]
            x[name] = low + (high - low) * torch.rand(2, length, heads, *width, generator=gen,
                                                      dtype=torch.float64)
    x["initial_state"] = tuple(randn(*s) / math.sqrt(s[-1])
                               for s in op.state_shapes(2, heads, dk, dv))
    if op.affine:
        x["ln_weight"], x["ln_bias"] = 1 + randn(heads, dv) / 4, randn(heads, dv) / 4
    return x


def _kernel_op(text: str):
    """The op of the module generated for a spec text (its kernels, in the interpreter on CPU)."""
    op = run_generated(render_module(op_from_yaml(text).spec)).op
    assert op.backend == "triton"
    return op


def _assert_small(errors: dict, limit: float = 1e-9):
    assert errors, "nothing was compared"
    bad = {name: e for name, e in errors.items() if not e <= limit}  # NaN is never <= limit
    assert not bad, bad


# ---- the shipped specs: kernels, torch path, reference ----------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_matches_the_oracle(name):
    """Chunks of 6 over 19 tokens (a partial last chunk), seeds and eta beyond the usual draws:
    output, final state and every input gradient of the reference (chunked as the kernels) and
    of the kernels against the oracle. An MLP memory runs the kernels' chunk step on the torch
    path here (Triton's interpreter takes 6-13 s for one; Yaad's kernels are checked below)."""
    text = (SPECS / f"{name}.yaml").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("chunk_size"))
    op = _kernel_op(text + "\nchunk_size: 6\n")
    mlp = op.spec.memory.kind == "mlp"
    inputs = draw(op, seed=10 + SHIPPED.index(name), length=19, dk=4, dv=4,
                  ranges={"eta": (0.1, 1.0)} if mlp else None)
    inputs = cover_branches(op, inputs, seed=SHIPPED.index(name))  # Yaad: delta across ||r||
    chunk = op.oracle_chunk_size
    subjects = {"reference": lambda **x: op.reference(**x, chunk_size=chunk),
                "torch path" if mlp else "kernels": (lambda **x: op(**x, backend="torch")) if mlp
                else op}
    for label, subject in subjects.items():
        errors = oracle.errors_against_oracle(subject, op.spec, inputs, chunk)
        _assert_small({f"{label}: {n}": e for n, e in errors.items()})


# ---- every axis value the kernel tests draw from, through the reference ------------------------

AXIS_CASES = ({f"bias {b}": {"bias": b} for b in BIASES}
              | {f"retention {r}": {"retention": r} for r in RETENTIONS}
              | {f"learner {lr}": {"learner": lr} for lr in LEARNERS}
              | {f"memory {m}": {"memory": m} for m in MEMORIES}
              | {f"option {name}": axes for name, axes in OPTION_CASES.items()}
              | {"lag token, momentum": {"learner": LEARNERS[5], "extra": "lag_token: true"}}
              | {"window of 3, huber": {"bias": "{kind: huber, delta: {}, window: {size: 3, "
                                                "weight: {}}}"}})


@pytest.mark.parametrize("case", sorted(AXIS_CASES))
def test_axis_values_match_the_oracle(case):
    """The reference (every kernel test's oracle) on each axis value, chunks of 5 over 17
    tokens, forward and every input gradient."""
    axes = AXIS_CASES[case]
    op = op_from_yaml(axis_spec(**axes).replace("chunk_size: 4", "chunk_size: 5"))
    dk = 4
    dv = dk if op.spec.memory.residual or op.spec.memory.kind == "vector" else 3
    steep = op.spec.bias.kind == "lp"  # a cubic loss diverges at steps near 1 (both sides inf)
    inputs = draw(op, seed=sorted(AXIS_CASES).index(case) + 1, length=17, dk=dk, dv=dv,
                  ranges={"eta": (0.05, 0.4) if steep else (0.1, 1.0)})
    for chunk in dict.fromkeys((op.oracle_chunk_size, None)):
        errors = oracle.errors_against_oracle(
            lambda chunk=chunk, **x: op.reference(**x, chunk_size=chunk), op.spec, inputs, chunk)
        _assert_small({f"chunk {chunk}: {n}": e for n, e in errors.items()})


MUON_CASES = {  # the reference's muon learner on each memory and both applies
    "matrix, bias, layer norm": {"memory": "{kind: matrix, bias: true, layer_norm: true}",
                                 "bias": "{kind: huber, delta: {}}",
                                 "learner": "{kind: muon, eta: {}, momentum: {}}"},
    "mlp, biases, apply chunk": {"memory": "{kind: mlp, depth: 2, expansion: 2, bias: true}",
                                 "learner": "{kind: muon, eta: {}, momentum: {}, apply: chunk}"},
    "vector, kl, retained": {"memory": "{kind: vector}", "retention": RETENTIONS[6],
                             "learner": "{kind: muon, eta: {}, momentum: {shape: channel}, "
                                        "ns_steps: 3, grad_at: retained}"},
}


@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_muon_matches_the_oracle(case):
    """The reference's muon (NS_k per memory tensor, a vector's x / ||x||) against the oracle's
    own Newton-Schulz: chunks of 5 over 12 tokens and the token recurrence, forward and every
    input gradient."""
    op = op_from_yaml(axis_spec(**MUON_CASES[case]).replace("chunk_size: 4", "chunk_size: 5"))
    dv = 3 if op.spec.memory.kind == "matrix" else 4
    inputs = draw(op, seed=sorted(MUON_CASES).index(case) + 80, length=12, dk=4, dv=dv)
    for chunk in (5, None):
        errors = oracle.errors_against_oracle(
            lambda chunk=chunk, **x: op.reference(**x, chunk_size=chunk), op.spec, inputs, chunk)
        _assert_small({f"chunk {chunk}: {n}": e for n, e in errors.items()})


BUILDER_CASES = AXIS_CASES | {  # grad_at 'retained' on the other paths, a lag token with a
    # proximal map, an affine layer norm or muon applied per chunk, an exact (WY/UT) update whose
    # g is not r - v, and a chunk-end map read through a residual and an affine layer norm
    "retained, channel decay": {"retention": "{kind: l2, decay: {shape: channel}}",
                                "bias": "{kind: huber, delta: {}}", "learner": LEARNERS[3]},
    "retained, channel decay, exact": {"retention": "{kind: l2, decay: {shape: channel}}",
                                       "learner": LEARNERS[3]},
    "retained, momentum": {"bias": "{kind: huber, delta: {}}",
                           "learner": "{kind: momentum, eta: {}, momentum: {}, grad_at: retained}"},
    "retained, vector": {"memory": "{kind: vector}", "bias": "{kind: huber, delta: {}}",
                         "learner": LEARNERS[3]},
    "lag token, proximal": {"retention": RETENTIONS[9], "extra": "lag_token: true"},
    "lag token, affine layer norm": {"memory": "{kind: matrix, layer_norm: {affine: true}}",
                                     "extra": "lag_token: true"},
    "exact, g = 1.4 r + v": {"bias": "{kind: expression, loss: '0.7 * r**2 + r * v'}"},
    "muon per chunk, lag token, lq map": {
        "retention": RETENTIONS[4], "extra": "lag_token: true",
        "learner": "{kind: muon, eta: {}, momentum: {}, apply: chunk, ns_steps: 3}"},
    "lq map, residual, affine layer norm": {
        "memory": "{kind: matrix, residual: true, layer_norm: {affine: true}}",
        "retention": RETENTIONS[4]},
}


@pytest.mark.parametrize("case", sorted(BUILDER_CASES))
def test_axis_values_on_the_torch_path_match_the_oracle(case, monkeypatch):
    """The kernels' chunk-step graph (mirasc/memories), run in torch, on each axis value that has
    kernels and on the retained gradient point of each path: chunks of 5 over 17 tokens (16 with
    a lag token), each where() on both sides, forward and every input gradient against the
    oracle (the builders' decays, updates and maps, not the reference's)."""
    axes = BUILDER_CASES[case]
    derivation = op_from_yaml(axis_spec(**axes).replace("chunk_size: 4", "chunk_size: 5")).derivation
    if triton_unsupported(derivation) is not None:
        pytest.skip(f"no kernels: {triton_unsupported(derivation)}")
    op = MirasOp(derivation, kernel=lambda *a: pytest.fail("the kernel ran"))
    calls, run = [], torch_chunk.run
    monkeypatch.setattr(torch_chunk, "run", lambda *a: calls.append(1) or run(*a))
    dk = 4
    dv = dk if op.spec.memory.residual or op.spec.memory.kind == "vector" else 3
    steep = op.spec.bias.kind == "lp"
    length = 16 if op.spec.lag_token else 17  # a last chunk of one token: an empty segment
    inputs = draw(op, seed=sorted(BUILDER_CASES).index(case) + 50, length=length, dk=dk, dv=dv,
                  ranges={"eta": (0.05, 0.4) if steep else (0.1, 1.0)})
    inputs = cover_branches(op, inputs, seed=sorted(BUILDER_CASES).index(case))
    _assert_small(oracle.errors_against_oracle(lambda **x: op(**x, backend="torch"), op.spec,
                                               inputs, op.oracle_chunk_size))
    assert calls  # the chunk step ran, not the reference


EXACT_CASES = {  # the exact (WY/UT) kernels beyond the shipped specs: gradient at W_(t-1)
    "l2, head decay": axis_spec(),  # (a channel decay takes 12 s in the interpreter)
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_kernels_match_the_oracle(case):
    """The token recurrence's kernels, 3 chunks of 8 and a partial one, against the oracle."""
    op = _kernel_op(EXACT_CASES[case].replace("chunk_size: 4", "chunk_size: 8"))
    assert op.oracle_chunk_size is None
    inputs = draw(op, seed=30 + sorted(EXACT_CASES).index(case), length=27)
    _assert_small(oracle.errors_against_oracle(op, op.spec, inputs, None))


# ---- each where() on both sides ---------------------------------------------------------------

BRANCH_CASES = {  # where() in the loss or the retention map; delta redrawn across the residuals
    "yaad": ((SPECS / "yaad.yaml").read_text(), "yaad ||r|| <= delta"),
    "huber coordinate": (axis_spec(bias="{kind: huber, delta: {shape: channel}}"),
                         "huber |r_j| <= delta"),
    "huber norm": (axis_spec(bias="{kind: huber, variant: norm, delta: {}}",
                             learner="{kind: gd, eta: {}, grad_at: retained}"),
                   "huber ||r|| <= delta"),
    "elastic net threshold": (axis_spec(retention="{kind: elastic_net, gamma: 0.3, decay: {}}"),
                              "elastic net |z| > gamma"),
    "user where": (axis_spec(bias="{kind: expression, loss: 'where(abs(r) < c, r**2 / 2, "
                                  "c * abs(r) - c**2 / 2)', params: {c: 0.75}}"),
                   "abs(r) < c"),
}


@pytest.mark.parametrize("case", sorted(BRANCH_CASES))
def test_each_where_takes_both_branches_in_the_kernels(case):
    """The kernels against the oracle where each branch holds 10-90 % of the entries the where()
    meets (counted by the oracle itself): the usual delta draw (0.05-1) misses Yaad's quadratic
    branch, as ||r|| > 1 there, so delta is redrawn across the residual norms (cover_branches)."""
    text, branch = BRANCH_CASES[case]
    text = "\n".join(line for line in text.splitlines() if not line.startswith("chunk_size"))
    op = _kernel_op(text + "\nchunk_size: 6\n")
    inputs = cover_branches(op, draw(op, seed=40 + sorted(BRANCH_CASES).index(case), length=23),
                            seed=3)
    tally = oracle.Tally()
    errors = oracle.errors_against_oracle(op, op.spec, inputs, op.oracle_chunk_size, tally=tally)
    share = tally.shares()[branch]
    assert 0.1 <= share <= 0.9, tally.shares()
    _assert_small(errors)


def test_float64_kernels_keep_a_specs_constants():
    """A constant that float32 cannot hold (c = 0.8) keeps its float64 value in the kernels: the
    reference and the torch path agree with the oracle to 1e-15 here (printed as a Python float,
    which Triton takes as float32, it erred by 1.6e-8)."""
    op = _kernel_op(axis_spec(bias="{kind: expression, loss: 'where(abs(r) < c, r**2 / 2, "
                                   "c * abs(r) - c**2 / 2)', params: {c: 0.8}}"))
    inputs = draw(op, seed=6, length=13)
    _assert_small(oracle.errors_against_oracle(op, op.spec, inputs, op.oracle_chunk_size), 1e-12)


def test_vector_memory_wider_than_16():
    """A vector memory of width 17 (the hypothesis sweep found it failing: its q and k run along
    the value columns, and were loaded in key blocks of 32 beside value blocks of 16)."""
    op = _kernel_op(axis_spec(memory="{kind: vector}").replace("chunk_size: 4", "chunk_size: 16"))
    inputs = draw(op, seed=8, length=20, dk=17, dv=17)
    _assert_small(oracle.errors_against_oracle(op, op.spec, inputs, op.oracle_chunk_size))


# ---- the derivation against autograd and the paper's formulas ---------------------------------

BUILTIN = ["{kind: dot_product}", "{kind: l2}", "{kind: lp, p: 3}", "{kind: lp, p: 2.5, smooth: false}",
           "{kind: lp, p: 1.5, temperature: 4, eps: 0.01}", "{kind: huber, delta: {}}",
           "{kind: huber, variant: norm, delta: {}}", "{kind: huber, variant: switch, delta: {}}",
           "{kind: robust, delta: {}}"]
TERMS = ["r**2 / 2", "log(cosh(r))", "abs(r)**3", "sqrt(1 + r**2)", "softplus(r) + softplus(-r)",
         "r * atan(r)", "exp(-v) * r**2", "r * v", "erf(r) * r", "sigmoid(r) * r**2",
         "where(abs(r) < c, r**2 / 2, c * abs(r) - c**2 / 2)", "where(r > 0, r**3, r**2)",
         "delta * r**2", "sinh(r / 2)**2", "r**4 / (1 + r**2)"]
NORM_TERMS = ["0", "rnorm**3 / 3", "log(1 + rnorm**2)", "delta * sqrt(1 + rnorm**2)",
              "where(rnorm < delta, rnorm**2, 2 * delta * rnorm - delta**2)"]


def _generated_biases(count: int = 24, seed: int = 5) -> list[str]:
    """User losses drawn from TERMS and NORM_TERMS: two terms with coefficients, one norm term."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        a, b = rng.sample(TERMS, 2)
        loss = f"{rng.uniform(0.2, 2):.3f} * ({a}) + {rng.uniform(0.2, 2):.3f} * ({b})"
        found.append(f"{{kind: expression, loss: '{loss}', norm_loss: '{rng.choice(NORM_TERMS)}', "
                     f"params: {{c: {rng.uniform(0.3, 1.5):.3f}}}, delta: {{}}}}")
    return found


def _points(seed: int, dv: int = 6):
    """r ~ N(0, 1.5^2) (|r_j| ~ 1, ||r|| ~ 3.7), v ~ N(0, 1), delta per head log-uniform on
    (0.3, 10): both sides of a threshold on |r_j| and of one on ||r||."""
    gen = torch.Generator().manual_seed(seed)
    r = 1.5 * torch.randn(8, 4, dv, generator=gen, dtype=torch.float64)
    v = torch.randn(8, 4, dv, generator=gen, dtype=torch.float64)
    u = torch.rand(8, 4, 1, generator=gen, dtype=torch.float64)
    return r, v, (math.log(0.3) + u * math.log(10 / 0.3)).exp()


def _derived_jacobian(d, r, v, delta):
    """dg_j/dr_k from the derivation's partials: d_elem['r'] on the diagonal, the rnorm terms
    through d||r||/dr_k = r_k / ||r||, and norm * delta_jk + d_norm['rnorm'] r_j r_k / ||r||."""
    rnorm = (r.square().sum(-1, keepdim=True) + oracle.NORM_EPS).sqrt()
    env = {R: r, V: v, RNORM: rnorm, DELTA: delta}

    def ev(expr):
        return torch.zeros_like(r) + to_torch(expr, env)

    unit = r / rnorm
    return (torch.diag_embed(ev(d.bias.d_elem["r"]) + ev(d.bias.norm))
            + ev(d.bias.d_elem["rnorm"]).unsqueeze(-1) * unit.unsqueeze(-2)
            + (ev(d.bias.d_norm["rnorm"]) * r).unsqueeze(-1) * unit.unsqueeze(-2))


@pytest.mark.parametrize("bias", BUILTIN + _generated_biases(),
                         ids=BUILTIN + [f"generated-{i}" for i in range(len(_generated_biases()))])
def test_derived_gradient_and_slope_match_autograd(bias):
    """g = dl/dr of the derivation against autograd of the oracle's loss (the paper's formula
    for a built-in bias, the spec text walked into torch for a user one), and its Jacobian
    dg/dr (what the backward uses) against autograd of the oracle's g, at points where every
    where() of the loss takes both branches."""
    try:
        d = op_from_yaml(axis_spec(bias=bias)).derivation
    except SpecError as exc:  # a drawn loss sympy cannot handle is refused, never accepted wrong
        assert "allowed" in str(exc) or "not differentiable" in str(exc), str(exc)
        pytest.skip(f"refused: {exc}")
    r, v, delta = (x.requires_grad_() for x in _points(seed=len(bias)))
    tally = oracle.Tally()
    g = oracle.bias_gradient(d.spec.bias, r, v, delta, tally, create_graph=True)
    assert oracle.relative_error(bias_grad(d, r.detach(), v.detach(), delta.detach()),
                                 g.detach()) < 1e-12

    def slope(y, x):  # autograd's d(y)/dx, zero where y does not depend on x
        (out,) = torch.autograd.grad(y, x, retain_graph=True, allow_unused=True)
        return torch.zeros_like(x) if out is None else out

    rows = range(r.shape[-1])
    jacobian = torch.stack([slope(g[..., j].sum(), r) for j in rows], -2)
    assert oracle.relative_error(_derived_jacobian(d, r.detach(), v.detach(), delta.detach()),
                                 jacobian) < 1e-10
    env = {R: r.detach(), V: v.detach(), RNORM: (r.detach().square().sum(-1, keepdim=True)
                                                 + oracle.NORM_EPS).sqrt(), DELTA: delta.detach()}
    ev = lambda e: torch.zeros_like(r) + to_torch(e, env)  # noqa: E731
    by_v = torch.stack([slope(g[..., j].sum(), v) for j in rows], -2)
    assert oracle.relative_error(torch.diag_embed(ev(d.bias.d_elem["v"])), by_v) < 1e-10
    weights = torch.randn(r.shape, generator=torch.Generator().manual_seed(2), dtype=r.dtype)
    by_delta = slope((g * weights).sum(), delta)
    derived = ((ev(d.bias.d_elem["delta"]) + ev(d.bias.d_norm["delta"]) * r.detach()) * weights)
    assert oracle.relative_error(derived.sum(-1, keepdim=True), by_delta) < 1e-10
    for name, share in tally.shares().items():
        assert 0.1 <= share <= 0.9, (name, share)


RETENTION_MAPS = ["{kind: lq, q: 4, decay: {}}", "{kind: lq, q: 3, scope: row, link: pnorm}",
                  "{kind: lq, q: 5, scope: column}", "{kind: kl, decay: {}, scale: 2.0}",
                  "{kind: kl, axis: column}", "{kind: kl, axis: matrix}",
                  "{kind: elastic_net, gamma: 0.3}", "{kind: elastic_net, gamma: 0.2, smooth: true}",
                  "{kind: mirror, potential: 'w*log(w) - w'}", "{kind: mirror, potential: 'w**4'}"]


@pytest.mark.parametrize("retention", RETENTION_MAPS)
def test_retention_maps_match_the_papers_formulas(retention):
    """The read map W = phi^-1(Z) of the reference (and the derivation's elementwise map) against
    the paper's closed forms in the oracle, on matrices and vectors."""
    from mirasc import reference

    d = op_from_yaml(axis_spec(retention=retention)).derivation
    gen = torch.Generator().manual_seed(len(retention))
    for shape in ((2, 3, 5, 4), (2, 3, 5)):
        z = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.6
        tally = oracle.Tally()
        want = oracle.read_map(d.spec.retention, z, tally)
        assert oracle.relative_error(reference.read(d, z), want) < 1e-12
        if d.retention.elementwise is not None:
            got = torch.zeros_like(z) + to_torch(d.retention.elementwise, {Z: z})
            assert oracle.relative_error(got, want) < 1e-12
        for share in tally.shares().values():
            assert 0.1 <= share <= 0.9


def test_the_oracle_refuses_what_it_does_not_state():
    """A smoothed user loss has no paper formula for its surrogate gradient: the oracle says so
    rather than guess."""
    d = op_from_yaml(axis_spec(bias="{kind: expression, loss: 'abs(r)**3', smooth: true}"))
    with pytest.raises(NotImplementedError):
        oracle.bias_gradient(d.spec.bias, *_points(1)[:2], None, oracle.Tally(), False)


def test_where_counts_are_the_branch_shares():
    tally = oracle.Tally()
    r = torch.tensor([-2.0, -0.5, 0.1, 0.7, 3.0], dtype=torch.float64)
    oracle.evaluate("where(abs(r) < 1, r, 0)", {"r": r}, tally)
    assert tally.shares() == {"abs(r) < 1": 3 / 5}


def test_the_oracle_imports_nothing_of_mirasc():
    """The oracle shares no code with what it checks: torch and the standard library only."""
    modules = set()
    for node in ast.walk(ast.parse((Path(__file__).parent / "oracle.py").read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules == {"__future__", "ast", "collections", "math", "torch"}
