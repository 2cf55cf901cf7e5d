"""torch.compile(fullgraph=True) on CPU tensors: the op's torch path is one opaque custom op
(`mirasc::torch_path`), so Dynamo traces a MirasLayer and the LM whole, backward included."""

from __future__ import annotations

import pytest
import torch
from conftest import axis_spec

import mirasc
from mirasc.catalog import spec_text
from mirasc.check import random_inputs, relative_error
from mirasc.layers import MirasLayer
from mirasc.lm import MirasConfig, MirasForCausalLM


@pytest.mark.parametrize("spec", ["gated_deltanet", "moneta", axis_spec(
    retention="{kind: elastic_net, decay: {}, gamma: 0.01}")])
def test_the_torch_path_is_a_well_formed_custom_op(spec):
    """torch.library.opcheck: the fake implementation's outputs match the real ones, the
    autograd registration gives gradients, on a kernel spec and on one that runs the reference."""
    op = mirasc.compile(spec)
    inputs = random_inputs(op, batch=2, length=9, heads=2, dk=4, dv=4, dtype=torch.float64)
    named = [inputs[n].requires_grad_() for n in op.torch_input_names]
    state = [s.requires_grad_() for s in inputs.get("initial_state", ())]
    qkv = [inputs[n].requires_grad_() for n in ("q", "k", "v")]
    torch.library.opcheck(torch.ops.mirasc.torch_path.default,
                          (op.torch_key, *qkv, named, state, None),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def _own(name: str) -> str:
    """A shipped spec's YAML under a name of its own: its module and ops are this file's, never
    the ones the rest of the suite shares (Dynamo keeps what it traced of an op it compiled)."""
    text = spec_text(name)[0]
    return text.replace(f"name: {name}\n", f"name: {name}_compiled\n", 1)


def _outside_the_interpreter(monkeypatch):
    """From here on the ops take their torch path on CPU tensors, as without TRITON_INTERPRET=1
    (the generated modules were loaded before, for the interpreter, as the rest of the suite
    expects to find them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("spec", ["simple_gla", "ttt_linear", "moneta"])
def test_compiled_layer_equals_eager_forward_and_backward(spec, monkeypatch):
    torch.manual_seed(0)
    layer = MirasLayer(_own(spec), hidden_size=16, num_heads=2).double()
    _outside_the_interpreter(monkeypatch)
    x = torch.randn(2, 11, 16, dtype=torch.float64)

    def loss(layer, x):
        y, _ = layer(x)
        return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(layer, x)
    grads = torch.autograd.grad(got, list(layer.parameters()))
    want = loss(layer, x)
    want_grads = torch.autograd.grad(want, list(layer.parameters()))
    assert relative_error(got, want) < 1e-12
    for g, w in zip(grads, want_grads, strict=True):
        assert relative_error(g, w) < 1e-10


@pytest.mark.slow
def test_compiled_lm_with_inductor_on_cpu(monkeypatch):
    """The LM under the default backend (Inductor, C++ on CPU), forward and a training step."""
    torch.manual_seed(0)
    model = MirasForCausalLM(MirasConfig(spec=_own("gated_deltanet"), vocab_size=32, hidden_size=16,
                                         num_hidden_layers=2, num_heads=2))
    _outside_the_interpreter(monkeypatch)
    ids = torch.randint(0, 32, (2, 12))
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids, labels=ids)
    want = model(ids, labels=ids)
    assert relative_error(got.logits, want.logits) < 1e-4
    got.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want.loss.backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        assert relative_error(g, p.grad) < 1e-3


def test_dynamo_sees_the_torch_path_as_one_node(monkeypatch):
    op = mirasc.compile(_own("gated_deltanet"))
    inputs = random_inputs(op, batch=1, length=10, heads=2, dk=4, dv=4, dtype=torch.float64)
    _outside_the_interpreter(monkeypatch)
    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    o, _ = torch.compile(op, fullgraph=True, backend=recording)(**inputs)
    assert seen.count("mirasc.torch_path.default") == 1, seen
    assert relative_error(o, op(**inputs)[0]) < 1e-12
