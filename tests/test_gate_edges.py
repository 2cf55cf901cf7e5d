"""Data-dependent gates at the edges of their ranges, against the reference of the same chunking
in float64 (forward and every gradient), on the torch path and in the kernels (the interpreter on
CPU): momentum 0 (S_t = eta_t grad_t: a reset of the momentum) and 1, log_alpha 0 (no decay) and
-inf (a full reset), and a vanishing step eta. Outside their ranges the op refuses them in eager
mode, naming the first place; NaN passes (it spoils the outputs from its token on)."""

from __future__ import annotations

import pytest
import torch
from conftest import OnBackend, axis_spec, op_from_yaml

import mirasc
from mirasc.check import compare, random_inputs

MEMORIES = {"matrix": "{kind: matrix}", "vector": "{kind: vector}",  # matrix: titans' axes
            "mlp": "{kind: mlp, depth: 2, expansion: 2}"}


def _edges(op, seed=0) -> dict:
    """Random inputs (two chunks of 4 and a part) with each gate at its edges: in the first
    sequence on one row, in the second on a run across a chunk boundary."""
    inputs = random_inputs(op, batch=2, length=11, heads=1, dk=4, dv=4, seed=seed)
    inputs["momentum"][0, 2] = 0.0
    inputs["momentum"][1, 3:6] = 0.0
    inputs["momentum"][0, 6:9] = 1.0
    inputs["momentum"][1, 9] = 1.0
    inputs["log_alpha"][0, 4] = float("-inf")
    inputs["log_alpha"][1, 1:3] = 0.0
    inputs["log_alpha"][1, 7] = float("-inf")
    inputs["eta"][0, 5:7] = 1e-30
    inputs["eta"][1, 0] = 0.0
    return inputs


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_gates_at_their_edges_match_the_reference(memory, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))
    op = mirasc.compile(axis_spec(memory=MEMORIES[memory],
                                  learner="{kind: momentum, eta: {}, momentum: {}}"))
    assert op.backend == "triton"
    inputs = _edges(op)
    errors = compare(OnBackend(op, backend), inputs, chunk_size=op.oracle_chunk_size)
    bad = {name: err for name, err in errors.items() if not err <= 1e-10}
    assert not bad, bad


ALL_GATES = axis_spec(bias="{kind: huber, delta: {}}",
                      learner="{kind: momentum, eta: {}, momentum: {}}")
OUTSIDE = {"log_alpha": 0.25, "eta": -0.5, "momentum": 1.5, "delta": 0.0}


@pytest.mark.parametrize("gate", OUTSIDE)
def test_a_gate_outside_its_range_is_refused_with_its_first_place(gate):
    op = op_from_yaml(ALL_GATES)
    inputs = random_inputs(op, batch=2, length=9, heads=3, dk=4, dv=4)
    inputs[gate][1, 2, 0] = OUTSIDE[gate]  # the first in (batch, token, head) order
    inputs[gate][1, 6, 2] = OUTSIDE[gate]
    with pytest.raises(ValueError, match=rf"{gate} must be .* got {OUTSIDE[gate]:g} at "
                                         r"\(batch 1, token 2, head 0\); .*check_gates=False"):
        op(**inputs)
    if gate == "momentum":
        inputs[gate][1, 2, 0] = -0.5  # below the range too
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got -0.5"):
            op(**inputs)


def test_a_channel_gate_names_its_channel():
    op = op_from_yaml(axis_spec(retention="{kind: l2, decay: {shape: channel}}"))
    inputs = random_inputs(op, batch=1, length=5, heads=2, dk=4, dv=4)
    inputs["log_alpha"][0, 3, 1, 2] = 1e-3
    with pytest.raises(ValueError, match=r"at \(batch 0, token 3, head 1, channel 2\)"):
        op(**inputs)


def test_nan_gates_pass_the_check_and_the_check_can_be_turned_off(monkeypatch):
    op = op_from_yaml(ALL_GATES)
    inputs = random_inputs(op, batch=1, length=6, heads=2, dk=4, dv=4)
    inputs["eta"][0, 3] = float("nan")  # NaN causality: outputs from token 3 on are NaN
    o, _ = op(**inputs)
    assert torch.isfinite(o[:, :3]).all() and o[:, 3:].isnan().all()
    inputs["log_alpha"][0, 1, 0] = 0.5
    with pytest.raises(ValueError, match="log_alpha must be <= 0"):
        op(**inputs)
    assert op(**inputs, check_gates=False)[0].shape == o.shape
    monkeypatch.setenv("MIRASC_CHECK_GATES", "0")
    assert op(**inputs)[0].shape == o.shape
    assert pytest.raises(ValueError, op, **inputs, check_gates=True)
    monkeypatch.delenv("MIRASC_CHECK_GATES")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as under torch.compile
    assert op(**inputs)[0].shape == o.shape
