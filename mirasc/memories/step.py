"""What every chunk step is made of: the `ChunkStep` record, the tiles it loads (q, k, v, the
data-dependent gates, the layer norm's parameters) and the masks it builds."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, ew


@dataclass(frozen=True)
class ChunkStep:
    """The forward graph of one chunk and the names of its inputs and outputs."""

    graph: Graph
    gates: tuple[str, ...]       # the data-dependent gates, in kernel argument order
    states: tuple[str, ...]      # the carried state tiles ("W", "b" for a bias, "S" for momentum)
    outputs: dict[str, str]      # "o" and each state -> the node computing it at the chunk end
    params: tuple[str, ...] = ()  # per-head inputs [1, DV] (the layer norm's affine)
    previous: tuple[str, ...] = ()  # tiles of the previous chunk's rows (k_prev, ..: a window)


def chunk_inputs(gr: Graph, d: Derivation, key_dim: str) -> tuple[list[str], str]:
    """The loaded tiles every chunk step starts from: q, k [T, key_dim], v [T, DV], the masks,
    and the data-dependent gates (returned in kernel argument order, with the row mask)."""
    gates = d.op_gates()
    for name in ("q", "k"):
        gr.input(name, ("T", key_dim))
    gr.input("v", ("T", "DV"))
    gr.const("causal", ("T", "T"), "causal")
    dim_mask(gr, "DV")  # the padding of DV up to a power of two
    data_gates = [a for a in ("log_alpha", "eta", "delta", "momentum", "window_weight")
                  if gates.get(a) is not None and gates[a].is_input]
    for arg in data_gates:
        width = {"delta": "DV"}.get(arg, key_dim) if gates[arg].shape == "channel" else 1
        gr.input(arg, ("T", width))
    norm = d.spec.memory.norm
    if norm is not None and norm.affine:
        gr.input("ln_weight", (1, "DV"))
        gr.input("ln_bias", (1, "DV"))
    return data_gates, gr.const("rowmask", ("T", 1), "rowmask")


def param_inputs(gr: Graph) -> tuple[str, ...]:
    """The per-head parameter inputs present in the graph, in kernel argument order."""
    return tuple(p for p in ("ln_weight", "ln_bias") if p in gr.g)


MASKS = {"DK": "kmask", "DV": "vmask", "DH": "hmask"}


def dim_mask(gr: Graph, dim: str) -> str:
    """The [1, dim] tile of ones over a dimension's real (unpadded) entries."""
    name = MASKS[dim]
    return name if name in gr.g else gr.const(name, (1, dim), name)


def strict_mask(gr: Graph) -> str:
    """The [T, T] mask of the pairs t > i (one const node per graph)."""
    return "strict" if "strict" in gr.g else gr.const("strict", ("T", "T"), "strict")


def lastrow_mask(gr: Graph) -> str:
    """The [T, 1] mask of the chunk's last real row (one const node per graph)."""
    return "lastrow" if "lastrow" in gr.g else gr.const("lastrow", ("T", 1), "lastrow")


def last_row_reads(gr: Graph, o: str, o_end: str, name: str = "o_rows") -> str:
    """The rows' outputs o, but the chunk's last real row reads o_end (the chunk-end state)."""
    return ew(gr, lambda a, b, m: a * (1 - m) + b * m, o, o_end, lastrow_mask(gr), name=name,
              formula=f"{name} = {o}, but {o_end} on the last real row")


def kept_when_empty(step: ChunkStep) -> ChunkStep:
    """With a lag token, a chunk of one token leaves its second segment without rows. That step
    must keep the states, but a proximal retention's map (a soft threshold, a softmax) would
    apply once more: every new state is the old one where the step has no rows."""
    gr = step.graph
    rows = gr.sum("rowmask", 0, name="n_rows", formula="n_rows = sum_t rowmask_t")
    kept = {s: ew(gr, lambda n, new, old: sp.Piecewise((new, n > 0), (old, True)), rows,
                  step.outputs[s], s, name=f"{s}_kept",
                  formula=f"{s}_kept = {step.outputs[s]} if n_rows > 0 else {s}")
            for s in step.states}
    return ChunkStep(gr, step.gates, step.states, step.outputs | kept, step.params)
