"""Shared pieces: medians of wall-clock repeats, inputs as autograd leaves, the environment line,
and the printed table with its optional CSV / JSON / plot."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
ALL_SPECS = tuple(sorted(p.stem for p in SPECS.glob("*.yaml")))  # every shipped spec
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}


def median_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of `repeats` calls of fn after `warmup`: wall clock (time.perf_counter)
    and this process's CPU time (time.process_time, less sensitive to other load)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `repeats` calls of fn (time.perf_counter), after `warmup`."""
    return median_times(fn, repeats, warmup)[0]


def leaves(x: dict, dtype: torch.dtype | None = None) -> dict:
    """Inputs `x` as fresh autograd leaves sharing their storage (copies cast to `dtype` when
    given)."""
    def leaf(t):
        return (t if dtype is None else t.to(dtype)).detach().requires_grad_()

    return {k: tuple(map(leaf, v)) if isinstance(v, tuple) else leaf(v) for k, v in x.items()}


def flat(x: dict) -> dict[str, torch.Tensor]:
    """Inputs by name, a state tuple as initial_state[i]."""
    out = {}
    for k, v in x.items():
        for i, t in (enumerate(v) if isinstance(v, tuple) else [(None, v)]):
            out[k if i is None else f"{k}[{i}]"] = t
    return out


def environment(device: str) -> str:
    """One line: date, machine, versions."""
    import triton

    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine}; "
            f"torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}")


def fmt(value, spec: str = ".3g") -> str:
    """A table cell: "-" for a missing number, nothing for missing text."""
    if value is None:
        return "-" if spec else ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: columns are (key, header, format spec); text left, numbers right."""
    cells = [[fmt(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(head)] + [len(c[i]) for c in cells]) for i, (_, head, _) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), int | float) or row.get(key) is None for row in rows)
               for key, _, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    header = line([head for _, head, _ in columns])
    return "\n".join([header, "-" * len(header)] + [line(c) for c in cells])


def write_outputs(out: Path | None, name: str, rows: list[dict], meta: dict,
                  plot: Callable[[Path], None] | None = None) -> None:
    """With `out`: OUT/NAME.csv, OUT/NAME.json (rows and `meta`) and, when matplotlib is
    installed, the figure `plot` draws."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    written = [f"{name}.csv", f"{name}.json"]
    if plot is not None:
        try:
            import matplotlib
        except ImportError:
            print("(matplotlib not installed: no plot)")
        else:
            matplotlib.use("Agg")
            plot(out / f"{name}.png")
            written.append(f"{name}.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")
