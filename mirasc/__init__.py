"""mirasc: compile Miras memory-layer specs (memory, bias, retention, learner) into PyTorch ops.

The names below load on first use, so `import mirasc` (and the command line's --help) stays fast:
torch, sympy and Triton are imported by what needs them."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"MirasOp": "mirasc.op", "compile": "mirasc.cache", "Spec": "mirasc.spec",
            "SpecError": "mirasc.errors", "load_spec": "mirasc.catalog"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mirasc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
