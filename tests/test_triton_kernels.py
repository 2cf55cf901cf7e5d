"""Generated Triton kernels (run by Triton's interpreter on CPU) against the
reference of the same chunking: the output, the final state and every input gradient."""

from __future__ import annotations

import ast
import functools
import inspect
import math
import re
from pathlib import Path

import oracle
import pytest
import torch
import triton
import triton.language as tl
from conftest import axis_spec, op_from_yaml, run_generated
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources, PTXASError

import mirasc
from mirasc import launch, memories, tuning
from mirasc.cache import load_module
from mirasc.check import compare, random_inputs, relative_error, varlen_inputs
from mirasc.codegen import render_module, triton_unsupported
from mirasc.derive import derive
from mirasc.errors import SpecError
from mirasc.schedule import kernels, streams

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
TRITON_SPECS = ["linear_attention", "simple_gla", "deltanet", "gated_deltanet", "titans",
                "ttt_linear", "ttt_mlp", "moneta", "yaad", "memora"]


def _compile(text: str, tmp_path, monkeypatch):
    """Compile inline YAML through the real pipeline (module written, imported)."""
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path))
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return mirasc.compile(path)


def _compiled(source: str, tmp_path, monkeypatch):
    """The op and generated module of a shipped spec path or of inline YAML."""
    op = mirasc.compile(source) if source.endswith(".yaml") else _compile(source, tmp_path,
                                                                         monkeypatch)
    return op, load_module(op.spec)


def _assert_close(errors: dict, dtype):
    assert errors, "nothing was compared"
    bad = {name: err for name, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", TRITON_SPECS)
def test_shipped_specs(spec, dtype):
    op = mirasc.compile(f"specs/{spec}.yaml")
    assert op.backend == "triton"
    dv = 7 if op.spec.memory.residual else 5
    inputs = random_inputs(op, batch=2, length=100, heads=2, dk=7, dv=dv)
    if dtype == torch.float64:
        _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), dtype)
        return
    # float32: against the float64 reference the kernel may lose at most 8x what the float32
    # reference itself loses, or 1e-5. Deep memories are ill-conditioned here: memora's float32
    # reference is 1e-4 from float64 on some gradients, and moneta's dq is 2.6e-6 for the
    # reference and 1.4e-5 for the kernel, whose dual form sums in another order (measured).
    narrow = {k: (tuple(x.float() for x in v) if isinstance(v, tuple) else v.float())
              for k, v in inputs.items()}
    kernel = compare(op, narrow, chunk_size=op.oracle_chunk_size, against=inputs)
    baseline = compare(op, narrow, chunk_size=op.oracle_chunk_size, against=inputs,
                       run_reference=True)
    bad = {n: (e, baseline[n]) for n, e in kernel.items() if not e <= max(1e-5, 8 * baseline[n])}
    assert not bad, bad


BIASES = ["{kind: l2}", "{kind: dot_product}", "{kind: lp, p: 3}", "{kind: lp, p: 1.5, smooth: false}",
          "{kind: huber, delta: {shape: channel}}", "{kind: huber, variant: switch, delta: {}}",
          "{kind: huber, variant: norm, delta: {value: 0.3}}", "{kind: robust, delta: {}}",
          "{kind: expression, loss: 'log(cosh(r))'}",
          "{kind: expression, loss: 'atan(r) * r - log(1 + r**2) / 2'}",
          "{kind: expression, loss: 'r**2/2 + c*log(cosh(r))', params: {c: 0.5}, "
          "norm_loss: 'delta*sqrt(1 + rnorm**2)', delta: {}}"]
RETENTIONS = ["{kind: none}", "{kind: l2, decay: {}}", "{kind: l2, decay: {value: 0.95}}",
              "{kind: l2, decay: {shape: channel}}", "{kind: lq, q: 4, decay: {}}",
              "{kind: lq, q: 3, scope: row, link: pnorm}", "{kind: kl, decay: {}, scale: 2.0}",
              "{kind: kl, axis: column}", "{kind: kl, axis: matrix}",
              "{kind: elastic_net, gamma: 0.01, decay: {}}",
              "{kind: elastic_net, gamma: 0.01, form: dual, smooth: true}",
              "{kind: mirror, potential: 'w*log(w) - w', decay: {}}"]
LEARNERS = ["{kind: gd, eta: {}}", "{kind: gd, eta: {value: 0.2}}",
            "{kind: gd, eta: {}, eta_at: query}",
            "{kind: gd, eta: {}, grad_at: retained}", "{kind: gd, eta: {shape: channel}}",
            "{kind: momentum, eta: {}, momentum: {}}",
            "{kind: momentum, eta: {value: 0.3}, momentum: {value: 0.8}, grad_at: retained}"]


TTT_MEMORY = ("{kind: matrix, bias: true, residual: true, read_residual: output, "
              "layer_norm: {affine: true, eps: 1.0e-6}}")
MEMORIES = ["{kind: matrix}", "{kind: matrix, residual: true, layer_norm: true}", TTT_MEMORY,
            "{kind: matrix, layer_norm: true}", "{kind: matrix, residual: true}",
            "{kind: mlp}", "{kind: mlp, depth: 3, expansion: 2, activation: silu}",
            "{kind: mlp, expansion: 1, activation: tanh, residual: false, layer_norm: false}",
            "{kind: vector}", "{kind: vector, residual: true, layer_norm: true}"]


SWEEP = {"kernels": 0, "fallback": 0, "refused": 0}  # what _random_axis_combination met


@settings(max_examples=40, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: each run is slow
@example(memory=MEMORIES[7], bias=BIASES[8], retention=RETENTIONS[9], learner=LEARNERS[0],
         chunk=16, lag=True, length=17, dk=3, dv=3)  # a chunk of one token: an empty lag segment
@given(memory=st.sampled_from(MEMORIES), bias=st.sampled_from(BIASES),
       retention=st.sampled_from(RETENTIONS), learner=st.sampled_from(LEARNERS),
       chunk=st.sampled_from([5, 16, 32]), lag=st.booleans(), length=st.integers(17, 70),
       dk=st.integers(3, 20), dv=st.integers(3, 20))
def _random_axis_combination(memory, bias, retention, learner, chunk, lag, length, dk, dv):
    """A combination with kernels matches its reference; a refused one names the field and what
    is allowed; a fallback (the reference itself, which test_oracle and
    test_options_the_kernels_leave_to_torch check against the second oracle) is only counted."""
    text = axis_spec(memory=memory, bias=bias, retention=retention, learner=learner,
                     extra=f"chunk_size: {chunk}\nlag_token: {str(lag).lower()}")
    text = text.replace("chunk_size: 4\n", "")
    try:
        op = op_from_yaml(text)
    except SpecError as exc:
        assert "not allowed" in str(exc) and "allowed:" in str(exc), str(exc)
        SWEEP["refused"] += 1
        return
    if op.spec.memory.residual or op.spec.memory.kind == "vector":
        dv = dk
    op = run_generated(render_module(op.spec)).op
    if triton_unsupported(op.derivation):
        assert op.backend == "reference"
        SWEEP["fallback"] += 1
        return
    assert op.backend == "triton"
    SWEEP["kernels"] += 1
    inputs = random_inputs(op, batch=1, length=length, heads=2, dk=dk, dv=dv, seed=length)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    # float64; a deep memory with a nonlinear retention is ill-conditioned (2e-10 seen for mlp
    # with kl), while a wrong kernel is off by 1e-3 or more
    assert max(errors.values()) < 1e-8, errors


@pytest.mark.slow
def test_random_axis_combinations():
    """41 drawn combinations of the four axes (`_random_axis_combination`), of which at least 20
    run on kernels. One test, so that the count is of this run's examples whichever worker
    runs it."""
    SWEEP.update(kernels=0, fallback=0, refused=0)
    _random_axis_combination()
    assert SWEEP["kernels"] >= 20, SWEEP


OPTION_CASES = {  # the memory bias, LN affine and eps, the read residual, eta_at (kernels)
    "bias": {"memory": "{kind: matrix, bias: true}"},
    "bias-huber-retained": {"memory": "{kind: matrix, bias: true, layer_norm: true}",
                            "bias": "{kind: huber, variant: switch, delta: {}}",
                            "learner": "{kind: gd, eta: {}, grad_at: retained}"},
    "bias-kl-lag": {"memory": "{kind: matrix, bias: true}", "retention": "{kind: kl, decay: {}}",
                    "extra": "lag_token: true"},
    "bias-elastic-proximal": {"memory": "{kind: matrix, bias: true}",
                              "retention": "{kind: elastic_net, gamma: 0.01, decay: {}}"},
    "ln-affine-matrix": {"memory": "{kind: matrix, layer_norm: {affine: true, eps: 1.0e-3}}"},
    "ln-affine-vector": {"memory": "{kind: vector, residual: true, layer_norm: {affine: true}}"},
    "ln-affine-mlp": {"memory": "{kind: mlp, layer_norm: {affine: true, eps: 1.0e-6}}",
                      "retention": "{kind: lq, q: 4, decay: {}}"},
    "read-output-matrix": {"memory": "{kind: matrix, residual: true, layer_norm: true, "
                                     "read_residual: output}",
                           "retention": "{kind: kl, decay: {}}"},
    "read-output-vector": {"memory": "{kind: vector, residual: true, layer_norm: true, "
                                     "read_residual: output}"},
    "read-output-mlp": {"memory": "{kind: mlp, read_residual: output}"},
    "eta-query-matrix": {"learner": "{kind: gd, eta: {}, eta_at: query}"},
    "eta-query-matrix-lq": {"retention": "{kind: lq, q: 4, decay: {}}",
                            "learner": "{kind: gd, eta: {}, eta_at: query}"},
    "eta-query-vector-channel": {"memory": "{kind: vector}",
                                 "learner": "{kind: gd, eta: {shape: channel}, eta_at: query}"},
    "eta-query-mlp-lag": {"memory": "{kind: mlp}", "learner": "{kind: gd, eta: {}, eta_at: query}",
                          "extra": "lag_token: true"},
    "ttt-with-decay": {"memory": TTT_MEMORY, "bias": "{kind: lp, p: 3}",
                       "learner": "{kind: gd, eta: {}, eta_at: query, grad_at: retained}"},
}
FALLBACK_CASES = {  # combinations the kernels leave to the torch path, with their reason
    "memory.bias on a vector memory": {"memory": "{kind: vector, bias: true}"},
    "memory.bias on a mlp memory": {"memory": "{kind: mlp, bias: true}"},
    "memory.bias with the momentum learner": {
        "memory": "{kind: matrix, bias: true}",
        "learner": "{kind: momentum, eta: {}, momentum: {}}"},
    "learner.eta_at 'query' with a channel-wise eta on a matrix memory": {
        "learner": "{kind: gd, eta: {shape: channel}, eta_at: query}"},
}


def _generated(axes: dict):
    """The op of the module rendered for an inline spec (chunk size 5, an odd tile)."""
    text = axis_spec(**axes).replace("chunk_size: 4", "chunk_size: 5")
    return run_generated(render_module(op_from_yaml(text).spec)).op


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_memory_and_learner_options(case):
    """Each new option in the kernels against the chunked reference, float64, gradients of
    every input including ln_weight and ln_bias."""
    op = _generated(OPTION_CASES[case])
    assert op.backend == "triton", triton_unsupported(op.derivation)
    dv = 6 if op.spec.memory.residual or op.spec.memory.kind == "vector" else 4
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=6, dv=dv)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    if op.affine:
        assert {"dln_weight", "dln_bias"} <= set(errors)
    _assert_close(errors, torch.float64)


@pytest.mark.parametrize("reason", sorted(FALLBACK_CASES))
def test_options_the_kernels_leave_to_torch(reason):
    """The fallback (the reference's chunked recurrence) against the second oracle, not itself."""
    op = _generated(FALLBACK_CASES[reason])
    assert op.backend == "reference"
    assert reason in triton_unsupported(op.derivation)
    inputs = random_inputs(op, batch=1, length=11, heads=2, dk=5, dv=5, seed=4)
    _assert_close(oracle.errors_against_oracle(op, op.spec, inputs, op.oracle_chunk_size),
                  torch.float64)


def test_ttt_linear_varlen_sums_the_parameter_gradients():
    """Packed sequences: one (W, b) per sequence, ln_weight/ln_bias shared, their gradients
    summed over the sequences."""
    op = mirasc.compile("specs/ttt_linear.yaml")
    inputs = varlen_inputs(op, [0, 15, 40, 57], dk=6, dv=6)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
    assert {"dln_weight", "dln_bias", "dinitial_state[1]"} <= set(errors)
    _assert_close(errors, torch.float64)


@pytest.mark.parametrize("bias", BIASES[:3] + BIASES[-1:])
def test_every_bias_in_float32(bias, tmp_path, monkeypatch):
    op = _compile(axis_spec(bias=bias).replace("chunk_size: 4", "chunk_size: 16"), tmp_path,
                  monkeypatch)
    inputs = random_inputs(op, batch=2, length=41, heads=2, dk=9, dv=6, dtype=torch.float32)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float32)


HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # unit roundoff 4.9e-4, 3.9e-3


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [x for v in inputs.values() for x in (v if isinstance(v, tuple) else (v,))]


@pytest.mark.parametrize(("spec", "dtype"), [
    ("gated_deltanet", torch.bfloat16), ("gated_deltanet", torch.float16),
    ("simple_gla", torch.bfloat16), ("simple_gla", torch.float16), ("yaad", torch.float16),
    ("gla", torch.float16), ("kda", torch.float16)])
def test_half_precision_inputs_accumulate_in_float32(spec, dtype):
    """bf16/fp16 inputs: matmul operands in the input dtype, float32 accumulation and state;
    output, final state and every input gradient against the float32 reference of the same
    rounded inputs. fp16 runs the half-operand path here, with the stage tiles read only as
    operands stored in fp16 (`BUFFERS`); bf16 takes float32 operands in the interpreter, whose
    bf16 dot is wrong (Triton 3.9). An MLP memory's gradients chain some twenty half-operand
    products (Yaad: 1.8e-2 here, the same whether its stage tiles are stored in fp16 or float32),
    so its bound is 10x wider; a tile read from the wrong place errs by O(1)."""
    op = mirasc.compile(f"specs/{spec}.yaml")
    half = random_inputs(op, batch=1, length=40, heads=2, dk=16, dv=16, dtype=dtype)
    wide = {k: (tuple(x.float() for x in v) if isinstance(v, tuple) else v.float())
            for k, v in half.items()}
    runs = []
    oracle = functools.partial(op.reference, chunk_size=op.oracle_chunk_size)
    for inputs, run in ((half, op), (wide, oracle)):
        leaves = [x.requires_grad_() for x in _leaves(inputs)]
        o, states = run(**inputs, output_final_state=True)
        cotangent = torch.linspace(-1, 1, o.numel()).view_as(o)
        grads = torch.autograd.grad((o.float() * cotangent).sum(), leaves)
        runs.append((o, states, grads))
    (o, states, grads), (o_ref, states_ref, grads_ref) = runs
    assert o.dtype == dtype and {s.dtype for s in states} == {torch.float32}
    errors = [relative_error(o, o_ref)]
    errors += [relative_error(s, r) for s, r in zip(states, states_ref, strict=True)]
    errors += [relative_error(g, r) for g, r in zip(grads, grads_ref, strict=True)]
    assert max(errors) < HALF_TOLERANCE[dtype] * (10 if op.spec.memory.kind == "mlp" else 1), errors


def _renamed(spec: str, suffix: str):
    """A shipped spec's module rendered now under a name of its own: custom ops of its own, not
    those a module of the same name registered earlier in the process."""
    return run_generated(render_module(mirasc.load_spec(f"specs/{spec}.yaml").model_copy(
        update={"name": f"{spec}_{suffix}"})))


def _fp16_runs(modules, length=150) -> list[list[torch.Tensor]]:
    """Each module's output, final states and input gradients on the same fp16 inputs."""
    runs = []
    for module in modules:
        inputs = random_inputs(module.op, batch=2, length=length, heads=2, dk=24, dv=20,
                               dtype=torch.float16)
        leaves = [x.requires_grad_() for x in _leaves(inputs)]
        o, states = module.op(**inputs, output_final_state=True)
        grads = torch.autograd.grad((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(),
                                    leaves)
        runs.append([o, *states, *grads])
    return runs


@pytest.mark.parametrize("spec", ["gated_deltanet", "simple_gla"])
def test_states_rounded_into_sums_change_only_the_decay_gradient(spec, monkeypatch):
    """`tuning.STATES_INTO_SUMS`: a decay's gradient sums W exp(gamma_end) dW over the stored
    states, which then are fp16 all the same. Over three chunks, the outputs, final states and
    the gradients of q, k, v (and beta) are bit-equal to those of float32 states; the decay's
    gradient is within fp16's unit roundoff of them."""
    held = _renamed(spec, "held")
    assert held.OPERAND_STATES == ["hs", "dhs"]
    monkeypatch.setattr(tuning, "STATES_INTO_SUMS", False)
    wide = _renamed(spec, "wide")
    assert wide.OPERAND_STATES == []
    rounded, exact = _fp16_runs((held, wide))
    names = ["o", "final_state", "q", "k", "v", *wide.GATES, "initial_state"]
    decay = names.index("log_alpha")
    assert all(torch.isfinite(x).all() for x in rounded)
    assert [n for n, a, b in zip(names, rounded, exact, strict=True) if not torch.equal(a, b)] \
        in ([], ["log_alpha"])
    assert relative_error(rounded[decay], exact[decay]) < 4.9e-4


@pytest.mark.parametrize("spec", ["linear_attention", "deltanet"])
def test_states_stored_as_operands_change_no_result(spec, monkeypatch):
    """Where every kernel after its writer takes the stored chunk-start states and their
    gradients only as matmul operands (through a sign or a NaN select at most), they are stored
    in the operands' dtype: fp16 here, half the bytes. Over three chunks, outputs, final states
    and every gradient are bit-equal to those of the module rendered with float32 buffers."""
    held = _renamed(spec, "held")
    assert held.OPERAND_STATES == ["hs", "dhs"]
    monkeypatch.setattr(kernels, "operand_states", lambda *args: ())
    wide = _renamed(spec, "wide")
    assert wide.OPERAND_STATES == []
    stored = []  # each module's chunk-start states

    def keeping_states(forward):
        def run(*args):
            outputs = forward(*args)
            stored.append(outputs[2])
            return outputs
        return run

    for module in (held, wide):
        monkeypatch.setattr(module.kernel, "run_forward", keeping_states(module.kernel.run_forward))
    runs = _fp16_runs((held, wide))
    assert [h.dtype for h in stored] == [torch.float16, torch.float32]
    assert torch.equal(stored[0], stored[1].half()) and stored[1].abs().amax(-1).gt(0).all()
    assert all(torch.isfinite(x).all() for x in runs[0])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_matmul_operands_by_input_dtype(monkeypatch):
    """The precision of each path: half inputs reach tensor cores in their own dtype, float32 and
    float64 inputs keep exact dots in their dtype."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert [launch.operands(d) for d in (torch.bfloat16, torch.float16, torch.float32,
                                          torch.float64)] == [tl.bfloat16, tl.float16,
                                                              tl.float32, tl.float64]


SPLIT_CASES = {  # steps that never mix DV columns: gates per head, per key channel, per value channel
    "gated_deltanet": "specs/gated_deltanet.yaml", "titans": "specs/titans.yaml",
    "channel decay, channel eta": axis_spec(retention="{kind: l2, decay: {shape: channel}}",
                                            learner="{kind: gd, eta: {shape: channel}}"),
    "huber per value channel": axis_spec(bias="{kind: huber, delta: {shape: channel}}"),
}


PER_BLOCK = ("fwd", "fwd_out", "bwd")  # with the output kernels: a program per block of DV


class _Grids:
    """Stands in for a launcher (of `fwd`, `bwd`, ...) and records the grids it is launched on
    and the key blocks (BK) it is launched with."""

    def __init__(self, launcher):
        self.launcher, self.grids, self.key_blocks = launcher, [], set()

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            self.key_blocks.add(kwargs["BK"])
            return self.launcher[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_dv_blocks_run_apart(case, tmp_path, monkeypatch):
    """SPLIT_V: blocks of 16 value columns run as programs of their own (DV = 37: three, the last
    one masked) in the passes and the output kernels, but for the kernels of the q, k and
    per-head gate gradients, whose programs walk the blocks and sum over them (WHOLE_V lowered,
    as at D = 128, or as in the narrow blocks `launch.WalkedBlocks` offers the autotuner at
    D = 64); packed sequences too. The tiles the kernels pass each other start as NaN, so that
    reading one no kernel wrote shows."""
    op, module = _compiled(SPLIT_CASES[case], tmp_path, monkeypatch)
    assert module.SPLIT_V
    monkeypatch.setattr(module, "WHOLE_V", 16)
    buffers = module.kernel.buffers
    monkeypatch.setattr(module.kernel, "buffers",
                        lambda *args: [b.fill_(float("nan")) for b in buffers(*args)])
    per_block = (*PER_BLOCK, *module.OUT_KERNELS)
    for kernel in per_block:
        monkeypatch.setitem(module.BV_MAX, kernel, 16)
        monkeypatch.setitem(module.kernel.launchers, kernel, _Grids(module.kernel.launchers[kernel]))
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=6, dv=37)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)
    packed = varlen_inputs(op, [0, 9, 30], dk=5, dv=37)
    _assert_close(compare(op, packed, chunk_size=op.oracle_chunk_size), torch.float64)
    assert {"bwd_dqk"} <= set(module.KEY_PROGRAMS) <= set(module.WALKS) <= set(module.V_SUMMED)
    assert "bwd_dv" in set(module.OUT_KERNELS) - set(module.V_SUMMED)
    for kernel in per_block:
        blocks = 1 if kernel in module.V_SUMMED else 3  # one key block of 6 columns
        assert {grid[2] for grid in module.kernel.launchers[kernel].grids} == {blocks}, kernel


def test_a_vector_memory_writes_its_gradients_by_value_block(tmp_path, monkeypatch):
    """A vector memory's q, k and gates run along the value columns: the output kernel that
    walks the value blocks (DV = 37 in blocks of 16, past WHOLE_V) writes their gradients by
    block (it wrote each block's tile at the first key columns, and at D = 128 no such kernel
    compiled)."""
    op, module = _compiled(axis_spec(memory="{kind: vector}",
                                     retention="{kind: l2, decay: {shape: channel}}"),
                           tmp_path, monkeypatch)
    assert module.SPLIT_V and module.V_SUMMED
    monkeypatch.setattr(module, "WHOLE_V", 8)
    for kernel in module.V_SUMMED:
        monkeypatch.setitem(module.BV_MAX, kernel, 16)
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=37, dv=37)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)


@pytest.mark.parametrize("case", ["gated_deltanet", "simple_gla", "titans", "channel decay, channel eta",
                                  "huber per value channel", "kda"])
def test_key_blocks_pass_one_at_a_time(case, tmp_path, monkeypatch):
    """The gradient kernels of a matrix memory pass over blocks of 16 key columns (DK = 37:
    three, the last one masked), their products over DK summed across the blocks and dq, dk (and
    a key-channel gate's gradient) written per block; so does the stage kernel of the products
    under per-channel decays (KDA's first: its inverse reads k k^T); packed sequences too. The
    per-head gates' gradients of gated DeltaNet and simple GLA are each key block's share,
    summed over the three."""
    op, module = _compiled(SPLIT_CASES.get(case, f"specs/{case}.yaml"), tmp_path, monkeypatch)
    shared = {"gated_deltanet": ["log_alpha", "eta"], "simple_gla": ["log_alpha"]}
    if case in shared:
        assert list(module.KEY_SHARES) == shared[case]
    keyed_stages = {"channel decay, channel eta": {"fwd_stage2"}, "kda": {"fwd_stage"}}.get(case, set())
    assert set(module.BK_MAX) & set(module.STAGES["fwd"]) == keyed_stages
    assert "bwd_dqk" in module.BK_MAX and set(module.BK_MAX) <= set(module.OUT_KERNELS) | keyed_stages
    for kernel in module.BK_MAX:
        monkeypatch.setitem(module.BK_MAX, kernel, 16)
        monkeypatch.setitem(module.kernel.launchers, kernel, _Grids(module.kernel.launchers[kernel]))
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=37, dv=6)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)
    packed = varlen_inputs(op, [0, 9, 30], dk=37, dv=5)
    _assert_close(compare(op, packed, chunk_size=op.oracle_chunk_size), torch.float64)
    assert "bwd_dqk" in module.KEY_PROGRAMS
    for kernel in module.KEY_PROGRAMS:  # a program per key block
        assert {grid[2] for grid in module.kernel.launchers[kernel].grids} == {3}, kernel
    for kernel in module.BK_MAX:  # each launched with its own key block
        assert module.kernel.launchers[kernel].key_blocks == {16}, kernel


def test_gate_gradients_joined_past_the_product_cap_sum_over_key_blocks(tmp_path, monkeypatch):
    """Titans' per-head gates joined to its dq/dk kernel (past `tuning.SHARE_PRODUCTS`, which
    keeps them apart by default): log_alpha's and momentum's gradients as each key block's share
    summed over three blocks of 16 (DK = 37), eta's, which reads no product over key columns,
    written whole by the first block; packed sequences too."""
    monkeypatch.setattr(tuning, "SHARE_PRODUCTS", 99)
    text = Path("specs/titans.yaml").read_text().replace("name: titans", "name: titans_joined")
    op, module = _compiled(text, tmp_path, monkeypatch)
    assert "bwd_dg" not in module.OUT_KERNELS
    assert list(module.KEY_SHARES) == ["log_alpha", "momentum"]
    assert "eta" in module.OUT_KERNELS["bwd_dqk"]
    monkeypatch.setitem(module.BK_MAX, "bwd_dqk", 16)
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=37, dv=6)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)
    packed = varlen_inputs(op, [0, 9, 30], dk=37, dv=5)
    _assert_close(compare(op, packed, chunk_size=op.oracle_chunk_size), torch.float64)


def test_a_stage_key_block_is_its_width_at_head_dims_up_to_64(monkeypatch):
    """GLA's key-block stage takes blocks of BK_STAGE columns up to D = 64 (one block there),
    halved per doubling of the head dim beyond; its dq/dk kernel keeps BK_PAIRS at every D, and
    its other stage kernel holds every key column."""
    op, module = _compiled("specs/gla.yaml", None, monkeypatch)
    blocks = {}
    for dk in (32, 64, 128, 256):
        q = torch.empty(1, 8, 2, dk)
        blocks[dk] = [module.kernel.meta(q, q, None, k)["BK"]
                      for k in ("fwd_stage2", "bwd_dqk", "fwd_stage")]
    assert blocks == {32: [32, 16, 32], 64: [64, 16, 64], 128: [32, 16, 128],
                      256: [16, 16, 256]}


def test_the_dv_kernel_takes_the_value_columns_whole_up_to_whole_v(monkeypatch):
    """Simple GLA's dv kernel, a program per block of value columns, takes them in one block up
    to WHOLE_V (its q k^T and decays computed once per chunk), in BV_MAX's blocks past it, as
    does its dq/dk kernel (which walks them); its forward pass keeps its narrow blocks."""
    op, module = _compiled("specs/simple_gla.yaml", None, monkeypatch)
    blocks = {}
    for dv in (20, 64, 128):
        q, v = torch.empty(1, 8, 2, 64), torch.empty(1, 8, 2, dv)
        blocks[dv] = [module.kernel.meta(q, v, None, k)["BV"] for k in ("bwd_dv", "bwd_dqk", "fwd")]
    assert blocks == {20: [32, 32, 32], 64: [64, 64, 32], 128: [32, 16, 32]}


@pytest.mark.parametrize("spec", ["deltanet", "gated_deltanet"])
def test_chunks_run_apart_but_the_passes(spec, monkeypatch):
    """Only the passes walk the chunks: the stage kernels (the exact path's (I + A)^-1 reads no
    state) and the output kernels run one program per chunk and head (sequences of 100 and 37
    tokens in chunks of 64: 2 + 1 chunks, batched and packed), the passes one per sequence and
    head (tests/test_schedule.py checks that the passes only load the inverse)."""
    op, module = _compiled(f"specs/{spec}.yaml", None, monkeypatch)
    kernels = ("fwd_stage", "fwd", "fwd_out", "bwd_stage", "bwd", *module.OUT_KERNELS)
    for kernel in kernels:
        monkeypatch.setitem(module.kernel.launchers, kernel, _Grids(module.kernel.launchers[kernel]))
    for length, packed, chunks in ((100, False, 4), (None, True, 3)):
        inputs = varlen_inputs(op, [0, 100, 137], dk=6, dv=5) if packed else \
            random_inputs(op, batch=2, length=length, heads=2, dk=6, dv=5)
        _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)
        for kernel in kernels:
            grids = module.kernel.launchers[kernel].grids
            per_sequence = kernel in ("fwd", "bwd")
            assert {grid[:2] for grid in grids} == {(2, 2) if per_sequence else (chunks, 2)}, \
                (kernel, grids)
            grids.clear()


STREAM_CASES = {  # MLP memories: the state passes through global memory in blocks of hidden units
    "ttt_mlp": "specs/ttt_mlp.yaml", "moneta (lq: norms over the hidden units)": "specs/moneta.yaml",
    "yaad": "specs/yaad.yaml", "memora (kl: softmax over the hidden units, lag token)":
        "specs/memora.yaml",
    "momentum": axis_spec(memory="{kind: mlp, depth: 2, expansion: 3}",
                          learner="{kind: momentum, eta: {}, momentum: {}}"),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_hidden_blocks_pass_one_at_a_time(case, tmp_path, monkeypatch):
    """STREAM_H: each chunk step passes over blocks of 16 hidden units (DH = 4 * 7 = 28: two
    blocks, the last one masked), summing its reductions over the blocks; packed sequences too,
    and a sequence of no tokens keeps its initial state."""
    op, module = _compiled(STREAM_CASES[case], tmp_path, monkeypatch)
    assert module.STREAM_H
    for kernel in PER_BLOCK:
        monkeypatch.setitem(module.BH_MAX, kernel, 16)
    inputs = random_inputs(op, batch=2, length=23, heads=2, dk=7, dv=7)
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)
    packed = varlen_inputs(op, [0, 9, 9, 30], dk=7, dv=7)
    _assert_close(compare(op, packed, chunk_size=op.oracle_chunk_size), torch.float64)


def _module_table(source: str, name: str):
    """The literal a generated module assigns to `name` (BUFFERS, STAGES, OUT_KERNELS)."""
    assign = next(node for node in ast.parse(source).body if isinstance(node, ast.Assign)
                  and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name])
    return ast.literal_eval(assign.value)


@pytest.mark.parametrize("name", ["ttt_mlp", "moneta", "yaad", "memora", "gated_deltanet"])
def test_operand_tiles_are_stored_in_the_operand_dtype(name, monkeypatch):
    """The buffers that every kernel reads only as matmul operands are stored in the operands'
    dtype (bf16 for bf16 inputs), an MLP memory's and a matrix memory's: every kernel that loads
    one uses it only in `tl.dot`; the others stay float32."""
    spec = mirasc.load_spec(f"specs/{name}.yaml")
    source = render_module(spec)
    table = _module_table(source, "BUFFERS")
    halves = [n for tiles in table.values() for n, *_, half in tiles if half]
    assert halves and len(halves) < sum(len(tiles) for tiles in table.values())
    kernels = source.split("@triton.jit")[1:]
    for n in halves:
        readers = [k for k in kernels if f"{n} = tl.load({n}_ptr" in k]
        assert readers, n
        for kernel in readers:
            uses = re.sub(r"#[^\n]*", "", kernel)  # formulas in comments name tiles too
            uses = re.sub(rf"{n} = tl.load\({n}_ptr[^\n]*", "", uses)
            uses = re.sub(rf"(tl\.trans\({n}\)|\b{n})\.to\(DOT\)", "", uses)
            assert not re.search(rf"\b{n}\b", uses), n
    module = load_module(mirasc.compile(f"specs/{name}.yaml").spec)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    q = v = torch.zeros(1, 64, 2, 16, dtype=torch.bfloat16)
    for key, tiles in table.items():
        dtypes = [b.dtype for b in module.kernel.buffers(q, v, 1, key)]
        assert dtypes == [torch.bfloat16 if half else torch.float32 for *_, half in tiles]


def test_a_hidden_layer_of_hidden_units_keeps_the_state_in_registers():
    """A weight with hidden units on both sides (depth 3: W2 [DH, DH]) cannot pass in blocks of
    hidden units: that module holds the whole state in one program."""
    deep = op_from_yaml(axis_spec(memory="{kind: mlp, depth: 3, expansion: 2}"))
    step = memories.chunk_step(deep.derivation)
    assert streams.stream(step.graph, list(step.outputs.values())) is None
    assert "STREAM_H = False" in render_module(deep.spec)
    for name in ("ttt_mlp", "moneta"):  # the shipped MLPs do pass in blocks
        spec = mirasc.load_spec(f"specs/{name}.yaml")
        step = memories.chunk_step(derive(spec))
        stream = streams.stream(step.graph, list(step.outputs.values()))
        assert all("DH" in step.graph.shape(n) for loop in stream.loops for n in loop.nodes)
        assert not any("DH" in step.graph.shape(n) for whole in stream.whole for n in whole)
        assert "STREAM_H = True" in render_module(spec)


def test_a_launch_that_does_not_fit_the_gpu_names_the_kernel(monkeypatch):
    """Triton's out-of-resources error (raised when no autotuned configuration fits) becomes one
    naming the spec, the kernel and the head dims, pointing at `mirasc resources`."""
    op = mirasc.compile("specs/ttt_mlp.yaml")
    module = load_module(op.spec)

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise OutOfResources(369664, 232448, "shared memory")
            return launch

    monkeypatch.setitem(module.kernel.launchers, "bwd", TooBig())
    inputs = random_inputs(op, batch=1, length=20, heads=2, dk=8, dv=8)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if k in ("q", "k", "v")}
    o, _ = op(**(inputs | leaves))
    with pytest.raises(RuntimeError, match=r"ttt_mlp: the bwd kernel at Dk=8, Dv=8 needs 369664 "
                                           r"\(shared memory\), over this GPU's 232448; `mirasc "
                                           r"resources SPEC --head-dim 8`.*backend='torch'"):
        o.sum().backward()


def test_the_autotuner_times_only_the_configurations_that_spill_least(monkeypatch):
    """`least_spilling`: each configuration compiled with the call's arguments and constexprs;
    those spilling more than the least are dropped, as are one that ptxas refuses and one that
    does not fit (None); ties all stay, and where none is left the autotuner gets every
    configuration back."""
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (8, 1), (8, 2))]

    class Kernel:
        def __init__(self, spilled):
            self.spilled, self.calls = spilled, []

        def warmup(self, grid, **kwargs):
            self.calls.append(kwargs)
            found = self.spilled[kwargs["num_warps"], kwargs["num_stages"]]
            if isinstance(found, Exception):
                raise found
            return found

    def keep(spilled):
        kernel = Kernel(spilled)
        kept = launch.least_spilling(kernel, spilled=lambda compiled: compiled)(
            configs, {"q_ptr": "q", "T": 20}, BV=16, grid=(3, 2), warmup=False)
        assert all(c["q_ptr"] == "q" and c["T"] == 20 and c["BV"] == 16 for c in kernel.calls)
        return [(c.num_warps, c.num_stages) for c in kept]

    refused = PTXASError("ptxas fatal: out of registers")
    assert keep({(4, 1): 24, (8, 1): 0, (8, 2): 8}) == [(8, 1)]
    assert keep({(4, 1): 0, (8, 1): 0, (8, 2): 8}) == [(4, 1), (8, 1)]
    assert keep({(4, 1): 16, (8, 1): refused, (8, 2): 16}) == [(4, 1), (8, 2)]
    assert keep({(4, 1): None, (8, 1): 32, (8, 2): refused}) == [(8, 1)]
    assert keep({(4, 1): None, (8, 1): refused, (8, 2): None}) == [(4, 1), (8, 1), (8, 2)]
    assert launch.least_spilling(None)(configs[:1], {}) == configs[:1]  # nothing to compile
    generated = load_module(mirasc.compile("specs/simple_gla.yaml").spec).simple_gla_fwd_kernel
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # the module loaded untuned
    tuner = launch.tuned(generated, [(4, 1), (8, 1)])
    prune = tuner.early_config_prune
    assert prune.__qualname__ == launch.least_spilling(None).__qualname__
    assert inspect.getclosurevars(prune).nonlocals["kernel"] is generated


def test_a_kernel_walking_the_value_blocks_is_timed_in_narrow_blocks_too(monkeypatch):
    """`launch.WalkedBlocks`: a launch that takes Dv in one block (BV = BDV = 64) runs under an
    autotuner that also holds each warp configuration with the kernel's narrow block (16, as
    past WHOLE_V), the configuration setting BV in place of the launch; a launch in blocks
    (BV = 16 of 128), or of 16 columns, runs under the autotuner of the warp configurations
    alone, its own BV kept, and so do the attributes the autotuner's callers read."""
    generated = load_module(mirasc.compile("specs/simple_gla.yaml").spec).simple_gla_bwd_dqk_kernel
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # the module loaded untuned
    walked = launch.tuned(generated, [(4, 1), (8, 1)], narrow=16)
    calls = []
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run",
                        lambda self, *args, **kwargs: calls.append((self, kwargs)))
    walked[(1,)](DK=64, BV=64, BDV=64)
    walked[(1,)](DK=128, BV=16, BDV=128)
    walked[(1,)](DK=16, BV=16, BDV=16)
    (blocked, first), (whole, second), (alone, third) = calls
    assert [(c.kwargs, c.num_warps) for c in blocked.configs] == \
        [({"BV": 64}, 4), ({"BV": 64}, 8), ({"BV": 16}, 4), ({"BV": 16}, 8)]
    assert "BV" not in first and second["BV"] == 16 and third["BV"] == 16
    assert whole is alone is walked.whole and [c.kwargs for c in whole.configs] == [{}, {}]
    assert walked.configs is whole.configs and walked.fn is whole.fn


def test_a_compiled_kernels_spills_are_its_cubins_stack(monkeypatch):
    """`launch.spills`: the stack cuobjdump reads from the cubin; None over the target's shared
    memory; 0 without a cubin or without cuobjdump (nothing is pruned then)."""
    from types import SimpleNamespace

    from mirasc import cubin

    def compiled(shared, binary=b"cubin"):
        target = SimpleNamespace(arch=90)
        return SimpleNamespace(metadata=SimpleNamespace(shared=shared, target=target),
                               asm={"cubin": binary} if binary else {})

    monkeypatch.setattr(cubin, "resource_usage", lambda cubin: (255, 48))
    assert launch.spills(compiled(1024)) == 48
    assert launch.spills(compiled(232449)) is None
    assert launch.spills(compiled(1024, binary=None)) == 0

    def missing(cubin):
        raise FileNotFoundError("cuobjdump")

    monkeypatch.setattr(cubin, "resource_usage", missing)
    assert launch.spills(compiled(1024)) == 0


def test_backend_torch_runs_the_chunk_step_in_torch_where_kernels_would_run(monkeypatch):
    """op(..., backend='torch') never launches a kernel (here: where the interpreter would run
    them) and computes the same function, gradients included."""
    op = mirasc.compile("specs/ttt_mlp.yaml")
    module = load_module(op.spec)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    for kernel in ("fwd_stage", "bwd_stage", *PER_BLOCK):
        monkeypatch.setitem(module.kernel.launchers, kernel, NoLaunch())
    inputs = random_inputs(op, batch=2, length=21, heads=2, dk=6, dv=6)

    class TorchPath:  # what `compare` calls: the op on backend='torch', and its reference
        reference = staticmethod(op.reference)

        def __call__(self, *args, **kwargs):
            return op(*args, **kwargs, backend="torch")

    _assert_close(compare(TorchPath(), inputs, chunk_size=op.oracle_chunk_size), torch.float64)
    with pytest.raises(ValueError, match="backend 'cuda'; allowed: auto, torch"):
        op(inputs["q"], inputs["k"], inputs["v"], backend="cuda")


def test_steps_that_mix_value_columns_keep_them_together():
    """A norm over the residual, a layer norm over DV or an MLP's hidden layer couple the value
    columns: those modules hold all of DV in one program."""
    mixed = [axis_spec(bias="{kind: huber, variant: norm, delta: {value: 0.3}}"),
             axis_spec(memory="{kind: mlp, depth: 2, expansion: 2}")]
    for text in mixed:
        assert not streams.separable(memories.chunk_step(op_from_yaml(text).derivation))
    for spec in ("ttt_linear", "moneta"):
        assert "SPLIT_V = False" in render_module(mirasc.load_spec(f"specs/{spec}.yaml"))


def test_varlen_matches_sequence_by_sequence():
    op = mirasc.compile("specs/gated_deltanet.yaml")
    inputs = varlen_inputs(op, [0, 15, 15, 100, 130], dk=6, dv=7)  # one of no tokens
    _assert_close(compare(op, inputs, chunk_size=op.oracle_chunk_size), torch.float64)


def test_unwritten_outputs_would_show(monkeypatch):
    """Poison every fresh allocation with NaN: a kernel that skips an element fails the check."""
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(math.nan))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: new_empty(self, *a, **k).fill_(math.nan))
    op = mirasc.compile("specs/simple_gla.yaml")
    inputs = random_inputs(op, batch=1, length=70, heads=3, dk=5, dv=9)
    _assert_close(compare(op, inputs, chunk_size=op.spec.chunk_size), torch.float64)


def test_same_spec_same_bytes():
    spec = mirasc.load_spec("specs/gated_deltanet.yaml")
    assert render_module(spec) == render_module(spec)


def test_torch_compile_fullgraph():
    op = mirasc.compile("specs/simple_gla.yaml")
    inputs = random_inputs(op, batch=1, length=20, heads=2, dk=8, dv=8, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(q, k, v, log_alpha):
        o, _ = op(q, k, v, log_alpha=log_alpha)
        return o.square().sum()

    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v", "log_alpha")]
    loss(*leaves).backward()
    ref = [x.detach().clone().requires_grad_() for x in leaves]
    op.reference(*ref[:3], log_alpha=ref[3], chunk_size=64)[0].square().sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_with_layer_norm_parameters():
    """The ops' fake implementations cover the per-head parameters (ln_weight, ln_bias)."""
    op = mirasc.compile("specs/ttt_linear.yaml")
    inputs = random_inputs(op, batch=1, length=20, heads=2, dk=8, dv=8, dtype=torch.float32)
    names = ("q", "k", "v", "eta", "ln_weight", "ln_bias")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(q, k, v, eta, ln_weight, ln_bias):
        o, _ = op(q, k, v, eta=eta, ln_weight=ln_weight, ln_bias=ln_bias)
        return o.square().sum()

    leaves = [inputs[n].clone().requires_grad_() for n in names]
    loss(*leaves).backward()
    ref = [inputs[n].clone().requires_grad_() for n in names]
    o, _ = op.reference(*ref[:3], eta=ref[3], ln_weight=ref[4], ln_bias=ref[5],
                        chunk_size=op.oracle_chunk_size)
    o.square().sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        assert relative_error(got.grad, want.grad) < 1e-5


@pytest.mark.parametrize("reads", ["output", "final state"])
def test_a_loss_of_one_output_only(reads):
    """A loss of the output alone (no gradient reaches the final state) or of the final state
    alone (none reaches the output): autograd hands the kernels no zero tiles for what the loss
    does not read, and every input gradient still equals the reference's."""
    op = mirasc.compile("specs/gated_deltanet.yaml")
    inputs = random_inputs(op, batch=2, length=37, heads=2, dk=5, dv=6)
    runs = []
    for run in (op, functools.partial(op.reference, chunk_size=op.oracle_chunk_size)):
        leaves = [x.detach().requires_grad_() for x in _leaves(inputs)]
        it = iter(leaves)
        fresh = {k: (tuple(next(it) for _ in v) if isinstance(v, tuple) else next(it))
                 for k, v in inputs.items()}
        o, states = run(**fresh, output_final_state=True)
        loss = (o * o).sum() if reads == "output" else sum((s * s).sum() for s in states)
        runs.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    errors = [relative_error(g, r) for g, r in zip(*runs, strict=True) if r.any()]
    assert errors and max(errors) < TOLERANCE[torch.float64], errors
    unread = [g for g, r in zip(*runs, strict=True) if not r.any()]  # q, when only states count
    assert len(unread) == (reads == "final state") and not any(g.any() for g in unread)
