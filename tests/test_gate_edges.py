"""Data-dependent gates at the edges of their ranges, against the reference of the same chunking
in float64 (forward and every gradient), on the torch path and in the kernels (the interpreter on
CPU): momentum 0 (S_t = eta_t grad_t: a reset of the momentum) and 1, log_alpha 0 (no decay) and
-inf (a full reset), and a vanishing step eta."""

from __future__ import annotations

import pytest
from conftest import axis_spec

import mirasc
from mirasc.check import compare, random_inputs

MEMORIES = {"matrix": "{kind: matrix}", "vector": "{kind: vector}",  # matrix: titans' axes
            "mlp": "{kind: mlp, depth: 2, expansion: 2}"}


class _Backend:
    """The op on one backend (what `compare` calls)."""

    def __init__(self, op, backend):
        self.op, self.backend = op, backend

    def __getattr__(self, name):
        return getattr(self.op, name)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs, backend=self.backend)


def _edges(op, seed=0) -> dict:
    """Random inputs (two chunks of 4 and a part) with each gate at its edges: in the first
    sequence on one row, in the second on a run across a chunk boundary."""
    inputs = random_inputs(op, batch=2, length=11, heads=2, dk=4, dv=4, seed=seed)
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
    errors = compare(_Backend(op, backend), inputs, chunk_size=op.oracle_chunk_size)
    bad = {name: err for name, err in errors.items() if not err <= 1e-10}
    assert not bad, bad

