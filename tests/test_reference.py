"""The oracle: every axis value runs, chunk_size 1 equals the token recurrence, and the classic
specs reproduce the closed-form recurrences they are known by (written out independently here)."""

from __future__ import annotations

import glob

import pytest
import torch
import torch.nn.functional as F
from conftest import axis_spec, op_from_yaml, random_inputs

import mirasc
from mirasc.check import relative_error

SHIPPED = sorted(glob.glob("specs/*.yaml"))

# One case per value on every axis (the others at the defaults of `axis_spec`).
AXIS_CASES = {
    "memory-matrix": {},
    "memory-matrix-ln-residual": {"memory": "{kind: matrix, residual: true, layer_norm: true}"},
    "memory-vector": {"memory": "{kind: vector}"},
    "memory-mlp-silu-depth3": {"memory": "{kind: mlp, depth: 3, expansion: 2, activation: silu}"},
    "memory-mlp-relu-plain": {"memory": "{kind: mlp, activation: relu, residual: false, "
                                        "layer_norm: false}"},
    "memory-mlp-tanh": {"memory": "{kind: mlp, activation: tanh, expansion: 1}"},
    "bias-dot_product": {"bias": "{kind: dot_product}"},
    "bias-lp-smooth": {"bias": "{kind: lp, p: 3}"},
    "bias-lp-exact": {"bias": "{kind: lp, p: 1.5, smooth: false}"},
    "bias-huber-coordinate": {"bias": "{kind: huber, variant: coordinate, delta: {}}"},
    "bias-huber-coordinate-channel": {"bias": "{kind: huber, delta: {shape: channel}}"},
    "bias-huber-norm": {"bias": "{kind: huber, variant: norm, delta: {value: 0.5}}"},
    "bias-huber-switch": {"bias": "{kind: huber, variant: switch, delta: {}}"},
    "bias-robust": {"bias": "{kind: robust, delta: {}}"},
    "bias-expression": {"bias": "{kind: expression, loss: 'c * log(cosh(r))', params: {c: 2}}"},
    "bias-expression-norm": {"bias": "{kind: expression, loss: 'r**2/2', "
                                     "norm_loss: 'delta * sqrt(1 + rnorm**2)', delta: {}}"},
    "retention-none": {"retention": "{kind: none}"},
    "retention-l2-channel": {"retention": "{kind: l2, decay: {shape: channel}}"},
    "retention-l2-constant": {"retention": "{kind: l2, decay: {value: 0.9}}"},
    "retention-lq": {"retention": "{kind: lq, q: 4, decay: {}}"},
    "retention-lq-row-pnorm": {"retention": "{kind: lq, q: 3, scope: row, link: pnorm}"},
    "retention-kl-row": {"retention": "{kind: kl, decay: {}, axis: row, scale: 2.0}"},
    "retention-kl-matrix": {"retention": "{kind: kl, axis: matrix}"},
    "retention-kl-column": {"retention": "{kind: kl, axis: column}"},
    "retention-elastic-proximal": {"retention": "{kind: elastic_net, gamma: 0.01, decay: {}}"},
    "retention-elastic-dual-smooth": {"retention": "{kind: elastic_net, gamma: 0.01, form: dual, "
                                                   "smooth: true}"},
    "retention-mirror": {"retention": "{kind: mirror, potential: 'w*log(w) - w', decay: {}}"},
    "learner-momentum": {"learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "learner-momentum-channel": {"learner": "{kind: momentum, eta: {shape: channel}, "
                                            "momentum: {shape: channel}}"},
    "learner-gd-retained": {"learner": "{kind: gd, eta: {}, grad_at: retained}"},
    "learner-gd-constant": {"learner": "{kind: gd, eta: {value: 0.3}}"},
    "chunk-lag-token": {"extra": "lag_token: true"},
    "memory-matrix-bias": {"memory": "{kind: matrix, bias: true}"},
    "memory-vector-bias-channel": {"memory": "{kind: vector, bias: true}",
                                   "retention": "{kind: l2, decay: {shape: channel}}"},
    "memory-mlp-bias": {"memory": "{kind: mlp, bias: true}"},
    "memory-ln-affine": {"memory": "{kind: matrix, layer_norm: {affine: true, eps: 1.0e-3}}"},
    "memory-read-residual-output": {"memory": "{kind: matrix, residual: true, layer_norm: true, "
                                              "read_residual: output}"},
    "learner-eta-at-query": {"learner": "{kind: gd, eta: {}, eta_at: query}"},
    "learner-eta-at-query-channel": {"learner": "{kind: gd, eta: {shape: channel}, "
                                                "eta_at: query}"},
    "memory-bias-momentum": {"memory": "{kind: matrix, bias: true}",
                             "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "learner-muon": {"learner": "{kind: muon, eta: {}, momentum: {}}"},
    "learner-muon-chunk-mlp-bias": {"memory": "{kind: mlp, bias: true}",
                                    "learner": "{kind: muon, eta: {}, momentum: {}, apply: chunk}"},
    "learner-muon-retained-kl-channel": {"retention": "{kind: kl, decay: {}}",
                                         "learner": "{kind: muon, eta: {value: 0.3}, momentum: "
                                                    "{shape: channel}, grad_at: retained}"},
}


def _case(name):
    return op_from_yaml(axis_spec(**AXIS_CASES[name]))


@pytest.mark.parametrize("name", sorted(AXIS_CASES))
def test_chunk_size_one_is_the_token_recurrence(name):
    op = _case(name)
    inputs = random_inputs(op, batch=2, length=7, heads=2, dk=6, dv=6)
    o, final = op.reference(**inputs, output_final_state=True)
    oc, finalc = op.reference(**inputs, output_final_state=True, chunk_size=1)
    assert torch.isfinite(o).all()
    assert o.abs().sum() > 0
    assert relative_error(oc, o) < 1e-12
    for f, fc in zip(final, finalc, strict=True):
        assert relative_error(fc, f) < 1e-12


@pytest.mark.parametrize("name", sorted(AXIS_CASES))
def test_every_axis_value_has_finite_gradients(name):
    op = _case(name)
    inputs = random_inputs(op, batch=1, length=6, heads=2, dk=4, dv=4)
    leaves = [x for v in inputs.values() for x in (v if isinstance(v, tuple) else (v,))]
    for x in leaves:
        x.requires_grad_()
    o, final = op.reference(**inputs, output_final_state=True, chunk_size=3)
    (o.square().sum() + sum(f.sum() for f in final)).backward()
    grads = [x.grad for x in leaves]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads[:3])


@pytest.mark.parametrize("name", ["memory-mlp-silu-depth3", "bias-lp-smooth", "retention-kl-row",
                                  "learner-momentum", "bias-huber-norm", "retention-lq",
                                  "memory-mlp-bias", "memory-ln-affine", "learner-eta-at-query",
                                  "learner-muon"])
def test_reference_backward_passes_gradcheck(name):
    """Autograd through the reference (vjp inside the recurrence) matches finite differences."""
    op = _case(name)
    inputs = random_inputs(op, batch=1, length=5, heads=1, dk=3, dv=3)
    names = list(inputs)

    def run(*flat):
        kw, i = {}, 0
        for key in names:
            n = len(inputs[key]) if isinstance(inputs[key], tuple) else 1
            kw[key] = tuple(flat[i:i + n]) if isinstance(inputs[key], tuple) else flat[i]
            i += n
        o, final = op.reference(**kw, output_final_state=True, chunk_size=2)
        return (o, *final)

    flat = [x.clone().requires_grad_() for v in inputs.values()
            for x in (v if isinstance(v, tuple) else (v,))]
    assert torch.autograd.gradcheck(run, flat, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_state_free_bias_chunks_exactly():
    """With a dot-product bias the gradient ignores the state: any chunking is exact."""
    op = mirasc.compile("specs/simple_gla.yaml")
    inputs = random_inputs(op, length=23, dk=5, dv=7)
    o, _ = op.reference(**inputs)
    for chunk in (4, 8, 64):
        assert relative_error(op.reference(**inputs, chunk_size=chunk)[0], o) < 1e-12


def test_lag_token_chunks_are_shifted():
    from mirasc.reference import chunk_starts

    assert chunk_starts(10, 4, False) == [0, 4, 8, 10]
    assert chunk_starts(10, 4, True) == [0, 1, 4, 5, 8, 9, 10]


def test_equivalent_retentions_agree():
    """Three spellings of 'no nonlinearity': lq with q=2, a quadratic mirror potential, and l2."""
    base = op_from_yaml(axis_spec(retention="{kind: l2, decay: {}}"))
    inputs = random_inputs(base, length=9, dk=5, dv=5)
    o, _ = base.reference(**inputs, chunk_size=4)
    for retention in ("{kind: lq, q: 2, decay: {}}",
                      "{kind: mirror, potential: 'w**2/2', decay: {}}"):
        other = op_from_yaml(axis_spec(retention=retention))
        assert relative_error(other.reference(**inputs, chunk_size=4)[0], o) < 1e-12


# ---- closed forms of the classic specs, written independently of mirasc ----------------------


def _inputs(spec, **shape):
    op = mirasc.compile(f"specs/{spec}.yaml")
    return op, random_inputs(op, **({"length": 13, "dk": 5, "dv": 6} | shape))


def _heads(x):
    return x.transpose(1, 2)  # [B,T,H,D] -> [B,H,T,D]


def test_linear_attention_is_causal_attention_without_softmax():
    op, x = _inputs("linear_attention")
    q, k, v = map(_heads, (x["q"], x["k"], x["v"]))
    w0 = x["initial_state"][0]
    scores = (q @ k.transpose(-1, -2)).tril()
    expected = scores @ v + torch.einsum("bhvk,bhtk->bhtv", w0, q)
    assert relative_error(op.reference(**x)[0], expected.transpose(1, 2)) < 1e-12


def test_simple_gla_is_decay_weighted_attention():
    op, x = _inputs("simple_gla")
    q, k, v = map(_heads, (x["q"], x["k"], x["v"]))
    g = x["log_alpha"].transpose(1, 2).cumsum(-1)  # [B,H,T]
    decay = (g[..., :, None] - g[..., None, :]).exp().tril()
    expected = ((q @ k.transpose(-1, -2)) * decay) @ v
    expected = expected + torch.einsum("bhvk,bhtk->bhtv", x["initial_state"][0], q) * g.exp()[..., None]
    assert relative_error(op.reference(**x)[0], expected.transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("spec", ["deltanet", "gated_deltanet"])
def test_delta_rules(spec):
    """S_t = S_{t-1} alpha_t (I - beta_t k k^T) + beta_t v k^T, o_t = S_t q_t."""
    op, x = _inputs(spec)
    state = x["initial_state"][0].clone()
    beta = x["eta"].transpose(1, 2)
    alpha = x["log_alpha"].transpose(1, 2).exp() if "log_alpha" in x else torch.ones_like(beta)
    q, k, v = map(_heads, (x["q"], x["k"], x["v"]))
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    outs = []
    for t in range(q.shape[2]):
        kt, a, b = k[:, :, t], alpha[:, :, t, None, None], beta[:, :, t, None, None]
        state = state @ (a * (eye - b * kt[..., :, None] * kt[..., None, :])) \
            + b * v[:, :, t, :, None] * kt[..., None, :]
        outs.append(torch.einsum("bhvk,bhk->bhv", state, q[:, :, t]))
    o, (final,) = op.reference(**x, output_final_state=True)
    assert relative_error(o, torch.stack(outs, 1)) < 1e-12
    assert relative_error(final, state) < 1e-12


def test_titans_momentum_and_decay():
    """M_t = alpha_t M_{t-1} - S_t, S_t = m_t S_{t-1} + theta_t (M_{t-1} k - v) k^T."""
    op, x = _inputs("titans")
    mem, mom = (s.clone() for s in x["initial_state"])
    q, k, v = map(_heads, (x["q"], x["k"], x["v"]))
    alpha, theta, m = (x[n].transpose(1, 2)[..., None, None] for n in ("log_alpha", "eta", "momentum"))
    alpha = alpha.exp()
    outs = []
    for t in range(q.shape[2]):
        grad = (torch.einsum("bhvk,bhk->bhv", mem, k[:, :, t]) - v[:, :, t])[..., None] \
            * k[:, :, t, None, :]
        mom = m[:, :, t] * mom + theta[:, :, t] * grad
        mem = alpha[:, :, t] * mem - mom
        outs.append(torch.einsum("bhvk,bhk->bhv", mem, q[:, :, t]))
    o, final = op.reference(**x, output_final_state=True)
    assert relative_error(o, torch.stack(outs, 1)) < 1e-12
    assert relative_error(final[0], mem) < 1e-12 and relative_error(final[1], mom) < 1e-12


def test_ttt_linear_mini_batch_dual_form():
    """TTT-Linear, chunked: every gradient at the chunk-start (W, b), the step of the reading
    token, W_t = W_s - eta_t sum_(i<=t) grad_i (and b), read as o_t = z_t + LN'(z_t) with
    z_t = W_t q_t + b_t; grad_i from autograd of 1/2 ||k + LN'(W k + b) - v||^2, LN' the layer
    norm (eps 1e-6) times ln_weight plus ln_bias."""
    op, x = _inputs("ttt_linear", length=21, dk=6, dv=6)
    assert op.state_names == ("W", "b")
    w, b = (s.clone() for s in x["initial_state"])
    q, k, v = map(_heads, (x["q"], x["k"], x["v"]))
    eta = x["eta"].transpose(1, 2)
    lw, lb = x["ln_weight"], x["ln_bias"]

    def norm(y):
        return F.layer_norm(y, (6,), eps=1e-6) * lw + lb

    size = op.spec.chunk_size
    outs = []
    for s in range(0, q.shape[2], size):
        ws, bs = w.detach().requires_grad_(), b.detach().requires_grad_()
        sum_w, sum_b = torch.zeros_like(w), torch.zeros_like(b)
        for t in range(s, min(s + size, q.shape[2])):
            pred = k[:, :, t] + norm(torch.einsum("bhvk,bhk->bhv", ws, k[:, :, t]) + bs)
            grad_w, grad_b = torch.autograd.grad(0.5 * (pred - v[:, :, t]).square().sum(), (ws, bs))
            sum_w, sum_b = sum_w + grad_w, sum_b + grad_b
            step = eta[:, :, t, None]
            w_t, b_t = ws.detach() - step[..., None] * sum_w, bs.detach() - step * sum_b
            z = torch.einsum("bhvk,bhk->bhv", w_t, q[:, :, t]) + b_t
            outs.append(z + norm(z))
        w, b = w_t, b_t
    o, final = op.reference(**x, output_final_state=True, chunk_size=size)
    assert relative_error(o, torch.stack(outs, 1)) < 1e-10
    assert relative_error(final[0], w) < 1e-10 and relative_error(final[1], b) < 1e-10


def test_eta_at_query_uses_the_reading_tokens_step():
    """With a step constant over each chunk, eta_at 'query' and 'key' agree; otherwise they
    differ inside a chunk (the token recurrence is the same for both)."""
    key = op_from_yaml(axis_spec())
    query = op_from_yaml(axis_spec(learner="{kind: gd, eta: {}, eta_at: query}"))
    x = random_inputs(key, batch=1, length=12, heads=2, dk=5, dv=4)
    runs = {name: op.reference(**x, output_final_state=True, chunk_size=4)
            for name, op in (("key", key), ("query", query))}
    assert relative_error(runs["query"][0], runs["key"][0]) > 1e-3
    flat = x | {"eta": x["eta"][:, ::4].repeat_interleave(4, 1)}
    o_key, s_key = key.reference(**flat, output_final_state=True, chunk_size=4)
    o_query, s_query = query.reference(**flat, output_final_state=True, chunk_size=4)
    assert relative_error(o_query, o_key) < 1e-12 and relative_error(s_query[0], s_key[0]) < 1e-12
    assert relative_error(query.reference(**x)[0], key.reference(**x)[0]) < 1e-12
