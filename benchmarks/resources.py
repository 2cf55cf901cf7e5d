"""What every shipped spec's kernels need from a GPU, without one: each launch configuration the
autotuner tries, compiled for the target by Triton and its ptxas (`mirasc.resources`), at each
head dim. Registers and spill stack per thread, shared memory per program against the target's
limit, and the cold compile time (a fresh TRITON_CACHE_DIR)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict

import torch
from tqdm import tqdm

import mirasc
from benchmarks.common import SPECS, table
from mirasc.cubin import SHARED_LIMIT
from mirasc.resources import kernel_usage

COLUMNS = [("spec", "spec", ""), ("dim", "D", "d"), ("kernel", "kernel", ""),
           ("num_warps", "warps", "d"), ("num_stages", "stages", "d"),
           ("block", "value block", ""), ("registers", "registers", "d"),
           ("spill_bytes", "spill B", "d"), ("tensor_core", "tensor-core ops", "d"),
           ("shared_kib", "shared KiB", ".1f"), ("fits", "fits", ""), ("seconds", "compile s", ".1f"),
           ("error", "ptxas error", "")]


def benchmark(specs: list[str], dims: list[int], capability: int, first: bool = False) -> list[dict]:
    """One row per spec, head dim (Dk = Dv), kernel and launch configuration (or the first only),
    bf16 inputs."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cold: every compile time counts Triton and ptxas
        for spec, dim in tqdm([(s, d) for s in specs for d in dims], desc="compiling"):
            op = mirasc.compile(SPECS / f"{spec}.yaml")
            configs = "first" if first else "tuned"
            for usage in kernel_usage(op, dim, dim, torch.bfloat16, capability, configs):
                row = {"spec": spec, "dim": dim} | asdict(usage)
                row |= {"shared_kib": None if usage.error else usage.shared_bytes / 1024,
                        "fits": "yes" if usage.fits else "NO"}
                rows.append(row)
    return rows


def report(rows: list[dict], capability: int, environment: str) -> str:
    unfit = sorted({(r["spec"], r["dim"], r["kernel"]) for r in rows}
                   - {(r["spec"], r["dim"], r["kernel"]) for r in rows if r["fits"] == "yes"})
    lines = [environment,
             f"kernels compiled for sm_{capability} (shared memory limit "
             f"{SHARED_LIMIT[capability] // 1024} KiB per block), bf16 inputs, Dk = Dv = D; "
             "nothing ran", "", table(rows, COLUMNS), ""]
    lines += [f"no configuration fits: {s} D={d} {k}" for s, d, k in unfit] or ["every kernel fits"]
    return "\n".join(lines)


def plot(rows: list[dict], capability: int):
    """A figure drawer for write_outputs: the least shared memory of any configuration of each
    kernel, per spec and head dim, against the target's limit."""
    def draw(path):
        import matplotlib.pyplot as plt

        dims = sorted({r["dim"] for r in rows})
        fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4), squeeze=False)
        for ax, dim in zip(axes[0], dims, strict=True):
            specs = list(dict.fromkeys(r["spec"] for r in rows if r["dim"] == dim))
            for shift, kernel in ((-0.2, "fwd"), (0.2, "bwd")):
                least = [min((r["shared_kib"] for r in rows if (r["spec"], r["dim"], r["kernel"])
                              == (spec, dim, kernel) and r["shared_kib"] is not None),
                             default=0) for spec in specs]
                ax.bar([i + shift for i in range(len(specs))], least, width=0.4, label=kernel)
            ax.axhline(SHARED_LIMIT[capability] / 1024, color="k", linestyle="--",
                       label=f"sm_{capability} limit")
            ax.set_xticks(range(len(specs)), specs, rotation=45, ha="right")
            ax.set(ylabel="shared memory per program, KiB", title=f"D = {dim}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return draw
