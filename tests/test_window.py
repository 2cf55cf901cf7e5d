"""bias.window (Atlas's Omega rule): the loss at t sums gamma_i l(M(k_i), v_i) over the last c
tokens of t's sequence. The references against float64 loops written out here, c = 1 against no
window, and varlen windows that stop at a sequence's start."""

from __future__ import annotations

import pytest
import torch
from conftest import axis_spec, decode, op_from_yaml, random_inputs

import mirasc
import mirasc.op
from mirasc.check import compare, varlen_inputs
from mirasc.decode import Decoder
from mirasc.launch import interpreting
from mirasc.layers import MirasLayer
from mirasc.op import MirasOp
from mirasc.reference import Inputs

WINDOW = "{kind: l2, window: {size: 2, weight: {}}}"


def _brute(inputs: dict, size: int, chunk: int | None):
    """A matrix memory with the l2 bias, l2 decay and gd, per (batch, head), in plain loops:
    W_t = alpha_t W_(t-1) - eta_t sum_(i=t-c+1..t) gamma_i (W k_i - v_i) k_i^T, the gradients at
    W_(t-1) (token recurrence, chunk None) or at the chunk's start state W_s, where inside a chunk
    W_t = alpha_t W_(t-1)' - eta_t grad_t(W_s) with W_(t-1)' the previous row's weights."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    alpha, eta, gamma = inputs["log_alpha"].exp(), inputs["eta"], inputs["window_weight"]
    batch, length, heads, _ = q.shape
    o = torch.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            w = inputs["initial_state"][0][b, h].clone()
            start = w
            for t in range(length):
                if chunk is None or t % chunk == 0:
                    start = w
                point = w if chunk is None else start
                grad = sum(gamma[b, i, h] * torch.outer(point @ k[b, i, h] - v[b, i, h], k[b, i, h])
                           for i in range(max(0, t - size + 1), t + 1))
                w = alpha[b, t, h] * w - eta[b, t, h] * grad
                o[b, t, h] = w @ q[b, t, h]
    return o


@pytest.mark.parametrize("chunk", [None, 3])
def test_window_against_a_brute_force_loop(chunk):
    op = op_from_yaml(axis_spec(bias="{kind: l2, window: {size: 3, weight: {}}}"))
    inputs = random_inputs(op, batch=1, length=8, heads=2, dk=3, dv=2)
    o, _ = op.reference(**inputs, chunk_size=chunk)
    torch.testing.assert_close(o, _brute(inputs, 3, chunk), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory", ["{kind: matrix}", "{kind: mlp, depth: 2, expansion: 1}"])
def test_a_window_of_one_is_the_bias_alone(memory):
    plain = op_from_yaml(axis_spec(memory=memory, bias="{kind: lp, p: 3}"))
    one = op_from_yaml(axis_spec(memory=memory, bias="{kind: lp, p: 3, window: {size: 1}}"))
    inputs = random_inputs(plain, batch=1, length=6, heads=1, dk=3, dv=3)
    for chunk in (None, 4):
        o, state = plain.reference(**inputs, chunk_size=chunk, output_final_state=True)
        o1, state1 = one.reference(**inputs, chunk_size=chunk, output_final_state=True)
        assert torch.equal(o, o1) and all(map(torch.equal, state, state1))


def test_varlen_windows_stop_at_a_sequence_start():
    op = op_from_yaml(axis_spec(bias=WINDOW))
    inputs = random_inputs(op, batch=1, length=9, heads=1, dk=3, dv=3)
    bounds = [0, 5, 9]
    state = tuple(torch.cat([s, s]) for s in inputs["initial_state"])
    packed = inputs | {"initial_state": state}
    o, _ = op(**packed, cu_seqlens=torch.tensor(bounds))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        alone = {n: x[:, lo:hi] if n not in ("initial_state",) else x for n, x in inputs.items()}
        o_seq, _ = op.reference(**alone, chunk_size=op.oracle_chunk_size)
        torch.testing.assert_close(o[:, lo:hi], o_seq, rtol=1e-12, atol=1e-12)
    whole, _ = op.reference(**inputs, chunk_size=op.oracle_chunk_size)
    assert not torch.allclose(o[:, 5:], whole[:, 5:])  # one sequence would reach back across


def test_window_ops_are_mini_batch_and_check_the_weight():
    op = op_from_yaml(axis_spec(bias=WINDOW))
    assert op.oracle_chunk_size == 4 and not op.derivation.exact
    inputs = random_inputs(op, batch=1, length=6, heads=1, dk=3, dv=3)
    with pytest.raises(ValueError, match="window_weight must be >= 0"):
        op(**inputs | {"window_weight": -inputs["window_weight"]})


@pytest.mark.parametrize("bias", ["{kind: huber, delta: {}, window: {size: 3, weight: {}}}",
                                  "{kind: l2, window: {size: 4, weight: {value: 0.5}}}"])
def test_decoding_keeps_the_window(bias, monkeypatch):
    """Token by token (the state holds the last c - 1 tokens), and a layer's prefill then
    decoding at several offsets, equal the parallel forward, float64."""
    monkeypatch.setattr(mirasc.op, "interpreting", lambda: False)
    op = op_from_yaml(axis_spec(bias=bias))
    inputs = random_inputs(op, batch=2, length=12, heads=2, dk=3, dv=3)
    parallel, _ = op(**inputs)
    decoder = Decoder(op.derivation, op.oracle_chunk_size)
    gates = {n: inputs.get(n) for n in ("log_alpha", "eta", "delta", "window_weight")}
    state, outputs = decoder.start(inputs["initial_state"]), []
    with torch.no_grad():
        for t in range(12):
            steps = Inputs.from_op(op.derivation, *(inputs[x][:, t:t + 1] for x in "qkv"),
                                   {n: None if x is None else x[:, t:t + 1]
                                    for n, x in gates.items()})
            o, state = decoder(state, steps)
            outputs.append(o.transpose(1, 2))
    torch.testing.assert_close(torch.cat(outputs, 1), parallel, rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    layer = MirasLayer(op.spec, 6, 2, head_dim=3).double()
    x = torch.randn(1, 11, 6, dtype=torch.float64)
    whole, _ = layer(x)
    for prefill in (1, 5, 6):
        torch.testing.assert_close(decode(layer, x, prefill), whole, rtol=1e-10, atol=1e-10)


# The torch path (the chunk-step graph, forward and reverse mode) against the chunked reference,
# float64, every input gradient; chunk_size 4, T = 11.
GRAPH_CASES = {
    "l2-c2-weight": {"bias": WINDOW},
    "lp-c3-constants": {"bias": "{kind: lp, p: 3, window: {size: 3, weight: {value: 0.7}}}",
                        "learner": "{kind: gd, eta: {value: 0.3}}"},
    "huber-c4-bias-ln": {"bias": "{kind: huber, delta: {}, window: {size: 4, weight: {}}}",
                         "memory": "{kind: matrix, bias: true, layer_norm: true}"},
    "c3-momentum": {"bias": "{kind: l2, window: {size: 3}}",
                    "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "c2-eta-query": {"bias": WINDOW, "learner": "{kind: gd, eta: {}, eta_at: query}"},
    "c2-kl": {"bias": WINDOW, "retention": "{kind: kl, decay: {}}"},
    "c1-weight-retained": {"bias": "{kind: l2, window: {size: 1, weight: {}}}",
                           "learner": "{kind: gd, eta: {}, grad_at: retained}"},
    "mlp-c3": {"bias": WINDOW.replace("size: 2", "size: 3"),
               "memory": "{kind: mlp, depth: 2, expansion: 1}"},
    "mlp-c2-momentum": {"bias": "{kind: lp, p: 3, window: {size: 2, weight: {}}}",
                        "memory": "{kind: mlp, depth: 2, expansion: 1}",
                        "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "vector-c2-ln": {"bias": WINDOW, "memory": "{kind: vector, residual: true, layer_norm: true}"},
    "vector-c3-momentum": {"bias": "{kind: l2, window: {size: 3, weight: {value: 0.5}}}",
                           "memory": "{kind: vector}",
                           "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "vector-c1-channel": {"bias": "{kind: l2, window: {size: 1, weight: {}}}",
                          "memory": "{kind: vector}",
                          "retention": "{kind: l2, decay: {shape: channel}}"},
}


def _graph_op(text: str) -> MirasOp:
    """An op of `text` that runs its chunk-step graph in torch (as if it had kernels)."""
    return MirasOp(op_from_yaml(text).derivation, kernel=lambda *a: pytest.fail("kernel ran"))


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_the_torch_path_equals_the_chunked_reference(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = _graph_op(axis_spec(**GRAPH_CASES[case]))
    inputs = random_inputs(op, batch=1, length=11, heads=2, dk=3, dv=3)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert errors and all(e < 1e-10 for e in errors.values()), errors


def test_the_torch_path_stops_windows_at_sequence_starts(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = _graph_op(axis_spec(bias="{kind: l2, window: {size: 3, weight: {}}}"))
    inputs = varlen_inputs(op, [0, 6, 7, 17], dk=3, dv=3)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert errors and all(e < 1e-10 for e in errors.values()), errors


def test_kernels_in_the_interpreter(tmp_path, monkeypatch):
    """The generated kernels (the previous chunk's rows loaded one chunk back, their gradients
    stored there), a sequence's last chunk partial, varlen: against the chunked reference."""
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))
    op = mirasc.compile(axis_spec(bias="{kind: huber, delta: {}, window: {size: 3, weight: {}}}"))
    assert op.backend == "triton" and interpreting()
    inputs = varlen_inputs(op, [0, 11, 13, 22], dk=3, dv=3)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert errors and all(e < 1e-10 for e in errors.values()), errors


def test_channel_gates_with_a_wide_window_run_the_reference():
    op = mirasc.compile(axis_spec(bias=WINDOW, retention="{kind: l2, decay: {shape: channel}}"))
    assert op.backend == "reference"


def test_explain_shows_the_window():
    from mirasc.catalog import checked_spec
    from mirasc.derive import explain

    spec = checked_spec(axis_spec(bias="{kind: l2, window: {size: 3, weight: {}}}"))
    text = explain(spec)
    assert "grad_t = sum_(i=t-2..t) gamma_i dl(M_W(k_i), v_i)/dW" in text
    assert "window of 3 tokens" in text and "mini-batch chunking" in text
    assert r"\sum_{i=t-2}^{t} \gamma_i" in explain(spec, latex=True)
