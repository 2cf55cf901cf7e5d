"""The Triton decode step (mirasc.step_op, templates/step.py.j2) in Triton's interpreter against
the torch step (mirasc.decode): every covered shipped spec and generated ones (a norm bias on
whole value rows, channel gates, grad_at 'retained', a proximal retention's map, a lag token,
a memory bias, residual and layer norm, eta_at 'query', the muon learner per token and per
chunk), odd head dims, steps across chunk boundaries; float32 and fp16 inputs against float32; which
specs the kernel covers."""

import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import axis_spec, op_from_yaml, run_generated

import mirasc.step_op
from mirasc.cache import compile as compile_spec
from mirasc.catalog import resolve
from mirasc.check import random_inputs
from mirasc.codegen import render_step_module, step_unsupported
from mirasc.decode import Decoder
from mirasc.derive import derive
from mirasc.launch import interpreting
from mirasc.reference import Inputs

pytestmark = pytest.mark.skipif(not interpreting(), reason="the kernel runs in the interpreter")

SPECS = Path(__file__).parent.parent / "specs"
COVERED = ["deltanet", "gated_deltanet", "gla", "kda", "linear_attention", "simple_gla", "titans",
           "ttt_linear"]
GENERATED = {
    "huber-elastic-momentum": axis_spec(bias="{kind: huber, delta: {shape: channel}}",
                                        retention="{kind: elastic_net, gamma: 0.01, decay: {}}",
                                        learner="{kind: momentum, eta: {}, momentum: {}}"),
    "yaad-norm-retained-channel": axis_spec(bias="{kind: huber, variant: switch, delta: {}}",
                                            retention="{kind: l2, decay: {shape: channel}}",
                                            learner="{kind: gd, eta: {shape: channel}, "
                                                    "grad_at: retained}"),
    "lp-lag": axis_spec(bias="{kind: lp, p: 3}", extra="lag_token: true"),
    "bias-residual-norm-momentum": axis_spec(memory="{kind: matrix, bias: true, residual: true, "
                                                    "layer_norm: true}",
                                             learner="{kind: momentum, eta: {}, momentum: {}}"),
    "query-channel-retained-lag": axis_spec(learner="{kind: gd, eta: {shape: channel}, "
                                                    "eta_at: query, grad_at: retained}",
                                            extra="lag_token: true"),
    "bias-retained-lag": axis_spec(memory="{kind: matrix, bias: true}",
                                   learner="{kind: gd, eta: {}, grad_at: retained}",
                                   extra="lag_token: true"),
    "query-bias-norm-elastic": axis_spec(memory="{kind: matrix, bias: true, "
                                                "layer_norm: {affine: true}}",
                                         retention="{kind: elastic_net, gamma: 0.01, decay: {}}",
                                         learner="{kind: gd, eta: {}, eta_at: query}"),
    "muon-token-channel": axis_spec(learner="{kind: muon, eta: {}, momentum: {shape: channel}}"),
    "muon-chunk-retained-elastic": axis_spec(
        bias="{kind: huber, delta: {}}",
        retention="{kind: elastic_net, gamma: 0.01, decay: {shape: channel}}",
        learner="{kind: muon, eta: {}, momentum: {}, apply: chunk, grad_at: retained, "
                "ns_steps: 3}"),
}


def spec_op(name: str):
    """A shipped spec (chunks of 4 tokens) or a generated one."""
    if name in GENERATED:
        return op_from_yaml(GENERATED[name])
    return compile_spec(resolve(name).model_copy(update={"chunk_size": 4}))


def relative_error(out, ref) -> float:
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    return ((out - ref).norm() / ref.norm()).item()


def run(op, dtype, kernel=True, length=10, seed=3, dk=5, computed=None):
    """`length` tokens one call each from a float32 random state: (o [B, H, T, Dv], final
    StepState), by the Triton step (`kernel`) or the torch step; inputs drawn in float64, cast
    to `dtype`, and the step's inputs made of them then cast to `computed`."""
    dv = dk if op.spec.memory.residual else 7  # a residual needs Dk = Dv
    inputs = random_inputs(op, batch=2, length=length, heads=3, dk=dk, dv=dv, seed=seed)
    if "eta" in inputs and op.spec.bias.kind == "lp":  # a cubic loss diverges at steps near 1
        inputs["eta"] = inputs["eta"] * 0.3
    decoder = Decoder(op.derivation, op.oracle_chunk_size)
    state = decoder.start(tuple(s.float() for s in inputs.pop("initial_state")))
    cast = {n: x.to(dtype) for n, x in inputs.items()}
    gates = {n: cast.get(n) for n in ("log_alpha", "eta", "delta", "momentum")}
    ln = (cast["ln_weight"], cast["ln_bias"]) if op.affine else None
    outputs = []
    with torch.no_grad(), mock.patch.object(Decoder, "_uses_kernel", return_value=kernel):
        for t in range(length):
            part = {n: None if x is None else x[:, t:t + 1] for n, x in gates.items()}
            steps = Inputs.from_op(op.derivation, cast["q"][:, t:t + 1], cast["k"][:, t:t + 1],
                                   cast["v"][:, t:t + 1], part, ln)
            if computed is not None:  # the step's inputs (alpha = exp(log_alpha) among them)
                steps = Inputs(*(x.to(computed) for x in (steps.q, steps.k, steps.v)),
                               {n: g if isinstance(g, float) else g.to(computed)
                                for n, g in steps.gates.items()},
                               ln and tuple(x.to(computed) for x in ln))
            o, state = decoder(state, steps)
            outputs.append(o)
    assert (decoder._kernel is not None) == kernel
    return torch.cat(outputs, 2), state


def compare(op, dtype=torch.float32, **kw) -> dict:
    """Relative errors of the kernel's outputs and state tracks (inputs in `dtype`) against the
    torch step's (the same values in float32)."""
    o, state = run(op, dtype, **kw)
    o_ref, state_ref = run(op, dtype, kernel=False, computed=torch.float32, **kw)
    assert sorted(state.tracks) == sorted(state_ref.tracks)
    assert state.position == state_ref.position
    errors = {"o": relative_error(o, o_ref)}
    for (name, got), want in zip(state.tracks.items(), state_ref.tracks.values(), strict=True):
        errors[name] = relative_error(got[0], want[0])
    if state.momentum is not None:
        errors["momentum"] = relative_error(state.momentum[0], state_ref.momentum[0])
    return errors


@pytest.mark.parametrize("name", COVERED + list(GENERATED))
def test_the_kernel_steps_like_the_torch_step(name):
    """Ten tokens (chunks of 4, or of 1 for an exact spec: every boundary and the tracks between
    them), Dk=5, Dv=7, float32: outputs and every track within 1e-5."""
    errors = compare(spec_op(name))
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", ["muon-token-channel", "muon-chunk-retained-elastic"])
def test_newton_schulz_on_a_wide_state(name):
    """More key than value columns (Dk=9, Dv=7; above, Dk=5): NS_k's other orientation, and a
    whole state padded on both dims (16 x 16); within 1e-5 as above."""
    errors = compare(spec_op(name), dk=9)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", ["titans", "ttt_linear", "huber-elastic-momentum"])
def test_fp16_inputs_against_float32(name):
    """fp16 q, k, v and gates into a float32 state: as the torch step on the same values in
    float32 (the kernel computes in float32), and near the unrounded float32 inputs."""
    op = spec_op(name)
    errors = compare(op, torch.float16, length=6)
    assert max(errors.values()) <= 1e-5, errors
    # against float32 inputs not rounded to fp16: the rounding's own error, about 2^-11
    o, _ = run(op, torch.float16, length=6)
    o_ref, _ = run(op, torch.float32, kernel=False, length=6)
    assert 1e-5 < relative_error(o, o_ref) < 1e-2


def test_a_wrong_step_is_caught(monkeypatch):
    """The comparison fails for a kernel whose retention map at a chunk end is left out."""
    spec = op_from_yaml(GENERATED["huber-elastic-momentum"]).spec
    text = render_step_module(spec)
    text, found = re.subn(r"(if CLOSE:\n\s+w = )", r"\1w + 0 * ", text, count=1)
    assert found == 1
    broken = run_generated(text)
    monkeypatch.setattr(mirasc.step_op, "load_step_module", lambda _: broken)
    monkeypatch.setattr(mirasc.step_op, "_CUSTOM_OPS", {})
    errors = compare(op_from_yaml(GENERATED["huber-elastic-momentum"]), length=5)
    assert errors["o"] > 1e-3, errors


def test_which_specs_the_kernel_covers():
    """The matrix memories whose state is W (no dual nonlinear retention); the others keep the
    torch step, with the reason."""
    covered = sorted(p.stem for p in SPECS.glob("*.yaml")
                     if step_unsupported(derive(resolve(p.stem))) is None)
    assert covered == COVERED
    assert "mlp memory" in step_unsupported(derive(resolve("moneta")))
    mirror = op_from_yaml(axis_spec(retention="{kind: elastic_net, gamma: 0.1, form: dual, "
                                    "decay: {}}"))
    assert "dual state (W = phi^-1(Z) is a second track)" in step_unsupported(mirror.derivation)
    kl = op_from_yaml(axis_spec(retention="{kind: kl, decay: {}}"))
    assert "whole-state reduction" in step_unsupported(kl.derivation)
    muon = op_from_yaml(axis_spec(memory="{kind: matrix, bias: true}",
                                  learner="{kind: muon, eta: {}, momentum: {}}"))
    assert "memory.bias with learner.kind 'muon'" in step_unsupported(muon.derivation)
