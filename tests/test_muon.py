"""learner muon (Atlas, LaCT): S_t = m_t S_(t-1) + grad_t, U_t = eta_t NS_k(S_t). The
Newton-Schulz iteration against a float64 one written out here, the references against brute-force
loops, one step of every memory tensor (MLP layers, biases, the vector memory), varlen, the op's
gradients, and what runs where."""

from __future__ import annotations

from pathlib import Path

import oracle
import pytest
import torch
from conftest import axis_spec, decode, op_from_yaml, random_inputs, run_generated
from typer.testing import CliRunner

import mirasc
from mirasc.catalog import checked_spec
from mirasc.check import compare, varlen_inputs
from mirasc.cli import app
from mirasc.codegen import render_module, step_unsupported, triton_unsupported
from mirasc.decode import Decoder
from mirasc.derive import explain
from mirasc.layers import MirasLayer
from mirasc.reference import Inputs, newton_schulz

MUON = "{kind: muon, eta: {}, momentum: {}}"


def _ns(x: torch.Tensor, steps: int) -> torch.Tensor:
    """NS_k of one matrix, written out: X / ||X||_F, then X <- a X + b (X X^T) X + c (X X^T)^2 X on
    the wide orientation (the transposed matrix when it has more rows than columns)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    flip = x.shape[0] > x.shape[1]
    y = x.T if flip else x
    y = y / (y.square().sum().sqrt() + 1e-7)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + b * (gram @ y) + c * (gram @ (gram @ y))
    return y.T if flip else y


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_newton_schulz_against_a_loop_and_its_band(shape):
    """Singular values of X / ||X|| at or above 0.05 land in [0.68, 1.14] after five steps (the
    coefficients' band); an orthogonal matrix stays in it. X = U diag(s) V^T, s in [0.2, 1]."""
    gen = torch.Generator().manual_seed(0)
    rank = min(shape)

    def orthonormal(n):
        return torch.linalg.qr(torch.randn(2, 3, n, n, generator=gen, dtype=torch.float64))[0]

    s = 0.2 + 0.8 * torch.rand(2, 3, rank, generator=gen, dtype=torch.float64)
    x = orthonormal(shape[0])[..., :rank] * s[..., None, :] @ orthonormal(shape[1])[..., :rank, :]
    for steps in (1, 5):
        got = newton_schulz(x, steps)
        want = torch.stack([torch.stack([_ns(m, steps) for m in row]) for row in x])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    normed = torch.linalg.svdvals(x) / torch.linalg.matrix_norm(x)[..., None]
    assert normed.min() >= 0.05
    sv = torch.linalg.svdvals(newton_schulz(x, 5))
    assert sv.min() > 0.68 and sv.max() < 1.14, sv
    orthogonal = orthonormal(rank)
    sv = torch.linalg.svdvals(newton_schulz(orthogonal, 5))
    assert sv.min() > 0.68 and sv.max() < 1.14, sv
    vector = x[..., 0, :]
    torch.testing.assert_close(newton_schulz(vector, 5),
                               vector / (vector.norm(dim=-1, keepdim=True) + 1e-7))


def _brute(inputs: dict, chunk: int | None, steps: int, by_chunk: bool) -> torch.Tensor:
    """A matrix memory with the l2 bias and l2 decay, per (batch, head), in plain loops: the
    gradient (W k_t - v_t) k_t^T at W_(t-1) (chunk None) or at the chunk's start W_s,
    S_t = m_t S_(t-1) + grad_t, W_t = alpha_t W_(t-1) - eta_t NS(S_t); `by_chunk`: the rows read
    the decayed start A_t W_s and the chunk's last row subtracts eta_t NS(S_t)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    alpha, eta, m = inputs["log_alpha"].exp(), inputs["eta"], inputs.get("momentum")
    batch, length, heads, _ = q.shape
    o = torch.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            w = inputs["initial_state"][0][b, h].clone()
            s = inputs["initial_state"][1][b, h].clone()
            for t in range(length):
                if chunk is None or t % chunk == 0:
                    start = base = w
                point = w if chunk is None else start
                s = (0.0 if m is None else m[b, t, h]) * s \
                    + torch.outer(point @ k[b, t, h] - v[b, t, h], k[b, t, h])
                if by_chunk:
                    base = alpha[b, t, h] * base
                    last = t % chunk == chunk - 1 or t == length - 1
                    w = base - eta[b, t, h] * _ns(s, steps) if last else base
                else:
                    w = alpha[b, t, h] * w - eta[b, t, h] * _ns(s, steps)
                o[b, t, h] = w @ q[b, t, h]
    return o


BRUTE = {  # learner, chunk, dk, dv
    "token-recurrence": (MUON, None, 3, 2),
    "chunked-tall": (MUON, 3, 2, 3),
    "apply-chunk": ("{kind: muon, eta: {}, momentum: {}, apply: chunk}", 3, 3, 2),
    "momentum-0-is-gd-with-ns": ("{kind: muon, eta: {}, momentum: {value: 0}, ns_steps: 2}", 3,
                                 3, 3),
}


@pytest.mark.parametrize("case", sorted(BRUTE))
def test_references_against_a_brute_force_loop(case):
    learner, chunk, dk, dv = BRUTE[case]
    op = op_from_yaml(axis_spec(learner=learner))
    inputs = random_inputs(op, batch=1, length=8, heads=2, dk=dk, dv=dv)
    o, _ = op.reference(**inputs, chunk_size=chunk)
    spec = op.spec.learner
    want = _brute(inputs, chunk, spec.ns_steps, spec.apply == "chunk")
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)


MEMORIES = {
    "mlp-bias": "{kind: mlp, depth: 2, expansion: 2, activation: tanh, residual: false, "
                "layer_norm: false, bias: true}",
    "vector": "{kind: vector}",
}


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_one_step_orthogonalises_each_tensor(memory):
    """One token from a random state: each tensor moves by eta NS(m S_0 + grad) on its own (an
    MLP's layers by NS_5, a tall first layer on its transpose; biases and the vector memory's w
    by x / ||x||), the gradient by autograd of 1/2 ||M(k) - v||^2 written out here."""
    op = op_from_yaml(axis_spec(memory=MEMORIES[memory], learner=MUON))
    inputs = random_inputs(op, batch=1, length=1, heads=1, dk=3, dv=3)
    _, final = op.reference(**inputs, output_final_state=True)
    n = len(final) // 2
    weights = [x[0, 0].clone().requires_grad_() for x in inputs["initial_state"][:n]]
    k, v = inputs["k"][0, 0, 0], inputs["v"][0, 0, 0]
    if memory == "vector":
        out = weights[0] * k
    else:
        w1, w2, b1, b2 = weights
        out = w2 @ torch.tanh(w1 @ k + b1) + b2
    grads = torch.autograd.grad((out - v).square().sum() / 2, weights)
    alpha, eta, m = (inputs[x][0, 0, 0] for x in ("log_alpha", "eta", "momentum"))
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        s = m * inputs["initial_state"][n + i][0, 0] + g
        step = _ns(s, 5) if s.dim() == 2 else s / (s.norm() + 1e-7)
        torch.testing.assert_close(final[n + i][0, 0], s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[i][0, 0], alpha.exp() * w.detach() - eta * step,
                                   rtol=1e-10, atol=1e-12)


def test_the_op_runs_the_reference_varlen_and_its_gradients():
    """Every muon spec is mini-batch; `apply: token` runs the chunked reference (no kernels: the
    reason names the field and what is allowed); packed sequences (one ending mid-chunk) equal
    each alone, and every input gradient of the op equals the reference's."""
    text = axis_spec(learner=MUON)
    op = mirasc.compile(text)
    assert op.backend == "reference" and op.oracle_chunk_size == 4 and not op.derivation.exact
    assert "learner.apply 'token'" in triton_unsupported(op.derivation)
    assert "allowed with kernels: 'chunk'" in triton_unsupported(op.derivation)
    assert step_unsupported(op.derivation) is None  # it decodes by the Triton step
    inputs = varlen_inputs(op, [0, 6, 13], dk=3, dv=3)
    o, _ = op(**inputs)
    for i, (lo, hi) in enumerate([(0, 6), (6, 13)]):
        alone = {n: x[:, lo:hi] for n, x in inputs.items() if n not in ("initial_state",
                                                                       "cu_seqlens")}
        state = tuple(s[i:i + 1] for s in inputs["initial_state"])
        o_seq, _ = op.reference(**alone, initial_state=state, chunk_size=4)
        torch.testing.assert_close(o[:, lo:hi], o_seq, rtol=1e-12, atol=1e-12)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert errors and all(e < 1e-12 for e in errors.values()), errors
    assert all(torch.isfinite(x).all() for x in inputs["initial_state"])


def test_check_and_explain():
    """examples/specs/atlas_muon.yaml (an MLP memory, a window of 4, muon) passes `mirasc check`;
    explain states NS_5."""
    path = Path(__file__).resolve().parents[1] / "examples" / "specs" / "atlas_muon.yaml"
    args = ["check", str(path), "--length", "5", "--heads", "1", "--head-dim", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dmomentum" in result.output and "dwindow_weight" in result.output
    spec = checked_spec(path.read_text())
    text = explain(spec)
    assert "S_t = m_t * S_(t-1) + grad_t;  U_t = eta_t * NS_5(S_t)" in text
    assert "mini-batch chunking" in text
    assert r"\operatorname{NS}_{5}(S_t)" in explain(spec, latex=True)


@pytest.mark.parametrize("apply", ["token", "chunk"])
def test_decoding_equals_the_parallel_forward(apply, monkeypatch):
    """Token by token from the op's state (S with W; with apply: chunk one NS at each chunk's
    last token), and a layer's prefill then decoding, equal the parallel forward, float64."""
    monkeypatch.setattr(mirasc.op, "interpreting", lambda: False)
    op = op_from_yaml(axis_spec(learner=MUON.replace("}}", f"}}, apply: {apply}}}")))
    inputs = random_inputs(op, batch=2, length=10, heads=2, dk=3, dv=3)
    parallel, _ = op(**inputs)
    decoder = Decoder(op.derivation, op.oracle_chunk_size)
    gates = {n: inputs[n] for n in ("log_alpha", "eta", "momentum")}
    state, outputs = decoder.start(inputs["initial_state"]), []
    with torch.no_grad():
        for t in range(8):
            steps = Inputs.from_op(op.derivation, *(inputs[x][:, t:t + 1] for x in "qkv"),
                                   {n: x[:, t:t + 1] for n, x in gates.items()})
            o, state = decoder(state, steps)
            outputs.append(o.transpose(1, 2))
    torch.testing.assert_close(torch.cat(outputs, 1), parallel[:, :8], rtol=1e-10, atol=1e-10)
    _, eight = op(**{n: x[:, :8] if n != "initial_state" else x for n, x in inputs.items()},
                  output_final_state=True)
    for x, y in zip(state.boundary, eight, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    layer = MirasLayer(op.spec, 6, 2, head_dim=3).double()
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    whole, _ = layer(x)
    for prefill in (1, 6):
        torch.testing.assert_close(decode(layer, x, prefill), whole, rtol=1e-10, atol=1e-10)


BY_CHUNK = "{kind: muon, eta: {}, momentum: {}, apply: chunk}"


def _kernels(axes: dict):
    op = run_generated(render_module(op_from_yaml(
        axis_spec(**({"learner": BY_CHUNK} | axes)).replace("chunk_size: 4", "chunk_size: 5")).spec)).op
    assert op.backend == "triton"
    return op


def test_kernels_apply_per_chunk_as_the_oracle():
    """The generated kernels (Triton's interpreter on CPU), apply: chunk on a matrix memory: the
    chunk-end momentum, NS_k on the whole state tile in the pass, the last row's read of the
    moved state and the reverse mode through the unrolled products, against the oracle's own
    Newton-Schulz: output, final states and every input gradient, float64, chunks of 5 over 13
    tokens, per-channel decay and momentum,
    gradients at the retained state, DK over two blocks of key columns in the gradient kernels
    (which pass over them)."""
    op = _kernels({"retention": "{kind: l2, decay: {shape: channel}}",
                   "bias": "{kind: huber, delta: {}}",
                   "learner": "{kind: muon, eta: {}, momentum: {shape: channel}, apply: chunk, "
                              "grad_at: retained}"})
    inputs = random_inputs(op, batch=1, length=13, heads=2, dk=33, dv=5)
    errors = oracle.errors_against_oracle(op, op.spec, inputs, 5)
    bad = {n: e for n, e in errors.items() if not e <= 1e-12}  # NaN is never <= 1e-12
    assert errors and not bad, bad


def test_kernels_with_a_window_varlen_in_float32():
    """A window of 3 weighted tokens (the previous chunk's rows regrouped through the band), a
    KL retention, constant gates (momentum 0), more value than key columns (the oracle and the
    reference take NS on X^T, the kernels on X: the same polynomial), packed sequences (one
    ending mid-chunk, where the chunk's step applies); float32 inputs against the float64
    reference: at most 8x what the float32 reference itself loses, or 1e-5."""
    op = _kernels({"bias": "{kind: l2, window: {size: 3, weight: {}}}",
                   "retention": "{kind: kl, decay: {value: 0.9}, scale: 2.0}",
                   "learner": "{kind: muon, eta: {value: 0.3}, momentum: {value: 0}, "
                              "apply: chunk, ns_steps: 2}"})
    inputs = varlen_inputs(op, [0, 6, 13], dk=3, dv=6)
    narrow = {k: (tuple(x.float() for x in v) if isinstance(v, tuple) else
                  v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    kernel = compare(op, narrow, chunk_size=5, against=inputs)
    baseline = compare(op, narrow, chunk_size=5, against=inputs, run_reference=True)
    bad = {n: (e, baseline[n]) for n, e in kernel.items() if not e <= max(1e-5, 8 * baseline[n])}
    assert kernel and not bad, bad


def test_what_the_kernels_leave_to_the_reference():
    """apply: token, an MLP or vector memory and memory.bias keep the reference; the reason names
    the field and what is allowed."""
    cases = {MUON: "learner.apply 'token'", "{kind: mlp}": "on a mlp memory",
             "{kind: vector}": "allowed: 'matrix'",
             "{kind: matrix, bias: true}": "memory.bias with learner.kind 'muon'"}
    for axis, reason in cases.items():
        axes = {"learner": axis} if axis == MUON else {"memory": axis, "learner": BY_CHUNK}
        assert reason in triton_unsupported(op_from_yaml(axis_spec(**axes)).derivation)
