"""Memories: the chunk step of each memory kind (matrix, vector, MLP) as a graph, and its reverse
mode (`step_adjoint`)."""

from __future__ import annotations

from dataclasses import replace

from mirasc.derive import Derivation
from mirasc.graph import backward
from mirasc.memories.matrix import matrix_chunk_step
from mirasc.memories.mlp import mlp_chunk_step
from mirasc.memories.step import ChunkStep, fold_masked_operands, kept_when_empty
from mirasc.memories.taints import poisoned
from mirasc.memories.vector import vector_chunk_step
from mirasc.memories.window import PREVIOUS

__all__ = ["ChunkStep", "chunk_step", "step_adjoint"]


def chunk_step(d: Derivation) -> ChunkStep:
    """The chunk step of the spec's memory kind."""
    builders = {"matrix": matrix_chunk_step, "vector": vector_chunk_step, "mlp": mlp_chunk_step}
    step = builders[d.spec.memory.kind](d)
    step = poisoned(kept_when_empty(step) if d.spec.lag_token else step)
    step = fold_masked_operands(step)
    return replace(step, previous=tuple(f"{n}_prev" for n in PREVIOUS if f"{n}_prev" in step.graph.g))


def step_adjoint(step: ChunkStep) -> tuple[dict[str, str], tuple[str, ...], dict[str, str | None]]:
    """Reverse mode through a chunk step: the cotangent inputs d_o and d<state>_new seed o and
    every new state. Returns (seeds, wrt: q, k, v, the states, gates and params in kernel argument
    order, then the previous chunk's rows, the gradient node of each, None where it is zero)."""
    graph = step.graph
    seeds = {step.outputs["o"]: graph.input("d_o", ("T", "DV"))}
    for state in step.states:
        seeds[step.outputs[state]] = graph.input(f"d{state}_new", graph.shape(step.outputs[state]))
    wrt = ("q", "k", "v", *step.states, *step.gates, *step.params, *step.previous)
    return seeds, wrt, backward(graph, seeds, wrt)
