"""Train a small byte-level MirasForCausalLM on the English documentation shipped with CPython
(`pydoc_data.topics`, no download), on one process or under torchrun with DDP or FSDP2.

    python examples/train_lm.py                                      # gated DeltaNet, a few minutes
    python examples/train_lm.py --spec deltanet --out runs/deltanet  # a shipped spec by name
    torchrun --nproc_per_node 2 examples/train_lm.py --parallel ddp
    torchrun --nproc_per_node 2 examples/train_lm.py --parallel fsdp --resume

The batch at step s is a function of (seed, s) alone and each rank takes its slice of it, so a run
follows the same loss curve on any number of processes, and a resumed run (model, optimizer and
step from the latest checkpoint) continues the curve it left. Checkpoints hold full, unsharded
state dicts keyed by parameter name, so they load under any `--parallel` and process count.
Writes to `--out`: checkpoints/step_NNNNNN.pt, metrics.json, loss.png and model/ (from_pretrained).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pydoc_data.topics
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from mirasc.catalog import resolve, spec_text
from mirasc.errors import SpecError
from mirasc.lm import MirasConfig, MirasForCausalLM

# Arguments that fix the loss curve: a resumed run must agree with its checkpoint on these.
RUN_ARGS = ("spec", "hidden_size", "layers", "heads", "attention_layers", "seq_len", "batch_size",
            "lr", "warmup", "steps", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", default="gated_deltanet", help="a shipped spec name or a YAML path")
    p.add_argument("--hidden-size", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=2, help="blocks")
    p.add_argument("--heads", type=int, default=4, help="memory heads per layer")
    p.add_argument("--attention-layers", type=int, nargs="*", default=[],
                   help="layer indices that use sliding-window attention instead (a hybrid)")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="global: split across processes")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine")
    p.add_argument("--steps", type=int, default=200, help="length of the run (and its schedule)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (for a job time limit); --resume continues")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations")
    p.add_argument("--eval-batches", type=int, default=4, help="batches per validation")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="none",
                   help="ddp or fsdp under torchrun")
    p.add_argument("--backend", choices=("auto", "torch"), default="auto",
                   help="the memory op's path (auto: Triton kernels on CUDA, torch on CPU)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op CPU threads (the tensors are small: 1 is usually fastest)")
    p.add_argument("--out", type=Path, default=Path("runs/train_lm"), help="output directory")
    p.add_argument("--prompt", default="The with statement", help="start of the final sample")
    p.add_argument("--sample-tokens", type=int, default=200, help="0 skips the final sample")
    args = p.parse_args(argv)
    args.stop_at = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    return args


def load_corpus(valid_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The pydoc topics as UTF-8 bytes (token ids 0..255), split into train and validation."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()
    split = int(len(data) * (1 - valid_fraction))
    return data[:split], data[split:]


def train_batch(data: torch.Tensor, step: int, args, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the global batch of step `step`: random windows drawn from (seed, step)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=gen)
    mine = starts.chunk(world)[rank]
    return torch.stack([data[s:s + args.seq_len] for s in mine.tolist()])


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay to a tenth of it at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(args) -> MirasForCausalLM:
    """The model, with the same initial weights on every rank (seeded)."""
    torch.manual_seed(args.seed)
    try:
        spec = spec_text(args.spec)[0]
    except SpecError as exc:
        raise SystemExit(f"--spec: {exc}") from None
    config = MirasConfig(spec=spec, vocab_size=256,
                         hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         num_heads=args.heads, attention_layers=args.attention_layers,
                         attention_window=args.seq_len, backend=args.backend)
    return MirasForCausalLM(config)


def setup_distributed(parallel: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when parallel; returns (rank, world size, device)."""
    cuda = torch.cuda.is_available()
    if parallel == "none":
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if "RANK" not in os.environ:
        raise SystemExit(f"--parallel {parallel} runs under torchrun (torchrun --nproc_per_node N "
                         f"examples/train_lm.py --parallel {parallel})")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with each block sharded on its own and the embedding/head at the root."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    return model


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The average of a scalar over the processes."""
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


@torch.no_grad()
def evaluate(model, valid: torch.Tensor, args, rank: int, world: int, device) -> float:
    """Mean loss on fixed validation windows, evenly spaced, split across ranks."""
    model.eval()
    count = args.eval_batches * args.batch_size
    starts = torch.linspace(0, len(valid) - args.seq_len, count).long().chunk(world)[rank]
    losses = []
    for rows in starts.split(max(1, args.batch_size // world)):
        x = torch.stack([valid[s:s + args.seq_len] for s in rows.tolist()]).to(device)
        losses.append(model(x, labels=x).loss)
    model.train()
    return mean_over_ranks(torch.stack(losses).mean(), world)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(directory: Path, model, optimizer, step: int, history: dict, args,
                    rank: int) -> None:
    """Write the full model and optimizer state (gathered on rank 0) as step_NNNNNN.pt."""
    state = {"model": get_model_state_dict(model, options=FULL),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
             "step": step, "history": history, "args": {k: getattr(args, k) for k in RUN_ARGS}}
    path = directory / f"step_{step:06d}.pt"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None."""
    paths = sorted(directory.glob("step_*.pt"))
    return paths[-1] if paths else None


def load_checkpoint(path: Path, model, optimizer, args) -> tuple[int, dict]:
    """Load a full checkpoint into this rank's (possibly wrapped) model and optimizer; returns
    (step, history). Refuses one whose run arguments differ from `args`."""
    state = torch.load(path, map_location="cpu")
    differ = {k: (v, getattr(args, k)) for k, v in state["args"].items() if getattr(args, k) != v}
    if differ:
        raise SystemExit(f"{path} was written by a different run (checkpoint, now): {differ}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    return state["step"], state["history"]


def plot(history: dict, path: Path, spec: str) -> None:
    """The train and validation loss curves of a run of `spec`, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*history["train"], strict=True), label="train")
    ax.plot(*zip(*history["valid"], strict=True), label="valid", marker="o")
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title=f"train_lm: {spec}")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def sample(model: MirasForCausalLM, args) -> str:
    """Continue `args.prompt` by `args.sample_tokens` sampled bytes."""
    model.eval()
    prompt = torch.tensor([list(args.prompt.encode())])
    torch.manual_seed(args.seed)
    out = model.generate(prompt, max_new_tokens=args.sample_tokens, do_sample=True, top_k=20,
                         pad_token_id=0)
    return bytes(out[0].tolist()).decode(errors="replace")


def train(args) -> dict:
    """Run (or resume) training; returns the history {"train" | "valid" | "grad_norm": [[step, x]]}
    (the gradient norm before clipping)."""
    rank, world, device = setup_distributed(args.parallel)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split across {world} processes")
    train_data, valid_data = load_corpus()
    model = build_model(args).to(device)
    config = model.config
    model = wrap(model, args.parallel, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    checkpoints = args.out / "checkpoints"
    step, history = 0, {"train": [], "valid": [], "grad_norm": []}
    latest = latest_checkpoint(checkpoints) if args.resume else None
    if latest is not None:
        step, history = load_checkpoint(latest, model, optimizer, args)
        if rank == 0:
            print(f"resuming from {latest} at step {step} of {args.steps}")
    elif rank == 0 and args.resume:
        print(f"no checkpoint in {checkpoints}: starting from step 0")
    if step == 0:
        history["valid"].append([0, evaluate(model, valid_data, args, rank, world, device)])
    bar = tqdm(range(step, args.stop_at), initial=step, total=args.steps, disable=rank != 0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x = train_batch(train_data, step, args, rank, world).to(device)
        loss = model(x, labels=x).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        history["train"].append([done, mean_over_ranks(loss, world)])
        history["grad_norm"].append([done, grad_norm.item()])
        bar.set_postfix(loss=f"{history['train'][-1][1]:.3f}")
        if done % args.eval_every == 0 or done == args.stop_at:
            history["valid"].append([done, evaluate(model, valid_data, args, rank, world, device)])
            if rank == 0:
                bar.write(f"step {done}: valid loss {history['valid'][-1][1]:.4f}")
        if done % args.ckpt_every == 0 or done == args.stop_at:
            save_checkpoint(checkpoints, model, optimizer, done, history, args, rank)
    full = get_model_state_dict(model, options=FULL)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(history))
        plot(history, args.out / "loss.png", resolve(config.spec).name)
        final = MirasForCausalLM(config)
        final.load_state_dict(full)
        final.save_pretrained(args.out / "model")
        if args.sample_tokens:
            print("sample:", sample(final, args), sep="\n")
    if world > 1:  # wait for rank 0's saving: a rank tearing gloo down alone may abort
        dist.barrier()
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    train(arguments)
