"""Multi-query associative recall (MQAR, as in Zoology and Based): compare memory specs at equal
model size on a synthetic recall task, generated on the fly (no download).

A sequence lists `pairs` key-value pairs, then asks `queries` of the keys again, each followed by
its value: `k1 v1 k2 v2 ... kN vN  ka va kb vb ...`. The model is scored only on the values after
the queried keys (the answer positions). Keys and values have separate ranges of the vocabulary;
the keys of one sequence are distinct, its values drawn with replacement.

    python examples/mqar.py          # six specs, 4 pairs: about 2 minutes (1 thread, 2-core sandbox)
    python examples/mqar.py --quick  # the three matrix-memory specs, under a minute
    python examples/mqar.py --atlas  # gated DeltaNet, Titans, omega and Atlas: about 11 minutes
    python examples/mqar.py --specs gated_deltanet specs/yaad.yaml --pairs 4 8 --eval-pairs 4 8 16

Each spec trains a fresh MirasForCausalLM (same hidden size, layers and heads) for `--steps` steps
on sequences of `--pairs` pairs (several: each batch draws one), then is scored on held-out
sequences (another seed) of each of `--eval-pairs` pairs. Prints a table and writes
`--out`/mqar.png (accuracy against the number of pairs, and the loss curves) and `--out`/mqar.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mirasc.lm import MirasConfig, MirasForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("linear_attention", "gated_deltanet", "moneta", "yaad", "memora",
         "examples/specs/cauchy_elastic.yaml")
QUICK_SPECS = ("linear_attention", "gated_deltanet", "examples/specs/cauchy_elastic.yaml")
# Atlas's Omega rule beside the delta rule and Titans; atlas_muon has no kernels (muon): it runs
# the reference's chunked recurrence, token by token inside each chunk, on the CPU and on a GPU
ATLAS_SPECS = ("gated_deltanet", "titans", "omega", "examples/specs/atlas_muon.yaml")
IGNORE = -100


@dataclass(frozen=True)
class Task:
    """An MQAR difficulty: tokens [0, num_keys) are keys, [num_keys, num_keys + num_values) values."""

    pairs: int
    queries: int
    num_keys: int = 16
    num_values: int = 16

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def length(self) -> int:
        return 2 * (self.pairs + self.queries)


def mqar_batch(task: Task, batch: int, generator: torch.Generator):
    """(input_ids, labels) [batch, length]; labels hold the answer values and -100 elsewhere."""
    if not 1 <= task.queries <= task.pairs <= task.num_keys:
        raise ValueError(f"need 1 <= queries <= pairs <= num_keys, got {task}")
    keys = torch.rand(batch, task.num_keys, generator=generator).argsort(-1)[:, :task.pairs]
    values = task.num_keys + torch.randint(task.num_values, (batch, task.pairs), generator=generator)
    asked = torch.rand(batch, task.pairs, generator=generator).argsort(-1)[:, :task.queries]
    context = torch.stack([keys, values], -1).flatten(1)
    questions = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).flatten(1)
    input_ids = torch.cat([context, questions], 1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, 2 * task.pairs + 1::2] = input_ids[:, 2 * task.pairs + 1::2]
    return input_ids, labels


def spec_path(name: str) -> Path:
    """A shipped spec by name (specs/NAME.yaml), or a YAML path relative to the repository."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() or path.exists() else ROOT / path
    return ROOT / "specs" / f"{name}.yaml"


def build_model(spec: str | Path, task: Task, hidden_size: int = 32, layers: int = 2,
                heads: int = 2, backend: str = "torch", seed: int = 0) -> MirasForCausalLM:
    """A fresh MirasForCausalLM for `task` with the memory `spec` (a path or YAML text)."""
    torch.manual_seed(seed)
    config = MirasConfig(spec=str(spec), vocab_size=task.vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=layers, num_heads=heads, backend=backend)
    return MirasForCausalLM(config)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer positions whose value the model predicts (argmax) from the token before."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = target != IGNORE
    return float((predicted[scored] == target[scored]).float().mean())


def train(model: MirasForCausalLM, tasks: list[Task], steps: int, batch_size: int, lr: float,
          seed: int = 0, desc: str = "") -> list[float]:
    """AdamW with linear warmup (10% of the steps) and cosine decay, each batch from a task drawn
    uniformly from `tasks`; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        task = tasks[int(torch.randint(len(tasks), (), generator=generator))]
        input_ids, labels = mqar_batch(task, batch_size, generator)
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: MirasForCausalLM, task: Task, sequences: int, seed: int) -> float:
    """Answer accuracy on `sequences` held-out sequences drawn from the generator `seed`."""
    model.eval()
    input_ids, labels = mqar_batch(task, sequences, torch.Generator().manual_seed(seed))
    return answer_accuracy(model(input_ids).logits, labels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--specs", nargs="+", default=list(SPECS),
                        help="shipped spec names or YAML paths")
    chosen.add_argument("--atlas", action="store_true",
                        help="the Omega rule's comparison: " + ", ".join(ATLAS_SPECS))
    p.add_argument("--pairs", type=int, nargs="+", default=[4],
                   help="key-value pairs per training sequence (every key is queried); with "
                   "several, each batch draws one of them")
    p.add_argument("--eval-pairs", type=int, nargs="+", default=[2, 4, 8],
                   help="difficulties to evaluate at (pairs per held-out sequence)")
    p.add_argument("--keys", type=int, default=16,
                   help="key tokens (the vocabulary has as many value tokens)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eval-sequences", type=int, default=256, help="per difficulty")
    p.add_argument("--backend", choices=("torch", "auto"), default="auto",
                   help="the memory op's path (auto: Triton kernels on CUDA)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op CPU threads (the tensors are small: 1 is usually fastest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="under a minute: the matrix-memory specs only")
    p.add_argument("--out", type=Path, default=Path("runs/mqar"))
    args = p.parse_args(argv)
    if args.atlas:
        args.specs = list(ATLAS_SPECS)
    if args.quick:
        args.specs = [s for s in args.specs if s in QUICK_SPECS]
    return args


def plot(results: list[dict], eval_pairs: list[int], chance: float, path: Path) -> None:
    """Held-out accuracy against the number of pairs (left) and the training loss curves (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        line, = left.plot(eval_pairs, [r["accuracy"][n] for n in eval_pairs], "o-",
                          label=r["spec"])
        losses = r["losses"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / min(10, i + 1) for i in range(len(losses))]
        right.plot(smooth, color=line.get_color(), label=r["spec"])
    left.axhline(chance, color="gray", ls=":")
    left.annotate("chance", (eval_pairs[0], chance), textcoords="offset points", xytext=(2, -10),
                  color="gray", fontsize=8)
    left.set(xlabel="key-value pairs (held-out)", ylabel="answer accuracy", ylim=(0, 1.02),
             xticks=eval_pairs, title="MQAR accuracy")
    right.set(xlabel="step", ylabel="answer loss (10-step mean)", title="training loss")
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """Train and evaluate every spec; print the table, write the plot and the numbers."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [Task(n, n, args.keys, args.keys) for n in args.pairs]
    results = []
    for name in args.specs:
        spec = spec_path(name)
        start = time.perf_counter()
        model = build_model(spec, tasks[0], args.hidden_size, args.layers, args.heads, args.backend,
                            args.seed)
        losses = train(model, tasks, args.steps, args.batch_size, args.lr, args.seed,
                       desc=spec.stem)
        seconds = time.perf_counter() - start
        accuracy = {n: evaluate(model, Task(n, n, args.keys, args.keys), args.eval_sequences,
                                seed=args.seed + 1) for n in args.eval_pairs}
        results.append({"spec": spec.stem, "params": sum(p.numel() for p in model.parameters()),
                        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                        "accuracy": accuracy, "seconds": seconds, "losses": losses})
        tqdm.write(f"{spec.stem}: loss {results[-1]['final_loss']:.3f}, accuracy "
                   + ", ".join(f"{a:.3f} at {n} pairs" for n, a in accuracy.items())
                   + f" ({seconds:.0f} s)")
    print(f"\nMQAR: trained on {' or '.join(map(str, args.pairs))} pairs, {args.steps} steps x "
          f"{args.batch_size} sequences, lr {args.lr}; hidden {args.hidden_size}, {args.layers} "
          f"layers, {args.heads} heads; {args.keys} keys + {args.keys} values (chance "
          f"{1 / args.keys:.3f}); accuracy on {args.eval_sequences} held-out sequences per "
          "difficulty\n")
    print("| spec | params | final loss | " + " | ".join(f"acc. {n} pairs" for n in args.eval_pairs)
          + " | train s |")
    print("|---|---:|---:|" + "---:|" * len(args.eval_pairs) + "---:|")
    for r in results:
        print(f"| {r['spec']} | {r['params']:,} | {r['final_loss']:.3f} | "
              + " | ".join(f"{r['accuracy'][n]:.3f}" for n in args.eval_pairs)
              + f" | {r['seconds']:.0f} |")
    plot(results, args.eval_pairs, 1 / args.keys, args.out / "mqar.png")
    (args.out / "mqar.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    print(f"\nwrote {args.out / 'mqar.png'} and {args.out / 'mqar.json'}")
    return results


if __name__ == "__main__":
    main()
