"""The classic specs equal flash-linear-attention's naive reference recurrences (fla-core, a test
dependency): fla keeps S = W^T [K, V] and scales q by 1/sqrt(K) unless told scale=1."""

from __future__ import annotations

import pytest
import torch
from fla.ops.gated_delta_rule import naive as naive_gdr
from fla.ops.simple_gla import naive as naive_gla

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
