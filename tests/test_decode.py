"""The O(1) decode step (mirasc.decode): token by token, prefill + decode at every offset inside a
chunk and batched sequences equal the parallel chunked forward (the op's chunk-step graph in
torch) for every shipped spec and generated ones; the cache's size does not grow with the
position; cached generation equals uncached. Under Triton's interpreter (the tests' default
without a GPU) the specs the step kernel covers (`codegen.step_unsupported`) step by it
(`mirasc.step_op`), so these hold for the kernel too; tests/test_step_kernel.py compares it with
the torch step."""

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_generates_alike, axis_spec, decode, op_from_yaml
from test_oracle import AXIS_CASES

import mirasc.op
from mirasc.cache import compile as compile_spec
from mirasc.catalog import resolve
from mirasc.check import random_inputs
from mirasc.decode import Decoder
from mirasc.layers import MirasLayer
from mirasc.lm import MirasConfig, MirasForCausalLM
from mirasc.reference import Inputs

SHIPPED = sorted(str(p) for p in (Path(__file__).parent.parent / "specs").glob("*.yaml"))
GENERATED = {
    "elastic-proximal-momentum": axis_spec(bias="{kind: huber, delta: {}}",
                                           retention="{kind: elastic_net, gamma: 0.01, "
                                                     "decay: {}}",
                                      learner="{kind: momentum, eta: {}, momentum: {}}"),
    "kl-lag-channel": axis_spec(retention="{kind: kl, decay: {shape: channel}}",
                                learner="{kind: gd, eta: {shape: channel}}",
                                extra="lag_token: true"),
    "vector-eta-query": axis_spec(memory="{kind: vector, residual: true, layer_norm: true}",
                                  learner="{kind: gd, eta: {}, eta_at: query}"),
    "mlp-retained-bias": axis_spec(memory="{kind: mlp, depth: 2, expansion: 2, bias: true, "
                                          "layer_norm: {affine: true}}",
                                   bias="{kind: lp, p: 3}",
                                   learner="{kind: gd, eta: {}, grad_at: retained}"),
}
SPECS = SHIPPED + list(GENERATED.values())
IDS = [Path(p).stem for p in SHIPPED] + list(GENERATED)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """The parallel forward is the op's chunk-step graph in torch, not Triton's interpreter
    (TRITON_INTERPRET itself stays: generated modules read it when they are imported)."""
    monkeypatch.setattr(mirasc.op, "interpreting", lambda: False)


def relative_error(out, ref):
    """||out - ref|| / ||ref||; NaN or inf anywhere never passes."""
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    return ((out - ref).norm() / ref.norm()).item()


def small(spec: str, chunk: int = 4):
    """The spec with chunks of `chunk` tokens (so a test crosses several boundaries)."""
    return resolve(spec).model_copy(update={"chunk_size": chunk})


def step_all(op, inputs: dict, per_call: int):
    """The op's inputs through the decoder, `per_call` tokens per call: (o [B, T, H, Dv], state)."""
    decoder = Decoder(op.derivation, op.oracle_chunk_size)
    acc = inputs["q"].dtype
    state = decoder.start(inputs["initial_state"])
    gates = {n: inputs.get(n) for n in mirasc.op.GATE_CHANNELS}
    ln = (inputs["ln_weight"], inputs["ln_bias"]) if op.affine else None
    outputs = []
    for t in range(0, inputs["q"].shape[1], per_call):
        part = slice(t, t + per_call)
        steps = Inputs.from_op(op.derivation, inputs["q"][:, part], inputs["k"][:, part],
                               inputs["v"][:, part],
                               {n: None if x is None else x[:, part] for n, x in gates.items()}, ln)
        o, state = decoder(state, steps)
        assert o.dtype == acc
        outputs.append(o.transpose(1, 2))
    return torch.cat(outputs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_steps_equal_the_parallel_chunked_forward(spec, dtype):
    """Token by token (and three tokens per call) from a random state, odd widths, two sequences:
    every output and the state at the last boundary equal the op's parallel chunked forward.
    In float32 an error above 1e-5 passes only while the step stays as close to the float64
    forward as twice the float32 forward's own error (memora's softmax from a random state)."""
    op = compile_spec(small(spec))
    chunk = op.oracle_chunk_size or 1
    length = 3 * chunk  # ends on a boundary: the op's last row reads the chunk-end state too
    inputs = random_inputs(op, batch=2, length=length, heads=3, dk=5, dv=5, dtype=dtype, seed=1)
    parallel, final = op(**inputs, output_final_state=True, backend="torch", check_gates=False)
    exact = random_inputs(op, batch=2, length=length, heads=3, dk=5, dv=5, seed=1)
    exact, _ = op(**exact, backend="torch", check_gates=False)
    own = relative_error(parallel.double(), exact)
    for per_call, grad in ((1, False), (3, True)):  # in place without autograd, else not
        with torch.set_grad_enabled(grad):
            o, state = step_all(op, inputs, per_call)
        assert state.position == 0
        error = relative_error(o, parallel)
        assert error < TOLERANCE[dtype] or (
            dtype == torch.float32 and relative_error(o.double(), exact) < 2 * own), error
        for s, f in zip(state.boundary, final, strict=True):
            assert relative_error(s, f.to(dtype)) < 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("case", sorted(AXIS_CASES))
def test_every_axis_value_steps_like_the_parallel_forward(case):
    """The generated-spec sweep (every axis value the kernel tests draw): token by token, without
    autograd, equal to the op's parallel forward in float64 (chunks of 4 over 10 tokens: the
    last row of the parallel run reads a chunk-end state its step does not, so it is left out)."""
    op = op_from_yaml(axis_spec(**AXIS_CASES[case]))
    dk = 4
    dv = dk if op.spec.memory.residual or op.spec.memory.kind == "vector" else 3
    inputs = random_inputs(op, batch=2, length=10, heads=2, dk=dk, dv=dv,
                           seed=sorted(AXIS_CASES).index(case))
    if op.spec.bias.kind == "lp" and "eta" in inputs:  # a cubic loss diverges at steps near 1
        inputs["eta"] = inputs["eta"] * 0.3
    parallel, _ = op(**inputs, backend="torch", check_gates=False)
    with torch.no_grad():
        o, _ = step_all(op, inputs, 1)
    assert relative_error(o[:, :-1], parallel[:, :-1]) < 1e-10


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_prefill_then_decode_at_every_offset(spec):
    """The layer (parallel forward: the op) against a prefill ending at each offset inside a chunk
    (and past a whole chunk) followed by token-by-token decoding, float64."""
    torch.manual_seed(0)
    layer = MirasLayer(small(spec), 12, 2, head_dim=5).double()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    parallel, _ = layer(x)
    for prefill in range(1, 7):
        with torch.set_grad_enabled(prefill % 2 == 0):  # the state updated in place or not
            decoded = decode(layer, x, prefill)
        assert relative_error(decoded, parallel) < 1e-10, prefill


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_continuing_in_pieces(spec):
    """Calls of several tokens from a mid-chunk state: the tokens to the boundary step, whole
    chunks run through the op, the rest steps (chunks of 4; pieces of 3, 6, 1, 5 tokens)."""
    torch.manual_seed(3)
    layer = MirasLayer(small(spec), 12, 2, head_dim=5).double()
    x = torch.randn(2, 15, 12, dtype=torch.float64)
    parallel, _ = layer(x)
    state, outputs, start = None, [], 0
    with torch.no_grad():
        for size in (3, 6, 1, 5):
            y, state = layer(x[:, start:start + size], state, use_cache=True)
            outputs.append(y)
            start += size
    assert relative_error(torch.cat(outputs, 1), parallel) < 1e-10


@pytest.mark.parametrize("spec", ["specs/moneta.yaml", "specs/ttt_mlp.yaml",
                                  "specs/gated_deltanet.yaml"])
def test_float32_decoding_at_the_shipped_chunk_size(spec):
    """The shipped chunk size, float32: a prefill that ends mid-chunk, then decoding across the
    next boundary."""
    torch.manual_seed(1)
    layer = MirasLayer(spec, 16, 2, head_dim=6)
    chunk = layer.decoder.chunk
    x = torch.randn(1, chunk + 3, 16)
    parallel, _ = layer(x)
    assert relative_error(decode(layer, x, max(1, chunk - 2)), parallel) < 1e-5


def state_bytes(state: dict) -> int:
    """Bytes of every tensor a layer's cached state holds."""
    conv = sum(c.numel() * c.element_size() for c in state["conv"])
    return state["memory"].nbytes() + conv


@pytest.mark.parametrize("spec", ["specs/moneta.yaml", "specs/memora.yaml", "specs/titans.yaml",
                                  "specs/gated_deltanet.yaml"])
def test_cache_size_does_not_grow_with_the_position(spec):
    """Inside a chunk the state holds the same tensors at every position; at a boundary only Z
    (and the momentum), so never more; exact specs hold Z alone."""
    layer = MirasLayer(small(spec, 6), 12, 2).double()
    x = torch.randn(1, 14, 12, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x[:, :1], None, use_cache=True)
        sizes = {}
        for t in range(1, x.shape[1]):
            _, state = layer(x[:, t:t + 1], state, use_cache=True)
            sizes.setdefault("zs" in state["memory"].tracks, set()).add(state_bytes(state))
    inside, boundary = sizes.get(False, set()), sizes[True]
    assert len(inside) <= 1 and len(boundary) == 1
    assert max(boundary) <= min(inside, default=max(boundary))
    if layer.decoder.chunk == 1:
        memory = 8 * sum(math.prod(s) for s in layer.op.state_shapes(1, 2, 6, 6))
        assert not inside and max(boundary) == memory + sum(
            c.numel() * c.element_size() for c in state["conv"])


def test_a_wrong_chunking_is_caught():
    """The check can fail: a decoder chunked one token longer than the op differs from it."""
    op = compile_spec(small("specs/moneta.yaml"))
    inputs = random_inputs(op, batch=1, length=12, heads=2, dk=5, dv=5, seed=2)
    parallel, _ = op(**inputs, backend="torch", check_gates=False)
    decoder = Decoder(op.derivation, op.oracle_chunk_size + 1)
    state = decoder.start(inputs["initial_state"])
    gates = {n: inputs.get(n) for n in ("log_alpha", "eta", "delta", "momentum")}
    o, _ = decoder(state, Inputs.from_op(op.derivation, inputs["q"], inputs["k"], inputs["v"],
                                         gates))
    assert relative_error(o.transpose(1, 2), parallel) > 1e-3


@pytest.mark.parametrize("name", ["kl-lag-channel", "elastic-proximal-momentum"])
def test_generate_with_cache_equals_without(name):
    """Chunks of 4 tokens: the prompt ends mid-chunk and generation crosses two boundaries."""
    torch.manual_seed(0)
    config = MirasConfig(spec=GENERATED[name], vocab_size=30, hidden_size=24,
                         num_hidden_layers=2, num_heads=2)
    model = MirasForCausalLM(config).double().eval()
    prompt = torch.randint(0, 30, (2, 4))
    assert_generates_alike(model, prompt, 8)


def test_bad_arguments_are_refused():
    op = compile_spec(small("specs/moneta.yaml"))
    with pytest.raises(ValueError, match="chunk"):
        Decoder(op.derivation, 0)
    inputs = random_inputs(op, batch=1, length=2, heads=1, dk=4, dv=4)
    decoder = Decoder(op.derivation, 4)
    state = decoder.start(inputs["initial_state"])
    gates = {n: inputs.get(n) for n in ("log_alpha", "eta", "delta", "momentum")}
    _, state = decoder(state, Inputs.from_op(op.derivation, inputs["q"], inputs["k"],
                                             inputs["v"], gates))
    with pytest.raises(ValueError, match="chunk boundaries"):
        state.boundary  # noqa: B018


def test_selected_sequences_continue_as_their_own():
    """Beam search's reorder: a state's select(index) continues each picked sequence as if it
    had been decoded alone (mid-chunk, with momentum)."""
    op = compile_spec(small("specs/titans.yaml"))
    inputs = random_inputs(op, batch=3, length=7, heads=2, dk=5, dv=5, seed=3)
    with torch.no_grad():
        _, state = step_all(op, {n: x if n == "initial_state" else x[:, :5]
                                 for n, x in inputs.items()}, 1)
        index = torch.tensor([2, 0, 2])
        picked = state.select(index)
        rest = {n: x[:, 5:] for n, x in inputs.items() if n not in ("initial_state",)}
        decoder = Decoder(op.derivation, op.oracle_chunk_size)
        gates = {n: rest.get(n) for n in ("log_alpha", "eta", "delta", "momentum")}
        o, _ = decoder(picked, Inputs.from_op(op.derivation, rest["q"][index], rest["k"][index],
                                              rest["v"][index],
                                              {n: None if x is None else x[index]
                                               for n, x in gates.items()}))
        alone, _ = step_all(op, inputs, 1)
    assert relative_error(o.transpose(1, 2), alone[index, 5:]) < 1e-12


def test_bfloat16_layer_decodes_in_float32_state():
    """A bf16 layer keeps its step state in float32 and decodes close to its parallel forward."""
    torch.manual_seed(2)
    layer = MirasLayer(small("specs/moneta.yaml"), 16, 2).to(torch.bfloat16)
    x = torch.randn(1, 9, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        parallel, _ = layer(x)
        _, state = layer(x[:, :6], None, use_cache=True)
        assert all(t.dtype == torch.float32 for t in state["memory"].tensors())
        decoded = decode(layer, x, 6)
    assert relative_error(decoded.float(), parallel.float()) < 2e-2
