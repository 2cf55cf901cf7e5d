"""The kernels compiled for real GPU targets (Triton's compiler and the ptxas it ships, no GPU
needed): every shipped spec compiles for sm_90, and `mirasc resources` reports what a launch
needs against the target's limits. These run in child processes without TRITON_INTERPRET, which
would replace the compiler by the interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mirasc
from mirasc.cache import load_module
from mirasc.codegen import step_unsupported
from mirasc.derive import derive
from mirasc.resources import Usage, configs, timed

pytestmark = pytest.mark.slow  # compiles for sm_90 in subprocesses: tens of seconds a test

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))


def _kernels(spec) -> list[str]:
    """The generated module's kernels, in launch order."""
    return load_module(mirasc.load_spec(spec)).KERNELS


EVERY_SPEC = """
import json, sys
import torch, mirasc
from mirasc.resources import kernel_usage
for name in sys.argv[1:]:
    op = mirasc.compile(name if name.endswith(".yaml") else f"specs/{name}.yaml")
    for u in kernel_usage(op, 13, 13, torch.bfloat16, 90, which="first"):
        print(json.dumps({"spec": name, "kernel": u.kernel, "registers": u.registers,
                          "shared": u.shared_bytes, "limit": u.shared_limit}))
"""

STEPS = """
import json, sys
import torch, mirasc
from mirasc.resources import kernel_usage, step_launches
for name in sys.argv[1:]:
    op = mirasc.compile(f"specs/{name}.yaml")
    only = tuple(step_launches(op, 128, 128, torch.bfloat16))
    for u in kernel_usage(op, 128, 128, torch.bfloat16, 90, which="first", only=only):
        print(json.dumps({"spec": name, "kernel": u.kernel, "registers": u.registers,
                          "spill": u.spill_bytes, "fits": u.fits}))
"""

MUON_STEP = """
import json, sys
import torch, mirasc
from mirasc.resources import kernel_usage
op = mirasc.compile(sys.argv[1])
for u in kernel_usage(op, 128, 128, torch.bfloat16, 90, which="first", only=("step",)):
    print(json.dumps({"kernel": u.kernel, "shared": u.shared_bytes, "limit": u.shared_limit,
                      "fits": u.fits}))
"""

PIPELINED = """
import json, sys
import torch, mirasc
from mirasc.resources import compile_launch, launches
op = mirasc.compile("specs/ttt_mlp.yaml")
calls = launches(op, 32, 32, torch.bfloat16, torch.float32)
print(json.dumps({k: compile_launch(calls[k], 90, 4, 2).asm["ttgir"] for k in ("fwd", "bwd")}))
"""

PRECOMPILE = """
import mirasc
from mirasc.resources import precompile
if __name__ == "__main__":
    op = mirasc.compile("specs/ttt_linear.yaml")
    for job in precompile([op], [(16, 16)], capability=90, workers=2):
        print(job.kernel, job.num_warps, job.num_stages, job.error)
"""

AUTOTUNE = """
import json, torch, mirasc
from mirasc.cubin import resource_usage
from mirasc.resources import compiling_for, launches
from mirasc.cache import load_module
op = mirasc.compile("specs/ttt_linear.yaml")
module = load_module(op.spec)
for name, (_, args, kwargs) in launches(op, 16, 16, torch.bfloat16, torch.float32).items():
    tuner = module.kernel.launchers[name]
    with compiling_for(90):
        timed = tuner.warmup(*args, grid=(1,), **kwargs)
        every = [tuner.fn.warmup(*args, grid=(1,), **kwargs, **c.all_kwargs()) for c in tuner.configs]
    spills = lambda compiled: [resource_usage(c.asm["cubin"])[1] for c in compiled]
    print(json.dumps([name, spills(timed), spills(every)]))
"""


MERGES = """
import json, re, torch, triton, triton.language as tl
from mirasc.resources import compiling_for
from mirasc.triton_helpers import dot_fp32

@triton.jit
def merge(a_ptr, b_ptr, out_ptr, HALF: tl.constexpr):
    offs = tl.arange(0, 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(out_ptr + offs, dot_fp32(tl.load(a_ptr + offs), tl.load(b_ptr + offs), "tf32", HALF))

a, b, out = (torch.empty(32, 32) for _ in range(3))
kinds = {}
for name, half in (("bf16", tl.bfloat16), ("fp16", tl.float16)):
    with compiling_for(90):
        ptx = merge.warmup(a, b, out, HALF=half, grid=(1,), num_warps=4).asm["ptx"]
    mma = r"mma\\.sync\\.aligned\\.\\w+\\.row\\.col\\.f32\\.(\\w+)\\."
    kinds[name] = sorted(set(re.findall(mma, ptx)))
print(json.dumps(kinds))
"""


@pytest.fixture
def env(tmp_path) -> dict:
    """The environment of a child: compiler on, caches of its own."""
    child = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return child | {"MIRASC_CACHE_DIR": str(tmp_path / "mirasc"),
                    "TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_DEFAULT_FP_FUSION": "1"}


def _mirasc(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mirasc.cli import app; app()", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_shipped_spec_compiles_for_sm90(env, tmp_path):
    """Triton lowers each forward and backward kernel (bf16 inputs, Dk = Dv = 13) to an sm_90
    cubin: code the interpreter accepts but the GPU compiler would reject fails here. Besides the
    shipped specs (gla and kda run the products under per-channel decays: gdot, gmix, gmix_t), a
    vector memory with per-channel gates (its prefix sums run over Dk columns)."""
    channels = tmp_path / "channels.yaml"
    channels.write_text("name: channels\nmemory: {kind: vector}\nbias: {kind: l2}\n"
                        "retention: {kind: l2, decay: {shape: channel}}\n"
                        "learner: {kind: gd, eta: {shape: channel}}\nchunk_size: 16\n")
    names = [*SPECS, str(channels)]
    done = subprocess.run([sys.executable, "-c", EVERY_SPEC, *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    # every spec has its passes and output kernels; the exact path (an l2 bias on a matrix
    # memory) has stages too: its inverse reads no state; so has a product under per-channel
    # decays, computed once per chunk
    staged = {"deltanet", "gated_deltanet", "gla", "kda"}
    for s in names:
        path = s if s.endswith(".yaml") else f"specs/{s}.yaml"
        steps = [r["kernel"] for r in rows if r["spec"] == s and r["kernel"].startswith("step")]
        assert bool(steps) == (step_unsupported(derive(mirasc.load_spec(path))) is None), steps
        kernels = [r["kernel"] for r in rows if r["spec"] == s and r["kernel"] not in steps]
        assert kernels == _kernels(path), (s, kernels)
        assert {"fwd", "fwd_out", "bwd"} < set(kernels), (s, kernels)
        assert s not in staged or {"fwd_stage", "bwd_stage"} <= set(kernels), (s, kernels)
    for r in rows:  # a kernel with no reduction across warps holds no shared memory
        assert 0 < r["registers"] <= 255 and 0 <= r["shared"] <= r["limit"], r


def test_step_kernels_do_not_spill_at_head_dim_128(env):
    """The decode step of every matrix spec at Dk = Dv = 128 (bf16 inputs, float32 state), each
    variant its chunk positions take, compiles for sm_90 without spilling a register."""
    covered = ["deltanet", "gated_deltanet", "gla", "kda", "linear_attention", "simple_gla",
               "titans", "ttt_linear"]
    done = subprocess.run([sys.executable, "-c", STEPS, *covered], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["spec"] for r in rows} == set(covered), rows
    for spec in ("titans", "ttt_linear"):  # mini-batch: a chunk's first, inner and last token
        assert {r["kernel"] for r in rows if r["spec"] == spec} == {"step_1st", "step",
                                                                    "step_end"}, rows
    for r in rows:
        assert r["spill"] == 0 and r["registers"] <= 255 and r["fits"], r


def test_the_muon_step_fits_hopper_at_head_dim_128(env):
    """The decode step of the muon learner holds the whole 128 x 128 state and runs NS_k on it at
    every token: it fits sm_90's shared memory (with tf32x3 products it needed 384 KiB)."""
    spec = ("name: muon_step\nmemory: {kind: matrix}\nbias: {kind: l2}\n"
            "retention: {kind: l2, decay: {}}\nlearner: {kind: muon, eta: {}, momentum: {}}\n")
    done = subprocess.run([sys.executable, "-c", MUON_STEP, spec], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["kernel"] for r in rows] == ["step"], rows
    assert rows[0]["fits"] and 0 < rows[0]["shared"] <= rows[0]["limit"], rows


def test_value_blocks_fit_hopper_at_head_dim_128(env):
    """gated_deltanet at D=128: with its value columns in blocks, the backward's shared memory
    fits sm_90's 227 KiB (one program holding all 128 columns needed 368 KiB); so do its other
    kernels."""
    done = _mirasc(env, "resources", "specs/gated_deltanet.yaml", "--head-dim", "128", "--first")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("fwd", "bwd"))]
    assert [r[0] for r in rows] == _kernels("specs/gated_deltanet.yaml"), done.stdout
    assert [r[0] for r in rows][-2:] == ["bwd_dv", "bwd_dqk"], done.stdout
    assert all(r[-2:] == ["yes", "yes"] for r in rows), done.stdout  # fits, timed


def test_hidden_blocks_fit_hopper_at_head_dim_64(env):
    """ttt_mlp at D=64 (hidden width 256): passing over blocks of hidden units, its backward fits
    sm_90's 227 KiB (one program holding both 64x256 weights needed 361 KiB)."""
    done = _mirasc(env, "resources", "specs/ttt_mlp.yaml", "--head-dim", "64", "--first")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("fwd", "bwd"))]
    assert [r[0] for r in rows] == _kernels("specs/ttt_mlp.yaml"), done.stdout
    assert all(r[-2:] == ["yes", "yes"] for r in rows), done.stdout  # fits, timed


def _chunk_loop(ttgir: str) -> tuple[str, list[str]]:
    """The header of the loop over chunks (the one up to n_chunks) and its body's ops."""
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(r"scf\.for \S+ = \S+ to %n_chunks",
                                                                    line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" " * indent + "}"))
    return lines[start], [line.strip() for line in lines[start + 1:end]]


def test_pipelined_passes_never_prefetch_across_a_chunk_step(env):
    """ttt_mlp at D=32 with 2 stages: Triton's pipeliner prefetches each pass's state blocks
    (async copies into shared memory), but only within the step. The chunk loop carries no async
    copy into the next step, and its body ends at the barrier after which the next step reads
    the state blocks this one stored."""
    done = subprocess.run([sys.executable, "-c", PIPELINED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for kernel, ttgir in json.loads(done.stdout).items():
        header, body = _chunk_loop(ttgir)
        assert any("ttg.async_copy_global_to_local" in op for op in body), kernel
        assert "!ttg.async.token" not in header, (kernel, header)
        assert re.match(r"(ttg|gpu)\.barrier", body[-1]), (kernel, body[-3:])  # Triton 3.9, 3.6


def test_inverse_merges_take_tf32_for_bf16_and_split_halves_for_fp16(env, tmp_path):
    """dot_fp32 compiled for sm_90: with bf16 inputs a merge of the triangular inverse is one tf32
    product (the inverse is stored in bf16); with fp16 inputs it stays three fp16 products of
    split operands, since fp16 keeps as many mantissa bits as tf32 reads."""
    child = tmp_path / "merges.py"  # Triton reads a kernel's source from its file
    child.write_text(MERGES)
    done = subprocess.run([sys.executable, str(child)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"bf16": ["tf32"], "fp16": ["f16"]}


def test_precompiled_kernels_are_the_autotuners(env, tmp_path):
    """precompile compiles each kernel of ttt_linear (D=16, bf16, a float32 initial state, as the
    GPU benchmark calls it) in each autotuned configuration, in worker processes, into Triton's
    cache; the autotuner compiling every configuration of the same launch then finds all of them
    there: the cache gains no entry. It times those that spill least (`least_spilling`)."""
    done = subprocess.run([sys.executable, "-c", PRECOMPILE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")[:-1]
    kernels = {line.split()[0] for line in lines}
    assert kernels == set(_kernels("specs/ttt_linear.yaml")), lines
    tried = load_module(mirasc.load_spec("specs/ttt_linear.yaml")).CONFIGS
    assert sorted(lines) == sorted(f"{k} {w} {s} None" for k in kernels for w, s in tried[k])
    cache = tmp_path / "triton"
    entries = set(cache.iterdir())
    assert len(entries) == len(lines)
    done = subprocess.run([sys.executable, "-c", AUTOTUNE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(cache.iterdir()) == entries
    for name, kept, every in map(json.loads, done.stdout.splitlines()):  # `least_spilling`
        assert kept == [min(every)] * every.count(min(every)), (name, kept, every)


def test_a_kernel_that_does_not_fit_is_named(env, tmp_path):
    """A depth-3 MLP has a hidden-to-hidden weight, so its state cannot pass in blocks of hidden
    units: at D=64 (hidden width 256) its backward's output kernel needs more shared memory than
    sm_90's 227 KiB (260 KiB with bf16 tiles; its backward pass 374 KiB; at D=32 they fit since
    the tiles are bf16); the command says which kernel at which dims, and exits 1 (the output
    kernel alone: compiling the backward pass too doubles the test's minute)."""
    spec = tmp_path / "deep.yaml"
    spec.write_text("name: deep\nmemory: {kind: mlp, depth: 3, expansion: 4}\nbias: {kind: l2}\n"
                    "retention: {kind: none}\nlearner: {kind: gd, eta: {}}\nchunk_size: 16\n")
    done = _mirasc(env, "resources", str(spec), "--head-dim", "64", "--first",
                   "--kernels", "bwd_out")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert [line.split()[0] for line in done.stdout.splitlines()[2:]] == ["bwd_out"]
    assert re.search(r"no launch configuration of the bwd_out kernel fits sm_90", done.stderr), \
        done.stderr
    assert "Dk=64, Dv=64" in done.stderr


def test_a_kernel_walking_the_value_blocks_is_tried_in_narrow_blocks_too():
    """`resources.configs`: the dq/dk kernel of simple GLA, whose program walks the value
    blocks, is compiled (by `mirasc resources` and `precompile`, as its autotuner does) in each
    warp configuration with the whole block of D = 64 and with the blocks of 16 it takes past
    WHOLE_V; at D = 128, in blocks of 16, with the launch's block alone, as is the dv kernel,
    which runs a program per block."""
    op = mirasc.compile("specs/simple_gla.yaml")
    whole, blocked = (None, (), {"BV": 64, "BDV": 64}), (None, (), {"BV": 16, "BDV": 128})
    assert configs(op, "bwd_dqk", whole) == [(4, 1, 64), (8, 1, 64), (4, 1, 16), (8, 1, 16)]
    assert configs(op, "bwd_dqk", blocked) == [(4, 1, None), (8, 1, None)]
    assert configs(op, "bwd_dv", whole) == [(4, 1, None), (8, 1, None)]


def test_the_timed_configurations_are_those_that_fit_and_spill_least():
    """`timed` marks, per kernel, the configurations the autotuner times: of those that fit,
    the ones spilling fewest bytes (a refused one is neither)."""
    def usage(kernel, warps, spill, shared=1024, error=None):
        return Usage(kernel, warps, 1, 128, spill, shared, 232448, 0.0, error=error)

    rows = [usage("fwd", 4, 24), usage("fwd", 8, 0), usage("bwd", 4, 0, shared=300000),
            usage("bwd", 8, 16), usage("bwd_dv", 4, 8), usage("bwd_dv", 8, 8),
            usage("bwd_dqk", 4, None, None, error="ptxas fatal"), usage("bwd_dqk", 8, 320)]
    assert timed(rows) == [False, True, False, True, True, True, False, True]


def test_bad_arguments_are_refused(env):
    done = _mirasc(env, "resources", "specs/gated_deltanet.yaml", "--sm", "75")
    assert done.returncode == 2 and "--sm: allowed: 80, 86, 87, 89, 90" in done.stderr
    done = _mirasc(env, "resources", "specs/gated_deltanet.yaml", "--kernels", "fwd,out")
    assert done.returncode == 2 and "--kernels: gated_deltanet has no out; allowed: fwd_stage, fwd," \
        in done.stderr
    done = _mirasc(env | {"TRITON_INTERPRET": "1"}, "resources", "specs/gated_deltanet.yaml")
    assert done.returncode == 2 and "unset it" in done.stderr
    done = _mirasc(env, "precompile", "specs/ttt_linear.yaml", "--state", "float64")
    assert done.returncode == 2 and "--state: allowed: float32, inputs, none" in done.stderr
    done = _mirasc(env, "precompile", "specs/ttt_mlp.yaml", "--state", "none", "--sm", "90")
    assert done.returncode == 2 and "ttt_mlp: an mlp memory needs initial_state" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="precompile targets the GPU present")
def test_precompile_without_a_gpu_needs_the_target(env):
    done = _mirasc(env, "precompile", "specs/ttt_linear.yaml")
    assert done.returncode == 2 and "no GPU here" in done.stderr and "--sm" in done.stderr


def test_static_sets_mirasc_beside_fla(env, tmp_path):
    """`python -m benchmarks static` (simple_gla, B=1, T=256, H=2, D=64, first configuration):
    rows for mirasc's forward and backward kernels and for fla's, each compiled for sm_90; the
    grid is the launch's (mirasc: one program per sequence, head and block of 32 (forward) or 16
    (backward) value columns;
    fla's output kernel: one per chunk of 64 tokens and head); bf16 inputs reach the tensor cores
    as bf16, and the loop of mirasc's chunk steps is found in the SASS; the configurations
    recorded are those each autotuner holds."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "static", "--specs", "simple_gla",
                           "--length", "256", "--heads", "2", "--dim", "64", "--configs", "1",
                           "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "static.json").read_text())["rows"]
    kernels = {(r["impl"], r["pass"], r["kernel"]): r for r in rows}
    fwd, bwd = kernels["mirasc", "fwd", "simple_gla_fwd_kernel"], \
        kernels["mirasc", "bwd", "simple_gla_bwd_kernel"]
    assert fwd["programs"] == 2 * 2 and bwd["programs"] == 2 * 4
    assert kernels["fla", "fwd", "chunk_fwd_kernel_o"]["programs"] >= 4 * 2
    assert {impl for impl, _, _ in kernels} == {"mirasc", "fla"}
    for r in (fwd, bwd):
        assert r["half_share"] == 100 and "bf16" in r["tensor_core"], r
        assert r["loop"] > 64 and r["registers"] > 0 and r["tried"] == "1/4", r
    # the dq/dk kernel walks the value blocks: its autotuner also times blocks of 16 at D = 64
    assert kernels["mirasc", "bwd", "simple_gla_bwd_dqk_kernel"]["tried"] == "1/4"
    assert kernels["mirasc", "bwd", "simple_gla_bwd_dv_kernel"]["tried"] == "1/2"
