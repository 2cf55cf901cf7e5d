"""mirasc's kernels beside fla's for the same op, compiled for sm_90 without a GPU.

The op and its fla peer (`benchmarks.peers.FLA_PEERS`) run forward and backward on CPU tensors
at the benchmark shape while every Triton launch is recorded instead of run (the kernel, its
arguments, each configuration its autotuner would time, the grid). Each launch is then compiled
for the target by Triton and its ptxas under mirasc's stand-in driver (`mirasc.resources`), and
its cubin read: registers and spill stack per thread, shared memory per program, tensor-core
instructions by operand type, and the static instructions of its largest loop (for a kernel
that walks the chunks, one chunk step: a static estimate of the dynamic instructions per
sequential step, per warp, inner loops counted once). Without a GPU the autotuner's choice is
unknown: of the configurations compiled, the row shows the one that spills least (the autotuner
times only those, `mirasc.launch.least_spilling`), then runs the fewest warp-instructions (a
stand-in for its timer). fla is imported as on an H100 (sm_90, 227 KiB of shared memory, 132
SMs), so it picks its configuration lists as there."""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch

import mirasc
from benchmarks.common import SPECS, leaves, table
from benchmarks.peers import FLA_PEERS
from benchmarks.work import compiled_afresh, per_warp, run_program, sass_with_lines, split_loops
from mirasc.check import random_inputs
from mirasc.cubin import SHARED_LIMIT, sass
from mirasc.resources import compiling_for, largest_loop

# launch options that set no block size: configurations differing only in them run alike
LAUNCH_ONLY = ("num_warps", "num_stages", "num_ctas", "maxnreg")
COLUMNS = [("impl", "impl", ""), ("pass", "pass", ""), ("kernel", "kernel", ""),
           ("programs", "programs", "d"), ("tried", "configs", ""),
           ("num_warps", "warps", "d"), ("num_stages", "stages", "d"),
           ("registers", "registers", "d"), ("spill_bytes", "spill B", "d"),
           ("shared_kib", "shared KiB", ".0f"), ("tensor_core", "tensor-core ops", ""),
           ("half_share", "bf16/fp16 %", ".0f"), ("loop", "loop instr", "d"),
           ("launches", "launches", "d"), ("warp_instr", "warp-instr M", ".1f"),
           ("moved_mb", "moved MB", ".0f"), ("tensor_mb", "tensors MB", ".0f"),
           ("seconds", "compile s", ".1f")]
PHASE = [("impl", "impl", ""), ("pass", "pass", ""), ("warp_instr", "warp-instr M", ".1f"),
         ("moved_mb", "moved MB", ".0f"), ("tensor_mb", "tensors MB", ".0f"),
         ("instr_ratio", "instr / fla", ".2f"), ("moved_ratio", "moved / fla", ".2f"),
         ("tensor_ratio", "tensors / fla", ".2f")]


@dataclass
class Launch:
    """One recorded launch of a Triton kernel in each configuration its autotuner would time,
    each with its own grid (a configuration that sets a block size sets the programs too)."""

    kernel: object               # the JITFunction
    args: tuple
    configs: list[dict]          # the keyword arguments of each configuration's launch
    grids: list[tuple[int, ...]]  # each configuration's grid

    @property
    def grid(self) -> tuple[int, ...]:
        """The grid of the first configuration."""
        return self.grids[0]


def _grid(kernel, args, kwargs, grid) -> tuple[int, ...]:
    """The launch grid, evaluating a grid function on the bound arguments as Triton does."""
    if not callable(grid):
        return tuple(grid)
    params = kernel.signature.parameters
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    return tuple(grid(dict(bound.arguments)))


@contextlib.contextmanager
def recording(launches: list[Launch]):
    """Within it, Triton launches append to `launches` and run nothing; an autotuned launch is
    recorded once with every configuration its autotuner holds. Tensors allocated empty are
    zeros: no kernel ran to fill them, and a program interpreted later reads them (a row's flag
    that garbage set would mask its loads off, and its bytes would not count)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    compile_only = JITFunction.run
    tuned: list[list[dict]] = []

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return compile_only(self, *args, grid=grid, warmup=warmup, **kwargs)
        shape = _grid(self, args, kwargs, grid)
        if tuned:
            tuned[-1].append(kwargs)
            if len(tuned[-1]) > 1:
                launches[-1].grids.append(shape)
                return None
        launches.append(Launch(self, args, tuned[-1] if tuned else [kwargs], [shape]))
        return None

    def tune(self, *args, **kwargs):
        tuned.append([])
        try:
            for config in self.configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            tuned.pop()

    with mock.patch.object(JITFunction, "run", run), mock.patch.object(Autotuner, "run", tune), \
            mock.patch.object(torch.Tensor, "new_empty", torch.Tensor.new_zeros), \
            mock.patch("torch.empty_like", torch.zeros_like), mock.patch("torch.empty", torch.zeros):
        yield


@contextlib.contextmanager
def _hopper(capability: int):
    """The stand-in driver and torch.cuda's queries answering as an H100 would, for libraries
    that read the GPU when imported (fla picks its configuration lists so)."""
    properties = {"max_shared_mem": SHARED_LIMIT[capability], "multiprocessor_count": 132}
    with compiling_for(capability):
        from triton.runtime.driver import driver

        driver.active.utils = SimpleNamespace(get_device_properties=lambda index: properties)
        with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3"), \
                mock.patch("torch.cuda.get_device_capability",
                           return_value=divmod(capability, 10)), \
                mock.patch("torch.cuda.device_count", return_value=1), \
                mock.patch("torch.cuda.current_device", return_value=0):
            yield


def record(spec: str, batch: int, length: int, heads: int, dim: int,
           capability: int) -> dict[tuple[str, str], list[Launch]]:
    """(impl, pass): the launches of the op's kernels ("mirasc") and of its fla peer ("fla") in
    the forward and in the backward, on bf16 inputs [batch, length, heads, dim]."""
    with _hopper(capability):
        import fla.ops  # noqa: F401 - imported as on the target

    op = mirasc.compile(SPECS / f"{spec}.yaml")
    if spec not in FLA_PEERS:
        raise ValueError(f"{spec}: fla has no peer of it; allowed: {', '.join(sorted(FLA_PEERS))}")
    peer = FLA_PEERS[spec](op, "cuda")
    if isinstance(peer, str):
        raise ValueError(f"{spec}: {peer}")
    x = random_inputs(op, batch, length, heads, dim, dim, torch.bfloat16,
                      state_dtype=torch.float32)
    runs = {"mirasc": lambda inputs: op(**inputs)[0], "fla": lambda inputs: peer.run(inputs, False)[0]}
    recorded = {}
    with mock.patch("mirasc.op.interpreting", return_value=True):  # the op's kernel path
        for impl, run in runs.items():
            inputs = leaves(x)
            with recording(forward := []):
                o = run(inputs)
            with recording(backward := []):
                o.float().sum().backward()
            recorded[impl, "fwd"], recorded[impl, "bwd"] = forward, backward
    return recorded


def _tensor_core(text: str) -> Counter:
    """Tensor-core instructions by operand type (HGMMA: wgmma, HMMA: mma.sync; fp16 operands
    carry no suffix in the opcode)."""
    kinds = Counter()
    for opcode in re.findall(r"\b(?:HGMMA|HMMA)\.[\w.]+", text):
        last = opcode.rsplit(".", 1)[-1]
        kinds[last.lower() if last in ("BF16", "TF32", "E4M3", "E5M2") else "fp16"] += 1
    return kinds


def compile_launch(launch: Launch, capability: int, most: int) -> list[dict]:
    """The launch compiled in its first `most` configurations, a row each (its SASS with source
    lines under "sass")."""
    rows = []
    for index, kwargs in enumerate(launch.configs[:most]):
        start = time.perf_counter()
        with compiling_for(capability), compiled_afresh(), \
                contextlib.redirect_stdout(io.StringIO()):  # ptxas
            compiled = launch.kernel.warmup(*launch.args, grid=(1,), **kwargs)
        registers, stack, listing = sass(compiled.asm["cubin"])
        kinds = _tensor_core(listing)
        rows.append({
            "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
            "registers": registers, "spill_bytes": stack,
            "shared_kib": compiled.metadata.shared / 1024,
            "tensor_core": ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "0",
            "half_share": 100 * (kinds["bf16"] + kinds["fp16"]) / sum(kinds.values())
            if kinds else None,
            "loop": largest_loop(listing), "seconds": time.perf_counter() - start,
            "config": index, "sass": sass_with_lines(compiled.asm["cubin"])})
    return rows


def launch_work(launch: Launch, rows: list[dict]) -> dict:
    """The launch's whole work (`benchmarks.work`): dynamic warp-instructions, bytes its
    programs' loads and stores move, and bytes of the argument tensors they touch, in the
    configuration of `rows` (`compile_launch`'s, or one of them) that spills least, then runs
    the fewest warp-instructions: the autotuner times only those that spill least
    (`mirasc.launch.least_spilling`), and of those the fewest instructions stand in for its
    timer. Each configuration's loops run the trips, and its grid the programs, of its own
    block sizes: one interpreted program per distinct blocking. The row comes back with the
    compile seconds of all."""
    def blocking(row):
        config = launch.configs[row["config"]]
        return repr(sorted((k, v) for k, v in config.items() if k not in LAUNCH_ONLY
                           and not isinstance(v, torch.Tensor))), launch.grids[row["config"]]

    runs = {}
    for row in rows:
        key = blocking(row)
        grid = key[1]
        if key not in runs:
            runs[key] = run_program(launch.kernel, launch.args, launch.configs[row["config"]], grid)
        row["programs"] = math.prod(grid)
        row["warp_instr"] = per_warp(row["sass"], runs[key]) * row["num_warps"] * \
            row["programs"] / 1e6
    best = min(rows, key=lambda r: (r["spill_bytes"], r["warp_instr"]))
    run, programs = runs[blocking(best)], best["programs"]
    tensors = [launch.args[key] if isinstance(key, int) else launch.configs[best["config"]][key]
               for key in run.tensors]
    touched = sum(t.numel() * t.element_size() for t in tensors)
    return best | {"moved_mb": run.bytes_moved * programs / 2**20, "tensor_mb": touched / 2**20,
                   "split_loops": split_loops(best["sass"]),
                   "seconds": sum(r["seconds"] for r in rows),
                   "tried": f"{len(rows)}/{len(launch.configs)}"}


def benchmark(specs: list[str], batch: int, length: int, heads: int, dim: int, capability: int,
              most: int) -> list[dict]:
    """One row per spec, implementation, pass and distinct kernel launch."""
    rows = []
    for spec in specs:
        for (impl, name), launches in record(spec, batch, length, heads, dim, capability).items():
            seen: dict[tuple, dict] = {}
            for launch in launches:
                key = (launch.kernel.fn.__qualname__, tuple(launch.grid), repr(sorted(
                    (k, v) for k, v in launch.configs[0].items() if not isinstance(v, torch.Tensor))))
                if key in seen:  # launched again alike: the same row, its work once more
                    row = seen[key]
                    row["launches"] += 1
                    work = launch_work(launch, [dict(row)])
                    for total in ("warp_instr", "moved_mb", "tensor_mb"):
                        row[total] += work[total]
                    continue
                row = {"spec": spec, "impl": impl, "pass": name, "launches": 1,
                       "kernel": launch.kernel.fn.__name__}
                row |= launch_work(launch, compile_launch(launch, capability, most))
                seen[key] = row
                rows.append(row)
    for row in rows:
        del row["sass"]
    return rows


def phases(rows: list[dict]) -> list[dict]:
    """Per spec, implementation and pass: the work of its launches summed, with mirasc's
    totals over fla's."""
    totals: dict[tuple, dict] = {}
    for row in rows:
        total = totals.setdefault((row["spec"], row["impl"], row["pass"]),
                                  {"spec": row["spec"], "impl": row["impl"], "pass": row["pass"],
                                   "warp_instr": 0.0, "moved_mb": 0.0, "tensor_mb": 0.0})
        for key in ("warp_instr", "moved_mb", "tensor_mb"):
            total[key] += row[key]
    for (spec, impl, name), total in totals.items():
        peer = totals.get((spec, "fla", name))
        if impl == "mirasc" and peer:
            for key, ratio in (("warp_instr", "instr_ratio"), ("moved_mb", "moved_ratio"),
                               ("tensor_mb", "tensor_ratio")):
                total[ratio] = total[key] / peer[key] if peer[key] else None
    return list(totals.values())


def report(rows: list[dict], shape: tuple, capability: int, most: int, environment: str) -> str:
    lines = [environment,
             f"kernels compiled for sm_{capability}, bf16 inputs, (B, T, H, D) = {shape}; nothing "
             f"ran. configs: compiled / held by the autotuner (the first {most}); the row is the "
             "one that spills least, then runs the fewest warp-instructions. loop instr: static "
             "SASS instructions of the largest loop "
             "(a kernel walking the chunks: one chunk step, per warp; an estimate). warp-instr: "
             "dynamic SASS instructions summed over every warp of every program of every launch "
             "of the row; moved: bytes its loads and stores move; tensors: bytes of the argument "
             "tensors they touch (benchmarks.work: one program interpreted, the SASS's loops "
             "counted by its trips)", ""]
    for spec in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == spec]
        totals = {}
        for r in mine:
            totals[r["impl"]] = totals.get(r["impl"], 0.0) + r["seconds"]
        lines += [spec, table(mine, COLUMNS), "compile s, every kernel in the configurations "
                  "compiled: " + ", ".join(f"{impl} {s:.1f}" for impl, s in totals.items()), "",
                  "per phase, every launch:",
                  table([p for p in phases(mine) if p["spec"] == spec], PHASE), ""]
        split = [r["kernel"] for r in mine if r["split_loops"]]
        lines += [f"loops split by unrolling (their trips counted in each part): "
                  f"{', '.join(split) if split else 'none'}", ""]
    return "\n".join(lines)
