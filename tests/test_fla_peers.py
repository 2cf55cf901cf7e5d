"""The classic specs equal flash-linear-attention's naive reference recurrences (fla-core, a test
dependency): fla keeps S = W^T [K, V] and scales q by 1/sqrt(K) unless told scale=1. Outputs,
final states and every input gradient. fla's chunked Triton kernels need a GPU driver (and
bfloat16 for the delta rule), so on CPU the peers are its naive recurrences."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from fla.ops.delta_rule import naive as naive_dr
from fla.ops.gated_delta_rule import naive as naive_gdr
from fla.ops.gla import naive as naive_cgla
from fla.ops.kda import naive as naive_kda
from fla.ops.simple_gla import naive as naive_gla
from fla.ops.ttt import naive as naive_ttt

import mirasc
from mirasc.check import random_inputs, relative_error


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_simple_gla_equals_fla(path):
    op = mirasc.compile("specs/simple_gla.yaml")
    x = random_inputs(op, batch=2, length=70, heads=2, dk=8, dv=6, dtype=torch.float32)
    (w0,) = x["initial_state"]
    run = op if path == "kernel" else op.reference
    o, (wt,) = run(x["q"], x["k"], x["v"], log_alpha=x["log_alpha"], initial_state=w0,
                   output_final_state=True)
    o_fla, s_fla = naive_gla.naive_recurrent_simple_gla(
        x["q"], x["k"], x["v"], x["log_alpha"], scale=1.0, initial_state=w0.transpose(-1, -2),
        output_final_state=True)
    assert relative_error(o, o_fla) < 1e-5
    assert relative_error(wt, s_fla.transpose(-1, -2)) < 1e-5


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_gated_deltanet_equals_fla(path):
    op = mirasc.compile("specs/gated_deltanet.yaml")
    assert op.oracle_chunk_size is None  # the l2 bias is quadratic: the exact WY/UT path
    x = random_inputs(op, batch=2, length=70, heads=2, dk=8, dv=6, dtype=torch.float32)
    (w0,) = x["initial_state"]
    run = op if path == "kernel" else op.reference
    o, (wt,) = run(x["q"], x["k"], x["v"], log_alpha=x["log_alpha"], eta=x["eta"],
                   initial_state=w0, output_final_state=True)
    o_fla, s_fla = naive_gdr.naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["eta"], x["log_alpha"], scale=1.0,
        initial_state=w0.transpose(-1, -2), output_final_state=True)
    assert relative_error(o, o_fla) < 1e-5
    assert relative_error(wt, s_fla.transpose(-1, -2)) < 1e-5


def _fla_simple_gla(q, k, v, log_alpha, initial_state):
    o, s = naive_gla.naive_recurrent_simple_gla(q, k, v, log_alpha, scale=1.0,
                                                initial_state=initial_state.transpose(-1, -2),
                                                output_final_state=True)
    return o, s.transpose(-1, -2)


def _fla_gated_deltanet(q, k, v, log_alpha, eta, initial_state):
    o, s = naive_gdr.naive_recurrent_gated_delta_rule(
        q, k, v, eta, log_alpha, scale=1.0, initial_state=initial_state.transpose(-1, -2),
        output_final_state=True)
    return o, s.transpose(-1, -2)


def _fla_deltanet(q, k, v, eta, initial_state):
    """fla's head-first delta rule, which scales q by K^-1/2 itself (undone here)."""
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    o, s = naive_dr.delta_rule_recurrence(
        heads_first(q * q.shape[-1] ** 0.5), heads_first(k), heads_first(v), heads_first(eta),
        initial_state=initial_state.transpose(-1, -2), output_final_state=True)
    return heads_first(o), s.transpose(-1, -2)


def _fla_gla(q, k, v, log_alpha, initial_state):
    """fla's GLA (a log decay per key channel), which scales q by K^-1/2 itself (undone here)."""
    o, s = naive_cgla.naive_recurrent_gla(q * q.shape[-1] ** 0.5, k, v, log_alpha,
                                          initial_state=initial_state.transpose(-1, -2),
                                          output_final_state=True)
    return o, s.transpose(-1, -2)


def _fla_kda(q, k, v, log_alpha, eta, initial_state):
    """fla's KDA: S <- diag(exp g) S, then the delta rule with beta; q and k taken as given (its
    naive recurrence normalises neither)."""
    o, s = naive_kda.naive_recurrent_kda(q, k, v, log_alpha, eta, scale=1.0,
                                         initial_state=initial_state.transpose(-1, -2),
                                         output_final_state=True)
    return o, s.transpose(-1, -2)


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("name", ["gla", "kda"])
def test_channel_decays_equal_fla(name, path):
    """GLA and KDA (gated DeltaNet with a decay per key channel) against fla's naive
    recurrences: outputs and final states, 70 tokens (a chunk and a part)."""
    op = mirasc.compile(f"specs/{name}.yaml")
    x = random_inputs(op, batch=2, length=70, heads=2, dk=8, dv=6, dtype=torch.float32)
    (w0,) = x["initial_state"]
    gates = {g: x[g] for g in ("log_alpha", "eta") if g in x}
    run = op if path == "kernel" else op.reference
    o, (wt,) = run(x["q"], x["k"], x["v"], **gates, initial_state=w0, output_final_state=True)
    o_fla, s_fla = PEERS[name](x["q"], x["k"], x["v"], **gates, initial_state=w0)
    assert relative_error(o, o_fla) < 1e-5
    assert relative_error(wt, s_fla) < 1e-5


PEERS = {"simple_gla": _fla_simple_gla, "gated_deltanet": _fla_gated_deltanet,
         "deltanet": _fla_deltanet, "gla": _fla_gla, "kda": _fla_kda}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_gradients_equal_fla(name):
    """The kernels' outputs, final state and the gradients of q, k, v, every gate and the initial
    state against autograd through fla's recurrence, in float32 (fla computes in float32), 45
    tokens (not a multiple of the chunk), eta up to 1.5, seed 9."""
    op = mirasc.compile(f"specs/{name}.yaml")
    x = random_inputs(op, batch=2, length=45, heads=2, dk=8, dv=6, dtype=torch.float32, seed=9)
    if "eta" in x:
        x["eta"] = x["eta"] * 3
    x["initial_state"] = x["initial_state"][0]
    gen = torch.Generator().manual_seed(11)
    cotangents = [torch.randn(shape, generator=gen) for shape in
                  (x["v"].shape, (2, 2, 6, 8))]

    def grads(fn):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        o, s = fn(**leaves)
        objective = (o * cotangents[0]).sum() + (s * cotangents[1]).sum()
        return [o, s, *torch.autograd.grad(objective, list(leaves.values()))]

    def mirasc_run(initial_state, **inputs):
        o, (s,) = op(**inputs, initial_state=initial_state, output_final_state=True)
        return o, s

    got, want = grads(mirasc_run), grads(PEERS[name])
    names = ["o", "final_state", *(f"d{n}" for n in x)]
    errors = {n: relative_error(g, w) for n, g, w in zip(names, got, want, strict=True)}
    bad = {n: e for n, e in errors.items() if not e < 2e-5}  # NaN is never < 2e-5
    assert not bad, bad


def _ttt_linear_run(fn, x: dict, cotangents: tuple) -> dict[str, torch.Tensor]:
    """o, the final (W, b) and the gradient of every input under <o, do> + <W, dW> + <b, db>,
    with mirasc's layout: o [B, T, H, D], W [B, H, Dv, Dk], b [B, H, Dv]."""
    leaves = {k: (tuple(s.clone().requires_grad_() for s in v) if isinstance(v, tuple)
                  else v.clone().requires_grad_()) for k, v in x.items()}
    o, w, b = fn(**leaves)
    loss = sum((y * c).sum() for y, c in zip((o, w, b), cotangents, strict=True))
    loss.backward()
    grads = {f"d{k}": leaves[k].grad for k in ("q", "k", "v", "eta", "ln_weight", "ln_bias")}
    w0, b0 = leaves["initial_state"]
    return {"o": o, "W": w, "b": b, **grads, "dW0": w0.grad, "db0": b0.grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_ttt_linear_equals_fla(path, dtype):
    """TTT-Linear against fla's naive `ttt_linear` (fla keeps h = W^T and hb [1, D], scales q
    inside): a test-time bias, LN with affine and eps 1e-6, the step of the reading token and
    the read z + LN(z). fla rounds LN's rstd to float32, so float64 agrees to about 1e-7."""
    op = mirasc.compile("specs/ttt_linear.yaml")
    assert op.backend == "triton" and op.state_names == ("W", "b")
    batch, length, heads, dim, chunk = 2, 48, 3, 10, op.spec.chunk_size  # fla: T % chunk == 0
    x = random_inputs(op, batch=batch, length=length, heads=heads, dk=dim, dv=dim, dtype=dtype)
    for name in ("ln_weight", "ln_bias"):  # fla casts them to float32
        x[name] = x[name].float().to(dtype)
    gen = torch.Generator().manual_seed(5)
    cotangents = tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in
                       ((batch, length, heads, dim), (batch, heads, dim, dim), (batch, heads, dim)))
    scale = dim ** -0.5
    run = op if path == "kernel" else partial(op.reference, chunk_size=chunk)

    def mirasc_run(q, k, v, eta, ln_weight, ln_bias, initial_state):
        o, (w, b) = run(q * scale, k, v, eta=eta, ln_weight=ln_weight, ln_bias=ln_bias,
                        initial_state=initial_state, output_final_state=True)
        return o, w, b

    def fla_run(q, k, v, eta, ln_weight, ln_bias, initial_state):
        heads_first = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731 - fla scales q in place
        w0, b0 = initial_state
        o, h, hb = naive_ttt.ttt_linear(
            heads_first(q), heads_first(k), heads_first(v), ln_weight, ln_bias,
            heads_first(eta[..., None]), scale, 1e-6, chunk, w0.transpose(-1, -2), b0[:, :, None],
            True)
        return o.transpose(1, 2), h.transpose(-1, -2), hb[:, :, 0]

    got = _ttt_linear_run(mirasc_run, x, cotangents)
    want = _ttt_linear_run(fla_run, x, cotangents)
    errors = {name: relative_error(got[name], want[name]) for name in want}
    tolerance = 1e-5 if dtype == torch.float32 else 1e-6
    bad = {name: e for name, e in errors.items() if not e < tolerance}  # NaN is never < tolerance
    assert not bad, bad
