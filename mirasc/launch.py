"""What generated modules run on (the launch support): whether Triton runs their kernels in its
CPU interpreter, and their custom ops, registered once per process."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CUSTOM_OPS: dict[str, object] = {}  # generated modules' custom ops by name, the first registered


def custom_op(name: str):
    """`torch.library.custom_op(name)`, once per process. A generated module run a second time (a
    copy imported from `mirasc compile`'s output beside the cached one) takes the op the first
    registered: a second registration under the name would take the first's place under the ops
    that call it (the same code either way, as the name includes the spec's digest)."""

    def define(fn):
        if name not in _CUSTOM_OPS:
            _CUSTOM_OPS[name] = torch.library.custom_op(name, mutates_args=())(fn)
        return _CUSTOM_OPS[name]

    return define
