"""MirasLayer and the sliding-window block: decoding equals the parallel forward, the generated
kernels equal the torch path inside the layer, every parameter learns, bad input is refused."""

import pytest
import torch
from conftest import axis_spec, decode

from mirasc.errors import SpecError
from mirasc.layers import MirasLayer, SlidingWindowAttention

HIDDEN, HEADS = 24, 3


def relative_error(out, ref):
    """||out - ref|| / ||ref||; 0 when both are exactly zero (a gate the loss never reaches)."""
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    if not ref.any():
        return (out - ref).norm().item()
    return ((out - ref).norm() / ref.norm()).item()


CHANNEL_GATES = axis_spec(retention="{kind: l2, decay: {shape: channel}}",
                          learner="{kind: gd, eta: {shape: channel}}")


@pytest.mark.parametrize("spec,prefill", [
    ("specs/linear_attention.yaml", 6), ("specs/gated_deltanet.yaml", 1), ("specs/titans.yaml", 6),
    ("specs/ttt_mlp.yaml", 6), ("specs/moneta.yaml", 1), ("specs/yaad.yaml", 6),
    ("specs/memora.yaml", 1), ("specs/memora.yaml", 6), ("specs/ttt_linear.yaml", 6),
    (CHANNEL_GATES, 6)])
def test_decoding_equals_parallel_forward(spec, prefill):
    layer = MirasLayer(spec, HIDDEN, HEADS, backend="torch").double()
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    parallel, _ = layer(x)
    assert relative_error(decode(layer, x, prefill), parallel) < 1e-12


def test_output_at_t_does_not_depend_on_where_the_sequence_ends():
    """moneta's chunk end maps A -> W; a prefix that ends mid-chunk must not read the mapped state."""
    layer = MirasLayer("specs/moneta.yaml", HIDDEN, HEADS, backend="torch").double()
    x = torch.randn(1, 11, HIDDEN, dtype=torch.float64)
    full, _ = layer(x)
    prefix, _ = layer(x[:, :7])
    assert relative_error(prefix, full[:, :7]) < 1e-12


def test_sliding_window_decoding_equals_parallel_forward():
    layer = SlidingWindowAttention(HIDDEN, 2, window=5).double()
    x = torch.randn(2, 17, HIDDEN, dtype=torch.float64)
    parallel, _ = layer(x)
    assert relative_error(decode(layer, x, 3), parallel) < 1e-12


def test_sliding_window_sees_only_its_window():
    layer = SlidingWindowAttention(HIDDEN, 2, window=4).double()
    x = torch.randn(1, 12, HIDDEN, dtype=torch.float64)
    y, _ = layer(x)
    changed = x.clone()
    changed[:, 2] += 1.0
    z, _ = layer(changed)
    assert torch.allclose(y[:, :2], z[:, :2]) and torch.allclose(y[:, 6:], z[:, 6:])
    assert not torch.allclose(y[:, 2:6], z[:, 2:6])


@pytest.mark.parametrize("spec", ["specs/gated_deltanet.yaml", "specs/yaad.yaml"])
def test_generated_kernels_equal_the_torch_path_in_the_layer(spec):
    """backend 'auto' runs the Triton kernels (interpreted on CPU): outputs and all gradients."""
    torch.manual_seed(1)
    kernel = MirasLayer(spec, 16, 2, backend="auto").double()
    torch_path = MirasLayer(spec, 16, 2, backend="torch").double()
    torch_path.load_state_dict(kernel.state_dict())
    assert kernel.op.backend == "triton"
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    results = []
    for layer in (kernel, torch_path):
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        (y * torch.cos(y)).sum().backward()
        grads = [p.grad for p in layer.parameters()]
        results.append((y, xi.grad, grads))
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert relative_error(y1, y2) < 1e-10
    assert relative_error(dx1, dx2) < 1e-10
    for a, b in zip(g1, g2, strict=True):
        assert relative_error(a, b) < 1e-9


@pytest.mark.parametrize("spec,expected", [
    ("specs/titans.yaml", {"gates.log_alpha.up.weight", "gates.eta.up.weight",
                           "gates.momentum.up.weight"}),
    ("specs/moneta.yaml", {"gates.log_alpha.up.weight", "initial_state.0", "initial_state.1"}),
    ("specs/ttt_linear.yaml", {"gates.eta.up.weight", "ln_weight", "ln_bias"})])
def test_every_parameter_gets_a_gradient(spec, expected):
    layer = MirasLayer(spec, HIDDEN, HEADS, backend="torch")
    y, _ = layer(torch.randn(2, 9, HIDDEN))
    y.square().mean().backward()
    names = dict(layer.named_parameters())
    assert expected <= set(names)
    for name, p in names.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gates_follow_the_spec_shape():
    layer = MirasLayer(CHANNEL_GATES, HIDDEN, HEADS)
    assert layer.gates["log_alpha"].up.out_features == HIDDEN  # heads x head_dim
    assert set(MirasLayer("specs/linear_attention.yaml", HIDDEN, HEADS).gates) == set()


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        MirasLayer("specs/deltanet.yaml", HIDDEN, 5)
    with pytest.raises(ValueError, match="backend 'cuda'; allowed: auto, torch"):
        MirasLayer("specs/deltanet.yaml", HIDDEN, HEADS, backend="cuda")
    with pytest.raises(SpecError, match="bias.kind"):
        MirasLayer(axis_spec(bias="{kind: l3}"), HIDDEN, HEADS)
    layer = MirasLayer("specs/deltanet.yaml", HIDDEN, HEADS)
    with pytest.raises(ValueError, match=r"\[batch, time, 24\], got \[2, 5, 16\]"):
        layer(torch.randn(2, 5, 16))
    x = torch.randn(2, 5, HIDDEN)
    x[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x)
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 5, HIDDEN, dtype=torch.int64))
    with pytest.raises(ValueError, match="head_dim must be even"):
        SlidingWindowAttention(HIDDEN, 8, window=4)
