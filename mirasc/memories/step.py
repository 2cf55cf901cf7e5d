"""What every chunk step is made of: the `ChunkStep` record, the tiles it loads (q, k, v, the
data-dependent gates, the layer norm's parameters) and the masks it builds."""

from __future__ import annotations

import re
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


def masked_input(gr: Graph, n: str) -> str | None:
    """The input x (q, k or v) when node n is x * rowmask * colmask, x's real entries and 0 in
    its padding: a kernel loads such a tile, in the matmul operands' dtype where it is only an
    operand, rather than compute it. Else None."""
    node = gr.node(n)
    if node["op"] != "ew" or node["expr"] != sp.Mul(*node["symbols"]):
        return None
    x = next((i for i in node["inputs"] if i in ("q", "k", "v")), None)
    if x is None or gr.shape(n) != gr.shape(x):
        return None
    return x if set(node["inputs"]) == _with_masks(gr, x) else None


def _with_masks(gr: Graph, x: str) -> set[str]:
    """Input x and the masks of its rows and its columns."""
    return {x, "rowmask", MASKS[gr.shape(x)[1]]}


def _expanded(gr: Graph, n: str, depth: int = 4) -> sp.Expr:
    """Node n's expression over the nodes its elementwise inputs reach within `depth` steps
    (each of those a symbol named after it)."""
    node = gr.node(n)
    if node["op"] != "ew" or depth == 0:
        return sp.Symbol(n, real=True)
    return node["expr"].xreplace({s: _expanded(gr, i, depth - 1)
                                  for s, i in zip(node["symbols"], node["inputs"], strict=True)})


def _scaled_input(gr: Graph, n: str) -> tuple[sp.Number, str] | None:
    """(c, x) when node n computes c * x * rowmask * colmask through elementwise nodes, c a
    number and x the input q, k or v; else None."""
    c, rest = _expanded(gr, n).as_coeff_Mul()
    names = {str(s) for s in rest.free_symbols}
    x = next((x for x in ("q", "k", "v") if x in names), None)
    if x is None or gr.shape(n) != gr.shape(x) or rest != sp.Mul(*rest.free_symbols) or \
            names != _with_masks(gr, x):
        return None
    return (sp.Integer(int(c)) if float(c).is_integer() else c), x


def _masked(gr: Graph, x: str) -> str:
    """The node of input x under its masks: the graph's, or a new one."""
    name = next((n for n in gr.g if masked_input(gr, n) == x), None)
    if name is None:
        name = ew(gr, lambda a, r, m: a * r * m, x, "rowmask", MASKS[gr.shape(x)[1]],
                  name=f"{x}_masked")
        gr.node(name)["formula"] = f"{name} = {x} on the real rows and columns, else 0"
    return name


def fold_masked_operands(step: ChunkStep) -> ChunkStep:
    """Products read an input under its masks as such: where an operand of a product computes
    c * x * rowmask * colmask (linear attention's u = eta * (-v), eta = 1), the product takes
    the masked input (`masked_input`) and c moves into its readers, which are elementwise
    (W - u^T k = W + v_masked^T k). Kernels then load that operand rather than a stage storing
    it. Linear attention, bf16, D=64, sm_90: its forward stage ran 15.3 M warp-instructions
    computing and storing u, 10.1 M without."""
    gr = step.graph
    for n in list(gr.order()):
        node, readers = gr.node(n), list(gr.g.successors(n))
        if node["op"] != "dot" or n in step.outputs.values() or not readers or \
                any(gr.node(r)["op"] != "ew" for r in readers):
            continue
        scale, operands = sp.Integer(1), list(node["inputs"])
        for i, x in enumerate(operands):
            found = None if masked_input(gr, x) else _scaled_input(gr, x)
            if found is not None:
                c, leaf = found
                operands[i], scale = _masked(gr, leaf), scale * c
        if operands == list(node["inputs"]):
            continue
        for old in set(node["inputs"]) - set(operands):
            gr.g.remove_edge(old, n)
        gr.g.add_edges_from((x, n) for x in operands)
        if "formula" in node:  # the product's own statement, over its new operands
            for old, new in zip(node["inputs"], operands, strict=True):
                node["formula"] = re.sub(rf"\b{old}\b", new, node["formula"])
        node["inputs"] = tuple(operands)
        for r in readers if scale != 1 else ():
            reader = gr.node(r)
            s = reader["symbols"][reader["inputs"].index(n)]
            reader["expr"] = reader["expr"].xreplace({s: scale * s})
            reader.pop("formula", None)  # it states the product before the sign moved
    return step


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
