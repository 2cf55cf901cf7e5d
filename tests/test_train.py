"""examples/train_lm.py: 2-process DDP equals one process on the same global batch, checkpoints
move between 1 and 2 processes (DDP and FSDP), and a resumed run continues the same loss curve.

The one-process runs go in this process; the two-process runs under torchrun (gloo, the torch
path of the memory op, TRITON_INTERPRET unset)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles or trains in subprocesses: tens of seconds a test

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
_spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
train_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_lm)

# A hybrid: gated DeltaNet on layer 0, sliding-window attention on layer 1.
TINY = ["--hidden-size", "32", "--layers", "2", "--attention-layers", "1", "--heads", "2",
        "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--warmup", "2", "--lr", "1e-2",
        "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--backend", "torch",
        "--sample-tokens", "0"]


def one_process(out: Path, *extra: str) -> dict:
    """Train the tiny model in this process on one thread, as the script does; returns the loss
    history."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_lm.train(train_lm.parse_args([*TINY, "--out", str(out), *extra]))
    finally:
        torch.set_num_threads(threads)


def two_processes(out: Path, parallel: str, *extra: str) -> dict:
    """Train the tiny model under torchrun with 2 processes; returns the loss history."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT), *TINY,
           "--parallel", parallel, "--out", str(out), *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-12000:]
    return json.loads((out / "metrics.json").read_text())


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step_{step:06d}.pt")["model"]


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).square().sum()) for k in a)
    return math.sqrt(diff / sum(float(b[k].square().sum()) for k in a))


def assert_same_curve(a: dict, b: dict, rtol: float) -> None:
    """The same steps, and losses and gradient norms within rtol (the gradient norm catches a
    wrongly scaled gradient average, which Adam's steps do not show)."""
    for key in ("train", "valid", "grad_norm"):
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]]
        for (step, x), (_, y) in zip(a[key], b[key], strict=True):
            assert math.isfinite(x) and abs(x - y) <= rtol * abs(y), (key, step, x, y)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted one-process run: 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("single")
    return out, one_process(out)


def test_one_process_run_learns(single):
    out, history = single
    assert [s for s, _ in history["train"]] == [1, 2, 3, 4]
    assert history["valid"][-1][1] < history["valid"][0][1]
    assert (out / "loss.png").stat().st_size > 0
    model = train_lm.MirasForCausalLM.from_pretrained(out / "model")
    assert relative_difference(dict(model.state_dict()), weights(out, 4)) == 0.0
    args = train_lm.parse_args([*TINY, "--prompt", "def", "--sample-tokens", "5"])
    assert train_lm.sample(model, args).startswith("def")


def test_resume_continues_the_same_curve(single, tmp_path, capsys):
    out, history = single
    first = one_process(tmp_path, "--stop-at", "2")
    assert [s for s, _ in first["train"]] == [1, 2]
    capsys.readouterr()
    resumed = one_process(tmp_path, "--resume")
    said = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'checkpoints' / 'step_000002.pt'} at step 2 of 4" in said
    assert resumed == history
    assert relative_difference(weights(tmp_path, 4), weights(out, 4)) == 0.0


def test_ddp_two_processes_equal_one_then_resume_in_one(single, tmp_path):
    out, history = single
    ddp = two_processes(tmp_path, "ddp", "--stop-at", "2")
    # Each rank averages the loss over half the batch and DDP averages the gradients: the global
    # batch mean of one process, up to float32 rounding (sums in another order). Adam's step
    # g / (sqrt(v) + eps) passes that rounding on to weights whose gradient is near zero (a gate
    # bias that starts at 0 differs by 1e-5 of its own norm), so the bound is on the whole model.
    assert relative_difference(weights(tmp_path, 2), weights(out, 2)) <= 1e-5
    assert_same_curve(ddp, {k: [p for p in v if p[0] <= 2] for k, v in history.items()}, 1e-5)
    resumed = one_process(tmp_path, "--resume")  # 2 processes -> 1
    assert_same_curve(resumed, history, 1e-5)
    assert relative_difference(weights(tmp_path, 4), weights(out, 4)) <= 1e-5


def test_fsdp_resumes_a_one_process_checkpoint(single, tmp_path):
    out, history = single
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(out / "checkpoints" / "step_000002.pt", tmp_path / "checkpoints")
    fsdp = two_processes(tmp_path, "fsdp", "--resume")  # 1 process -> 2, sharded
    assert_same_curve(fsdp, history, 1e-5)
    assert relative_difference(weights(tmp_path, 4), weights(out, 4)) <= 1e-5


def test_resume_refuses_a_different_run(single, tmp_path):
    out, _ = single
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(SystemExit, match="hidden_size"):
        one_process(tmp_path, "--resume", "--hidden-size", "64")
