"""Check a compiled op against its reference on random inputs: forward and every input gradient.

The measure is the relative error ||out - ref|| / ||ref||; NaN anywhere is infinite error.
"""

from __future__ import annotations

import math

import sympy as sp
import torch
import torch.nn.functional as F

from mirasc import reference
from mirasc.derive import DELTA, RNORM, R, V
from mirasc.expr import to_torch
from mirasc.op import MirasOp

GATE_RANGES = {"log_alpha": (-0.3, -0.01), "eta": (0.05, 0.5), "delta": (0.05, 1.0),
               "momentum": (0.1, 0.9), "window_weight": (0.2, 1.0)}
# docs/kernels.md#precision: half inputs against the reference of the same rounded inputs, per
# tensor; an MLP memory's gradients chain some twenty half-operand products: 10x wider.
HALF_PRECISION = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
MLP_HALF_FACTOR = 10


def half_bound(op: MirasOp, dtype: torch.dtype) -> float:
    """The relative error the precision table allows `op` on `dtype` (half) inputs."""
    return HALF_PRECISION[dtype] * (MLP_HALF_FACTOR if op.spec.memory.kind == "mlp" else 1)


class OnBackend:
    """`op` called with `backend` (what `compare` calls), its reference and attributes as is."""

    def __init__(self, op: MirasOp, backend: str):
        self.op, self.backend = op, backend

    def __getattr__(self, name):
        return getattr(self.op, name)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs, backend=self.backend)


def random_inputs(op: MirasOp, batch=2, length=19, heads=2, dk=12, dv=12, dtype=torch.float64,
                  seed=0, device="cpu", state_dtype=None) -> dict:
    """Random, never-zero inputs for `op` on `device`: L2-normalised q and k, gates in their usual
    ranges, a random initial state in `state_dtype` (default `dtype`; scaled so an MLP memory
    starts non-trivially) and, for an affine layer norm, ln_weight and ln_bias. Drawn in float64
    on the CPU and in float32 elsewhere (no float64 copies of a GPU benchmark's inputs)."""
    gen = torch.Generator(device).manual_seed(seed)
    drawn = torch.float64 if torch.device(device).type == "cpu" else torch.float32

    def rand(*shape, draw=torch.randn):
        return draw(*shape, generator=gen, device=device, dtype=drawn)

    inputs = {"q": F.normalize(rand(batch, length, heads, dk), dim=-1),
              "k": F.normalize(rand(batch, length, heads, dk), dim=-1),
              "v": rand(batch, length, heads, dv)}
    for name, gate in op.derivation.op_gates().items():
        if gate.is_input:
            width = dv if name == "delta" else dk
            shape = (batch, length, heads) + ((width,) if gate.shape == "channel" else ())
            low, high = GATE_RANGES[name]
            inputs[name] = low + (high - low) * rand(*shape, draw=torch.rand)
    state = [rand(*s) / math.sqrt(s[-1]) for s in op.state_shapes(batch, heads, dk, dv)]
    inputs["initial_state"] = tuple(x.to(state_dtype or dtype) for x in state)
    if op.affine:  # the layer norm's affine parameters, around the identity
        inputs["ln_weight"] = 1 + rand(heads, dv) / 4
        inputs["ln_bias"] = rand(heads, dv) / 4
    return {k: v if isinstance(v, tuple) else v.to(dtype) for k, v in inputs.items()}


class _BranchRecorder:
    """A bias gradient that also counts, for each where() of g, the residual entries on each
    branch (the first whose condition holds), and keeps the residuals' magnitudes |r_j| and
    ||r||."""

    def __init__(self, op: MirasOp):
        self.derivation = op.derivation
        rule = op.derivation.bias
        self.pieces = sorted(rule.elem.atoms(sp.Piecewise) | rule.norm.atoms(sp.Piecewise), key=str)
        self.counts = [[0] * len(piece.args) for piece in self.pieces]
        self.magnitudes: dict[str, list[torch.Tensor]] = {"|r_j|": [], "||r||": []}

    def __call__(self, d, r, v, delta):
        env = {R: r, V: v, RNORM: reference.residual_norm(r), DELTA: delta}
        for piece, counts in zip(self.pieces, self.counts, strict=True):
            left = torch.ones_like(r, dtype=torch.bool)
            for i, (_, cond) in enumerate(piece.args):
                hit = left if cond == sp.true else left & to_torch(cond, env)
                counts[i] += int(hit.sum())
                left = left & ~hit
        self.magnitudes["|r_j|"].append(r.detach().abs().flatten())
        self.magnitudes["||r||"].append(env[RNORM].detach().flatten())
        return reference.bias_grad(d, r, v, delta)

    def run(self, inputs: dict) -> None:
        probe = MirasOp(self.derivation, bias_grad=self)  # the reference, through this gradient
        with torch.no_grad():
            probe(**inputs)

    def shares(self) -> dict[str, list[float]]:
        """Each where() of g by its first condition, with the share of entries on each branch."""
        return {sp.sstr(piece.args[0][1]): [c / max(sum(counts), 1) for c in counts]
                for piece, counts in zip(self.pieces, self.counts, strict=True)}


def branch_shares(op: MirasOp, inputs: dict) -> dict[str, list[float]]:
    """For each where() of the bias gradient g (Yaad's rnorm <= delta, Huber's clip), the share of
    residual entries on each of its branches while the reference runs on `inputs`."""
    recorder = _BranchRecorder(op)
    recorder.run(inputs)
    return recorder.shares()


def cover_branches(op: MirasOp, inputs: dict, seed: int = 0) -> dict:
    """`inputs` with a data-dependent delta redrawn so that a threshold on the residual falls on
    both sides of it: log-uniform from the 10th to the 90th percentile of what the conditions
    compare delta with (||r|| or |r_j|, as the reference meets them on `inputs`). Unchanged without a
    where() in g or a delta input."""
    recorder = _BranchRecorder(op)
    if not recorder.pieces or "delta" not in inputs:
        return inputs
    recorder.run(inputs)
    conditions = [cond for piece in recorder.pieces for _, cond in piece.args if cond.has(DELTA)]
    compared = {"||r||" if any(c.has(RNORM) for c in conditions) else None,
                "|r_j|" if any(c.has(R) for c in conditions) else None} - {None}
    quantiles = [torch.quantile(torch.cat(recorder.magnitudes[name]).double(),
                                torch.tensor([0.1, 0.9], dtype=torch.float64))
                 for name in sorted(compared or recorder.magnitudes)]
    low = math.log(max(min(q[0].item() for q in quantiles), 1e-3))
    high = math.log(max(max(q[1].item() for q in quantiles), 1e-3))
    gen = torch.Generator().manual_seed(seed + 2)
    delta = inputs["delta"]
    draw = torch.rand(delta.shape, generator=gen, dtype=torch.float64)
    return inputs | {"delta": (low + (high - low) * draw).exp().to(delta.dtype)}


def varlen_inputs(op: MirasOp, offsets: list[int], heads=2, dk=12, dv=12, dtype=torch.float64,
                  seed=0) -> dict:
    """Random inputs packed along T (B = 1) with `cu_seqlens` = offsets, one state per sequence."""
    inputs = random_inputs(op, batch=1, length=offsets[-1], heads=heads, dk=dk, dv=dv,
                           dtype=dtype, seed=seed)
    n = len(offsets) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    inputs["initial_state"] = tuple(
        (torch.randn(n, *s.shape[1:], generator=gen, dtype=torch.float64) / math.sqrt(s.shape[-1]))
        .to(dtype) for s in inputs["initial_state"])
    inputs["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int64)
    return inputs


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return math.inf
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


def _run(fn, inputs: dict, cotangents: dict) -> dict[str, torch.Tensor]:
    fixed = {k: v for k, v in inputs.items() if k == "cu_seqlens"}
    leaves = {k: (tuple(x.detach().requires_grad_() for x in v) if isinstance(v, tuple)
                  else v.detach().requires_grad_()) for k, v in inputs.items() if k not in fixed}
    o, final = fn(**leaves, **fixed, output_final_state=True)
    loss = (o * cotangents["o"]).sum() + sum((f * c).sum()
                                            for f, c in zip(final, cotangents["state"], strict=True))
    flat = {f"d{k}" if not isinstance(v, tuple) else f"d{k}[{i}]": x
            for k, v in leaves.items()
            for i, x in (enumerate(v) if isinstance(v, tuple) else [(0, v)])}
    grads = torch.autograd.grad(loss, list(flat.values()), allow_unused=True)
    results = {"o": o.detach()}
    results.update({f"final_state[{i}]": f.detach() for i, f in enumerate(final)})
    results.update({name: (g if g is not None else torch.zeros_like(x))
                    for (name, x), g in zip(flat.items(), grads, strict=True)})
    return results


def compare(op: MirasOp, inputs: dict, chunk_size: int | None = None, seed: int = 1,
            backward: bool = True, against: dict | None = None,
            run_reference: bool = False) -> dict[str, float]:
    """Relative errors of op(...) against op.reference(chunk_size=...) for the output, the final
    state and (with `backward`) the gradient of every input under a random cotangent.

    `against` gives the reference other inputs (e.g. the same in float64); `run_reference`
    measures the reference on `inputs` instead of the op (a precision baseline)."""
    gen = torch.Generator().manual_seed(seed)
    ref_fn = lambda **kw: op.reference(**kw, chunk_size=chunk_size)  # noqa: E731
    subject = ref_fn if run_reference else op
    reference_inputs = inputs if against is None else against
    with torch.no_grad():
        o, final = op.reference(**reference_inputs, chunk_size=chunk_size, output_final_state=True)
    cotangents = {"o": torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype),
                  "state": [torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f.dtype)
                            for f in final]}
    if not backward:
        with torch.no_grad():
            got_o, got_final = subject(**inputs, output_final_state=True)
        pairs = {"o": (got_o, o)} | {f"final_state[{i}]": (g, r) for i, (g, r)
                                      in enumerate(zip(got_final, final, strict=True))}
        return {name: relative_error(g, r) for name, (g, r) in pairs.items()}
    narrow = {k: [c.to(inputs["q"].dtype) for c in v] if isinstance(v, list) else
              v.to(inputs["q"].dtype) for k, v in cotangents.items()}
    got, ref = _run(subject, inputs, narrow), _run(ref_fn, reference_inputs, cotangents)
    return {name: relative_error(got[name], ref[name]) for name in ref}
