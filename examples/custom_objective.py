"""A new objective without a kernel: a Cauchy attentional bias with elastic-net retention
(examples/specs/cauchy_elastic.yaml), from its derived update rule to a trained language model.

    python examples/custom_objective.py           # about a minute on CPU

1. prints the update rule sympy derives from the spec (g = dl/dr, dg/dr for the backward, the
   retention's soft threshold);
2. compiles the spec into generated Triton forward and backward kernels (`op.backend` is
   'triton') and runs them against the torch reference, output and every input gradient (on a
   machine without a GPU, in Triton's interpreter);
3. trains a small MirasForCausalLM with that memory on multi-query associative recall (mqar.py)
   and prints the loss falling.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any generated module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mqar import Task, build_model, evaluate, train  # noqa: E402 (examples/ is the script's path)

import mirasc  # noqa: E402
from mirasc.check import compare, random_inputs  # noqa: E402
from mirasc.derive import explain  # noqa: E402

SPEC = Path(__file__).resolve().parent / "specs" / "cauchy_elastic.yaml"


def check_kernels(op: mirasc.MirasOp) -> dict[str, float]:
    """Relative errors of the op against its reference on small random float64 inputs."""
    inputs = random_inputs(op, batch=1, length=20, heads=1, dk=8, dv=8)
    return compare(op, inputs, chunk_size=op.oracle_chunk_size)


def main(argv: list[str] | None = None) -> list[float]:
    """Explain, compile and check the spec, then train on MQAR; returns the training losses."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=SPEC)
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    print(explain(mirasc.load_spec(args.spec)), end="\n\n")
    op = mirasc.compile(args.spec)
    print(f"compiled {op.spec.name}: backend {op.backend!r}")
    errors = check_kernels(op)
    print("generated op vs reference, worst relative error over o, final state and "
          f"{len(errors) - 2} gradients: {max(errors.values()):.1e}\n")

    task = Task(pairs=2, queries=2, num_keys=8, num_values=8)
    backend = "auto" if torch.cuda.is_available() else "torch"
    model = build_model(args.spec, task, hidden_size=32, layers=2, heads=2, backend=backend)
    start = time.perf_counter()
    losses = train(model, [task], args.steps, batch_size=32, lr=1e-2, desc=op.spec.name)
    window = max(1, args.steps // 8)
    for step in range(0, args.steps, window):
        chunk = losses[step:step + window]
        print(f"steps {step:>3}-{step + len(chunk) - 1:<3} loss {sum(chunk) / len(chunk):.3f}")
    accuracy = evaluate(model, task, sequences=256, seed=1)
    print(f"MQAR ({task.pairs} pairs, {task.num_values} values): held-out answer accuracy "
          f"{accuracy:.3f} after {args.steps} steps ({time.perf_counter() - start:.0f} s)")
    return losses


if __name__ == "__main__":
    main()
