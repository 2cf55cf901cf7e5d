"""The `mirasc` command line: compile, explain, check, resources, precompile, list."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Compile Miras memory-layer specs into PyTorch ops.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

SpecSource = Annotated[str, typer.Argument(
    help="A shipped spec's name (see `mirasc list`), a spec YAML file, or YAML text.")]


def _load(source: str):
    """The validated spec of SOURCE; a bad one exits 2 with the spec's error."""
    from mirasc.catalog import resolve
    from mirasc.errors import SpecError

    try:
        return resolve(source)
    except SpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _compile(source):
    """The op of SOURCE (or of a loaded spec); a bad spec or an unusable cache exits 2 with its
    message."""
    from mirasc.cache import CacheError
    from mirasc.cache import compile as compile_spec

    loaded = _load(source)
    try:
        return compile_spec(loaded)
    except CacheError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


FP_FUSION_NOTICE = "TRITON_DEFAULT_FP_FUSION is unset"  # Triton 3.9's notice when compiling


def _quiet_triton() -> None:
    """Silence Triton 3.9's notice that TRITON_DEFAULT_FP_FUSION is unset (its default, fusion,
    is what the kernels are measured with), here and in the worker processes spawned later."""
    warnings.filterwarnings("ignore", message=FP_FUSION_NOTICE, category=UserWarning)
    rule = f"ignore:{FP_FUSION_NOTICE}:UserWarning"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), rule)))


def _kernel_dtypes() -> dict:
    """The input dtypes the GPU kernels are compiled for, by name."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@app.command("compile", short_help="Write the generated module of SPEC to OUT/<name>.py.")
def compile_(spec: SpecSource,
             out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path(".")):
    """Write the generated module of SPEC to OUT/<name>.py."""
    from mirasc.cache import write_atomic
    from mirasc.codegen import render_module

    loaded = _load(spec)
    target = out / f"{loaded.name}.py"
    try:
        write_atomic(target, render_module(loaded))
    except OSError as exc:
        typer.echo(f"error: cannot write {target}: {exc.strerror or exc} ({exc.filename}); "
                   "choose a writable directory with --out", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {target}")


@app.command(short_help="Print the derived update rule of SPEC.")
def explain(spec: SpecSource,
            latex: Annotated[bool, typer.Option(help="Print the expressions as LaTeX.")] = False):
    """Print the derived update rule of SPEC."""
    from mirasc.derive import explain as explain_rule

    typer.echo(explain_rule(_load(spec), latex=latex))


@app.command(short_help="Check SPEC's op against its reference: output, state, gradients.")
def check(spec: SpecSource,
          length: Annotated[int, typer.Option(min=1, help="Sequence length T.")] = 37,
          heads: Annotated[int, typer.Option(min=1, help="Heads H.")] = 2,
          head_dim: Annotated[int, typer.Option(min=1, help="Head dimension Dk = Dv.")] = 12,
          dtype: Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")]
          = "float32",
          tolerance: Annotated[float, typer.Option(help="Largest relative error that passes "
                                                        "(float32 and float64).")] = 1e-5):
    """Run SPEC's compiled op against its reference (same chunking, evaluated in float64 on the
    same inputs) and print the relative error of the output, the final state and every input
    gradient, beside the error of the reference itself in --dtype (the precision the problem
    allows). A tensor passes within --tolerance or within 8x that baseline.

    Half inputs (float16, bfloat16) run the torch path, and the kernels where they can be checked
    here (without a GPU in Triton's interpreter, float16 only: its bfloat16 dot is wrong), against
    the float64 reference of the same rounded inputs; a tensor passes within the precision
    table's bound (docs/kernels.md): 2e-3 for float16, 1e-2 for bfloat16, 10x for an MLP memory."""
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        typer.echo("error: --dtype: allowed: float32, float64, float16, bfloat16", err=True)
        raise typer.Exit(2)
    loaded = _load(spec)
    import torch

    if not torch.cuda.is_available():  # run the Triton kernels in the interpreter: set before
        os.environ.setdefault("TRITON_INTERPRET", "1")  # triton.language is first imported
    _quiet_triton()
    from mirasc.check import branch_shares, compare, cover_branches, random_inputs

    op = _compile(loaded)
    exact = cover_branches(op, random_inputs(op, length=length, heads=heads, dk=head_dim,
                                             dv=head_dim))
    for cond, shares in branch_shares(op, exact).items():
        taken = " / ".join(f"{share:.1%}" for share in shares)
        never = " (a branch never taken goes unchecked)" if min(shares) == 0 else ""
        typer.echo(f"where({cond}, ...) in g: branches taken by {taken} of the residual "
                   f"entries{never}")
    inputs = _cast(exact, getattr(torch, dtype))
    if dtype in ("float16", "bfloat16"):
        return _check_half(op, inputs, dtype, length)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size, against=exact)
    baseline = compare(op, inputs, chunk_size=op.oracle_chunk_size, against=exact,
                       run_reference=True)
    width = max(map(len, errors))
    typer.echo(f"{'tensor':<{width}}  {'op':>9}  {'reference':>9}")
    passed = True
    for name, err in errors.items():
        ok = err <= max(tolerance, 8 * baseline[name])
        passed &= ok
        typer.echo(f"{name:<{width}}  {err:9.3e}  {baseline[name]:9.3e}  {'ok' if ok else 'FAIL'}")
    against = ("the token recurrence" if op.oracle_chunk_size is None
               else f"the chunked reference (chunk_size {op.oracle_chunk_size})")
    typer.echo(f"{op.spec.name}: worst relative error {max(errors.values()):.3e} ({op.backend} "
               f"backend vs {against} in float64; {dtype} inputs, T={length})")
    if not passed:
        raise typer.Exit(1)


def _cast(inputs: dict, dtype) -> dict:
    return {k: (tuple(x.to(dtype) for x in v) if isinstance(v, tuple) else v.to(dtype))
            for k, v in inputs.items()}


def _check_half(op, inputs: dict, dtype: str, length: int) -> None:
    """`check` on half inputs: the torch path and (where they can run here) the kernels against
    the float64 reference of the same rounded inputs, within the precision table's bound."""
    import torch

    from mirasc.check import OnBackend, compare, half_bound
    from mirasc.launch import interpreting

    rounded = _cast(inputs, torch.float64)
    runs = {"torch path": "torch"}
    skipped = ""
    if op.backend == "triton" and interpreting() and dtype == "float16":
        runs["kernels"] = "auto"
    elif op.backend == "triton":
        skipped = ("kernels: not run (Triton's interpreter computes bfloat16 dots wrongly)"
                   if interpreting() else "kernels: not run (check runs CPU tensors)")
    else:
        skipped = (f"no kernels: the op runs the reference recurrence in {dtype} itself (the "
                   "precision table's bounds are for the kernels' float32 accumulation)")
    errors = {label: compare(OnBackend(op, backend), inputs, chunk_size=op.oracle_chunk_size,
                             against=rounded) for label, backend in runs.items()}
    bound = half_bound(op, getattr(torch, dtype))
    names = list(next(iter(errors.values())))
    width = max(map(len, names))
    typer.echo(f"{'tensor':<{width}}  " + "  ".join(f"{label:>10}" for label in runs)
               + f"  {'bound':>9}")
    passed = True
    for name in names:
        ok = all(e[name] <= bound for e in errors.values())
        passed &= ok
        typer.echo(f"{name:<{width}}  " + "  ".join(f"{e[name]:10.3e}" for e in errors.values())
                   + f"  {bound:9.1e}  {'ok' if ok else 'FAIL'}")
    if skipped:
        typer.echo(skipped)
    against = ("the token recurrence" if op.oracle_chunk_size is None
               else f"the chunked reference (chunk_size {op.oracle_chunk_size})")
    worst = max(max(e.values()) for e in errors.values())
    typer.echo(f"{op.spec.name}: worst relative error {worst:.3e} within the precision table's "
               f"{bound:g} for {dtype} ({', '.join(runs)} vs {against} in float64 on the same "
               f"rounded inputs; T={length})" if passed else
               f"{op.spec.name}: worst relative error {worst:.3e} exceeds the precision table's "
               f"{bound:g} for {dtype} (T={length})")
    if not passed:
        raise typer.Exit(1)


@app.command(short_help="Compile SPEC's kernels for a GPU and print what each one needs.")
def resources(spec: SpecSource,
              head_dim: Annotated[int, typer.Option(help="Head dimension Dk.")] = 64,
              value_dim: Annotated[int | None, typer.Option(help="Dv (default: Dk).")] = None,
              dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32 inputs.")]
              = "bfloat16",
              sm: Annotated[int, typer.Option(help="Compute capability, e.g. 90 (H100), 80 "
                                                   "(A100).")] = 90,
              first: Annotated[bool, typer.Option(help="Only the first launch configuration.")]
              = False,
              kernels: Annotated[str, typer.Option(help="Only these kernels, comma-separated "
                                                        "(default: all).")] = ""):
    """Compile SPEC's kernels for a GPU (no GPU needed: Triton and its ptxas run here) and print
    each launch configuration's registers and spills per thread, tensor-core instructions (HGMMA,
    HMMA), shared memory per program, the instructions of its largest loop, and whether the
    autotuner times it (of a kernel's configurations that fit, those that spill least).
    Exits 1 when no configuration of a kernel fits the GPU's shared memory."""
    _quiet_triton()
    from mirasc.cubin import SHARED_LIMIT
    from mirasc.resources import CannotCompile, kernel_usage, timed

    dtypes = _kernel_dtypes()
    only = tuple(k for k in kernels.split(",") if k)
    if dtype not in dtypes or sm not in SHARED_LIMIT:
        typer.echo(f"error: --dtype: allowed: {', '.join(dtypes)}; --sm: allowed: "
                   f"{', '.join(map(str, SHARED_LIMIT))}", err=True)
        raise typer.Exit(2)
    op = _compile(spec)
    dv = value_dim or head_dim
    try:
        rows = kernel_usage(op, head_dim, dv, dtypes[dtype], sm, "first" if first else "tuned",
                            only)
    except CannotCompile as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{op.spec.name}: Dk={head_dim}, Dv={dv}, {dtype}, sm_{sm} (shared memory limit "
               f"{SHARED_LIMIT[sm] // 1024} KiB per block)")
    typer.echo(f"{'kernel':<9}  {'warps':>5}  {'stages':>6}  {'registers':>9}  {'spill B':>7}  "
               f"{'tensor-core ops':>15}  {'shared KiB':>10}  {'loop instr':>10}  fits  timed")
    for u, kept in zip(rows, timed(rows), strict=True):
        kernel = u.kernel if u.block is None else f"{u.kernel} BV={u.block}"
        head = f"{kernel:<9}  {u.num_warps:>5}  {u.num_stages:>6}  "
        if u.error is not None:
            typer.echo(f"{head}ptxas refused it: {u.error}")
            continue
        loop = "-" if u.loop is None else u.loop
        typer.echo(f"{head}{u.registers:>9}  {u.spill_bytes:>7}  {u.tensor_core:>15}  "
                   f"{u.shared_bytes / 1024:>10.1f}  {loop:>10}  {'yes' if u.fits else 'NO ':<4}  "
                   f"{'yes' if kept else 'no'}")
    unfit = sorted({u.kernel for u in rows} - {u.kernel for u in rows if u.fits})
    if unfit:
        typer.echo(f"{op.spec.name}: no launch configuration of the {' and '.join(unfit)} kernel "
                   f"fits sm_{sm}'s shared memory at Dk={head_dim}, Dv={dv}; a smaller head dim, "
                   "expansion or chunk_size needs less, and op(..., backend='torch') runs "
                   "without the kernels", err=True)
        raise typer.Exit(1)


@app.command(short_help="Compile SPECS' kernels in every launch configuration beforehand.")
def precompile(specs: Annotated[list[str], typer.Argument(help="Shipped spec names or spec YAML "
                                                                "files.")],
               head_dim: Annotated[list[int], typer.Option(help="Head dimension Dk = Dv; "
                                                             "repeat for several.")] = [64],  # noqa: B006
               dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32 inputs.")]
               = "bfloat16",
               state: Annotated[str, typer.Option(help="The calls' initial state: float32, the "
                                                        "inputs' dtype (inputs) or none.")]
               = "float32",
               sm: Annotated[int | None, typer.Option(help="Target compute capability (default: "
                                                         "this machine's GPU).")] = None,
               jobs: Annotated[int | None, typer.Option(help="Worker processes (default: one "
                                                           "per CPU core).")] = None):
    """Compile the kernels of SPECS in every launch configuration their autotuners try, in
    parallel, into Triton's cache (TRITON_CACHE_DIR): the first call then loads them instead of
    compiling one configuration after another (minutes for an MLP memory's backward). For calls
    on inputs of --dtype at each --head-dim with an initial state in --state, lengths a multiple
    of 16, not varlen.
    Exits 1 when some kernel compiled in no configuration."""
    import time

    import torch

    _quiet_triton()
    from mirasc.resources import CannotCompile
    from mirasc.resources import precompile as run

    dtypes = _kernel_dtypes()
    states = {"float32": torch.float32, "inputs": dtypes.get(dtype), "none": None}
    if dtype not in dtypes or state not in states:
        typer.echo(f"error: --dtype: allowed: {', '.join(dtypes)}; --state: allowed: "
                   f"{', '.join(states)}", err=True)
        raise typer.Exit(2)
    ops = [_compile(spec) for spec in specs]
    start, done = time.perf_counter(), []
    try:
        for job in run(ops, [(d, d) for d in head_dim], dtypes[dtype], states[state], sm, jobs):
            done.append(job)
            block = "" if job.block is None else f" BV={job.block}"
            typer.echo(f"{job.spec} D={job.dk} {job.kernel} warps={job.num_warps} "
                       f"stages={job.num_stages}{block}: {job.seconds:.1f} s"
                       + (f", failed: {job.error}" if job.error else ""))
    except CannotCompile as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{len(done)} kernels in {time.perf_counter() - start:.1f} s "
               f"({sum(j.seconds for j in done):.1f} s of compiling)")
    kernels = {(j.spec, j.dk, j.kernel) for j in done}
    unusable = sorted(kernels - {(j.spec, j.dk, j.kernel) for j in done if j.error is None})
    if unusable:
        typer.echo("no configuration compiled: " + ", ".join(
            f"{s} D={d} {k}" for s, d, k in unusable), err=True)
        raise typer.Exit(1)


@app.command("list", short_help="List the shipped specs, then the building blocks on each axis.")
def list_():
    """List the shipped specs, then the building blocks on each axis."""
    from mirasc import spec as S
    from mirasc.catalog import shipped
    from mirasc.derive import BUILTIN_BIASES
    from mirasc.expr import FUNCTIONS

    specs = shipped()
    typer.echo("shipped specs (give the name wherever a spec is asked for):")
    width = max(map(len, specs))
    for name, description in specs.items():
        typer.echo(f"  {name:<{width}}  {description}")
    for axis, union in (("memory", S.Memory), ("bias", S.Bias), ("retention", S.Retention),
                        ("learner", S.Learner)):
        typer.echo(f"{axis}:")
        for model in union.__args__[0].__args__:
            kind = model.model_fields["kind"].annotation.__args__[0]
            fields = ", ".join(f for f in model.model_fields if f != "kind")
            doc = " ".join((model.__doc__ or "").split())
            typer.echo(f"  {kind:<12} {doc}" + (f"\n  {'':<12} fields: {fields}" if fields else ""))
    typer.echo("built-in losses (as expressions): " + "; ".join(
        f"{k}: {a if a != '0' else ''}{' + ' if a != '0' and b != '0' else ''}"
        f"{b if b != '0' else ''}" for k, (a, b) in BUILTIN_BIASES.items()))
    typer.echo("expression functions: " + ", ".join(FUNCTIONS))
