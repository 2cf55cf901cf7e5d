"""The implementations timed beside a generated op, each behind one calling convention.

`Impl.run(x, final)` takes the op's keyword inputs `x` (q, k, v [B, T, H, D], gates [B, T, H],
ln_weight / ln_bias [H, Dv], initial_state as a tuple in the op's layout) and returns
(o [B, T, H, Dv], the final state as a tuple in the op's layout, or None when `final` is false),
so outputs and gradients compare one to one. fla keeps the state transposed (S = W^T, [K, V]) and
scales q by 1/sqrt(K) unless given scale=1; its gates are named g (log decay) and beta (step).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import flops
from mirasc.op import MirasOp


@dataclass
class Impl:
    """One implementation: its name, how to run it, whether it computes the op's function (then
    its outputs and gradients must equal the op's), and its forward FLOPs for (B, T, H, Dk, Dv)."""

    name: str
    run: Callable[[dict, bool], tuple[torch.Tensor, tuple | None]]
    same_function: bool
    forward_flops: Callable[[int, int, int, int, int], float | None]
    max_length: int | None = None  # longer sequences are not timed (a Python loop over tokens)
    reset: Callable[[], None] = lambda: None  # before each new shape


def mirasc_impl(op: MirasOp) -> Impl:
    def run(x, final):
        return op(**x, output_final_state=final)

    return Impl(f"mirasc ({op.backend})", run, True,
                lambda *shape: flops.op_forward(op, *shape))


def _input_gates(op: MirasOp) -> set[str]:
    return {name for name, gate in op.derivation.op_gates().items() if gate.is_input}


def _mismatch(op: MirasOp, gates: set[str], states: tuple[str, ...], affine: bool) -> str | None:
    """Why `op` is not the function an fla peer computes, or None when it is."""
    got = (_input_gates(op), op.state_names, op.affine)
    if got == (gates, states, affine):
        return None
    return (f"{op.spec.name} takes gates {sorted(got[0])}, state {got[1]}, affine LN {got[2]}; "
            f"the fla peer needs {sorted(gates)}, {states}, {affine}")


def _fla_state_recurrence(op: MirasOp, device: str, package: str, chunk: str, naive: str,
                          gates: dict[str, str], **options) -> Impl | str:
    """fla.ops.<package>.<chunk>(q, k, v, scale=1, <fla gate>=<op gate>..., **options) with the
    state W^T; on CPU its naive recurrence <naive> (fla's chunk kernels need a GPU driver, even
    under TRITON_INTERPRET). k is L2-normalised by the inputs, not in the kernel."""
    if why := _mismatch(op, set(gates.values()), ("W",), False):
        return why
    try:
        module = importlib.import_module(f"fla.ops.{package}")
        fn = getattr(module, chunk) if device == "cuda" else getattr(
            importlib.import_module(f"fla.ops.{package}.naive"), naive)
    except (ImportError, AttributeError) as exc:
        return f"fla not importable ({exc})"

    def run(x, final):
        (w0,) = x["initial_state"]
        o, s = fn(q=x["q"], k=x["k"], v=x["v"], scale=1.0, initial_state=w0.transpose(-1, -2),
                  output_final_state=final, **{arg: x[gate] for arg, gate in gates.items()},
                  **options)
        return o, ((s.transpose(-1, -2),) if final else None)

    name = f"fla {chunk if device == 'cuda' else naive}"
    return Impl(name, run, True, lambda *shape: flops.op_forward(op, *shape))


def fla_simple_gla(op: MirasOp, device: str) -> Impl | str:
    """chunk_simple_gla(q, k, v, g=log_alpha, scale=1)."""
    return _fla_state_recurrence(op, device, "simple_gla", "chunk_simple_gla",
                                 "naive_recurrent_simple_gla", {"g": "log_alpha"})


def fla_gated_delta_rule(op: MirasOp, device: str) -> Impl | str:
    """chunk_gated_delta_rule(q, k, v, g=log_alpha, beta=eta, scale=1)."""
    return _fla_state_recurrence(op, device, "gated_delta_rule", "chunk_gated_delta_rule",
                                 "naive_recurrent_gated_delta_rule",
                                 {"g": "log_alpha", "beta": "eta"})


def fla_gla(op: MirasOp, device: str) -> Impl | str:
    """chunk_gla(q, k, v, g=log_alpha [B, T, H, K], scale=1), on a GPU: fla's CPU GLA (its naive
    recurrence) fixes the scale at K^-1/2."""
    if device != "cuda":
        return "fla's CPU GLA fixes the scale at K^-1/2: compared on a GPU only"
    return _fla_state_recurrence(op, device, "gla", "chunk_gla", "", {"g": "log_alpha"})


def fla_kda(op: MirasOp, device: str) -> Impl | str:
    """chunk_kda(q, k, v, g=log_alpha [B, T, H, K], beta=eta, scale=1)."""
    return _fla_state_recurrence(op, device, "kda", "chunk_kda", "naive_recurrent_kda",
                                 {"g": "log_alpha", "beta": "eta"})


def fla_delta_rule(op: MirasOp, device: str) -> Impl | str:
    """chunk_delta_rule(q, k, v, beta=eta, scale=1), on a GPU: fla's CPU delta rule (its naive
    recurrence) takes head-first inputs and scales q itself."""
    if device != "cuda":
        return "fla's CPU delta rule is head-first and scales q itself: compared on a GPU only"
    return _fla_state_recurrence(op, device, "delta_rule", "chunk_delta_rule", "", {"beta": "eta"})


def fla_linear_attn(op: MirasOp, device: str) -> Impl | str:
    """chunk_linear_attn(q, k, v, scale=1, normalize=False)."""
    return _fla_state_recurrence(op, device, "linear_attn", "chunk_linear_attn",
                                 "naive_recurrent_linear_attn", {}, normalize=False)


def fla_ttt_linear(op: MirasOp, device: str) -> Impl | str:
    """fla.ops.ttt.chunk_ttt_linear(q, k, v, w=ln_weight, b=ln_bias, eta [B, T, H, 1], scale=1,
    eps=the spec's LN eps, chunk_size=the spec's), state h = W^T and hb = b [N, H, 1, V]; on CPU
    fla's naive `ttt_linear` (head-first)."""
    if why := _mismatch(op, {"eta"}, ("W", "b"), True):
        return why
    try:
        from fla.ops.ttt import chunk_ttt_linear
        from fla.ops.ttt.naive import ttt_linear
    except ImportError as exc:
        return f"fla not importable ({exc})"
    eps, chunk = op.spec.memory.norm.eps, op.spec.chunk_size

    def run(x, final):
        w0, b0 = x["initial_state"]
        args = dict(w=x["ln_weight"], b=x["ln_bias"], scale=1.0, eps=eps,
                    initial_state=w0.transpose(-1, -2), initial_state_bias=b0[:, :, None],
                    output_final_state=final)
        if device == "cuda":
            o, h, hb = chunk_ttt_linear(x["q"], x["k"], x["v"], eta=x["eta"][..., None],
                                        chunk_size=chunk, **args)
        else:  # head-first copies: the naive form scales q in place
            heads_first = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
            o, h, hb = ttt_linear(heads_first(x["q"]), heads_first(x["k"]), heads_first(x["v"]),
                                  eta=heads_first(x["eta"][..., None]), mini_batch_size=chunk,
                                  **args)
            o = o.transpose(1, 2)
        return o, ((h.transpose(-1, -2), hb[:, :, 0]) if final else None)

    name = "fla chunk_ttt_linear" if device == "cuda" else "fla naive ttt_linear"
    return Impl(name, run, True, lambda *shape: flops.op_forward(op, *shape))


def reference(op: MirasOp, compiled: bool, max_length: int) -> Impl:
    """op.reference(..., chunk_size=op.oracle_chunk_size), the torch recurrence the op equals,
    optionally under torch.compile (caches reset before each shape, so each shape compiles once
    outside the timed runs)."""
    def eager(**x):
        return op.reference(**x, chunk_size=op.oracle_chunk_size)

    fn = torch.compile(eager) if compiled else eager

    def run(x, final):
        return fn(**x, output_final_state=final)

    name = "reference (torch.compile)" if compiled else "reference (eager)"
    return Impl(name, run, True, lambda *shape: flops.op_forward(op, *shape), max_length,
                torch.compiler.reset if compiled else (lambda: None))


def sdpa(device: str) -> Impl:
    """Causal softmax attention, F.scaled_dot_product_attention(is_causal=True) on [B, H, T, D]
    views; the flash backend on CUDA. A different function: timed, never compared."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]

    def run(x, final):
        q, k, v = (x[name].transpose(1, 2) for name in ("q", "k", "v"))
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2), None

    name = "sdpa (flash)" if device == "cuda" else "sdpa (math)"
    return Impl(name, run, False, flops.causal_attention_forward)


FLA_PEERS = {"simple_gla": fla_simple_gla, "gated_deltanet": fla_gated_delta_rule,
             "deltanet": fla_delta_rule, "linear_attention": fla_linear_attn,
             "ttt_linear": fla_ttt_linear, "gla": fla_gla, "kda": fla_kda}


def peers(op: MirasOp, device: str, compile_reference: bool,
          reference_max_length: int) -> list[Impl | tuple[str, str]]:
    """The op's peers: fla's kernel for the specs fla has, else the reference; then SDPA.
    A peer that cannot run is (name, reason)."""
    make = FLA_PEERS.get(op.spec.name)
    if make is None:
        first = reference(op, compile_reference, reference_max_length)
    else:
        first = make(op, device)
        if isinstance(first, str):
            first = (f"fla peer of {op.spec.name}", first)
    return [first, sdpa(device)]
