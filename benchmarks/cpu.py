"""CPU benchmark, runs anywhere: per spec, the torch paths in float32 on small shapes, forward and
forward + backward, median seconds of repeats: wall clock (time.perf_counter) and, beside it, the
process's CPU time (time.process_time), which other load on the machine disturbs less.

- recurrence: `op.reference(...)`, the token recurrence;
- chunked: `op.reference(..., chunk_size=spec.chunk_size)`, the mini-batch chunked reference (for
  an exactly chunked spec, oracle_chunk_size None, a different function of the same cost);
- op: `op(...)`, which on CPU tensors without TRITON_INTERPRET=1 runs the torch path: the
  kernels' chunk-step graph evaluated in torch, batched over (sequence, head), with the graph's
  reverse mode as its backward (`mirasc.torch_chunk`).

The forward runs with inputs that require grad; forward + backward adds torch.autograd.grad of
every input under a random cotangent of o.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import mirasc
from benchmarks.common import SPECS, flat, leaves, median_times, table
from mirasc.check import random_inputs
from mirasc.launch import interpreting

COLUMNS = [("spec", "spec", ""), ("impl", "impl", ""), ("pass", "pass", ""), ("s", "s", ".4f"),
           ("ktok_s", "ktok/s", ".3g"), ("speedup", "x recurrence", ".2f"),
           ("cpu_s", "CPU s", ".4f"), ("cpu_speedup", "x rec. (CPU)", ".2f")]


@dataclass
class Config:
    specs: list[str]
    batch: int
    length: int
    heads: int
    dim: int
    repeats: int
    threads: int


def paths(op) -> dict[str, Callable]:
    """The three torch paths of `op` by name, each inputs -> (o, final state)."""
    op_path = "op (Triton interpreter)" if interpreting() else "op (torch path)"
    return {
        "recurrence": lambda x: op.reference(**x),
        f"chunked ({op.spec.chunk_size})": lambda x: op.reference(**x,
                                                                 chunk_size=op.spec.chunk_size),
        op_path: lambda x: op(**x),
    }


def seconds(fn, x: dict, backward: bool, repeats: int) -> tuple[float, float]:
    """(wall, CPU) median seconds of a forward, or of a forward + backward."""
    x = leaves(x)
    tensors = list(flat(x).values())
    if not backward:
        return median_times(lambda: fn(x), repeats)
    do = torch.randn_like(fn(x)[0])

    def step():
        o, _ = fn(x)
        torch.autograd.grad(o, tensors, do, allow_unused=True)

    return median_times(step, repeats)


def benchmark(cfg: Config) -> list[dict]:
    """One row per spec, path and pass, printed as it completes."""
    torch.set_num_threads(cfg.threads)
    rows = []
    for name in cfg.specs:
        op = mirasc.compile(SPECS / f"{name}.yaml")
        x = random_inputs(op, batch=cfg.batch, length=cfg.length, heads=cfg.heads, dk=cfg.dim,
                          dv=cfg.dim, dtype=torch.float32)
        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            base = None
            for impl, fn in paths(op).items():
                s, cpu_s = seconds(fn, x, backward, cfg.repeats)
                base = base or (s, cpu_s)
                row = {"spec": name, "impl": impl, "pass": pass_name, "s": s,
                       "ktok_s": cfg.batch * cfg.length / s / 1e3, "speedup": base[0] / s,
                       "cpu_s": cpu_s, "cpu_speedup": base[1] / cpu_s}
                rows.append(row)
                print(f"  {name} {impl} {pass_name}: {s:.4f} s", flush=True)
    return rows


def report(cfg: Config, rows: list[dict], environment: str) -> str:
    return (f"{environment}\nfloat32, B={cfg.batch}, T={cfg.length}, H={cfg.heads}, "
            f"Dk=Dv={cfg.dim}; {cfg.threads} torch thread(s); median of {cfg.repeats} repeats, wall "
            "clock (s) and process CPU time (CPU s); x recurrence: the token recurrence's time / "
            "this row's\n\n" + table(rows, COLUMNS))
