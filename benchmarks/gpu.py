"""GPU benchmark: each generated op beside its peer (fla's chunk kernel where fla has the model,
else the torch reference the op equals) and causal SDPA, forward and forward + backward.

Times are medians of `triton.testing.do_bench` (on `--device cpu`, of wall-clock repeats: the
dry path that runs the kernels in Triton's interpreter). The forward runs with inputs that
require grad, as in training; forward + backward adds torch.autograd.grad of every input under a
fixed random cotangent of o. Throughput is B*T / time; TFLOP/s applies the FLOP models of
`benchmarks.flops` to the time, and %peak divides it by a torch.matmul timed in the same run.

Before timing, the op is checked (the `err` column): against `op.reference` in float32 on the
first --check-length tokens, and against every peer that computes the same function on the
timed inputs: the output and the final state, and for forward + backward every input gradient.
The op is timed only when all of these are within --tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import mirasc
from benchmarks import flops
from benchmarks.common import SPECS, environment, flat, leaves, median_seconds, table
from benchmarks.peers import Impl, mirasc_impl, peers
from mirasc.check import random_inputs, relative_error
from mirasc.resources import precompile

DEFAULT_SPECS = ("simple_gla", "gated_deltanet", "ttt_linear", "moneta", "yaad", "memora")
PASSES = ("fwd", "fwd+bwd")
COLUMNS = [("spec", "spec", ""), ("D", "D", "d"), ("T", "T", "d"), ("pass", "pass", ""),
           ("impl", "impl", ""), ("ms", "ms", ".3f"), ("mtok_s", "Mtok/s", ".3g"),
           ("tflops", "TFLOP/s", ".3g"), ("peak_pct", "%peak", ".1f"),
           ("gib", "GiB", ".2f"), ("mirasc_speedup", "mirasc x", ".2f"), ("err", "err", ".1e"),
           ("note", "note", "")]


class NoDevice(RuntimeError):
    """No CUDA device for the GPU benchmark."""


@dataclass
class Config:
    specs: list[str]
    dims: list[int]
    lengths: list[int]
    batch: int
    heads: int
    dtype: torch.dtype
    device: str  # "cuda", or "cpu" for the dry path in Triton's interpreter
    tolerance: float
    check_length: int
    compile_reference: bool
    reference_max_length: int
    repeats: int  # wall-clock repeats on cpu; do_bench picks its own on cuda


def seconds(cfg: Config, fn) -> float:
    """Median seconds of fn: do_bench on CUDA, wall-clock repeats on CPU."""
    if cfg.device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    return median_seconds(fn, cfg.repeats)


def matmul_peak(cfg: Config) -> float:
    """Achieved TFLOP/s of one large square torch.matmul in the benchmark dtype (8192 on CUDA)."""
    n = 8192 if cfg.device == "cuda" else 512
    a, b = (torch.randn(n, n, device=cfg.device, dtype=cfg.dtype) for _ in range(2))
    return 2 * n**3 / seconds(cfg, lambda: a @ b) / 1e12


def inputs(cfg: Config, op, dim: int, length: int) -> dict:
    """The op's inputs at Dk = Dv = dim in the benchmark dtype on its device, the state in
    float32 (as fla keeps it)."""
    return random_inputs(op, cfg.batch, length, cfg.heads, dim, dim, cfg.dtype, device=cfg.device,
                         state_dtype=torch.float32)


def outputs(impl: Impl, x: dict, backward: bool, cotangent_dtype: torch.dtype) -> dict:
    """o and the final state; with `backward`, the gradient of every input under <o, do>, do a
    fixed standard normal draw rounded to `cotangent_dtype`."""
    x = leaves(x)
    o, final = impl.run(x, True)
    out = {"o": o.detach()} | {f"final_state[{i}]": s.detach() for i, s in enumerate(final)}
    if backward:
        gen = torch.Generator(o.device).manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device=o.device).to(cotangent_dtype).to(o.dtype)
        named = flat(x)
        grads = torch.autograd.grad(o, list(named.values()), do, allow_unused=True)
        out |= {f"d{name}": g for name, g in zip(named, grads, strict=True) if g is not None}
    return out


def worst_error(got: dict, want: dict) -> float:
    return max(relative_error(got[name], want[name]) for name in want if name in got)


def timed(cfg: Config, impl: Impl, x: dict, backward: bool) -> tuple[float, float | None]:
    """(median seconds, peak bytes allocated during one call, inputs included; None on CPU)."""
    x = leaves(x)
    tensors = list(flat(x).values())
    if backward:
        o, _ = impl.run(x, False)
        do = torch.randn_like(o)
        del o

        def fn():
            o, _ = impl.run(x, False)
            torch.autograd.grad(o, tensors, do, allow_unused=True)
    else:
        def fn():
            impl.run(x, False)
    secs = seconds(cfg, fn)
    if cfg.device != "cuda":
        return secs, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return secs, torch.cuda.max_memory_allocated()


def progress(row: dict) -> str:
    """One finished row, as printed while the benchmark runs."""
    done = f"{row['ms']:.3f} ms" if row.get("ms") is not None else row.get("note", "")
    err = f", err {row['err']:.1e}" if row.get("err") is not None else ""
    return f"  {row['spec']} D={row['D']} T={row['T']} {row['pass']} {row['impl']}: {done}{err}"


def failure(exc: Exception) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:90]}"


def own_check(cfg: Config, op, impl: Impl, dim: int) -> dict[str, float | str]:
    """The op in cfg.dtype against op.reference(chunk_size=op.oracle_chunk_size) in float32 on
    the same (rounded) inputs of length --check-length: the worst error per pass, or why not.
    The op runs twice and must agree with itself bit for bit (its kernels use no atomics: a
    difference is a race, such as a read of a state block before the step that writes it)."""
    x = inputs(cfg, op, dim, cfg.check_length)
    ref = Impl("reference", lambda y, final: op.reference(
        **y, chunk_size=op.oracle_chunk_size, output_final_state=final), True, lambda *s: None)
    result = {}
    for name in PASSES:
        backward = name == "fwd+bwd"
        try:
            want = outputs(ref, leaves(x, torch.float32), backward, cfg.dtype)
            got, again = (outputs(impl, x, backward, cfg.dtype) for _ in range(2))
            moved = [k for k in got if not torch.equal(got[k], again[k])]
            result[name] = (f"two runs differ in {', '.join(moved)}" if moved
                            else worst_error(got, want))
        except Exception as exc:
            result[name] = failure(exc)
    return result


def benchmark(cfg: Config) -> tuple[list[dict], dict]:
    """Run every spec x dim x length x pass x implementation; returns (rows, meta)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise NoDevice("no CUDA device: the GPU benchmark needs one (torch.cuda.is_available() is "
                       "False). For the dry path on CPU: python -m benchmarks gpu --device cpu")
    peak = matmul_peak(cfg)
    meta = {"environment": environment(cfg.device), "matmul_peak_tflops": peak,
            "dtype": str(cfg.dtype), "batch": cfg.batch, "heads": cfg.heads,
            "tolerance": cfg.tolerance, "check_length": cfg.check_length}
    print(f"{meta['environment']}\nmeasured {cfg.dtype} matmul peak: {peak:.3g} TFLOP/s; "
          f"B={cfg.batch}, H={cfg.heads}")
    ops = [mirasc.compile(SPECS / f"{name}.yaml") for name in cfg.specs]
    if cfg.device == "cuda":
        meta["precompile_seconds"] = precompiled(cfg, ops)
    rows = []
    for op in ops:
        ours = mirasc_impl(op)
        others = peers(op, cfg.device, cfg.compile_reference, cfg.reference_max_length)
        for dim in cfg.dims:
            checked = own_check(cfg, op, ours, dim)
            for length in cfg.lengths:
                rows += _shape(cfg, op, ours, others, checked, dim, length, peak)
    return rows, meta


def precompiled(cfg: Config, ops: list) -> float:
    """Compile every op's kernels at every dim, in every autotuned configuration, in parallel
    processes before timing, for the inputs `inputs` draws (`mirasc.resources.precompile`): the
    autotuner's first calls then load them. Returns the wall-clock seconds."""
    start = time.perf_counter()
    try:
        jobs = list(precompile(ops, [(d, d) for d in cfg.dims], cfg.dtype, torch.float32))
    except Exception as exc:  # only a head start: the autotuner compiles what is missing
        print(f"precompile failed ({failure(exc)}); the autotuner compiles as it goes")
        return time.perf_counter() - start
    wall = time.perf_counter() - start
    failed = [j for j in jobs if j.error is not None]
    print(f"precompiled {len(jobs)} kernels in {wall:.0f} s ({sum(j.seconds for j in jobs):.0f} s "
          f"of compiling); {len(failed)} failed" + "".join(
              f"\n  {j.spec} D={j.dk} {j.kernel} warps={j.num_warps} stages={j.num_stages}: "
              f"{j.error}" for j in failed))
    return wall


def _shape(cfg, op, ours, others, checked, dim, length, peak) -> list[dict]:
    """The rows of one (spec, D, T): the checks against peers, then every timing."""
    x = inputs(cfg, op, dim, length)
    runnable = [p for p in others if isinstance(p, Impl)
                and (p.max_length is None or length <= p.max_length)]
    for impl in runnable:
        impl.reset()
    errors = {}
    for impl in runnable:
        if impl.same_function:
            for name in PASSES:
                backward = name == "fwd+bwd"
                try:
                    want = outputs(impl, x, backward, cfg.dtype)
                    errors[impl.name, name] = worst_error(outputs(ours, x, backward, cfg.dtype),
                                                          want)
                except Exception as exc:
                    errors[impl.name, name] = failure(exc)
    rows = []
    for name in PASSES:
        backward = name == "fwd+bwd"
        # a failed own check stops the op's timing; a peer that failed to run does not
        checks = [checked[name]] + [e for (_, n), e in errors.items()
                                    if n == name and isinstance(e, float)]
        wrong = [e for e in checks if isinstance(e, str) or not e <= cfg.tolerance]
        mirasc_time = None
        for impl in [ours, *others]:
            row = {"spec": op.spec.name, "D": dim, "T": length, "pass": name}
            if not isinstance(impl, Impl):
                rows.append(row | {"impl": impl[0], "note": f"skipped: {impl[1]}"})
                continue
            row["impl"] = impl.name
            err = checked[name] if impl is ours else errors.get((impl.name, name))
            row["err"] = err if isinstance(err, float) else None
            if isinstance(err, str):
                row["note"] = f"check failed: {err}"
            if impl is ours and wrong:
                row["note"] = row.get("note") or f"not timed: an error is above {cfg.tolerance:g}"
            elif impl.max_length is not None and length > impl.max_length:
                row["note"] = (f"not timed: T > --reference-max-length {impl.max_length} "
                               "(a Python loop over tokens)")
            else:
                row |= _measure(cfg, impl, x, backward, dim, length, peak)
                if impl is ours:
                    mirasc_time = row.get("ms")
                elif mirasc_time and row.get("ms"):
                    row["mirasc_speedup"] = row["ms"] / mirasc_time
            rows.append(row)
            print(progress(row), flush=True)
    del x
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _measure(cfg, impl, x, backward, dim, length, peak) -> dict:
    """The timing columns of one row, or the note of its failure."""
    try:
        secs, memory = timed(cfg, impl, x, backward)
    except Exception as exc:
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        return {"note": failure(exc)}
    work = flops.total(impl.forward_flops(cfg.batch, length, cfg.heads, dim, dim), backward)
    row = {"ms": secs * 1e3, "mtok_s": cfg.batch * length / secs / 1e6,
           "gib": None if memory is None else memory / 2**30}
    if work is not None:
        row["tflops"] = work / secs / 1e12
        row["peak_pct"] = 100 * row["tflops"] / peak
    return row


def report(cfg: Config, rows: list[dict], meta: dict) -> str:
    """The legend and the table."""
    return (f"{meta['environment']}; B={cfg.batch}, H={cfg.heads}, {cfg.dtype}; measured matmul "
            f"peak {meta['matmul_peak_tflops']:.3g} TFLOP/s\n"
            "ms: median time; Mtok/s: B*T per second; TFLOP/s and %peak: the FLOP model of "
            "benchmarks/flops.py\n(fwd+bwd = 3x fwd) over the time, as a share of the measured "
            "matmul peak; GiB: peak allocated during one call,\ninputs included; mirasc x: this "
            "row's time / mirasc's (above 1: mirasc is faster); err: worst relative error of\n"
            f"the op: on its own row against op.reference in float32 on {cfg.check_length} "
            "tokens, on a peer's row against that peer\n(output, final state, and for fwd+bwd "
            f"every input gradient); mirasc is timed only when every err <= {cfg.tolerance:g}.\n\n"
            + table(rows, COLUMNS))


def plot(rows: list[dict]):
    """A figure drawer for write_outputs: Mtok/s against T, one panel per spec, pass and D."""
    def draw(path):
        import matplotlib.pyplot as plt

        panels = sorted({(r["spec"], r["pass"], r["D"]) for r in rows})
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False)
        for ax, (spec, name, dim) in zip(axes[:, 0], panels, strict=True):
            mine = [r for r in rows if (r["spec"], r["pass"], r["D"]) == (spec, name, dim)
                    and r.get("mtok_s")]
            for impl in dict.fromkeys(r["impl"] for r in mine):
                points = [(r["T"], r["mtok_s"]) for r in mine if r["impl"] == impl]
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
            ax.set(xscale="log", yscale="log", xlabel="T", ylabel="Mtok/s",
                   title=f"{spec}, {name}, D={dim}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return draw
