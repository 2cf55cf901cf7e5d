"""`python -m benchmarks {cpu,decode,gpu,compile,inverse,resources,static,startup}` from the
repository root; see --help."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks of mirasc's generated ops.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

Out = Annotated[Path | None, typer.Option(help="Also write NAME.csv, NAME.json (and a plot) here.")]
Specs = Annotated[str | None, typer.Option(help="Comma-separated spec names from specs/.")]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str | None) -> list[str]:
    """The specs named in `text`, every shipped spec where it names none."""
    from benchmarks.common import ALL_SPECS, SPECS

    if not text:
        return list(ALL_SPECS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    missing = [n for n in names if not (SPECS / f"{n}.yaml").exists()]
    if missing:
        typer.echo(f"error: no spec {', '.join(missing)} in {SPECS}", err=True)
        raise typer.Exit(2)
    return names


@app.command()
def cpu(specs: Specs = None,
        batch: Annotated[int, typer.Option(help="B.")] = 1,
        length: Annotated[int, typer.Option(help="T.")] = 64,
        heads: Annotated[int, typer.Option(help="H.")] = 2,
        dim: Annotated[int, typer.Option(help="Dk = Dv.")] = 16,
        repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
        threads: Annotated[int, typer.Option(help="torch.set_num_threads.")] = 1,
        quick: Annotated[bool, typer.Option(help="Four specs, T=32.")] = False,
        out: Out = None):
    """Token recurrence vs chunked reference vs op(...) on CPU, float32 (all specs: ~1 minute
    on 2 cores)."""
    from benchmarks import cpu as bench
    from benchmarks.common import environment, write_outputs

    if quick:
        specs, length = specs or "linear_attention,gated_deltanet,ttt_linear,moneta", 32
    cfg = bench.Config(_names(specs), batch, length, heads, dim, repeats, threads)
    rows = bench.benchmark(cfg)
    env = environment("cpu")
    typer.echo("\n" + bench.report(cfg, rows, env))
    write_outputs(out, "cpu", rows, {"environment": env, **vars(cfg)})


@app.command()
def decode(specs: Specs = None,
           hidden: Annotated[int, typer.Option(help="The layer's hidden size.")] = 512,
           heads: Annotated[int, typer.Option(help="Heads (head dim = hidden / heads).")] = 4,
           repeats: Annotated[int, typer.Option(help="Timed repeats (the least).")] = 5,
           threads: Annotated[int, typer.Option(help="torch.set_num_threads.")] = 1,
           new_tokens: Annotated[int, typer.Option(help="Tokens each generate call adds.")] = 32,
           out: Out = None):
    """Per-token decode time by position in the chunk, the O(1) step against re-running the op
    on the inputs since the boundary, cache bytes per layer and generate's tokens/s, on CPU
    (all specs at hidden 512: a few minutes on 2 cores)."""
    from benchmarks import decode as bench
    from benchmarks.common import environment, write_outputs

    cfg = bench.Config(_names(specs), hidden, heads, repeats, threads, new_tokens)
    rows = bench.benchmark(cfg)
    env = environment("cpu")
    typer.echo("\n" + bench.report(cfg, rows, env))
    write_outputs(out, "decode", rows, {"environment": env, **vars(cfg)})


@app.command()
def gpu(specs: Specs = None,
        dims: Annotated[str | None, typer.Option(help="Head dims, e.g. 64,128.")] = None,
        lengths: Annotated[str | None, typer.Option(help="Sequence lengths T.")] = None,
        batch: Annotated[int | None, typer.Option(help="B.")] = None,
        heads: Annotated[int | None, typer.Option(help="H.")] = None,
        dtype: Annotated[str | None, typer.Option(help="bfloat16, float16, float32.")] = None,
        device: Annotated[str, typer.Option(help="cuda, or cpu: the dry path (kernels in "
                                                 "Triton's interpreter, fla's naive forms)")]
        = "cuda",
        quick: Annotated[bool, typer.Option(help="D=64, T=1024,8192.")] = False,
        tolerance: Annotated[float, typer.Option(help="Largest relative error that is timed.")]
        = 5e-2,
        check_length: Annotated[int | None, typer.Option(
            help="Tokens of the check against op.reference in float32.")] = None,
        reference_mode: Annotated[str, typer.Option(help="compile or eager: the reference "
                                                         "peer under torch.compile or not")]
        = "compile",
        reference_max_length: Annotated[int, typer.Option(
            help="Longest T the reference peer runs at (a Python loop over tokens).")] = 2048,
        repeats: Annotated[int, typer.Option(help="Wall-clock repeats on --device cpu.")] = 3,
        out: Out = None):
    """Generated ops vs fla / the reference, and causal SDPA: forward and forward+backward.
    Defaults: on cuda the issue's shapes (B=8, H=16, D=64,128, T=1k..32k, bfloat16); on cpu a
    tiny float32 shape."""
    if device not in ("cuda", "cpu") or reference_mode not in ("compile", "eager"):
        typer.echo("error: --device is cuda or cpu; --reference-mode is compile or eager", err=True)
        raise typer.Exit(2)
    if device == "cpu":  # before mirasc imports a generated module: its kernels get interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    from benchmarks import gpu as bench
    from benchmarks.common import DTYPES, write_outputs

    on_gpu = device == "cuda"
    if quick:
        dims, lengths = dims or "64", lengths or "1024,8192"
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    if dtype not in DTYPES:
        typer.echo(f"error: --dtype: allowed: {', '.join(DTYPES)}", err=True)
        raise typer.Exit(2)
    cfg = bench.Config(
        specs=_names(specs) if specs else list(bench.DEFAULT_SPECS),
        dims=_ints(dims or ("64,128" if on_gpu else "16")),
        lengths=_ints(lengths or ("1024,2048,4096,8192,16384,32768" if on_gpu else "64")),
        batch=batch or (8 if on_gpu else 1), heads=heads or (16 if on_gpu else 2),
        dtype=DTYPES[dtype], device=device, tolerance=tolerance,
        check_length=check_length or (128 if on_gpu else 32),
        compile_reference=reference_mode == "compile",
        reference_max_length=reference_max_length, repeats=repeats)
    try:
        rows, meta = bench.benchmark(cfg)
    except bench.NoDevice as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n" + bench.report(cfg, rows, meta))
    write_outputs(out, "gpu", rows, meta, bench.plot(rows))


@app.command("compile")
def compile_(specs: Specs = None,
             repeats: Annotated[int, typer.Option(help="Cold runs per spec (median).")] = 3,
             quick: Annotated[bool, typer.Option(help="One run per spec.")] = False,
             out: Out = None):
    """Cold compile time of each shipped spec: render, write, import."""
    from benchmarks import compile_time as bench
    from benchmarks.common import environment, write_outputs

    names = _names(specs)
    repeats = 1 if quick else repeats
    rows = bench.benchmark(names, repeats)
    env = environment("cpu")
    typer.echo("\n" + bench.report(rows, repeats, env))
    write_outputs(out, "compile", rows, {"environment": env, "repeats": repeats})


@app.command()
def inverse(tiles: Annotated[int, typer.Option(help="Tiles per case.")] = 64,
            rows: Annotated[int, typer.Option(help="Rows of a tile (the chunk).")] = 64,
            dim: Annotated[int, typer.Option(help="Dk.")] = 64,
            out: Out = None):
    """The triangular inverse's error by the precision of its merges' products (float32, bf16
    splits, tf32, fp16 splits), modelled on the CPU, before and after it is stored."""
    from benchmarks import inverse as bench
    from benchmarks.common import environment, write_outputs

    rows_ = bench.benchmark(tiles, rows, dim)
    typer.echo(bench.report(rows_, tiles, rows, dim))
    write_outputs(out, "inverse", rows_, {"environment": environment("cpu"), "tiles": tiles,
                                          "rows": rows, "dim": dim})


@app.command()
def resources(specs: Specs = None,
              dims: Annotated[str, typer.Option(help="Head dims (Dk = Dv).")] = "64,128",
              sm: Annotated[int, typer.Option(help="Compute capability of the target.")] = 90,
              first: Annotated[bool, typer.Option(help="Only each kernel's first launch "
                                                       "configuration.")] = False,
              out: Out = None):
    """Registers, spills and shared memory of every kernel and launch configuration, compiled for
    a GPU target without one (every shipped spec at D=64,128: 53 min on a 2-core machine, most of
    it ptxas on the MLP memories' backward, up to 5 min for one configuration)."""
    from benchmarks import resources as bench
    from benchmarks.common import environment, write_outputs
    from mirasc.resources import CannotCompile

    names = _names(specs)
    try:
        rows = bench.benchmark(names, _ints(dims), sm, first)
    except CannotCompile as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    env = environment("cpu")
    typer.echo("\n" + bench.report(rows, sm, env))
    write_outputs(out, "resources", rows, {"environment": env, "sm": sm}, bench.plot(rows, sm))


@app.command()
def startup(repeats: Annotated[int, typer.Option(help="Fresh processes per command (median).")]
            = 5, out: Out = None):
    """Seconds until `import mirasc` and `mirasc --help` finish, beside importing torch (the floor
    of any call that computes)."""
    from benchmarks import startup as bench
    from benchmarks.common import environment, write_outputs

    rows = bench.benchmark(repeats)
    env = environment("cpu")
    typer.echo(bench.report(rows, repeats, env))
    write_outputs(out, "startup", rows, {"environment": env, "repeats": repeats})


@app.command()
def static(specs: Annotated[str, typer.Option(help="Specs with an fla peer.")] =
           "gated_deltanet,simple_gla",
           batch: Annotated[int, typer.Option(help="B.")] = 1,
           length: Annotated[int, typer.Option(help="T.")] = 32768,
           heads: Annotated[int, typer.Option(help="H.")] = 16,
           dim: Annotated[int, typer.Option(help="Dk = Dv.")] = 128,
           sm: Annotated[int, typer.Option(help="Compute capability of the target.")] = 90,
           configs: Annotated[int, typer.Option(help="Configurations compiled per kernel (the "
                                                      "autotuner's first).")] = 4,
           out: Out = None):
    """mirasc's kernels beside fla's for the same op and shapes, compiled for a GPU target
    without one: registers, spills, shared memory, tensor-core instructions by operand type,
    programs per launch and the instructions of each kernel's largest loop."""
    from benchmarks import static as bench
    from benchmarks.common import environment, write_outputs

    rows = bench.benchmark(_names(specs), batch, length, heads, dim, sm, configs)
    env = environment("cpu")
    shape = (batch, length, heads, dim)
    typer.echo("\n" + bench.report(rows, shape, sm, configs, env))
    write_outputs(out, "static", rows, {"environment": env, "sm": sm, "shape": shape})


if __name__ == "__main__":
    app()
