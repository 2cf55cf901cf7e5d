"""The op's torch path as one opaque PyTorch custom op, `mirasc::torch_path`, on every device.

`torch.compile` (fullgraph included) and other tracers see one node per call, never the Python
that evaluates the chunk-step graph or the reference recurrence inside it. Its backward is a
second opaque op that replays the forward under autograd (the graph's own reverse mode) and
returns the gradients of every input. Each `MirasOp` registers under a key of its own
(`name-digest-N`: ops of one spec may differ, as a probe's bias gradient does).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

_OPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> MirasOp
_NUMBERS = itertools.count()


def register(op) -> str:
    """The key under which the custom op finds `op`, held for as long as `op` lives."""
    key = f"{op.spec.name}-{op.spec.digest()}-{next(_NUMBERS)}"
    _OPS[key] = op
    return key


def _run(key: str, q, k, v, inputs: list, state: list, cu_seqlens) -> list[torch.Tensor]:
    """[o, *final states] of the op under `key`, by its torch path, differentiable by autograd."""
    op = _OPS[key]
    named = dict(zip(op.torch_input_names, inputs, strict=True))
    o, final = op.run_torch_path(q, k, v, named, tuple(state) or None, cu_seqlens)
    return [o, *final]


@torch.library.custom_op("mirasc::torch_path", mutates_args=())
def torch_path(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               inputs: list[torch.Tensor], state: list[torch.Tensor],
               cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
    """[o, *final states] of the op under `key`, by its torch path."""
    held = {x.untyped_storage().data_ptr() for x in (q, k, v, *inputs, *state)}
    # contiguous, as the fake implementation promises, and never aliasing an input (as a state
    # passed through unchanged would): a custom op's outputs are its own
    return [y.clone(memory_format=torch.contiguous_format)
            if y.untyped_storage().data_ptr() in held else y.contiguous()
            for y in _run(key, q, k, v, inputs, state, cu_seqlens)]


@torch_path.register_fake
def _(key, q, k, v, inputs, state, cu_seqlens):
    op = _OPS[key]
    seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dtype = op.torch_state_dtype(q.dtype)
    shapes = op.state_shapes(seqs, q.shape[2], q.shape[3], v.shape[3])
    return [v.new_empty(v.shape), *(q.new_empty(shape, dtype=dtype) for shape in shapes)]


@torch.library.custom_op("mirasc::torch_path_backward", mutates_args=())
def torch_path_backward(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        inputs: list[torch.Tensor], state: list[torch.Tensor],
                        cu_seqlens: torch.Tensor | None,
                        grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of q, k, v, each of `inputs` and of `state` for the output cotangents `grads`:
    the forward replayed under autograd."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, *inputs, *state)]
    with _autograd_on():
        outputs = _run(key, *leaves[:3], leaves[3:3 + len(inputs)], leaves[3 + len(inputs):],
                       cu_seqlens)
        found = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return [x.new_zeros(x.shape) if g is None else g.contiguous()
            for g, x in zip(found, leaves, strict=True)]


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside a custom op's implementation, which runs with autograd's dispatch keys
    excluded: the thread's dispatch state without that exclusion (torch's own guard, as its
    higher-order ops use it), and grad mode on."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(
        torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


@torch_path_backward.register_fake
def _(key, q, k, v, inputs, state, cu_seqlens, grads):
    return [x.new_empty(x.shape) for x in (q, k, v, *inputs, *state)]


def _setup_context(ctx, inputs, output):
    key, q, k, v, tensors, state, cu_seqlens = inputs
    ctx.key, ctx.cu_seqlens, ctx.n_inputs = key, cu_seqlens, len(tensors)
    ctx.outputs = [(y.shape, y.dtype) for y in output]  # for the cotangents autograd leaves None
    ctx.save_for_backward(q, k, v, *tensors, *state)


def _backward(ctx, grads):
    q, k, v, *rest = ctx.saved_tensors
    n_inputs = ctx.n_inputs
    grads = [q.new_zeros(shape, dtype=dtype) if g is None else g
             for g, (shape, dtype) in zip(grads, ctx.outputs, strict=True)]
    found = torch_path_backward(ctx.key, q, k, v, rest[:n_inputs], rest[n_inputs:],
                                ctx.cu_seqlens, grads)
    return (None, *found[:3], found[3:3 + n_inputs], found[3 + n_inputs:], None)


torch_path.register_autograd(_backward, setup_context=_setup_context)
