"""The Miras block around a compiled memory, and a sliding-window attention block for hybrids.

MirasLayer(x) = W_o [ RMSNorm(M(q, k, v; gates)) * sigmoid(W_g x) ], where q, k, v are linear
projections of x through a depthwise causal convolution and SiLU (q and k L2-normalised), and every
data-dependent gate the spec asks for comes from a low-rank projection of x.

Both blocks take and return a per-layer `state` dict, so one code path serves training (no state),
prefill and token-by-token decoding; decoding gives the same outputs as the parallel forward.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mirasc import reference
from mirasc.cache import compile as compile_spec
from mirasc.catalog import resolve
from mirasc.decode import Decoder, StepState
from mirasc.op import BACKENDS, MirasOp
from mirasc.spec import Spec

# How a raw projection becomes each gate: log alpha <= 0, step, momentum and the window's weight in
# (0, 1), delta > 0.
GATE_ACTIVATIONS = {
    "log_alpha": lambda z: F.logsigmoid(z) / 16.0,  # alpha near 1 at init, as GLA normalises it
    "eta": torch.sigmoid,
    "momentum": torch.sigmoid,
    "delta": F.softplus,
    "window_weight": torch.sigmoid,
}


def check_hidden(name: str, x: torch.Tensor, hidden_size: int) -> None:
    """Refuse input that is not [B, T, hidden_size] floating point, or that holds NaN/inf."""
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name}: expected hidden states [batch, time, {hidden_size}], got "
                         f"{list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: hidden states must be floating point, got {x.dtype}")
    if not torch.compiler.is_compiling() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: the input holds NaN or inf values")


class ShortConv(nn.Module):
    """Depthwise causal convolution + SiLU: y_t = silu(sum_{j<K} w_j x_{t-j}).

    The state is the last K - 1 inputs [B, C, K-1], so a step continues a parallel prefix."""

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel_size) / math.sqrt(kernel_size))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        x = x.transpose(1, 2)
        if state is None:
            state = x.new_zeros(*x.shape[:2], self.kernel_size - 1)
        full = torch.cat([state.to(x.dtype), x], -1)
        y = F.conv1d(full, self.weight.to(x.dtype), groups=x.shape[1])
        return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - self.kernel_size + 1:]


class LowRankGate(nn.Module):
    """A gate from x: act(W_up W_down x + b), one value per head or per head channel."""

    def __init__(self, hidden_size: int, rank: int, outputs: int, activation):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, outputs)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.up(self.down(x)))


class MirasLayer(nn.Module):
    """The paper's block around a compiled memory (see the module docstring).

    spec: a `Spec`, a spec path or YAML text. The memory's key and value width is `head_dim`
    (hidden_size // num_heads by default). An MLP memory starts each sequence from learned weights;
    an affine memory layer norm has learned per-head ln_weight and ln_bias.
    backend: 'auto' runs the op (generated kernels on CUDA or under TRITON_INTERPRET=1, else its
    torch path: the kernels' chunk step in torch, or the reference for specs without kernels);
    'torch' always runs the torch reference of the op's chunking.
    check_gates: passed to the op (None: on unless MIRASC_CHECK_GATES=0); the layer's gates are
    in range by construction, so False skips one host sync per call.
    """

    def __init__(self, spec: str | Path | Spec, hidden_size: int, num_heads: int,
                 head_dim: int | None = None, conv_size: int = 4, gate_rank: int = 32,
                 norm_eps: float = 1e-5, backend: str = "auto", check_gates: bool | None = None):
        super().__init__()
        self.spec = resolve(spec)
        self.name = f"MirasLayer({self.spec.name})"
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"{self.name}: hidden_size {hidden_size} is not divisible by "
                                 f"num_heads {num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        if min(hidden_size, num_heads, head_dim) < 1:
            raise ValueError(f"{self.name}: hidden_size, num_heads and head_dim must be positive")
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.backend, self.check_gates = backend, check_gates
        self.op: MirasOp = compile_spec(self.spec)
        self.decoder = Decoder(self.op.derivation, self.op.oracle_chunk_size)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(width, conv_size) for _ in range(3))
        self.gates = nn.ModuleDict({
            name: LowRankGate(hidden_size, gate_rank,
                              num_heads * (head_dim if gate.shape == "channel" else 1),
                              GATE_ACTIVATIONS[name])
            for name, gate in self.op.derivation.op_gates().items() if gate.is_input})
        shapes = self.op.state_shapes(1, num_heads, head_dim, head_dim)
        memory_shapes = shapes[:len(shapes) // 2] if self.spec.has_momentum else shapes
        self.initial_state = nn.ParameterList(
            [nn.Parameter(torch.randn(s) / math.sqrt(s[-1])) for s in memory_shapes]
            if self.spec.memory.kind == "mlp" else [])
        if self.op.affine:  # the memory's layer norm has per-head affine parameters
            self.ln_weight = nn.Parameter(torch.ones(num_heads, head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.o_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None, use_cache: bool = False):
        """x [B, T, hidden] -> (y [B, T, hidden], state or None). With a state (from a previous
        call) the sequence continues; `use_cache` returns the state to continue from."""
        check_hidden(self.name, x, self.hidden_size)
        batch, length, _ = x.shape
        conv = (state or {}).get("conv", (None, None, None))
        q, cq = self.q_conv(self.q_proj(x), conv[0])
        k, ck = self.k_conv(self.k_proj(x), conv[1])
        v, cv = self.v_conv(self.v_proj(x), conv[2])
        heads = (batch, length, self.num_heads, self.head_dim)
        inputs = {"q": F.normalize(q.view(heads), dim=-1), "k": F.normalize(k.view(heads), dim=-1),
                  "v": v.view(heads)}
        for name, gate in self.gates.items():
            inputs[name] = gate(x).view(batch, length, self.num_heads, -1).squeeze(-1)
        if state is None and not use_cache:
            o, _ = self._memory(inputs, self._initial_memory(batch, x))
            new_state = None
        else:
            o, new_state = self._continue(inputs, state, batch, x)
            new_state["conv"] = (cq, ck, cv)
        gate = torch.sigmoid(self.g_proj(x)).view(heads)
        y = self.o_proj((self.o_norm(o) * gate).reshape(batch, length, -1))
        return y, new_state

    def _initial_memory(self, batch: int, like: torch.Tensor):
        if not len(self.initial_state):
            return None
        memory = [w.expand(batch, *w.shape[1:]).to(like.dtype) for w in self.initial_state]
        if self.spec.has_momentum:
            memory += [torch.zeros_like(w) for w in memory]
        return tuple(memory)

    def _memory(self, inputs: dict, memory, final: bool = False):
        """The op on `inputs`. Its last row reads the chunk-end (retention-mapped) state, so a
        sequence that ends mid-chunk gets one more token, whose output is dropped: then the
        output at t never depends on where the sequence ends (decoding equals the parallel run)."""
        length = inputs["q"].shape[1]
        if final or length % self.decoder.chunk == 0:
            return self._run(inputs, memory, final)
        padded = {n: torch.cat([x, x[:, -1:]], 1) for n, x in inputs.items()}
        return self._run(padded, memory)[0][:, :length], None

    def _run(self, inputs: dict, memory, final: bool = False):
        if self.op.affine:
            dtype = inputs["q"].dtype
            inputs = inputs | {"ln_weight": self.ln_weight.to(dtype),
                               "ln_bias": self.ln_bias.to(dtype)}
        if self.backend == "torch":
            return self.op.reference(**inputs, initial_state=memory, output_final_state=final,
                                     chunk_size=self.op.oracle_chunk_size)
        return self.op(**inputs, initial_state=memory, output_final_state=final,
                       check_gates=self.check_gates)

    def _continue(self, inputs: dict, state: dict | None, batch: int, like: torch.Tensor):
        """Continue from the state's `StepState` (O(1) in the position inside a chunk): the
        tokens up to the next chunk boundary step, then whole chunks of a call of more than one
        token run through the op (a prefill), and the rest steps again. With a window (c > 1)
        that holds earlier tokens, every token steps: the op's window starts at its first token."""
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        memory = state["memory"] if state else self._start_state(batch, like, acc)
        length, chunk = inputs["q"].shape[1], self.decoder.chunk
        head = min(length, -memory.position % chunk)
        rest = length - head
        whole = rest - rest % chunk if length > 1 and "window" not in memory.tracks else 0
        outputs = []
        if head:
            o, memory = self._step({n: x[:, :head] for n, x in inputs.items()}, memory)
            outputs.append(o)
        if whole:
            part = {n: x[:, head:head + whole] for n, x in inputs.items()}
            o, final = self._memory(part, memory.boundary, final=True)
            outputs.append(o)
            memory = self.decoder.start(tuple(s.to(acc) for s in final),
                                        self._head_major(part, acc))
        if head + whole < length:
            o, memory = self._step({n: x[:, head + whole:] for n, x in inputs.items()}, memory)
            outputs.append(o)
        return torch.cat(outputs, 1), {"memory": memory}

    def _start_state(self, batch: int, like: torch.Tensor, dtype: torch.dtype) -> StepState:
        """The step state of a new sequence: the learned initial memory or zeros."""
        memory = self._initial_memory(batch, like)
        if memory is None:
            shapes = self.op.state_shapes(batch, self.num_heads, self.head_dim, self.head_dim)
            memory = tuple(like.new_zeros(s, dtype=dtype) for s in shapes)
        return self.decoder.start(tuple(m.to(dtype) for m in memory))

    def _step(self, inputs: dict, memory: StepState):
        """The tokens of `inputs` through the O(1) step, in the state's dtype: (o, state)."""
        o, memory = self.decoder(memory, self._head_major(inputs, memory.tensors()[0].dtype))
        return o.transpose(1, 2).to(inputs["v"].dtype), memory

    def _head_major(self, inputs: dict, dtype: torch.dtype) -> reference.Inputs:
        """The op's inputs [B, T, H, ...] as the reference's head-major ones, in `dtype`."""
        cast = {n: x.to(dtype) for n, x in inputs.items()}
        gates = {n: cast.get(n) for n in self.op.torch_input_names if n not in ("ln_weight",
                                                                                 "ln_bias")}
        ln = (self.ln_weight.to(dtype), self.ln_bias.to(dtype)) if self.op.affine else None
        return reference.Inputs.from_op(self.op.derivation, cast["q"], cast["k"], cast["v"],
                                        gates, ln)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on [B, T, H, D] (D even), rotating channel pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * freq[None, :]
    cos, sin = angle.cos()[None, :, None, :].to(x.dtype), angle.sin()[None, :, None, :].to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over the last `window` tokens, with rotary positions; the state
    keeps the last window - 1 keys and values and the position reached."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, head_dim: int | None = None):
        super().__init__()
        self.name = "SlidingWindowAttention"
        head_dim = head_dim or hidden_size // num_heads
        if head_dim % 2 or head_dim * num_heads == 0:
            raise ValueError(f"{self.name}: head_dim must be even and positive (rotary), got "
                             f"{head_dim}")
        if window < 1:
            raise ValueError(f"{self.name}: window must be at least 1, got {window}")
        self.hidden_size, self.num_heads, self.head_dim, self.window = (hidden_size, num_heads,
                                                                         head_dim, window)
        self.qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None, use_cache: bool = False):
        check_hidden(self.name, x, self.hidden_size)
        batch, length, _ = x.shape
        start = state["position"] if state else 0
        positions = torch.arange(start, start + length, device=x.device)
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = rotary(q, positions), rotary(k, positions)
        if state:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        key_positions = torch.arange(start + length - k.shape[1], start + length, device=x.device)
        offset = positions[:, None] - key_positions[None, :]
        mask = (offset >= 0) & (offset < self.window)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        y = self.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
        if not (use_cache or state):
            return y, None
        first = max(0, k.shape[1] - (self.window - 1))
        return y, {"k": k[:, first:], "v": v[:, first:],
                   "position": start + length}
