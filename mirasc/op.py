"""`MirasOp`, the callable a spec compiles to, and its input checks.

`MirasOp.__call__` checks every input against the spec (shapes, dtypes, gates) and runs the
generated kernels (on CPU tensors their chunk-step graph in torch, `mirasc.torch_chunk`; without
kernels the reference); `MirasOp.reference` runs the oracle recurrence on the same inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from mirasc import reference
from mirasc.derive import Derivation, derive
from mirasc.launch import interpreting
from mirasc.spec import Spec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GATE_CHANNELS = {"log_alpha": "Dk", "eta": "Dk", "momentum": "Dk", "delta": "Dv",
                 "window_weight": "Dk"}
# Each data-dependent gate's range, as the test of an entry outside it (False for NaN: a NaN gate
# spoils the outputs from its token on, as documented, and is not refused).
GATE_RANGES = {"log_alpha": ("<= 0 (the log of a decay in [0, 1]; -inf is a full reset)",
                             lambda x: x > 0),
               "eta": (">= 0", lambda x: x < 0),
               "momentum": ("in [0, 1]", lambda x: (x < 0) | (x > 1)),
               "delta": ("> 0", lambda x: x <= 0),
               "window_weight": (">= 0", lambda x: x < 0)}
BACKENDS = ("auto", "torch")


class MirasOp:
    """op(q, k, v, *, log_alpha, eta, delta, momentum, window_weight, ln_weight, ln_bias,
    initial_state, output_final_state)."""

    def __init__(self, derivation: Derivation, bias_grad: Callable = reference.bias_grad,
                 kernel: Callable | None = None):
        self.derivation = derivation
        self.spec = derivation.spec
        self._bias_grad = bias_grad
        self._kernel = kernel
        self._chunk_step = None  # the chunk-step graph of the CPU path, built on first use
        norm = self.spec.memory.norm
        self.affine = norm is not None and norm.affine  # takes ln_weight and ln_bias
        # what the op takes besides q, k, v and the state, in order: the data-dependent gates,
        # then the affine layer norm's parameters
        self.torch_input_names = tuple(n for n, g in derivation.op_gates().items() if g.is_input)
        if self.affine:
            self.torch_input_names += ("ln_weight", "ln_bias")
        from mirasc.torch_op import register

        self.torch_key = register(self)  # how the torch path's custom op finds this op

    @classmethod
    def from_spec_data(cls, data: dict, bias_grad: Callable = reference.bias_grad,
                       kernel: Callable | None = None) -> MirasOp:
        return cls(derive(Spec.model_validate(data)), bias_grad, kernel)

    def __repr__(self) -> str:
        spec = self.spec
        memory = spec.memory.kind + (f" depth {spec.memory.depth}" if spec.memory.kind == "mlp"
                                     else "")
        chunking = "exact" if self.derivation.exact else "mini-batch gradients"
        return (f"MirasOp({spec.name}: memory {memory}, bias {spec.bias.kind}, retention "
                f"{spec.retention.kind}, learner {spec.learner.kind}; backend {self.backend}; "
                f"chunk_size {spec.chunk_size}, {chunking})")

    @property
    def oracle_chunk_size(self) -> int | None:
        """The chunking of the reference this op equals: None (the token recurrence) when its
        chunking is exact, else the spec's chunk_size (mini-batch gradients)."""
        return None if self.derivation.exact else self.spec.chunk_size

    @property
    def backend(self) -> str:
        """'triton' when generated kernels exist for this spec, else 'reference' (torch). With
        kernels, CPU tensors (outside Triton's interpreter) run the kernels' chunk-step graph in
        torch (`mirasc.torch_chunk`); without, the reference's chunked recurrence."""
        return "triton" if self._kernel is not None else "reference"

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the state tensors, in order: memory weights (W or W1..Wd), their biases with
        memory.bias (b or b1..bd), then the momentum buffers (S, S1.., Sb, Sb1..)."""
        mem = self.spec.memory
        layers = [f"W{i + 1}" for i in range(mem.depth)] if mem.kind == "mlp" else ["W"]
        if mem.bias:
            layers += ["b" + name[1:] for name in layers]
        if self.spec.has_momentum:
            layers += ["S" + name.removeprefix("W") for name in layers]
        return tuple(layers)

    def state_shapes(self, batch: int, heads: int, dk: int, dv: int) -> list[tuple[int, ...]]:
        shapes = reference.memory_shapes(self.derivation, dk, dv)
        if self.spec.has_momentum:
            shapes = shapes + shapes
        return [(batch, heads, *s) for s in shapes]

    def __call__(self, q, k, v, *extra, log_alpha=None, eta=None, delta=None, momentum=None,
                 window_weight=None, ln_weight=None, ln_bias=None, initial_state=None,
                 output_final_state=False, cu_seqlens=None, backend="auto", check_gates=None):
        """backend 'auto': the Triton kernels on CUDA tensors (or under Triton's interpreter),
        else torch; 'torch': the kernels' chunk-step graph in torch on any device (for a GPU
        whose shared memory a kernel does not fit). Specs without kernels run the reference's
        chunked recurrence either way. `check_gates` (default: on unless MIRASC_CHECK_GATES=0)
        refuses a gate outside its range in eager mode (`check_gate_ranges`)."""
        if backend not in BACKENDS:
            why = ("'auto' runs the Triton kernels on CUDA tensors (or under TRITON_INTERPRET=1); "
                   f"on {q.device.type} tensors, with no GPU, it runs their chunk step in torch. "
                   if backend == "triton" and isinstance(q, torch.Tensor) and not q.is_cuda
                   else "")
            raise ValueError(f"{self.spec.name}: backend {backend!r}; {why}allowed: "
                             f"{', '.join(BACKENDS)}")
        self._check_positional(extra)
        gates = {"log_alpha": log_alpha, "eta": eta, "delta": delta, "momentum": momentum,
                 "window_weight": window_weight}
        self._check_flag(output_final_state)
        state = self._check(q, k, v, gates, initial_state, cu_seqlens)
        ln = self._check_ln(ln_weight, ln_bias, q, v)
        named = {name: x for name, x in gates.items() if x is not None}  # data-dependent gates
        if _checking_gates(check_gates):
            self.check_gate_ranges(named)
        if ln is not None:
            named |= {"ln_weight": ln[0], "ln_bias": ln[1]}
        if self._kernel is not None and backend == "auto" and (q.is_cuda or interpreting()):
            o, final = self._kernel(q, k, v, named, state, cu_seqlens)
        else:
            from mirasc.torch_op import torch_path

            o, *final = torch_path(self.torch_key, q, k, v,
                                   [named[n] for n in self.torch_input_names], list(state or ()),
                                   cu_seqlens)
            final = tuple(final)
        return o, (final if output_final_state else None)

    def torch_state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The final states' dtype on the torch path for inputs of `dtype`: the kernels'
        accumulator (float64 or float32) where the spec has kernels, else the inputs' own."""
        if self._kernel is None:
            return dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def run_torch_path(self, q, k, v, named: dict, state, cu_seqlens):
        """(o, final states) by torch: the kernels' chunk-step graph (`mirasc.torch_chunk`) where
        the spec has kernels, else the reference's chunked recurrence with the derived bias
        gradient. `named` holds `torch_input_names`; inputs are checked."""
        given = {n: x for n, x in named.items() if n in GATE_CHANNELS}
        if self._kernel is not None:
            from mirasc import torch_chunk

            if self._chunk_step is None:
                self._chunk_step = torch_chunk.Step(self.derivation)
            step, params = self._chunk_step, {n: named[n] for n in named if n not in given}

            def one(q, k, v, part, s):  # ln_weight, ln_bias are per head, not per token
                return torch_chunk.run(step, q, k, v, part | params, s)

            return per_sequence(one, q, k, v, given, state, cu_seqlens)
        ln = (named["ln_weight"], named["ln_bias"]) if self.affine else None
        chunk = self.oracle_chunk_size or 1
        return self._by_sequence(
            lambda inputs, s: reference.chunked(self.derivation, inputs, s, chunk,
                                                g=self._bias_grad),
            q, k, v, {n: given.get(n) for n in GATE_CHANNELS}, state, cu_seqlens, ln)

    def reference(self, q, k, v, *extra, log_alpha=None, eta=None, delta=None, momentum=None,
                  window_weight=None, ln_weight=None, ln_bias=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, chunk_size=None):
        """The oracle: the token recurrence, or with `chunk_size` the mini-batch chunked one."""
        self._check_positional(extra)
        gates = {"log_alpha": log_alpha, "eta": eta, "delta": delta, "momentum": momentum,
                 "window_weight": window_weight}
        self._check_flag(output_final_state)
        state = self._check(q, k, v, gates, initial_state, cu_seqlens)
        ln = self._check_ln(ln_weight, ln_bias, q, v)
        if chunk_size is None:
            run = lambda inputs, s: reference.recurrent(self.derivation, inputs, s)  # noqa: E731
        else:
            run = lambda inputs, s: reference.chunked(self.derivation, inputs, s, chunk_size)  # noqa: E731
        o, final = self._by_sequence(run, q, k, v, gates, state, cu_seqlens, ln)
        return o, (final if output_final_state else None)

    def _by_sequence(self, run, q, k, v, gates, state, cu_seqlens, ln=None):
        """Run a reference recurrence on a batch, or sequence by sequence on packed varlen input."""
        if state is not None:  # the reference computes in the inputs' dtype
            state = tuple(s.to(q.dtype) for s in state)

        def one(q, k, v, part, s):  # the reference is head-major
            o, final = run(reference.Inputs.from_op(self.derivation, q, k, v, part, ln), s)
            return o.transpose(1, 2), final

        return per_sequence(one, q, k, v, gates, state, cu_seqlens)

    # ---- input checks ----------------------------------------------------------------------

    def _check(self, q, k, v, given, initial_state, cu_seqlens):
        """Validate every input against the spec; returns the initial state as a tuple (or None)."""
        name = self.spec.name
        for arg, x in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, arg, x)
            if x.dim() != 4:
                raise ValueError(f"{name}: {arg} must be a 4-D tensor [B, T, H, D], got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
            if x.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}: {arg} has dtype {x.dtype}; allowed: float16, bfloat16, "
                                "float32, float64")
        if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"{name}: q and k must be [B, T, H, Dk] and v [B, T, H, Dv] with the "
                             f"same B, T, H; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
            raise TypeError(f"{name}: q, k, v must share dtype and device; got {q.dtype}, "
                            f"{k.dtype}, {v.dtype}")
        batch, _, heads, dk = k.shape
        dv = v.shape[-1]
        mem = self.spec.memory
        if (mem.kind == "vector" or mem.residual) and dk != dv:
            why = "a vector memory" if mem.kind == "vector" else "memory.residual"
            raise ValueError(f"{name}: {why} needs Dk == Dv; got Dk={dk}, Dv={dv}")
        gates = self.derivation.op_gates()
        for arg, x in given.items():
            gate = gates.get(arg)
            if gate is None or not gate.is_input:
                if x is not None:
                    why = "has no such gate" if gate is None else f"fixes it to {gate.value:g}"
                    raise ValueError(f"{name}: {arg} was given but the spec {why}")
                continue
            width = {"Dk": dk, "Dv": dv}[GATE_CHANNELS[arg]]
            channel = gate.shape == "channel"
            shape = (*k.shape[:3], width) if channel else tuple(k.shape[:3])
            layout = f"[B, T, H{', ' + GATE_CHANNELS[arg] if channel else ''}]"
            if x is None:
                raise ValueError(f"{name}: {arg} is required by the spec: a per-token gate of "
                                 f"shape {list(shape)} {layout} ({gate.shape})")
            _check_like(name, arg, x, shape, f"{layout} ({gate.shape} gate)", q)
        if cu_seqlens is not None:
            batch = self._check_cu_seqlens(cu_seqlens, q)
        return self._check_state(initial_state, batch, heads, dk, dv, q.dtype, q.device)

    def check_gate_ranges(self, gates: dict) -> None:
        """Refuse a gate with an entry outside its range (log_alpha <= 0, eta >= 0,
        0 <= momentum <= 1, delta > 0, window_weight >= 0), naming the first such (batch, token,
        head[, channel]). One reduction per gate and one host sync for all of them."""
        outside = {arg: GATE_RANGES[arg][1](x) for arg, x in gates.items()
                   if arg in GATE_RANGES and not x.is_meta}  # a meta tensor has no values
        if not outside or not torch.stack([bad.any() for bad in outside.values()]).any():
            return
        arg, bad = next((arg, bad) for arg, bad in outside.items() if bad.any())
        where = bad.nonzero()[0].tolist()
        place = ", ".join(f"{axis} {i}" for axis, i in zip(("batch", "token", "head", "channel"),
                                                             where, strict=False))
        raise ValueError(f"{self.spec.name}: {arg} must be {GATE_RANGES[arg][0]}, got "
                         f"{gates[arg][tuple(where)].item():g} at ({place}); to skip this check "
                         "pass check_gates=False or set MIRASC_CHECK_GATES=0")

    def _check_positional(self, extra: tuple) -> None:
        """Refuse arguments after q, k, v given by position: the rest are keywords."""
        if not extra:
            return
        named = ", ".join(f"{n}=..." for n in self.torch_input_names) or "none"
        raise TypeError(f"{self.spec.name}: the op takes q, k, v by position and everything else "
                        f"by keyword; got {len(extra)} more positional argument(s). Pass the "
                        f"gates by name (this spec's: {named}), and initial_state=..., "
                        "output_final_state=... likewise")

    def _check_flag(self, output_final_state) -> None:
        """output_final_state is a bool: a string such as "no" would be truthy."""
        if not isinstance(output_final_state, bool):
            raise TypeError(f"{self.spec.name}: output_final_state must be True or False, got "
                            f"{output_final_state!r}")

    def _check_ln(self, weight, bias, q, v):
        """The affine layer norm's (ln_weight, ln_bias), each [H, Dv] (ones and zeros when both
        are omitted), or None when the spec's layer norm has no affine parameters."""
        name = self.spec.name
        if not self.affine:
            for arg, x in (("ln_weight", weight), ("ln_bias", bias)):
                if x is not None:
                    raise ValueError(f"{name}: {arg} was given but the spec's memory has no "
                                     "affine layer norm (memory.layer_norm: {affine: true})")
            return None
        shape = (q.shape[2], v.shape[-1])
        if weight is None and bias is None:
            return v.new_ones(shape), v.new_zeros(shape)
        for arg, x in (("ln_weight", weight), ("ln_bias", bias)):
            if x is None:
                raise ValueError(f"{name}: {arg} is required with "
                                 f"{'ln_bias' if arg == 'ln_weight' else 'ln_weight'}: give both "
                                 f"or neither (the identity), each of shape {list(shape)} [H, Dv]")
            _check_like(name, arg, x, shape, "[H, Dv]", q)
        return weight, bias

    def _check_cu_seqlens(self, cu_seqlens, q) -> int:
        name = self.spec.name
        _check_tensor(name, "cu_seqlens", cu_seqlens)
        if cu_seqlens.is_meta:
            raise ValueError(f"{name}: cu_seqlens is a meta tensor, which holds no values, but "
                             "the op reads the sequence offsets on the host to split the "
                             "sequences; pass cu_seqlens as a CPU (or CUDA) int32/int64 tensor "
                             "(q, k, v and the gates may stay on meta)")
        if q.shape[0] != 1:
            raise ValueError(f"{name}: with cu_seqlens the batch size must be 1 (sequences packed "
                             f"along T), got B={q.shape[0]}")
        if (cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64)
                or len(cu_seqlens) < 2):
            raise ValueError(f"{name}: cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of "
                             "sequence offsets")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(
                a > b for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
            raise ValueError(f"{name}: cu_seqlens must rise from 0 to T={q.shape[1]}, got {bounds}")
        return len(bounds) - 1

    def _check_state(self, state, batch, heads, dk, dv, dtype, device):
        name, names = self.spec.name, self.state_names
        if state is None:
            if self.spec.memory.kind == "mlp":
                raise ValueError(f"{name}: an mlp memory needs initial_state ({', '.join(names)}): "
                                 "from zero weights its gradients vanish and it never learns")
            return None
        if not isinstance(state, tuple | list):  # one tensor
            _check_tensor(name, "initial_state", state)
            state = (state,)
        state = tuple(state)
        shapes = self.state_shapes(batch, heads, dk, dv)
        if len(state) != len(shapes):
            raise ValueError(f"{name}: initial_state must hold {len(shapes)} tensors "
                             f"({', '.join(names)}), got {len(state)}")
        for label, x, shape in zip(names, state, shapes, strict=True):
            _check_tensor(name, f"initial_state {label}", x)
            if tuple(x.shape) != shape:
                raise ValueError(f"{name}: initial_state {label} must have shape {list(shape)}, "
                                 f"got {list(getattr(x, 'shape', []))}")
            if x.dtype not in (dtype, torch.float32, torch.float64) or x.device != device:
                raise TypeError(f"{name}: initial_state {label} has dtype {x.dtype} on {x.device}; "
                                f"allowed: float32, float64 or the inputs' {dtype}, on {device}")
        return state


def _checking_gates(flag: bool | None) -> bool:
    """Whether to check the gates' ranges: `flag`, else MIRASC_CHECK_GATES (on unless "0");
    never while torch.compile traces or a CUDA graph captures (the check syncs with the host)."""
    if flag is False or (flag is None and os.environ.get("MIRASC_CHECK_GATES", "1") == "0"):
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def per_sequence(run, q, k, v, per_token: dict, state, cu_seqlens):
    """run(q, k, v, per_token, state) -> (o [B, T, H, DV], final states) on the batch or, with
    cu_seqlens, on each packed sequence: per-token inputs [1, T, H(, D)] sliced along T (None kept),
    one state row each; outputs joined along T, final states along the batch."""
    if cu_seqlens is None:
        return run(q, k, v, per_token, state)
    outputs, finals = [], []
    bounds = cu_seqlens.tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = {name: None if x is None else x[:, bos:eos] for name, x in per_token.items()}
        o, final = run(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], part,
                       None if state is None else tuple(s[n:n + 1] for s in state))
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, 1), tuple(torch.cat(f, 0) for f in zip(*finals, strict=True))


def _check_like(name: str, arg: str, x, shape: tuple, what: str, q: torch.Tensor) -> None:
    """Refuse `x` unless it is a tensor of `shape` with q's dtype and device."""
    _check_tensor(name, arg, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: {arg} must have shape {list(shape)} {what}, got "
                         f"{list(getattr(x, 'shape', []))}{_head_first_hint(q)}")
    if x.dtype != q.dtype or x.device != q.device:
        raise TypeError(f"{name}: {arg} has dtype {x.dtype} on {x.device}; it must match "
                        f"q ({q.dtype} on {q.device})")


def _check_tensor(name: str, arg: str, x) -> None:
    """Refuse `x` unless it is a torch.Tensor, saying what it is (a numpy array has a shape too)."""
    if isinstance(x, torch.Tensor):
        return
    kind = f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")
    shape = f" of shape {list(x.shape)}" if hasattr(x, "shape") else ""
    how = {"q": "torch.as_tensor(q)", "k": "torch.as_tensor(k)", "v": "torch.as_tensor(v)",
           "cu_seqlens": "torch.as_tensor(cu_seqlens, dtype=torch.int64)"}.get(
        arg, "torch.as_tensor(..., dtype=q.dtype, device=q.device)")
    raise ValueError(f"{name}: {arg} is a {kind}{shape}, not a torch.Tensor; the op takes torch "
                     f"tensors only: convert it with {how}")


def _head_first_hint(q: torch.Tensor) -> str:
    """A note when q's shape suggests the head-first layout [B, H, T, D]: more heads than tokens."""
    _, length, heads, _ = q.shape
    if heads <= length:
        return ""
    return (f"; q [B, T, H, D] = {list(q.shape)} reads as T={length} tokens and H={heads} heads, "
            "which looks head-first: the layout is [B, T, H, D] for q, k, v (and [B, T, H(, D)] "
            "for the gates), so pass q.transpose(1, 2) and likewise k, v; keep the gates as they "
            "are if they are [B, T, H(, D)]")
