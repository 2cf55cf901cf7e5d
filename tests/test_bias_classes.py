"""Biases whose gradient g has a constant or piecewise-constant derivative in r (the paper's L1,
|r| + r^2/2, a loss linear in r): the op on every memory kind, on the torch path and in the
Triton kernels (the interpreter on CPU), against the reference of the same chunking, float64.

The bias is classified by g: only g = c r + e(v) is affine (solved exactly on a matrix memory);
g = sign(r) has dg/dr = 0 almost everywhere and g = sign(r) + r has dg/dr = 1, yet neither is
affine."""

from __future__ import annotations

import pytest
import torch
from conftest import OnBackend, axis_spec, op_from_yaml

import mirasc
from mirasc.check import compare, random_inputs

MEMORIES = {"matrix": "{kind: matrix}", "vector": "{kind: vector}",
            "mlp": "{kind: mlp, depth: 2, expansion: 2, residual: false, layer_norm: false}"}
BIASES = {  # (bias, its kind)
    "l1": ("{kind: lp, p: 1, smooth: false}", "general"),  # g = sign(r): dg/dr = 0 a.e.
    "sign_r_times_r": ("{kind: expression, loss: 'sign(r) * r'}", "general"),  # |r| again
    "abs_plus_l2": ("{kind: expression, loss: 'r**2 / 2 + abs(r)'}", "general"),  # dg/dr = 1
    "linear": ("{kind: expression, loss: '2 * r + v**2'}", "state_free"),  # g = 2
    "l2_plus_rv": ("{kind: expression, loss: 'r**2 / 2 + r * v'}", "affine"),  # g = r + v
}


@pytest.mark.parametrize("bias", BIASES)
def test_only_a_gradient_linear_in_r_is_affine(bias):
    text, kind = BIASES[bias]
    d = op_from_yaml(axis_spec(bias=text)).derivation
    assert d.bias.kind == kind
    assert d.exact == (kind != "general")  # the token recurrence only where chunks solve it


@pytest.mark.parametrize(("memory", "bias"), [(m, b) for m in MEMORIES for b in ("l1", "abs_plus_l2")]
                         + [("mlp", "linear")])  # g constant, pulled back through the layers
def test_constant_and_piecewise_constant_derivatives_run(memory, bias, tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))
    op = mirasc.compile(axis_spec(memory=MEMORIES[memory], bias=BIASES[bias][0]))
    assert op.backend == "triton"
    inputs = random_inputs(op, batch=1, length=7, heads=1, dk=4, dv=4, seed=3)
    for backend in ("torch", "auto"):  # auto: the kernels, in the interpreter on CPU
        errors = compare(OnBackend(op, backend), inputs, chunk_size=op.oracle_chunk_size)
        bad = {name: err for name, err in errors.items() if not err <= 1e-10}
        assert not bad, (backend, bad)
    # the update moved the state: the residual's sign mattered
    _, final = op.reference(**inputs, chunk_size=op.oracle_chunk_size, output_final_state=True)
    assert (final[0] - inputs["initial_state"][0]).norm() > 1e-3 * final[0].norm()
    assert torch.isfinite(final[0]).all()
