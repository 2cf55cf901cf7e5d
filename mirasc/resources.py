"""The op's kernels compiled for a GPU target without launching them, on a machine with or without
that GPU: Triton's JIT specialises each kernel as the op's launch would and compiles it for the
target (its ptxas assembles the cubin), while a stand-in driver reports the target.

`kernel_usage` reads what each launch configuration needs: registers and spill stack per thread
and the tensor-core instructions in the SASS (cuobjdump), shared memory per program (Triton's
metadata). A launch fails on the GPU when its shared memory exceeds the target's per-block limit;
spilled registers go to local memory and cost bandwidth. `precompile` compiles every
configuration the autotuner tries in parallel processes into Triton's on-disk cache, so the
autotuner's first call loads them instead of compiling them one after another."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from unittest import mock

import torch

from mirasc.cubin import SHARED_LIMIT, sass


class CannotCompile(ValueError):
    """The op's kernels cannot be compiled for a GPU here: why, in the message."""


@dataclass(frozen=True)
class Usage:
    """One kernel compiled with one launch configuration."""

    kernel: str                # one of the module's KERNELS
    num_warps: int
    num_stages: int
    registers: int | None      # per thread (255 is the hardware's most)
    spill_bytes: int | None    # stack per thread: registers spilled to local memory
    shared_bytes: int | None   # per program
    shared_limit: int          # the target's per-block limit
    seconds: float             # Triton + ptxas compile time
    tensor_core: int | None = None  # tensor-core instructions in the SASS (HGMMA, HMMA)
    loop: int | None = None    # instructions of the largest loop (`largest_loop`)
    error: str | None = None   # why ptxas refused the kernel (the autotuner skips such a config)
    block: int | None = None   # the value block the configuration sets (None: the launch's)

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= self.shared_limit


def timed(rows: list[Usage]) -> list[bool]:
    """Per row, whether the autotuner times that configuration: it fits, and of its kernel's
    configurations that fit it spills fewest (`launch.least_spilling`; one that spills more
    never runs)."""
    from mirasc.launch import fewest_spills

    kept = set()
    for kernel in {u.kernel for u in rows}:
        kept.update(fewest_spills({i: u.spill_bytes if u.fits else None
                                   for i, u in enumerate(rows) if u.kernel == kernel}))
    return [i in kept for i in range(len(rows))]


class _StandIn:
    """Triton's active driver while compiling for sm_`capability`: reports that target, and a
    device key of its own (the JIT keeps its compiled kernels per device). Nothing launches."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.device = f"sm_{capability} (compile only)"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return None


@contextlib.contextmanager
def compiling_for(capability: int):
    """Within it, Triton's JIT compiles for sm_`capability`, with or without that GPU here, and
    cannot launch: `kernel.warmup(...)` and an autotuner's `warmup(...)` compile only."""
    from triton.runtime.driver import driver

    previous = driver._active  # None until a real driver was asked for (none exists without a GPU)
    driver.set_active(_StandIn(capability))
    try:
        yield
    finally:
        driver.set_active(previous)


class _Recorder:
    """Stands in for a kernel launcher: keeps the arguments of the launch instead of running it."""

    def __init__(self):
        self.call = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.call = (args, kwargs)
        return launch


def launches(op, dk: int, dv: int, dtype: torch.dtype, state_dtype: torch.dtype | None) -> dict:
    """Each of the module's `KERNELS` (in launch order: per direction its stage kernels, the pass
    over the chunks and the per-chunk output kernels): (Triton kernel, args, kwargs) as the op
    launches them on inputs of `dtype` at head dims (dk, dv) and T a multiple of 16 (Triton
    specialises on it), with an initial state in `state_dtype` (None: without one), not varlen,
    the final state not differentiated."""
    from mirasc.cache import load_module
    from mirasc.check import random_inputs
    from mirasc.launch import interpreting

    if interpreting():
        raise CannotCompile("TRITON_INTERPRET=1 replaces Triton's compiler; unset it")
    if op.backend != "triton":
        raise CannotCompile(f"{op.spec.name} has no Triton kernels (it runs on the torch path)")
    module = load_module(op.spec)
    inputs = random_inputs(op, batch=1, length=16 * op.spec.chunk_size, heads=2, dk=dk, dv=dv,
                           dtype=dtype, state_dtype=state_dtype)
    if state_dtype is None:
        del inputs["initial_state"]
    inputs = {k: (tuple(x.detach().requires_grad_() for x in v) if isinstance(v, tuple)
                  else v.detach().requires_grad_()) for k, v in inputs.items()}
    recorders = {k: _Recorder() for k in module.KERNELS}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("mirasc.op.interpreting", return_value=True))
        stack.enter_context(mock.patch.dict(module.kernel.launchers, recorders))
        try:
            o, _ = op(**inputs)
        except (TypeError, ValueError) as exc:  # e.g. an MLP memory without an initial state
            raise CannotCompile(str(exc)) from None
        o.float().sum().backward()
    return {kernel: (getattr(module, f"{op.spec.name}_{kernel}_kernel"), *r.call)
            for kernel, r in recorders.items()}


STEP_VARIANTS = {(False, False): "step", (True, False): "step_1st", (False, True): "step_end",
                 (True, True): "step_one"}
# the decode step's kernel by (a chunk's first token, its last): inside a chunk, opening one,
# closing one, a chunk of one token (an exact spec's every token, a lag token)


class _Calls:
    """Stands in for the step kernel's launcher: keeps the first launch of each (FIRST, CLOSE)
    variant instead of running it."""

    def __init__(self):
        self.calls = {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.setdefault((kwargs["FIRST"], kwargs["CLOSE"]), (args, kwargs))
        return launch


def step_launches(op, dk: int, dv: int, dtype: torch.dtype) -> dict:
    """The decode step's kernel (`mirasc.step_op`) as `Decoder` launches it over a chunk's tokens
    of `dtype` into a float32 state at head dims (dk, dv), in each variant (`STEP_VARIANTS`)
    the chunk's positions take: {name: ((kernel, args, kwargs), [(num_warps, num_stages,
    None)])}."""
    from mirasc.check import random_inputs
    from mirasc.decode import Decoder
    from mirasc.reference import Inputs
    from mirasc.step_op import StepKernel

    decoder = Decoder(op.derivation, op.oracle_chunk_size)
    decoder._kernel = kernel = StepKernel(op.derivation)
    x = random_inputs(op, batch=1, length=decoder.chunk, heads=2, dk=dk, dv=dv)
    gates = {n: x.get(n) for n in ("log_alpha", "eta", "delta", "momentum")}
    ln = (x["ln_weight"], x["ln_bias"]) if op.affine else None
    inputs = Inputs.from_op(op.derivation, x["q"].to(dtype), x["k"].to(dtype), x["v"].to(dtype),
                            {n: None if g is None else g.to(dtype) for n, g in gates.items()},
                            ln)
    recorder = _Calls()
    with mock.patch.object(kernel, "launcher", recorder), torch.no_grad():
        decoder._kernel_steps(decoder.start(tuple(s.float() for s in x["initial_state"])), inputs)
    found = {}
    for variant, (args, kwargs) in recorder.calls.items():
        warps = kwargs.pop("num_warps")
        found[STEP_VARIANTS[variant]] = ((kernel.launcher, args, kwargs), [(warps, 1, None)])
    return found


def configs(op, kernel: str, launch: tuple | None = None) -> list[tuple[int, int, int | None]]:
    """The (num_warps, num_stages, value block) configurations the autotuner of the op's
    `kernel` tries (on `launch`, where it walks the value blocks: `launch.walked_blocks`; else
    the block is None, the launch's)."""
    from mirasc.cache import load_module
    from mirasc.launch import walked_blocks

    module = load_module(op.spec)
    blocks = walked_blocks(launch[2], module.BV_MAX[kernel]) \
        if launch is not None and kernel in module.V_SUMMED else ()
    return [(w, s, b if len(blocks) > 1 else None) for b in blocks or (None,)
            for w, s in module.CONFIGS[kernel]]


def compile_launch(launch: tuple, capability: int, num_warps: int, num_stages: int,
                   block: int | None = None):
    """A launch (kernel, args, kwargs) compiled for sm_`capability` in one configuration (its
    value block `block` in place of the launch's, where given), as the autotuner's call would
    compile it: `.asm` holds every stage ("ttir", "ttgir", "ptx", "cubin"), `.metadata.shared`
    the shared memory per program. Raises PTXASError when ptxas refuses it."""
    import triton

    kernel, args, kwargs = launch
    if block is not None:
        kwargs = kwargs | {"BV": block}
    config = triton.Config({}, num_warps=num_warps, num_stages=num_stages).all_kwargs()
    with compiling_for(capability), contextlib.redirect_stdout(io.StringIO()):  # ptxas: the PTX
        return kernel.warmup(*args, grid=(1,), **kwargs, **config)


def largest_loop(listing: str) -> int | None:
    """Instructions in the largest loop of a SASS listing: the span from a branch's target back
    to the branch when the target lies before it (16 bytes per instruction), or None. For a
    pass, one chunk step per warp (inner loops counted once): a static estimate of the dynamic
    instructions per sequential step."""
    spans = [(int(at, 16) - int(to, 16)) // 16 + 1
             for at, to in re.findall(r"/\*([0-9a-f]+)\*/[^;]*?\bBRA\s+0x([0-9a-f]+)", listing)
             if int(to, 16) < int(at, 16)]
    return max(spans, default=None)


def _cubin_facts(cubin: bytes) -> tuple[int, int, int, int | None]:
    """Registers and spill stack per thread, the count of tensor-core instructions (HGMMA:
    Hopper's wgmma, HMMA: mma.sync) in the SASS and its `largest_loop`."""
    registers, stack, listing = sass(cubin)
    return (registers, stack, len(re.findall(r"\b[HQ]GMMA\b|\bHMMA\b", listing)),
            largest_loop(listing))


def kernel_usage(op, dk: int, dv: int, dtype: torch.dtype = torch.bfloat16,
                 capability: int = 90, which: str = "tuned", only=()) -> list[Usage]:
    """Usage of the op's kernels (those named in `only`, default all) at head dims (dk, dv) on
    inputs of `dtype`, for each launch configuration the autotuner tries (`which="tuned"`) or its
    first only."""
    from triton.runtime.errors import PTXASError

    from mirasc.codegen import step_unsupported, triton_unsupported
    from mirasc.launch import interpreting

    if capability not in SHARED_LIMIT:
        raise CannotCompile(f"sm_{capability}: allowed: {', '.join(map(str, SHARED_LIMIT))}")
    if interpreting():
        raise CannotCompile("TRITON_INTERPRET=1 replaces Triton's compiler; unset it")
    found = {}
    if op.backend == "triton":
        found = {kernel: (launch, configs(op, kernel, launch))
                 for kernel, launch in launches(op, dk, dv, dtype, state_dtype=dtype).items()}
    step = step_unsupported(op.derivation)
    if step is None:
        found |= step_launches(op, dk, dv, dtype)
    elif not found:
        raise CannotCompile(f"{op.spec.name} has no Triton kernels (it runs on the torch path; "
                            f"the Triton backend does not support "
                            f"{triton_unsupported(op.derivation)}; the step kernel does not "
                            f"support {step})")
    unknown = sorted(set(only) - set(found))
    if unknown:
        raise CannotCompile(f"--kernels: {op.spec.name} has no {', '.join(unknown)}; allowed: "
                            f"{', '.join(found)}")
    rows = []
    for kernel, (launch, tried) in found.items():
        if only and kernel not in only:
            continue
        for num_warps, num_stages, block in tried if which == "tuned" else tried[:1]:
            start = time.perf_counter()
            try:
                compiled = compile_launch(launch, capability, num_warps, num_stages, block)
            except PTXASError as exc:
                reason = next((line for line in str(exc).splitlines() if "fatal" in line), str(exc))
                rows.append(Usage(kernel, num_warps, num_stages, None, None, None,
                                  SHARED_LIMIT[capability], time.perf_counter() - start,
                                  error=reason.strip(), block=block))
                continue
            registers, stack, tensor_core, loop = _cubin_facts(compiled.asm["cubin"])
            rows.append(Usage(kernel, num_warps, num_stages, registers, stack,
                              compiled.metadata.shared, SHARED_LIMIT[capability],
                              time.perf_counter() - start, tensor_core, loop=loop, block=block))
    return rows


@dataclass(frozen=True)
class Precompiled:
    """One kernel of one spec compiled in one launch configuration by `precompile`."""

    spec: str
    dk: int
    dv: int
    kernel: str
    num_warps: int
    num_stages: int
    seconds: float             # in its worker (a cache hit takes well under a second)
    error: str | None = None   # why it did not compile (the autotuner skips such a config)
    block: int | None = None   # the value block the configuration sets (None: the launch's)


def _precompile_one(spec, dk, dv, dtype, state_dtype, capability, kernel, num_warps,
                    num_stages, block) -> Precompiled:
    """A worker's job: one kernel in one configuration, into Triton's cache."""
    import mirasc

    start = time.perf_counter()
    try:
        launch = launches(mirasc.compile(spec), dk, dv, dtype, state_dtype)[kernel]
        compile_launch(launch, capability, num_warps, num_stages, block)
        error = None
    except Exception as exc:  # reported per job: the others still compile
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    return Precompiled(spec.name, dk, dv, kernel, num_warps, num_stages,
                       time.perf_counter() - start, error, block)


def precompile(ops: list, dims: list[tuple[int, int]], dtype: torch.dtype = torch.bfloat16,
               state_dtype: torch.dtype | None = torch.float32, capability: int | None = None,
               workers: int | None = None) -> Iterator[Precompiled]:
    """Compile each op's kernels (its module's `KERNELS`) at each (dk, dv), in every configuration its
    autotuner tries, for sm_`capability` (default: this process's GPU), in `workers` processes
    (default: one per CPU core), into Triton's on-disk cache (TRITON_CACHE_DIR). Yields each job
    as it finishes. The launch form must match the calls to come (see `launches`): inputs of
    `dtype`, an initial state in `state_dtype` or (None) none. The workers are
    spawned: a script calling this runs it under `if __name__ == "__main__":`."""
    if capability is None:
        if not torch.cuda.is_available():
            raise CannotCompile("no GPU here: name the target's compute capability (--sm)")
        major, minor = torch.cuda.get_device_capability()
        capability = 10 * major + minor
    # the launches of each op at each dims; refuses what cannot compile, before forking
    found = {(i, dk, dv): launches(op, dk, dv, dtype, state_dtype)
             for i, op in enumerate(ops) for dk, dv in dims}
    jobs = [(op.spec, dk, dv, dtype, state_dtype, capability, kernel, warps, stages, block)
            for i, op in enumerate(ops) for dk, dv in dims
            for kernel, launch in found[i, dk, dv].items()
            for warps, stages, block in configs(op, kernel, launch)]
    context = multiprocessing.get_context("spawn")  # a forked CUDA context would not work
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
        for done in as_completed([pool.submit(_precompile_one, *job) for job in jobs]):
            yield done.result()
