"""Decode benchmark, CPU: the O(1) step (`mirasc.decode`) against re-running the chunk op on the
inputs since the chunk boundary (the path it replaced), per token and by position in the chunk.

Per spec, a `MirasLayer` (float32, no grad) at the given hidden size and heads; per-token times
are this process's CPU time (time.process_time: other load on a shared machine disturbs it less
than the wall clock), generate's tokens/s wall clock:
- layer ms: one `layer(x_t, state)` call at each position inside a chunk (a whole chunk
  prefilled first, so position 0 starts a chunk), the least of repeats (the run other load
  disturbed least); early is the mean over positions 1 .. C/8, late over C-1-C/8 .. C-2 (for
  C = 64: 1-8 and 55-62), as the issue measured; an exact spec (chunks of one) has no position:
  its row is the median over 16 tokens;
- memory ms: the memory's share alone, the step (`layer._step`) against the op on the p + 1
  inputs since the boundary (`layer._memory`, what a cached call ran before), on random inputs;
- cache bytes: the layer's state (memory step state and convolution tails) against the
  boundary state plus the C - 1 tokens of inputs the replaced cache held at a chunk's end;
- generate: tokens/s of `MirasForCausalLM.generate` (greedy, 2 layers) with the cache and
  without (each new token runs the whole prefix again).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import SPECS, table
from mirasc.check import random_inputs
from mirasc.layers import MirasLayer
from mirasc.lm import MirasConfig, MirasForCausalLM

COLUMNS = [("spec", "spec", ""), ("chunk", "C", "d"),
           ("layer_early_ms", "layer early ms", ".2f"), ("layer_late_ms", "layer late ms", ".2f"),
           ("layer_ratio", "late/early", ".2f"),
           ("step_early_ms", "step early ms", ".2f"), ("step_late_ms", "step late ms", ".2f"),
           ("step_ratio", "step late/early", ".2f"),
           ("rerun_early_ms", "rerun early ms", ".2f"), ("rerun_late_ms", "rerun late ms", ".2f"),
           ("rerun_ratio", "rerun late/early", ".2f"),
           ("cache_kib", "cache KiB", ".0f"), ("rerun_cache_kib", "rerun cache KiB (end)", ".0f"),
           ("gen_tok_s", "generate tok/s", ".1f"), ("gen_nocache_tok_s", "no cache tok/s", ".1f")]


@dataclass
class Config:
    specs: list[str]
    hidden: int
    heads: int
    repeats: int
    threads: int
    new_tokens: int


def _ms(fn, clock=time.process_time) -> float:
    start = clock()
    fn()
    return 1e3 * (clock() - start)


def _windows(chunk: int) -> tuple[range, range]:
    """The early and late positions inside a chunk (the chunk's first and last tokens aside)."""
    n = max(1, chunk // 8)
    return range(1, 1 + n), range(max(1, chunk - 1 - n), chunk - 1)


def _summary(per_position: list[float], chunk: int, prefix: str) -> dict:
    early, late = _windows(chunk)
    e = statistics.mean(per_position[p] for p in early)
    la = statistics.mean(per_position[p] for p in late)
    return {f"{prefix}_early_ms": e, f"{prefix}_late_ms": la, f"{prefix}_ratio": la / e}


def _positions(chunk: int) -> int:
    """Tokens timed: a chunk, or 16 for an exact spec (chunks of one token)."""
    return chunk if chunk > 2 else 16


def layer_times(layer: MirasLayer, repeats: int) -> list[float]:
    """The least ms of one cached layer call at each position of a chunk, over repeats."""
    chunk, n = layer.decoder.chunk, _positions(layer.decoder.chunk)
    x = torch.randn(1, chunk + n, layer.hidden_size)
    _, prefilled = layer(x[:, :chunk], None, use_cache=True)
    runs = []
    for _ in range(repeats):
        state, times = prefilled | {"memory": prefilled["memory"].clone()}, []
        for t in range(chunk, chunk + n):
            start = time.process_time()
            _, state = layer(x[:, t:t + 1], state, use_cache=True)
            times.append(1e3 * (time.process_time() - start))
        runs.append(times)
    return [min(r[p] for r in runs) for p in range(n)]


def memory_times(layer: MirasLayer, repeats: int) -> tuple[list[float], list[float]]:
    """The least ms of the memory's work per token at each position: the step, and the op run on
    the inputs since the boundary."""
    chunk, op, n = layer.decoder.chunk, layer.op, _positions(layer.decoder.chunk)
    drawn = random_inputs(op, batch=1, length=n, heads=layer.num_heads, dk=layer.head_dim,
                          dv=layer.head_dim, dtype=torch.float32)
    inputs = {name: x for name, x in drawn.items() if name in ("q", "k", "v", *layer.gates)}
    boundary = tuple(s.to(torch.float32) for s in drawn["initial_state"])
    start = layer.decoder.start(boundary)
    steps, reruns = [], []
    for _ in range(repeats):
        state, step_run, rerun_run = start.clone(), [], []
        for p in range(n):
            token = {name: x[:, p:p + 1] for name, x in inputs.items()}
            begin = time.process_time()
            _, state = layer._step(token, state)
            step_run.append(1e3 * (time.process_time() - begin))
            first = p - p % chunk  # the boundary the replaced path re-ran from
            since = {name: x[:, first:p + 1] for name, x in inputs.items()}
            rerun_run.append(_ms(lambda since=since: layer._memory(since, boundary)))
        steps.append(step_run)
        reruns.append(rerun_run)
    least = lambda runs: [min(r[p] for r in runs) for p in range(n)]  # noqa: E731
    return least(steps), least(reruns)


def cache_bytes(layer: MirasLayer) -> tuple[int, int]:
    """The layer's cached state after a prefill ending mid-chunk, and what the replaced cache
    held at a chunk's last token: the boundary state and C - 1 tokens of q, k, v and gates."""
    chunk = layer.decoder.chunk
    x = torch.randn(1, chunk + 1, layer.hidden_size)
    _, state = layer(x, None, use_cache=True)
    conv = sum(c.numel() * c.element_size() for c in state["conv"])
    memory = state["memory"]
    boundary = 4 * sum(math.prod(s) for s in layer.op.state_shapes(1, layer.num_heads,
                                                                   layer.head_dim, layer.head_dim))
    width = 3 * layer.head_dim + sum(
        layer.head_dim if g.shape == "channel" else 1
        for n, g in layer.op.derivation.op_gates().items() if g.is_input)
    pending = (chunk - 1) * layer.num_heads * width * 4
    return memory.nbytes() + conv, boundary + pending + conv


def generate_rate(spec: str, hidden: int, heads: int, new_tokens: int) -> tuple[float, float]:
    """Tokens/s of greedy generation from a 16-token prompt, with the cache and without."""
    torch.manual_seed(0)
    model = MirasForCausalLM(MirasConfig(spec=str(SPECS / f"{spec}.yaml"), vocab_size=256,
                                         hidden_size=hidden, num_hidden_layers=2,
                                         num_heads=heads)).eval()
    prompt = torch.randint(0, 256, (1, 16))
    rates = []
    for use_cache in (True, False):
        seconds = _ms(lambda use_cache=use_cache: model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=use_cache), time.perf_counter) / 1e3
        rates.append(new_tokens / seconds)
    return rates[0], rates[1]


def benchmark(cfg: Config) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    rows = []
    with torch.no_grad():
        for spec in cfg.specs:
            torch.manual_seed(0)
            layer = MirasLayer(SPECS / f"{spec}.yaml", cfg.hidden, cfg.heads).eval()
            chunk = layer.decoder.chunk
            row = {"spec": spec, "chunk": chunk}
            if chunk > 2:
                row |= _summary(layer_times(layer, cfg.repeats), chunk, "layer")
                steps, reruns = memory_times(layer, cfg.repeats)
                row |= _summary(steps, chunk, "step") | _summary(reruns, chunk, "rerun")
            else:  # an exact spec: every token is a chunk of its own, there is no position
                steps, reruns = memory_times(layer, cfg.repeats)
                row |= {"layer_early_ms": statistics.median(layer_times(layer, cfg.repeats)),
                        "step_early_ms": statistics.median(steps),
                        "rerun_early_ms": statistics.median(reruns)}
            cache, rerun_cache = cache_bytes(layer)
            row |= {"cache_kib": cache / 1024, "rerun_cache_kib": rerun_cache / 1024}
            row["gen_tok_s"], row["gen_nocache_tok_s"] = generate_rate(spec, cfg.hidden,
                                                                       cfg.heads, cfg.new_tokens)
            rows.append(row)
    return rows


def report(cfg: Config, rows: list[dict], environment: str) -> str:
    return (f"Decoding, MirasLayer hidden {cfg.hidden}, {cfg.heads} heads, float32, batch 1, "
            f"{cfg.threads} thread(s), CPU ms, least of {cfg.repeats}; generate: 2 layers, "
            f"{cfg.new_tokens} new tokens\n{environment}\n\n{table(rows, COLUMNS)}")
