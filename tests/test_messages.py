"""Input errors of the op that say what is wrong and what to do: a numpy array where a tensor
belongs, gates passed by position, meta tensors with cu_seqlens."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import axis_spec, op_from_yaml

from mirasc.check import random_inputs


@pytest.fixture
def op():
    return op_from_yaml(axis_spec())  # gates log_alpha and eta, as gated DeltaNet


@pytest.fixture
def inputs(op):
    return random_inputs(op, batch=2, length=5, heads=2, dk=4, dv=4)


@pytest.mark.parametrize("arg", ["q", "v", "log_alpha", "eta", "initial_state", "cu_seqlens"])
def test_a_numpy_array_is_named_as_such(op, inputs, arg):
    if arg == "cu_seqlens":
        inputs = random_inputs(op, batch=1, length=5, heads=2, dk=4, dv=4)
        inputs["cu_seqlens"] = np.array([0, 2, 5])
    elif arg == "initial_state":
        inputs["initial_state"] = inputs["initial_state"][0].numpy()
    else:
        inputs[arg] = inputs[arg].numpy()
    shape = list(inputs[arg].shape)
    literal = re.escape(f"{arg} is a numpy.ndarray of shape {shape}, not a torch.Tensor;")
    with pytest.raises(ValueError, match=rf"{literal} .* convert it with torch.as_tensor\(") as e:
        op(**inputs)
    assert "must have shape" not in str(e.value) and "4-D" not in str(e.value)


@pytest.mark.parametrize("call", ["op", "reference"])
def test_gates_by_position_are_refused_with_their_names(op, inputs, call):
    fn = op if call == "op" else op.reference
    with pytest.raises(TypeError, match=r"q, k, v by position and everything else by keyword; "
                                        r"got 2 more .* \(this spec's: log_alpha=\.\.\., eta=\.\.\.\)"):
        fn(inputs["q"], inputs["k"], inputs["v"], inputs["log_alpha"], inputs["eta"])


def test_meta_tensors_run_but_meta_offsets_are_refused(op):
    inputs = random_inputs(op, batch=1, length=5, heads=2, dk=4, dv=4)
    inputs["initial_state"] = tuple(s.repeat(2, 1, 1, 1) for s in inputs["initial_state"])
    meta = {k: (tuple(x.to("meta") for x in v) if isinstance(v, tuple) else v.to("meta"))
            for k, v in inputs.items()}
    offsets = torch.tensor([0, 2, 5])
    o, final = op(**meta, cu_seqlens=offsets, output_final_state=True)  # shapes only
    assert o.is_meta and o.shape == inputs["v"].shape and final[0].shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens is a meta tensor, which holds no values.* "
                                         "pass cu_seqlens as a CPU"):
        op(**meta, cu_seqlens=offsets.to("meta"))
