"""Compile time of each shipped spec: the steps of `mirasc.compile` (load and validate the spec,
derive and render the module; write it; import it) timed in a fresh interpreter with a fresh
temporary MIRASC_CACHE_DIR, so every cache is cold. Importing torch and mirasc is not counted;
Triton compiles the kernels later, at their first launch on a GPU, and that is not counted
either. Median of repeats: wall clock (time.perf_counter), and the process's CPU time
(time.process_time) of the three steps together."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import ROOT, SPECS, table

CHILD = """
import json, sys, time
from mirasc.cache import module_path, run_module, write_atomic
from mirasc.catalog import load_spec
from mirasc.codegen import render_module

start, start_cpu = time.perf_counter(), time.process_time()
spec = load_spec(sys.argv[1])
source = render_module(spec)
rendered = time.perf_counter()
path = module_path(spec)
write_atomic(path, source)
written = time.perf_counter()
op = run_module(path, source).op
imported, cpu = time.perf_counter(), time.process_time() - start_cpu
print(json.dumps({"render": rendered - start, "write": written - rendered,
                  "import": imported - written, "cpu": cpu, "backend": op.backend,
                  "bytes": len(source)}))
"""
STAGES = ("render", "write", "import")
COLUMNS = [("spec", "spec", ""), ("backend", "backend", ""), ("kb", "module kB", ".1f"),
           ("render", "render s", ".3f"), ("write", "write s", ".4f"),
           ("import", "import s", ".3f"), ("total", "total s", ".3f"),
           ("cpu", "total CPU s", ".3f")]


def once(spec: str) -> dict:
    """One cold compile of specs/<spec>.yaml in a child interpreter."""
    with tempfile.TemporaryDirectory(prefix="mirasc-cache-") as cache:
        env = os.environ | {"MIRASC_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", CHILD, str(SPECS / f"{spec}.yaml")],
                              cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(specs: list[str], repeats: int) -> list[dict]:
    """One row per spec: the median over `repeats` cold runs of each stage's wall-clock time, of
    their sum, and of the process CPU time of the three (less disturbed by other load)."""
    rows = []
    for spec in specs:
        runs = [once(spec) for _ in range(repeats)]
        row = {"spec": spec, "backend": runs[0]["backend"], "kb": runs[0]["bytes"] / 1e3}
        row |= {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
        row["total"] = statistics.median(sum(r[s] for s in STAGES) for r in runs)
        row["cpu"] = statistics.median(r["cpu"] for r in runs)
        rows.append(row)
        print(f"  {spec}: {row['total']:.3f} s", flush=True)
    return rows


def report(rows: list[dict], repeats: int, environment: str) -> str:
    return (f"{environment}\ncold `mirasc.compile` stages in a fresh interpreter and cache "
            f"directory, median of {repeats} (wall clock; total CPU s: the process's CPU "
            "time)\n\n" + table(rows, COLUMNS))
