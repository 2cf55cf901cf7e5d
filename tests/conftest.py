"""Shared helpers: build ops from inline YAML, random inputs in float64.

Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set before any
generated module is imported (triton.jit reads it when decorating)."""

from __future__ import annotations

import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mirasc.catalog import checked_spec  # noqa: E402
from mirasc.check import random_inputs  # noqa: E402
from mirasc.derive import derive  # noqa: E402
from mirasc.op import MirasOp  # noqa: E402


def run_generated(text: str) -> types.ModuleType:
    """A generated module's source run as a module of its own (not through the cache)."""
    module = types.ModuleType("generated")
    exec(compile(text, "<generated>", "exec"), module.__dict__)  # noqa: S102 - generated code
    return module


def op_from_yaml(text: str) -> MirasOp:
    return MirasOp(derive(checked_spec(text)))


def axis_spec(memory="{kind: matrix}", bias="{kind: l2}", retention="{kind: l2, decay: {}}",
              learner="{kind: gd, eta: {}}", extra="") -> str:
    """A spec text with one value per axis (defaults: matrix, l2, l2 decay, gd)."""
    return (f"name: axis_case\nmemory: {memory}\nbias: {bias}\nretention: {retention}\n"
            f"learner: {learner}\nchunk_size: 4\n{extra}")


class OnBackend:
    """The op on one backend, "triton" or "torch" (what `compare` calls)."""

    def __init__(self, op, backend):
        self.op, self.backend = op, backend

    def __getattr__(self, name):
        return getattr(self.op, name)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs, backend=self.backend)


WORKERS_AT_MOST = 4  # each worker holds its own torch, Triton and fla in memory


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker per CPU core, at most WORKERS_AT_MOST."""
    return max(1, min(os.cpu_count() or 1, WORKERS_AT_MOST))


def pytest_configure(config) -> None:
    """Workers share the cores: each runs torch on its share rather than on all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _float64_default():
    torch.manual_seed(0)
    yield


__all__ = ["axis_spec", "op_from_yaml", "random_inputs", "run_generated"]


def decode(layer, x, prefill):
    """A layer's outputs when it prefills `prefill` tokens in one call, then takes one token per
    call from the state it returned."""
    y, state = layer(x[:, :prefill], None, use_cache=True)
    outputs = [y]
    for t in range(prefill, x.shape[1]):
        y, state = layer(x[:, t:t + 1], state, use_cache=True)
        outputs.append(y)
    return torch.cat(outputs, 1)


def assert_generates_alike(model, prompt: torch.Tensor, new: int) -> None:
    """Greedy generation of `new` tokens gives the same tokens with the cache and without."""
    cached = model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    fresh = model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                           use_cache=False)
    assert cached.shape == (prompt.shape[0], prompt.shape[1] + new)
    assert torch.equal(cached, fresh)
