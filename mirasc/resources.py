"""What a spec's kernels need from a GPU, found without one: Triton lowers each kernel to PTX for
the target, the ptxas it ships assembles the cubin, and cuobjdump reads its registers and spill
stack per thread and counts the tensor-core instructions in its SASS; Triton's metadata gives the
shared memory per program. Nothing is launched.

A launch fails on the GPU when its shared memory exceeds the target's per-block limit; spilled
registers (stack bytes) go to local memory and cost bandwidth."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

# Shared memory a block may opt into, in bytes, by compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                 torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}


@dataclass(frozen=True)
class Usage:
    """One kernel compiled with one launch configuration."""

    kernel: str                # "fwd" or "bwd"
    num_warps: int
    num_stages: int
    registers: int | None      # per thread (255 is the hardware's most)
    spill_bytes: int | None    # stack per thread: registers spilled to local memory
    shared_bytes: int | None   # per program
    shared_limit: int          # the target's per-block limit
    seconds: float             # Triton + ptxas compile time
    tensor_core: int | None = None  # tensor-core instructions in the SASS (HGMMA, HMMA)
    error: str | None = None   # why ptxas refused the kernel (the autotuner skips such a config)

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= self.shared_limit


class _Recorder:
    """Stands in for a kernel launcher: keeps the arguments of the launch instead of running it."""

    def __init__(self):
        self.call = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.call = (args, kwargs)
        return launch


def _launches(module, op, dk: int, dv: int, dtype: torch.dtype) -> dict[str, tuple]:
    """The (args, kwargs) the op's forward and backward launch with, on CPU tensors of the shape."""
    from mirasc.check import random_inputs

    inputs = random_inputs(op, batch=1, length=2 * op.spec.chunk_size, heads=2, dk=dk, dv=dv,
                           dtype=dtype)
    inputs = {k: (tuple(x.detach().requires_grad_() for x in v) if isinstance(v, tuple)
                  else v.detach().requires_grad_()) for k, v in inputs.items()}
    recorders = {"fwd": _Recorder(), "bwd": _Recorder()}
    with mock.patch("mirasc.runtime.interpreting", return_value=True), \
            mock.patch.object(module, "_fwd", recorders["fwd"]), \
            mock.patch.object(module, "_bwd", recorders["bwd"]):
        o, _ = op(**inputs)
        o.float().sum().backward()
    return {kernel: r.call for kernel, r in recorders.items()}


def _source(fn, args: tuple, kwargs: dict):
    """Triton's AST source of `fn` specialised as a launch with these arguments would be:
    tensors 16-byte aligned, integers divisible by 16 marked so, constexprs bound."""
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {}, {}
    bound = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = bound[name]
        if param.is_constexpr or value is None:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def _cubin_facts(cubin: bytes) -> tuple[int, int, int]:
    """REG and STACK of the cubin's kernel, as cuobjdump -res-usage prints them, and the count of
    tensor-core instructions (HGMMA: Hopper's wgmma, HMMA: mma.sync) in its SASS."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    return int(found[1]), int(found[2]), len(re.findall(r"\b[HQ]GMMA\b|\bHMMA\b", sass))


def kernel_usage(op, dk: int, dv: int, dtype: torch.dtype = torch.bfloat16,
                 capability: int = 90, configs: str = "tuned") -> list[Usage]:
    """Usage of the op's forward and backward kernels at head dims (dk, dv) on inputs of `dtype`,
    for each launch configuration the autotuner tries (`configs="tuned"`) or its first only."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.errors import PTXASError

    from mirasc.runtime import import_module, interpreting, module_path

    if interpreting():
        raise RuntimeError("kernel_usage needs Triton's compiler: unset TRITON_INTERPRET")
    if op.backend != "triton":
        raise ValueError(f"{op.spec.name}: no Triton kernels (the torch path runs it)")
    if capability not in SHARED_LIMIT:
        raise ValueError(f"capability {capability}: allowed: {sorted(SHARED_LIMIT)}")
    module = import_module(module_path(op.spec))
    calls = _launches(module, op, dk, dv, dtype)
    target = GPUTarget("cuda", capability, 32)
    rows = []
    for kernel, (args, kwargs) in calls.items():
        fn = getattr(module, f"{op.spec.name}_{kernel}_kernel")
        tried = module.CONFIGS
        for num_warps, num_stages in tried if configs == "tuned" else tried[:1]:
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # ptxas failures print the PTX
                    compiled = triton.compile(_source(fn, args, kwargs), target=target, options={
                        "num_warps": num_warps, "num_stages": num_stages})
            except PTXASError as exc:
                reason = next((line for line in str(exc).splitlines() if "fatal" in line), str(exc))
                rows.append(Usage(kernel, num_warps, num_stages, None, None, None,
                                  SHARED_LIMIT[capability], time.perf_counter() - start,
                                  error=reason.strip()))
                continue
            registers, stack, tensor_core = _cubin_facts(compiled.asm["cubin"])
            rows.append(Usage(kernel, num_warps, num_stages, registers, stack,
                              compiled.metadata.shared, SHARED_LIMIT[capability],
                              time.perf_counter() - start, tensor_core))
    return rows
