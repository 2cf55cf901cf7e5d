"""The CPU path of ops with kernels (`mirasc.torch_chunk`: the kernels' chunk-step graph run in
torch, batched over sequences and heads) against the reference of the same chunking, float64:
the output, the final state and every input gradient."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import axis_spec, op_from_yaml

import mirasc
from mirasc import torch_chunk
from mirasc.check import compare, random_inputs, varlen_inputs
from mirasc.codegen import triton_unsupported
from mirasc.op import MirasOp

SPECS = ["linear_attention", "simple_gla", "gla", "deltanet", "gated_deltanet", "kda", "titans",
         "ttt_linear", "ttt_mlp", "moneta", "yaad", "memora"]


INTERPRET = os.environ.get("TRITON_INTERPRET")  # as conftest set it for the whole suite


@pytest.fixture(autouse=True)
def _on_cpu(monkeypatch):
    """Not interpreting: an op with kernels runs its CPU path on CPU tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _compile(spec: str, monkeypatch) -> MirasOp:
    """Compile under the suite's TRITON_INTERPRET: triton.jit reads it when the generated module is
    imported (once per process), and later tests run these kernels in the interpreter."""
    with monkeypatch.context() as m:
        if INTERPRET is not None:
            m.setenv("TRITON_INTERPRET", INTERPRET)
        return mirasc.compile(f"specs/{spec}.yaml")


def _assert_close(errors: dict, tol: float = 1e-10):
    assert errors
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, bad


def _with_kernels(text: str) -> MirasOp:
    """An op of an inline spec that takes the CPU path (as if its kernels were compiled)."""
    op = op_from_yaml(text)
    assert triton_unsupported(op.derivation) is None, triton_unsupported(op.derivation)
    return MirasOp(op.derivation, kernel=lambda *a: pytest.fail("the kernel ran on CPU"))


@pytest.mark.parametrize("spec", SPECS)
def test_shipped_specs(spec, monkeypatch):
    op = _compile(spec, monkeypatch)
    assert op.backend == "triton"
    calls, run = [], torch_chunk.run
    monkeypatch.setattr(torch_chunk, "run", lambda *a: calls.append(1) or run(*a))
    dv = 6 if op.spec.memory.residual else 5
    inputs = random_inputs(op, batch=2, length=37, heads=2, dk=6, dv=dv)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size))
    assert calls  # the CPU path ran, not the reference


CASES = {  # axis combinations (chunk_size 5: not a power of two; T = 23 not a multiple of it)
    "channel-decay-eta": {"retention": "{kind: l2, decay: {shape: channel}}",
                          "learner": "{kind: gd, eta: {shape: channel}}"},
    "lag-kl": {"retention": "{kind: kl, decay: {}}", "extra": "lag_token: true"},
    "momentum": {"learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "momentum-mlp": {"memory": "{kind: mlp}", "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "matrix-bias-ln": {"memory": "{kind: matrix, bias: true, layer_norm: {affine: true}}",
                       "bias": "{kind: huber, delta: {shape: channel}}"},
    "mlp-3-silu-lag": {"memory": "{kind: mlp, depth: 3, expansion: 2, activation: silu}",
                       "extra": "lag_token: true"},
    "vector-eta-query": {"memory": "{kind: vector, residual: true, layer_norm: true}",
                         "learner": "{kind: gd, eta: {shape: channel}, eta_at: query}"},
    "exact-retained": {"learner": "{kind: gd, eta: {}, grad_at: retained}"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_axis_combinations(case):
    op = _with_kernels(axis_spec(**CASES[case]).replace("chunk_size: 4", "chunk_size: 5"))
    dv = 5 if op.spec.memory.residual or op.spec.memory.kind == "vector" else 3
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=5, dv=dv)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size))


@pytest.mark.parametrize("spec", ["gated_deltanet", "ttt_linear", "memora"])
def test_varlen(spec, monkeypatch):
    op = _compile(spec, monkeypatch)
    dv = 5 if op.spec.memory.residual else 3
    inputs = varlen_inputs(op, [0, 7, 30, 31, 50], dk=5, dv=dv)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_dtypes_compute_in_float32(dtype, monkeypatch):
    op = _compile("gated_deltanet", monkeypatch)
    inputs = random_inputs(op, batch=1, length=70, heads=2, dk=8, dv=8)
    narrow = {k: (tuple(x.to(dtype) for x in v) if isinstance(v, tuple) else v.to(dtype))
              for k, v in inputs.items()}
    o, final = op(**narrow, output_final_state=True)
    assert o.dtype == dtype and all(f.dtype == torch.float32 for f in final)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    errors = compare(op, narrow, chunk_size=op.oracle_chunk_size, against=inputs)
    _assert_close(errors, tol)


def test_sequences_shorter_than_a_chunk(monkeypatch):
    """A sequence shorter than a chunk runs in a tile of its rows (lag token: memora)."""
    op = _compile("memora", monkeypatch)
    inputs = varlen_inputs(op, [0, 3, 4, 70], dk=5, dv=5)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size))
