"""Call-time numerics on the three paths: the reference (its chunked recurrence), the torch chunk
path and the Triton kernels (in the interpreter). A NaN or inf at token t leaves every output
before t as a run on the sequence cut before t gives it (forward and backward); log_alpha = -inf
(alpha = 0, a full reset) and decays of -20 per token (a chunk sums to -320, past exp's range)
match the reference, forward and backward, in float64 and float32."""

from __future__ import annotations

import oracle
import pytest
import torch

import mirasc
from mirasc.check import compare, random_inputs

SPECS = {  # one per way a decay enters the chunk step
    "gated_delta": "memory: {kind: matrix}\nbias: {kind: l2}\n"
                   "retention: {kind: l2, decay: {shape: head}}\n"
                   "learner: {kind: gd, eta: {shape: head}, grad_at: retained}\n",
    "delta_channel": "memory: {kind: matrix}\nbias: {kind: l2}\n"
                     "retention: {kind: l2, decay: {shape: channel}}\n"
                     "learner: {kind: gd, eta: {shape: head}}\n",
    "gla": "memory: {kind: matrix}\nbias: {kind: dot_product}\n"
           "retention: {kind: l2, decay: {shape: channel}}\nlearner: {kind: gd, eta: {value: 1.0}}\n",
    "huber_channel": "memory: {kind: matrix}\nbias: {kind: huber, delta: {}}\n"
                     "retention: {kind: l2, decay: {shape: channel}}\n"
                     "learner: {kind: gd, eta: {}, grad_at: retained}\n",
    "vector_channel": "memory: {kind: vector}\nbias: {kind: l2}\n"
                      "retention: {kind: l2, decay: {shape: channel}}\nlearner: {kind: gd, eta: {}}\n",
    "momentum": "memory: {kind: matrix}\nbias: {kind: l2}\nretention: {kind: l2, decay: {}}\n"
                "learner: {kind: momentum, eta: {}, momentum: {}}\n",
    "mlp": "memory: {kind: mlp, expansion: 2}\nbias: {kind: l2}\nretention: {kind: l2, decay: {}}\n"
           "learner: {kind: gd, eta: {}}\n",
    "kl_lag": "memory: {kind: matrix}\nbias: {kind: l2}\nretention: {kind: kl, decay: {}}\n"
              "learner: {kind: gd, eta: {}}\nlag_token: true\n",
}
BACKENDS = ["reference", "torch", "triton"]
LENGTH, CUT = 37, 21  # three chunks of 16; the bad token sits inside the second


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The op of a spec in SPECS, compiled once for the module."""
    ops = {}

    def get(name: str):
        if name not in ops:
            path = tmp_path_factory.mktemp("specs") / f"{name}.yaml"
            path.write_text(f"name: numerics_{name}\n{SPECS[name]}chunk_size: 16\n")
            ops[name] = mirasc.compile(path)
            assert ops[name].backend == "triton"
        return ops[name]

    return get


def _run(op, backend: str, inputs: dict):
    if backend == "reference":
        return op.reference(**inputs, chunk_size=op.oracle_chunk_size, output_final_state=True)
    return op(**inputs, output_final_state=True, backend="torch" if backend == "torch" else "auto")


def _inputs(op, dtype=torch.float64) -> dict:
    return random_inputs(op, batch=2, length=LENGTH, heads=2, dk=5, dv=5, dtype=dtype)


def _cut(inputs: dict, end: int) -> dict:
    """The inputs of the sequences cut before token `end`."""
    return {k: v if isinstance(v, tuple) or v.dim() < 3 else v[:, :end] for k, v in inputs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("field", "value"), [("v", float("nan")), ("k", float("inf")),
                                              ("log_alpha", float("nan"))])
@pytest.mark.parametrize("spec", ["gated_delta", "delta_channel", "gla", "mlp"])
def test_a_bad_token_leaves_the_tokens_before_it(compiled, spec, field, value, backend):
    op = compiled(spec)
    inputs = _inputs(op)
    inputs[field][0, CUT, 1] = value  # sequence 0, head 1
    with torch.no_grad():
        o, final = _run(op, backend, inputs)
        o_cut, _ = _run(op, backend, _cut(inputs, CUT))
        o_clean, final_clean = _run(op, backend, _inputs(op))
    assert torch.equal(o[:, :CUT], o_cut)
    assert not torch.isfinite(o[0, CUT:, 1]).any()
    assert not torch.isfinite(final[0][0, 1]).any()
    others = torch.ones(2, 2, dtype=torch.bool)
    others[0, 1] = False  # every other sequence and head is untouched
    assert torch.equal(o.transpose(1, 2)[others], o_clean.transpose(1, 2)[others])
    assert torch.equal(final[0][others], final_clean[0][others])


@pytest.mark.parametrize(("field", "value"), [("v", float("nan")), ("k", -float("inf"))])
@pytest.mark.parametrize("spec", ["gated_delta", "gla"])
def test_a_bad_half_entry_leaves_the_tokens_before_it(compiled, spec, field, value):
    """Half inputs, head dims of 20 (tiles of 32 columns): the kernels flag a row by its sum in
    a tensor-core product (`triton_helpers.nonfinite_rows`), and one bad entry of token t
    leaves every output before t as the sequence cut before t gives it, and spoils the rest of
    its head."""
    op = compiled(spec)
    inputs = _narrow(random_inputs(op, batch=2, length=LENGTH, heads=2, dk=20, dv=20),
                     torch.float16)
    inputs[field][0, CUT, 1, 7] = value
    with torch.no_grad():
        o, final = _run(op, "triton", inputs)
        o_cut, _ = _run(op, "triton", _cut(inputs, CUT))
    assert torch.isfinite(o_cut).all()
    assert torch.equal(o[:, :CUT], o_cut)
    assert not torch.isfinite(o[0, CUT:, 1]).any()
    assert not torch.isfinite(final[0][0, 1]).any()
    assert torch.isfinite(o[1]).all() and torch.isfinite(o[0, :, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut", [16, 17])
def test_a_bad_token_spoils_every_later_chunk(compiled, cut, backend):
    """A softmax retention: its `where` would turn a NaN state into a finite one, so a step that
    starts from a NaN state spoils its rows itself; the bad token is a chunk's lag token (which
    runs alone) or the next one."""
    op = compiled("kl_lag")
    inputs = _inputs(op)
    inputs["v"][1, cut, 0] = float("nan")
    with torch.no_grad():
        o, final = _run(op, backend, inputs)
        o_cut, _ = _run(op, backend, _cut(inputs, 16))
    assert torch.equal(o[:, :16], o_cut)
    assert not torch.isfinite(o[1, cut:, 0]).any()
    assert all(not torch.isfinite(f[1, 0]).any() for f in final)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", ["gated_delta", "gla", "mlp"])
def test_a_bad_token_passes_no_nan_to_the_gradients_before_it(compiled, spec, backend):
    """With a cotangent on the outputs before t only, every gradient at the tokens before t (and
    of the initial state) is the gradient of the run cut before t."""
    op = compiled(spec)
    inputs = _inputs(op)
    inputs["v"][0, CUT, 1] = float("nan")
    d_o = torch.randn(inputs["v"].shape, dtype=torch.float64)
    d_o[:, CUT:] = 0

    def grads(given: dict, d_o: torch.Tensor) -> dict:
        leaves = {k: tuple(x.clone().requires_grad_() for x in v) if isinstance(v, tuple)
                  else v.clone().requires_grad_() for k, v in given.items()}
        o, _ = _run(op, backend, leaves)
        (o * d_o).sum().backward()
        out = {k: v.grad[:, :CUT] for k, v in leaves.items() if not isinstance(v, tuple)}
        return out | {"initial_state": leaves["initial_state"][0].grad}

    got, want = grads(inputs, d_o), grads(_cut(inputs, CUT), d_o[:, :CUT])
    for name, g in want.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_query_spoils_its_own_token_only(compiled, backend):
    op = compiled("gla")
    inputs = _inputs(op)
    inputs["q"][1, CUT, 0, 2] = float("nan")
    with torch.no_grad():
        o, final = _run(op, backend, inputs)
        o_clean, final_clean = _run(op, backend, _inputs(op))
    assert not torch.isfinite(o[1, CUT, 0]).any()
    o[1, CUT, 0] = o_clean[1, CUT, 0]
    torch.testing.assert_close(o, o_clean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(final[0], final_clean[0], rtol=1e-12, atol=1e-14)


def _narrow(inputs: dict, dtype) -> dict:
    """The tensors of `inputs` (and of its state tuple) in `dtype`; flags as they are."""
    return {k: tuple(x.to(dtype) for x in v) if isinstance(v, tuple)
            else v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _assert_matches_reference(op, inputs: dict, dtype, backend: str):
    """Forward and every gradient against the float64 reference (the reference itself against
    the second oracle, tests/oracle.py, in float32 within 1e-4): within 1e-10 in float64; in
    float32 within what the float32 reference itself loses (10x), or 3e-5: the chunk's prefix
    sums of log_alpha reach |gamma| ~ 320 here, where float32's spacing is 3e-5. (The MLP
    memory's log_alpha gradient under large decays lost 8.2x the reference's 9.4e-6 on one
    CPU and under 8x on another: the interpreter's float32 products follow the CPU's.)"""
    narrow = _narrow(inputs, dtype)
    if backend == "reference":
        chunk = op.oracle_chunk_size
        errors = oracle.errors_against_oracle(
            lambda **x: op.reference(**_narrow(x, dtype), chunk_size=chunk), op.spec, inputs, chunk)
        limits = dict.fromkeys(errors, 1e-10 if dtype == torch.float64 else 1e-4)  # mlp: 3.6e-5
        bad = {n: (e, limits[n]) for n, e in errors.items() if not e <= limits[n]}
        assert not bad, bad
        return
    subject = _Torch(op) if backend == "torch" else op
    errors = compare(subject, narrow, chunk_size=op.oracle_chunk_size, against=inputs)
    if dtype == torch.float64:
        limits = dict.fromkeys(errors, 1e-10)
    else:
        baseline = compare(op, narrow, chunk_size=op.oracle_chunk_size, against=inputs,
                           run_reference=True)
        limits = {n: max(3e-5, 10 * baseline[n]) for n in errors}
    bad = {n: (e, limits[n]) for n, e in errors.items() if not e <= limits[n]}
    assert not bad, bad


class _Torch:
    """The op with backend='torch' (what `compare` calls)."""

    def __init__(self, op):
        self.op = op

    def __getattr__(self, name):
        return getattr(self.op, name)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_log_alpha_minus_inf_matches_the_reference(compiled, spec, backend, dtype):
    op = compiled(spec)
    inputs = _inputs(op)
    inputs["log_alpha"][0, 5] = float("-inf")  # inside a chunk, at a chunk's first row, in a run
    inputs["log_alpha"][1, 16] = float("-inf")
    inputs["log_alpha"][1, 30:33] = float("-inf")
    _assert_matches_reference(op, inputs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_alpha_minus_inf_starts_the_memory_afresh(compiled, backend):
    """Gated DeltaNet with alpha_t = 0 takes its gradient at the state 0: from t on it is the run
    of the tokens from t with a zero initial state."""
    op = compiled("gated_delta")
    inputs = _inputs(op)
    inputs["log_alpha"][:, CUT] = float("-inf")
    tail = {k: v if isinstance(v, tuple) or v.dim() < 3 else v[:, CUT:] for k, v in inputs.items()}
    tail["initial_state"] = tuple(torch.zeros_like(s) for s in inputs["initial_state"])
    with torch.no_grad():
        o, final = _run(op, backend, inputs)
        o_tail, final_tail = _run(op, backend, tail)
    torch.testing.assert_close(o[:, CUT:], o_tail, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final[0], final_tail[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_large_decays_match_the_reference(compiled, spec, backend, dtype):
    """log_alpha in [-25, -15]: a chunk of 16 sums to about -320, so exp(-gamma) would overflow
    (and float32's exp(gamma) underflows): the pairs' decays are taken one by one."""
    op = compiled(spec)
    inputs = _inputs(op)
    gen = torch.Generator().manual_seed(3)
    inputs["log_alpha"] = -15 - 10 * torch.rand(inputs["log_alpha"].shape, generator=gen,
                                                dtype=torch.float64)
    _assert_matches_reference(op, inputs, dtype, backend)


@pytest.mark.parametrize("potential", ["w**4", "w*log(w) - w"])
def test_a_mirror_map_on_padded_columns_stays_finite(potential, tmp_path, monkeypatch):
    """Head dims below the tile's width leave padded state entries at 0, where the inverse of
    w**4's gradient, sign(z) |z/4|^(1/3), has an infinite slope: the map is selected on the real
    entries, never multiplied by their mask (0 * inf = NaN)."""
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))
    op = mirasc.compile(f"name: mirror_padded\nmemory: {{kind: matrix}}\nbias: {{kind: l2}}\n"
                        f"retention: {{kind: mirror, potential: '{potential}', decay: {{}}}}\n"
                        "learner: {kind: gd, eta: {}}\nchunk_size: 8\n")
    inputs = random_inputs(op, batch=1, length=13, heads=2, dk=12, dv=12, dtype=torch.float64)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert errors and max(errors.values()) < 1e-10, errors
