"""The runtime: deterministic code generation, a compile cache that is safe under concurrent
compiles, the generated op against its reference, input validation, state handling and chaining.

Every test points the compile cache at its own temporary directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_generated

import mirasc
from mirasc import reference
from mirasc.cache import CacheError, load_module, module_path, write_atomic
from mirasc.catalog import load_spec
from mirasc.check import compare, random_inputs, relative_error
from mirasc.codegen import render_module, render_reference_module, triton_unsupported
from mirasc.derive import derive
from mirasc.op import MirasOp
from mirasc.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
SPEC_NAMES = [p.stem for p in SPECS]
PYTHON = sys.executable
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(cache))
    return cache


def shipped(name: str) -> MirasOp:
    return mirasc.compile(ROOT / "specs" / f"{name}.yaml")


def op_from_yaml(text: str) -> MirasOp:
    return MirasOp(derive(parse_spec(text)))


def spec_text(memory="{kind: matrix}", bias="{kind: l2}", retention="{kind: none}",
              learner="{kind: gd, eta: {}}", chunk_size=16) -> str:
    return (f"name: inline\nmemory: {memory}\nbias: {bias}\nretention: {retention}\n"
            f"learner: {learner}\nchunk_size: {chunk_size}\n")


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


# ---- determinism of code generation -----------------------------------------------------------

RENDER_HASHES = """
import hashlib, json, sys
from mirasc.catalog import load_spec
from mirasc.codegen import render_module
print(json.dumps({p: hashlib.sha256(render_module(load_spec(p)).encode()).hexdigest()
                  for p in sys.argv[1:]}))
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.slow
def test_render_is_deterministic_in_process_and_across_processes():
    paths = [str(p) for p in SPECS]
    here = {}
    for p in paths:
        spec = load_spec(p)
        first = render_module(spec)
        assert render_module(load_spec(p)) == first, p
        here[p] = _sha(first)
    # two fresh interpreters with different hash seeds (set/dict-order nondeterminism would show)
    procs = [subprocess.Popen([PYTHON, "-c", RENDER_HASHES, *paths], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(PYTHONHASHSEED=seed))
             for seed in ("1", "12345")]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == here
    assert results[1] == here


def test_different_specs_have_different_digests_and_modules():
    specs = [load_spec(p) for p in SPECS]
    digests = {s.digest() for s in specs}
    assert len(digests) == len(SPECS)
    assert len({_sha(render_module(s)) for s in specs}) == len(SPECS)
    # one field changed: another digest, another module path, another module text
    base = load_spec(ROOT / "specs" / "moneta.yaml")
    text = (ROOT / "specs" / "moneta.yaml").read_text().replace("chunk_size: 64", "chunk_size: 32")
    changed = parse_spec(text)
    assert changed.digest() != base.digest()
    assert module_path(changed) != module_path(base)
    assert render_module(changed) != render_module(base)
    assert load_spec(ROOT / "specs" / "moneta.yaml").digest() == base.digest()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_rendered_module_is_python_with_an_op(name, _cache):
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    source = render_module(spec)
    compile(source, f"{name}.py", "exec")  # valid Python
    path = module_path(spec)
    assert path.parent == _cache and spec.digest() in path.name
    op = load_module(spec).op
    assert path.read_text() == source
    assert isinstance(op, MirasOp)
    assert op.spec == spec and op.spec.digest() == spec.digest()
    expected = "reference" if triton_unsupported(derive(spec)) else "triton"
    assert op.backend == expected


def test_compile_writes_the_rendered_module(_cache):
    op = shipped("ttt_mlp")
    spec = load_spec(ROOT / "specs" / "ttt_mlp.yaml")
    assert module_path(spec).read_text() == render_module(spec)
    assert [p.name for p in _cache.iterdir() if p.is_file()] == [module_path(spec).name]
    assert op.spec == spec


def test_cache_under_a_file_is_a_clean_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CacheError) as info:
        shipped("deltanet")
    message = str(info.value)
    assert message.startswith(f"cannot use the compile cache {blocker / 'cache'}: ")
    assert "set MIRASC_CACHE_DIR to a writable directory" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unwritable_cache_is_a_clean_error(_cache, monkeypatch):
    """Tests run as root here, so the directory's permission bits would not stop a write: the
    temporary file's creation fails as it would in a read-only directory."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CacheError) as info:
        shipped("deltanet")
    message = str(info.value)
    assert message.startswith(f"cannot use the compile cache {_cache}: Permission denied "
                              f"({_cache}{os.sep}.deltanet-")
    assert message.endswith(".tmp); set MIRASC_CACHE_DIR to a writable directory")


# ---- the compile cache under concurrency ------------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
import torch
import mirasc
from mirasc.check import random_inputs
sync, index, spec = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(sync / f"ready-{index}").touch()
deadline = time.monotonic() + 120
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.002)
op = mirasc.compile(spec)
inputs = random_inputs(op, batch=1, length=6, heads=2, dk=4, dv=4, seed=int(index))
o, final = op(**inputs, output_final_state=True)
assert o.shape == (1, 6, 2, 4) and torch.isfinite(o).all(), o
assert len(final) == 2
print("ok", op.spec.name)
"""


@pytest.mark.slow
def test_concurrent_compiles_share_one_module(tmp_path, _cache):
    sync = tmp_path / "sync"
    sync.mkdir()
    spec_path = ROOT / "specs" / "moneta.yaml"
    procs = [subprocess.Popen([PYTHON, "-c", CHILD, str(sync), str(i), str(spec_path)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(MIRASC_CACHE_DIR=str(_cache), OMP_NUM_THREADS="1"))
             for i in range(4)]
    try:
        deadline = time.monotonic() + 180
        while len(list(sync.glob("ready-*"))) < len(procs):
            dead = [p.communicate() for p in procs if p.poll() is not None]
            assert not dead, dead
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        (sync / "go").touch()  # all four compile at once
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "ok moneta" in out
    spec = load_spec(spec_path)
    files = [p for p in _cache.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files == [module_path(spec)]
    assert files[0].read_text() == render_module(spec)
    assert not [p for p in _cache.rglob("*") if p.name.endswith(".tmp")]


def test_write_atomic(tmp_path):
    target = tmp_path / "deep" / "dir" / "module.py"
    write_atomic(target, "first = 1\n")
    assert target.read_text() == "first = 1\n"
    write_atomic(target, "second = 2\n")
    assert target.read_text() == "second = 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["module.py"]
    # a failed write leaves the old file whole and no temporary file behind
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "second = 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["module.py"]


def test_write_atomic_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.py", "x = 1\n")
        os.umask(0o077)
        write_atomic(tmp_path / "private.py", "x = 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.py").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.py").stat().st_mode & 0o777 == 0o600


def test_a_module_runs_once_per_process_whatever_the_cache_dir(tmp_path, monkeypatch):
    """A module registers its custom ops under the spec's name: running it again (for a second
    cache directory) would replace the registrations the first op calls. The file is still
    verified and written in each directory."""
    spec = load_spec(ROOT / "specs" / "simple_gla.yaml")
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path / "first"))
    first = mirasc.compile(spec)
    monkeypatch.setenv("MIRASC_CACHE_DIR", str(tmp_path / "second"))
    assert mirasc.compile(spec) is first
    for folder in ("first", "second"):
        assert (tmp_path / folder / module_path(spec).name).read_text() == render_module(spec)


def test_a_copy_of_a_module_shares_the_custom_ops_of_the_first(tmp_path):
    """`mirasc compile`'s output imported beside the cached module of the same spec: torch keeps
    one registration per op name, so the copy takes the first module's ops instead of replacing
    them under the ops that call them."""
    spec = load_spec(ROOT / "specs" / "deltanet.yaml")
    cached = load_module(spec)
    copy_path = tmp_path / "deltanet_copy.py"
    copy_path.write_text(render_module(spec))
    loader = importlib.util.spec_from_file_location("deltanet_copy", copy_path)
    copy = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(copy)
    assert copy.kernel.forward is cached.kernel.forward
    assert copy.kernel.backward is cached.kernel.backward
    inputs = random_inputs(cached.op, batch=1, length=7, heads=2, dk=4, dv=4)
    for op in (cached.op, copy.op):
        errors = compare(op, inputs, chunk_size=op.oracle_chunk_size)
        assert max(errors.values()) < 1e-10, errors


def test_a_planted_bytecode_file_never_runs(tmp_path, _cache):
    """Bytecode beside a verified module, with a header that matches the module's source, is
    what Python's own loader would run; the cache runs the verified text instead (in a new
    process, as the next user of the cache would)."""
    spec = load_spec(ROOT / "specs" / "simple_gla.yaml")
    mirasc.compile(spec)
    path = module_path(spec)
    marker = tmp_path / "payload-ran"
    payload = compile(f"open({str(marker)!r}, 'w').close()\nop = None\n", str(path), "exec")
    stat = path.stat()
    pyc = Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(importlib._bootstrap_external._code_to_timestamp_pyc(
        payload, int(stat.st_mtime), stat.st_size))
    loader = importlib.util.spec_from_file_location("planted_probe", path)
    loader.loader.exec_module(importlib.util.module_from_spec(loader))
    assert marker.exists()  # the plant works: Python's loader ran it
    marker.unlink()
    child = ("import sys, mirasc; op = mirasc.compile(sys.argv[1]); "
             "print(type(op).__name__, op.spec.name)")
    run = subprocess.run([PYTHON, "-c", child, str(ROOT / "specs" / "simple_gla.yaml")],
                         capture_output=True, text=True, timeout=300,
                         env=_env(MIRASC_CACHE_DIR=str(_cache)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["MirasOp", "simple_gla"]
    assert not marker.exists()


# ---- the generated op against its reference ---------------------------------------------------


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_op_matches_reference(name):
    """Float64 at a second shape; float32 is held to the float64 reference in
    tests/test_triton_kernels.py (deep memories are too ill-conditioned for 1e-5 between two
    float32 programs)."""
    dtype = torch.float64
    op = shipped(name)
    # the op equals the token recurrence when its chunking is exact, else the chunked reference
    assert op.oracle_chunk_size == (None if op.derivation.exact else op.spec.chunk_size)
    residual = op.spec.memory.residual or op.spec.memory.kind == "vector"
    inputs = random_inputs(op, batch=2, length=20, heads=2, dk=8, dv=8 if residual else 6,
                           dtype=dtype)
    errors = compare(op, inputs, chunk_size=op.oracle_chunk_size, backward=True)
    assert {"o", "final_state[0]", "dq", "dk", "dv"} <= set(errors)
    bad = {k: e for k, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, bad
    o, final = op(**inputs, output_final_state=True)
    assert o.dtype == dtype and o.shape == inputs["v"].shape
    assert len(final) == len(op.state_names)


BIAS_CASES = ["{kind: l2}", "{kind: dot_product}", "{kind: lp, p: 3}",
              "{kind: lp, p: 1.5, smooth: false}", "{kind: huber, delta: {}}",
              "{kind: huber, variant: norm, delta: {}}",
              "{kind: huber, variant: switch, delta: {}}", "{kind: robust, delta: {}}",
              "{kind: expression, loss: 'log(cosh(r))'}",
              "{kind: expression, loss: 'r**2/2 + c*r**4', params: {c: 0.1}, "
              "norm_loss: 'delta*sqrt(1 + rnorm**2)', delta: {}}"]


@pytest.mark.parametrize("bias", BIAS_CASES)
def test_generated_bias_gradient_matches_reference(bias):
    """The reference module prints the derived gradient as torch code; it must agree with the
    sympy rule evaluated directly."""
    spec = parse_spec(spec_text(memory="{kind: mlp}", bias=bias))
    module = run_generated(render_reference_module(spec))
    d = derive(spec)
    gen = torch.Generator().manual_seed(3)
    r, v = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    delta = 0.2 + torch.rand(2, 3, 1, generator=gen, dtype=torch.float64)
    got = module.bias_grad(d, r, v, delta)
    want = reference.bias_grad(d, r, v, delta)
    assert got.shape == r.shape
    assert relative_error(got, want) <= 1e-12
    assert module.op.spec == spec


# ---- bad inputs -------------------------------------------------------------------------------

B, T, H, DK, DV = 2, 5, 2, 4, 3


def _qkv(dk=DK, dv=DV, dtype=torch.float64):
    return (torch.randn(B, T, H, dk, dtype=dtype), torch.randn(B, T, H, dk, dtype=dtype),
            torch.randn(B, T, H, dv, dtype=dtype))


def _eta():
    return torch.rand(B, T, H, dtype=torch.float64)


def _raises(exc, fn, *needles: str):
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_q_must_be_4d():
    op = shipped("deltanet")
    q, k, v = _qkv()
    _raises(ValueError, lambda: op(q[0], k, v, eta=_eta()), "deltanet", "q must be a 4-D tensor",
            "[B, T, H, D]", "[5, 2, 4]")
    _raises(ValueError, lambda: op(q.tolist(), k, v, eta=_eta()), "q is a list",
            "not a torch.Tensor", "torch.as_tensor(q)")
    _raises(ValueError, lambda: op(q, k, v[..., None], eta=_eta()), "v must be a 4-D tensor")


def test_k_q_shape_mismatch():
    op = shipped("deltanet")
    q, k, v = _qkv()
    _raises(ValueError, lambda: op(q, k[..., :3], v, eta=_eta()), "q and k must be",
            "q (2, 5, 2, 4)", "k (2, 5, 2, 3)")


def test_v_with_another_length():
    op = shipped("deltanet")
    q, k, v = _qkv()
    _raises(ValueError, lambda: op(q, k, v[:, :4], eta=_eta()), "same B, T, H", "v (2, 4, 2, 3)")


def test_integer_and_mixed_dtypes():
    op = shipped("deltanet")
    q, k, v = _qkv()
    _raises(TypeError, lambda: op(q.long(), k, v, eta=_eta()), "q has dtype torch.int64",
            "float32", "float64")
    _raises(TypeError, lambda: op(q, k, v.int(), eta=_eta()), "v has dtype torch.int32")
    _raises(TypeError, lambda: op(q, k.float(), v, eta=_eta()), "q, k, v must share dtype",
            "torch.float32")
    _raises(TypeError, lambda: op(q, k, v, eta=_eta().long()), "eta has dtype torch.int64",
            "must match q")
    _raises(TypeError, lambda: op(q, k, v, eta=_eta().to(torch.float16)), "eta has dtype",
            "must match q")
    state = (torch.zeros(B, H, DV, DK, dtype=torch.float16),)
    _raises(TypeError, lambda: op(q, k, v, eta=_eta(), initial_state=state),
            "initial_state W has dtype torch.float16")


def test_required_gate_missing():
    op = shipped("deltanet")
    _raises(ValueError, lambda: op(*_qkv()), "eta is required", "[2, 5, 2]")
    op = shipped("gated_deltanet")
    _raises(ValueError, lambda: op(*_qkv(), eta=_eta()), "log_alpha is required")


def test_gate_the_spec_does_not_take():
    _raises(ValueError, lambda: shipped("deltanet")(*_qkv(), eta=_eta(), log_alpha=-_eta()),
            "log_alpha was given", "no such gate")
    _raises(ValueError, lambda: shipped("linear_attention")(*_qkv(), eta=_eta()),
            "eta was given", "fixes it to 1")
    _raises(ValueError, lambda: shipped("titans")(*_qkv(), eta=_eta(), momentum=_eta(),
                                                  log_alpha=-_eta(), delta=_eta()),
            "delta was given", "no such gate")


def test_gate_with_wrong_shape():
    op = shipped("deltanet")
    _raises(ValueError, lambda: op(*_qkv(), eta=_eta()[..., None]), "eta must have shape [2, 5, 2]",
            "head gate", "got [2, 5, 2, 1]")
    _raises(ValueError, lambda: op(*_qkv(), eta=_eta()[:, :4]), "eta must have shape [2, 5, 2]",
            "got [2, 4, 2]")


def test_a_head_first_call_is_named_as_such():
    """q, k, v given [B, H, T, D] with the gates [B, T, H]: the error says the layout and that q
    looks head-first, instead of leading the user to transpose the gates too."""
    op = shipped("gated_deltanet")
    q, k, v = (torch.randn(B, 3, 40, 4, dtype=torch.float64) for _ in range(3))  # [B, H, T, D]
    gate = torch.rand(B, 40, 3, dtype=torch.float64)  # [B, T, H]
    message = _raises(ValueError, lambda: op(q, k, v, eta=gate, log_alpha=-gate),
                      "log_alpha must have shape [2, 3, 40] [B, T, H] (head gate)",
                      "looks head-first", "layout is [B, T, H, D]", "q.transpose(1, 2)")
    assert "got [2, 40, 3]" in message
    # the [B, T, H, D] call of the same tensors runs
    o, _ = op(*(x.transpose(1, 2) for x in (q, k, v)), eta=gate, log_alpha=-gate)
    assert o.shape == (B, 40, 3, 4)


def test_a_layout_error_without_head_first_signs_has_no_hint():
    op = shipped("deltanet")
    message = _raises(ValueError, lambda: op(*_qkv(), eta=_eta()[:, :4]), "[B, T, H]")
    assert "head-first" not in message


def test_backend_triton_on_cpu_says_why():
    _raises(ValueError, lambda: shipped("deltanet")(*_qkv(), eta=_eta(), backend="triton"),
            "backend 'triton'", "runs the Triton kernels on CUDA tensors", "on cpu tensors",
            "allowed: auto, torch")


def test_repr_names_the_spec_axes_backend_and_chunking():
    text = repr(shipped("moneta"))
    for part in ("MirasOp(moneta", "memory mlp depth 2", "bias lp", "retention lq", "learner gd",
                 "backend triton", "chunk_size 64", "mini-batch"):
        assert part in text, (part, text)
    assert "exact" in repr(shipped("gated_deltanet"))


def test_layer_norm_affine_parameters():
    """ln_weight and ln_bias [H, Dv]: both or neither (the identity), only with an affine LN."""
    op = shipped("ttt_linear")
    q, k, v = _qkv(dk=DV)
    ones, zeros = torch.ones(H, DV, dtype=torch.float64), torch.zeros(H, DV, dtype=torch.float64)
    _raises(ValueError, lambda: op(q, k, v, eta=_eta(), ln_weight=ones), "ln_bias is required",
            "give both or neither", f"[{H}, {DV}]")
    _raises(ValueError, lambda: op(q, k, v, eta=_eta(), ln_weight=ones[:, :2], ln_bias=zeros),
            f"ln_weight must have shape [{H}, {DV}] [H, Dv]", f"got [{H}, 2]")
    _raises(TypeError, lambda: op(q, k, v, eta=_eta(), ln_weight=ones, ln_bias=zeros.float()),
            "ln_bias has dtype torch.float32", "must match q")
    _raises(ValueError, lambda: shipped("ttt_mlp")(q, k, v, eta=_eta(), ln_weight=ones,
                                                   initial_state=_mlp_state()),
            "ln_weight was given", "no affine layer norm")
    eta = _eta()
    o_identity, _ = op(q, k, v, eta=eta)
    o_explicit, _ = op(q, k, v, eta=eta, ln_weight=ones, ln_bias=zeros)
    assert relative_error(o_identity, o_explicit) <= 1e-12
    o_scaled, _ = op(q, k, v, eta=eta, ln_weight=2 * ones, ln_bias=zeros)
    assert relative_error(o_scaled, o_explicit) > 1e-3


def _mlp_state():
    return tuple(torch.randn(B, H, *s, dtype=torch.float64) for s in ((4 * DV, DV), (DV, 4 * DV)))


def test_channel_gate_with_wrong_width():
    op = op_from_yaml(spec_text(retention="{kind: l2, decay: {shape: channel}}"))
    q, k, v = _qkv()
    log_alpha = -torch.rand(B, T, H, DK, dtype=torch.float64)
    o, _ = op(q, k, v, eta=_eta(), log_alpha=log_alpha)  # Dk wide: fine
    assert o.shape == v.shape
    _raises(ValueError, lambda: op(q, k, v, eta=_eta(), log_alpha=log_alpha[..., :DV]),
            "log_alpha must have shape [2, 5, 2, 4]", "channel gate", "got [2, 5, 2, 3]")
    _raises(ValueError, lambda: op(q, k, v, eta=_eta(), log_alpha=log_alpha[..., 0]),
            "log_alpha must have shape [2, 5, 2, 4]")
    # a channel-wise delta runs along the value channels: Dv wide
    op = op_from_yaml(spec_text(bias="{kind: huber, delta: {shape: channel}}"))
    delta = torch.rand(B, T, H, DK, dtype=torch.float64)
    _raises(ValueError, lambda: op(q, k, v, eta=_eta(), delta=delta),
            "delta must have shape [2, 5, 2, 3]", "got [2, 5, 2, 4]")
    o, _ = op(q, k, v, eta=_eta(), delta=delta[..., :DV])
    assert o.shape == v.shape


def test_mlp_needs_initial_state():
    op = shipped("ttt_mlp")
    _raises(ValueError, lambda: op(*_qkv(dv=DK), eta=_eta()), "ttt_mlp",
            "mlp memory needs initial_state", "W1, W2")


def test_initial_state_count_and_shapes():
    titans = shipped("titans")
    gates = {"eta": _eta(), "momentum": _eta(), "log_alpha": -_eta()}
    w = torch.zeros(B, H, DV, DK, dtype=torch.float64)
    _raises(ValueError, lambda: titans(*_qkv(), **gates, initial_state=(w,)),
            "initial_state must hold 2 tensors", "(W, S)", "got 1")
    _raises(ValueError, lambda: titans(*_qkv(), **gates, initial_state=(w, w, w)), "got 3")
    _raises(ValueError, lambda: titans(*_qkv(), **gates, initial_state=(w, w.mT)),
            "initial_state S must have shape [2, 2, 3, 4]", "got [2, 2, 4, 3]")
    deltanet = shipped("deltanet")
    _raises(ValueError, lambda: deltanet(*_qkv(), eta=_eta(), initial_state=w.mT),
            "initial_state W must have shape [2, 2, 3, 4]", "got [2, 2, 4, 3]")
    _raises(ValueError, lambda: deltanet(*_qkv(), eta=_eta(), initial_state=w[:1]),
            "initial_state W must have shape [2, 2, 3, 4]", "got [1, 2, 3, 4]")
    mlp = shipped("ttt_mlp")
    w1, w2 = torch.zeros(B, H, 4 * DK, DK), torch.zeros(B, H, DK, 4 * DK)
    _raises(ValueError, lambda: mlp(*_qkv(dv=DK), eta=_eta(), initial_state=(w2, w1)),
            "initial_state W1 must have shape [2, 2, 16, 4]")


def test_dk_must_equal_dv_for_vector_and_residual_memories():
    vector = op_from_yaml(spec_text(memory="{kind: vector}"))
    _raises(ValueError, lambda: vector(*_qkv(), eta=_eta()), "a vector memory needs Dk == Dv",
            "Dk=4, Dv=3")
    o, _ = vector(*_qkv(dv=DK), eta=_eta())
    assert o.shape == (B, T, H, DK)
    residual = shipped("ttt_linear")
    _raises(ValueError, lambda: residual(*_qkv(), eta=_eta()), "memory.residual needs Dk == Dv",
            "Dk=4, Dv=3")
    _raises(ValueError, lambda: op_from_yaml(spec_text(memory="{kind: matrix, residual: true}"))(
        *_qkv(), eta=_eta()), "memory.residual needs Dk == Dv")


# ---- state handling ----------------------------------------------------------------------------


def test_output_final_state_false_gives_none():
    op = shipped("simple_gla")
    inputs = random_inputs(op, batch=1, length=7, heads=2, dk=5, dv=4)
    o, state = op(**inputs)
    assert state is None
    o2, state = op(**inputs, output_final_state=False)
    assert state is None and torch.equal(o, o2)
    o3, state = op(**inputs, output_final_state=True)
    assert torch.equal(o, o3) and len(state) == 1 and state[0].shape == (1, 2, 4, 5)
    ro, rstate = op.reference(**inputs)
    assert rstate is None and relative_error(o, ro) <= 1e-10
    _, rstate = op.reference(**inputs, output_final_state=True)
    assert relative_error(state[0], rstate[0]) <= 1e-10


@pytest.mark.parametrize("flag", ["no", 0, 1, None, torch.tensor(True)])
def test_output_final_state_must_be_a_bool(flag):
    """A string such as "no" is truthy: every non-bool is refused, by the op and the reference."""
    op = shipped("simple_gla")
    inputs = random_inputs(op, batch=1, length=3, heads=2, dk=4, dv=4)
    for run in (op, op.reference):
        with pytest.raises(TypeError, match=r"simple_gla: output_final_state must be True or "
                                            rf"False, got {re.escape(repr(flag))}"):
            run(**inputs, output_final_state=flag)


def test_single_tensor_initial_state():
    op = shipped("simple_gla")
    inputs = random_inputs(op, batch=2, length=6, heads=2, dk=5, dv=4)
    (w,) = inputs.pop("initial_state")
    o_tuple, s_tuple = op(**inputs, initial_state=(w,), output_final_state=True)
    o_tensor, s_tensor = op(**inputs, initial_state=w, output_final_state=True)
    assert torch.equal(o_tuple, o_tensor) and torch.equal(s_tuple[0], s_tensor[0])
    o_ref, s_ref = op.reference(**inputs, initial_state=w, output_final_state=True)
    assert relative_error(o_tensor, o_ref) <= 1e-10
    o_zero, _ = op(**inputs, initial_state=torch.zeros_like(w))
    assert relative_error(o_zero, o_tensor) > 1e-3  # the state was used, not ignored
    o_none, _ = op(**inputs)
    assert relative_error(o_zero, o_none) <= 1e-12  # no state means zeros


def test_state_names():
    assert shipped("deltanet").state_names == ("W",)
    assert shipped("ttt_mlp").state_names == ("W1", "W2")
    assert shipped("titans").state_names == ("W", "S")
    assert op_from_yaml(spec_text(memory="{kind: vector}")).state_names == ("W",)
    mlp3 = op_from_yaml(spec_text(memory="{kind: mlp, depth: 3, expansion: 2}"))
    assert mlp3.state_names == ("W1", "W2", "W3")
    assert mlp3.state_shapes(1, 2, 4, 4) == [(1, 2, 8, 4), (1, 2, 8, 8), (1, 2, 4, 8)]
    momentum = op_from_yaml(spec_text(memory="{kind: mlp}",
                                      learner="{kind: momentum, eta: {}, momentum: {}}"))
    assert momentum.state_names == ("W1", "W2", "S1", "S2")
    assert len(momentum.state_shapes(1, 2, 4, 4)) == 4
    assert shipped("ttt_linear").state_names == ("W", "b")
    assert shipped("ttt_linear").state_shapes(1, 2, 4, 4) == [(1, 2, 4, 4), (1, 2, 4)]
    biased = op_from_yaml(spec_text(memory="{kind: mlp, bias: true, expansion: 2}",
                                    learner="{kind: momentum, eta: {}, momentum: {}}"))
    assert biased.state_names == ("W1", "W2", "b1", "b2", "S1", "S2", "Sb1", "Sb2")
    assert biased.state_shapes(1, 2, 4, 3)[2:4] == [(1, 2, 8), (1, 2, 3)]


# ---- chaining: one call equals two calls with the state carried over -------------------------


def _split(inputs: dict, at: int):
    """The inputs of the first `at` tokens, and a function giving the rest with a given state."""
    head = {k: (v[:, :at] if k != "initial_state" else v) for k, v in inputs.items()}

    def tail(state):
        rest = {k: v[:, at:] for k, v in inputs.items() if k != "initial_state"}
        return rest | {"initial_state": state}

    return head, tail


def _chain(run, inputs, at):
    o_all, s_all = run(**inputs, output_final_state=True)
    head, tail = _split(inputs, at)
    o1, s1 = run(**head, output_final_state=True)
    o2, s2 = run(**tail(s1), output_final_state=True)
    errors = {"o": relative_error(torch.cat([o1, o2], 1), o_all)}
    errors |= {f"state[{i}]": relative_error(a, b) for i, (a, b) in enumerate(zip(s2, s_all,
                                                                                strict=True))}
    return errors


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "titans", "memora", "moneta", "yaad"])
def test_reference_chains_through_the_final_state(name):
    op = shipped(name)
    residual = op.spec.memory.residual
    inputs = random_inputs(op, batch=2, length=12, heads=2, dk=6, dv=6 if residual else 5)
    errors = _chain(lambda **kw: op.reference(**kw, chunk_size=None), inputs, 5)
    assert len(errors) == 1 + len(op.state_names)
    bad = {k: e for k, e in errors.items() if not e <= 1e-12}
    assert not bad, bad


@pytest.mark.parametrize("name", ["linear_attention", "simple_gla", "deltanet", "gated_deltanet"])
def test_exact_ops_chain_through_the_final_state(name):
    """An exact op's chunking is invisible, so splitting mid-chunk changes nothing."""
    op = shipped(name)
    assert op.derivation.exact
    inputs = random_inputs(op, batch=1, length=20, heads=2, dk=6, dv=5)
    errors = _chain(op, inputs, 7)
    bad = {k: e for k, e in errors.items() if not e <= 1e-10}
    assert not bad, bad


@pytest.mark.parametrize("render", [render_module, render_reference_module])
def test_importing_a_module_derives_nothing(render, tmp_path, monkeypatch):
    """A generated module (with kernels, or the reference's) holds its spec, tables and code:
    importing it neither validates nor derives the spec; its op does, on first use."""
    import mirasc.op

    derived = []
    monkeypatch.setattr(mirasc.op, "derive", lambda spec: derived.append(spec) or derive(spec))
    path = tmp_path / "deltanet_module.py"
    path.write_text(render(load_spec(ROOT / "specs" / "deltanet.yaml")))
    loader = importlib.util.spec_from_file_location("deltanet_module", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    assert derived == []
    assert module.op.spec.name == "deltanet" and len(derived) == 1
    assert module.op is module.op and len(derived) == 1
    with pytest.raises(AttributeError, match="no attribute 'opp'"):
        module.opp  # noqa: B018 - the attribute access is the test
