"""Code generation: render a spec's derivation into the source of its Python module.

The same spec always renders the same bytes (sorted literals, deterministic printing)."""

from __future__ import annotations

import pprint
import re
from importlib import resources
from pathlib import Path

import jinja2
import sympy as sp

import mirasc
from mirasc import tuning
from mirasc.derive import DELTA, RNORM, RNORM_EPS, R, V, derive
from mirasc.expr import torch_source
from mirasc.graph import plan
from mirasc.memories import chunk_step, step_adjoint
from mirasc.schedule.streams import separable, stream
from mirasc.spec import Spec

_NAMES = {R: "r", V: "v", RNORM: "rnorm", DELTA: "delta"}


def _templates():
    """templates/ ships inside the wheel as mirasc.templates; in a source tree imported directly
    (a script run from the repository root) it is the folder beside mirasc/."""
    try:
        return resources.files("mirasc.templates")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"


def _environment() -> jinja2.Environment:
    templates = _templates()
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: templates.joinpath(name).read_text()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_module(spec: Spec) -> str:
    """The Python source of the module that `mirasc compile` writes for `spec`: Triton kernels
    where the backend supports the spec, else the reference module."""
    if triton_unsupported(derive(spec)) is None:
        return render_triton_module(spec)
    return render_reference_module(spec)


def render_reference_module(spec: Spec) -> str:
    """The module whose op runs the chunked recurrence in torch with the derived bias gradient."""
    d = derive(spec)
    template = _environment().get_template("reference_module.py.j2")
    return template.render(
        name=spec.name,
        digest=spec.digest(),
        version=mirasc.__version__,
        spec_data=pprint.pformat(spec.model_dump(mode="json"), width=96, sort_dicts=True),
        elem=torch_source(d.bias.elem, _NAMES),
        norm=torch_source(d.bias.norm, _NAMES),
        elem_text=sp.sstr(d.bias.elem),
        norm_text=sp.sstr(d.bias.norm),
        rnorm_eps=repr(RNORM_EPS),
    )


# ---- sympy -> Triton ------------------------------------------------------------------------------


class CodegenError(ValueError):
    """A derived expression or spec feature that the Triton backend cannot emit."""


KERNEL_CONSTANTS = {"DV": "DV", "DK": "DK"}  # symbols the kernels know as constexprs
TRITON_FUNCTIONS = {sp.exp: "tl.exp", sp.log: "tl.log", sp.Abs: "tl.abs", sp.erf: "tl.erf",
                    sp.tanh: "tanh", sp.atan: "atan"}  # mirasc.triton_helpers


def triton_source(expr: sp.Expr, names) -> str:
    """Print a sympy expression as Triton code over tiles named by `names`."""

    def show(e) -> str:
        if e.is_Symbol:
            return names[e] if e in names else KERNEL_CONSTANTS[e.name]
        if e.is_number:  # constant subexpressions (sqrt(2), pi/2, ...) are folded in float64
            return repr(float(e))
        if isinstance(e, sp.Add | sp.Mul):
            return "(" + (" + " if isinstance(e, sp.Add) else " * ").join(map(show, e.args)) + ")"
        if isinstance(e, sp.Pow):
            return _pow(show(e.args[0]), e.args[1])
        if type(e) in TRITON_FUNCTIONS:
            return f"{TRITON_FUNCTIONS[type(e)]}({show(e.args[0])})"
        if isinstance(e, sp.sinh | sp.cosh):
            x = show(e.args[0])
            return f"((tl.exp({x}) {'-' if isinstance(e, sp.sinh) else '+'} tl.exp(-{x})) * 0.5)"
        if isinstance(e, sp.sign):
            x = show(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sp.Heaviside):
            return f"tl.where({show(e.args[0])} > 0, 1.0, 0.0)"
        if isinstance(e, sp.Rel):
            return f"({show(e.lhs)} {e.rel_op} {show(e.rhs)})"
        if isinstance(e, sp.And | sp.Or):
            return "(" + (" & " if isinstance(e, sp.And) else " | ").join(map(show, e.args)) + ")"
        if isinstance(e, sp.Piecewise):
            *branches, (out, _) = e.args
            out = show(out)
            for value, cond in reversed(branches):
                out = f"tl.where({show(cond)}, {show(value)}, {out})"
            return out
        raise CodegenError(f"{e.func.__name__} has no Triton form")

    return show(expr)


def _pow(base: str, exponent: sp.Expr) -> str:
    if exponent.is_Integer and 0 < abs(int(exponent)) <= 4:
        product = " * ".join([base] * abs(int(exponent)))
        return f"({product})" if exponent > 0 else f"(1.0 / ({product}))"
    if exponent == sp.Rational(1, 2):
        return f"tl.sqrt({base})"
    if exponent == -sp.Rational(1, 2):
        return f"(1.0 / tl.sqrt({base}))"
    return f"tl.exp({float(exponent)!r} * tl.log({base}))"  # a positive base (smoothed norms)


# ---- the Triton module of a matrix memory -----------------------------------------------------------

_INDENT = " " * 12  # the chunk-step body sits inside the chunk and segment loops
_DIMS = {"T": "BT", "DK": "BK", "DV": "BV", "DH": "BH", 1: "1"}
_PROLOGUE = """\
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        first_chunk = tl.load(chunk_ptr + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        first_chunk = i_n.to(tl.int64) * tl.cdiv(T, CHUNK)
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    i_v = tl.program_id(2)  # the block of DV columns (0 unless SPLIT_V)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_h = tl.arange(0, BH)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_h = offs_h < DH
    causal = tl.where(offs_t[:, None] >= offs_t[None, :], 1.0, 0.0).to(ACC)
    strict = tl.where(offs_t[:, None] > offs_t[None, :], 1.0, 0.0).to(ACC)
    strict2 = tl.where(offs_t[:, None] > offs_t[None, :] + 1, 1.0, 0.0).to(ACC)
    vmask = tl.where(mask_v, 1.0, 0.0).to(ACC)[None, :]
    kmask = tl.where(mask_k, 1.0, 0.0).to(ACC)[None, :]
    hmask = tl.where(mask_h, 1.0, 0.0).to(ACC)[None, :]"""


HELPERS = ("atan", "dot_fp32", "gdot", "gmix", "gmix_t", "load_rows", "store_sum", "tanh", "tri_inv")
# the functions of mirasc.triton_helpers that kernel bodies call


def triton_unsupported(d) -> str | None:
    """Why the Triton backend cannot compile this spec yet (None when it can)."""
    spec = d.spec
    mem, ret = spec.memory, spec.retention
    reasons = [
        (mem.kind == "mlp" and spec.learner.grad_at == "retained" and "log_alpha" in d.op_gates(),
         "grad_at 'retained' with a decaying mlp memory (the gradient point differs per row)"),
        (not d.retention.linear and spec.learner.grad_at == "retained",
         "grad_at 'retained' with a nonlinear retention (the gradient point differs per row)"),
        (ret.kind == "lq" and not float(ret.q).is_integer(), "retention.q: only integer q"),
        (spec.learner.kind == "momentum" and any(
            g.shape == "channel" for f, g in spec.gates().items() if f != "bias.delta"),
         "channel-wise gates with the momentum learner"),
        (mem.bias and mem.kind != "matrix", f"memory.bias on a {mem.kind} memory (kernels carry "
                                            "the bias of a matrix memory only)"),
        (mem.bias and spec.learner.kind == "momentum", "memory.bias with the momentum learner"),
        (mem.kind == "matrix" and spec.learner.kind == "gd" and spec.learner.eta_at == "query"
         and spec.learner.eta.shape == "channel",
         "learner.eta_at 'query' with a channel-wise eta on a matrix memory"),
    ]
    why = [text for failed, text in reasons if failed]
    for expr in (d.bias.elem, d.bias.norm, d.retention.elementwise):
        try:
            if expr is not None:
                triton_source(expr, {s: s.name for s in expr.free_symbols})
        except CodegenError as exc:
            why.append(str(exc))
    return "; ".join(why) if why else None


_FORMATS = {  # the Triton code of the one-input ops: {0} is the input, {axis} the node's axis
    "sum": "tl.sum({0}, {axis}, keep_dims=True)",
    "max": "tl.max({0}, {axis}, keep_dims=True)",
    "trans": "tl.trans({0})",
    "tri_inv": "tri_inv({0}, BT, PRECISION, DOT)",
    "nonfinite": 'tl.sum(tl.sum(tl.where(tl.abs({0}) < float("inf"), 0.0, 1.0), 1, keep_dims=True), 0, '
                 'keep_dims=True)',
}


def _prefix_sum(x: str, width, reverse: bool) -> str:
    """The inclusive prefix sum over the rows of a [BT, width] tile (from the last row with
    `reverse`): one column as a 1-D scan, more as a product with the causal mask. Not tl.cumsum
    on the tile: Triton 3.6 fails to lower that scan in these kernels' layouts."""
    if width == 1:
        flag = ", reverse=True" if reverse else ""
        return f"tl.reshape(tl.cumsum(tl.reshape({x}, [BT]), 0{flag}), [BT, 1])"
    mask = "tl.trans(causal)" if reverse else "causal"
    return f'tl.dot({mask}, {x}, input_precision="ieee")'


def _expression(graph, n) -> str:
    """The Triton expression of node n over its inputs (tiles named as the nodes)."""
    node = graph.node(n)
    x = list(node["inputs"])
    op = node["op"]
    if op == "dot":
        a = f"tl.trans({x[0]})" if node["ta"] else x[0]
        b = f"tl.trans({x[1]})" if node["tb"] else x[1]
        return f"tl.dot({a}.to(DOT), {b}.to(DOT), input_precision=PRECISION)"
    if op == "ew":
        return triton_source(node["expr"], dict(zip(node["symbols"], x, strict=True)))
    if op in ("cumsum", "revcumsum"):
        return _prefix_sum(x[0], graph.shape(x[0])[1], reverse=op == "revcumsum")
    if op in ("gdot", "gmix"):
        helper = "gmix_t" if node.get("ta") else op
        return f"{helper}({', '.join(x)}, BT, {node['offset']})"
    if op in _FORMATS:
        return _FORMATS[op].format(*x, axis=node.get("axis"))
    return f"tl.broadcast_to({x[0]}, ({', '.join(_DIMS[s] for s in node['shape'])}))"


def _emit(graph, nodes, indent=_INDENT, staged=(), stored=()) -> list[str]:
    """Triton statements computing `nodes` (in order), skipping the loaded and built tiles; a
    `staged` node is loaded from the buffer another kernel wrote, a `stored` one written to its
    buffer as soon as it is computed."""
    lines = []
    for n in nodes:
        if n in staged:
            lines.append(f"{indent}{n} = tl.load({_stage_at(graph, n)})")
        elif graph.node(n)["op"] not in ("input", "const"):
            lines.append(f"{indent}{n} = {_expression(graph, n)}")
        if n in stored:
            lines.append(f"{indent}tl.store({_stage_at(graph, n)}, {n})")
    return lines


_STAGE_DIMS = {"T": ("BT", "offs_t"), "DK": ("BDK", "offs_k"), "DV": ("BDV", "offs_v"),
               1: ("1", "")}
STAGED_CONSTS = ("tainted", "qbad")  # consts that read every input: a stage computes them once


def _stageable(graph, n) -> bool:
    """Whether a state-free node can be a stage kernel's output: a tile of the chunk's rows (or
    one row, or one column of key or value entries), not a loaded input and not a state-shaped
    tile, which the pass computes itself rather than move one per chunk through memory."""
    node = graph.node(n)
    rows, cols = node["shape"]
    computed = node["op"] not in ("input", "const", "broadcast", "trans") or \
        node.get("kind") in STAGED_CONSTS
    return computed and (rows in ("T", 1) or cols == 1) and "DH" not in (rows, cols)


def _frontier(graph, targets, live) -> tuple[str, ...]:
    """The state-free tiles that the nodes of `targets` depending on `live` (the states, their
    cotangents) read: what a stage kernel computes for every chunk at once, so that the
    sequential pass only loads them. A state-free node that cannot be staged runs in the pass,
    and its own state-free inputs join the frontier."""
    nodes = plan(graph, targets)
    dep = set(live)
    for n in nodes:
        if any(i in dep for i in graph.node(n)["inputs"]):
            dep.add(n)
    staged, todo = set(), [i for n in nodes if n in dep for i in graph.node(n)["inputs"]]
    while todo:
        n = todo.pop()
        if n in dep or n in staged:
            continue
        if _stageable(graph, n):
            staged.add(n)
        else:
            dep.add(n)
            todo.extend(graph.node(n)["inputs"])
    return tuple(n for n in graph.order() if n in staged)


def _keepable(graph, n) -> bool:
    """Whether a node the pass computes is a tile it stores for its output kernel: a product
    (what is costly to recompute) of the chunk's rows by value columns (a block of columns is
    its program's own)."""
    return graph.node(n)["op"] == "dot" and graph.shape(n) == ("T", "DV")


def _kept(graph, pass_targets, out_targets, stop) -> tuple[str, ...]:
    """The [T, DV] products of the forward pass that the output kernels read: the pass stores
    them rather than have the output kernels recompute what led to them (as fla's state kernel
    stores the delta rule's corrected values). Keeping the backward pass's too was measured
    worse (gated_deltanet, sm_90, D=128): its step grew and spilled."""
    able = {n for n in plan(graph, pass_targets, stop) if n not in stop and _keepable(graph, n)}
    return tuple(n for n in plan(graph, out_targets, (*stop, *able)) if n in able)


def _stops(graph, targets: dict, staged: dict) -> tuple[dict, tuple]:
    """Per kernel, the tiles it loads rather than computes: the forward's stage tiles, then
    those of the forward pass (the forward saves both for the backward), then the backward
    stage's. Also the tiles the forward pass stores (`_kept`)."""
    kept = _kept(graph, targets["fwd"], targets["fwd_out"], staged["fwd"])
    stops = {"fwd": staged["fwd"], "fwd_out": staged["fwd"] + kept}
    stops["bwd"] = stops["bwd_out"] = tuple(dict.fromkeys(stops["fwd_out"] + staged["bwd"]))
    return stops, kept


def _stage_at(graph, n) -> str:
    """The address of node n's tile in its stage buffer [chunks * SEGMENTS, H, rows * cols] (the
    tile padded to its blocks) at this step (`srow`)."""
    (rows, r), (cols, c) = (_STAGE_DIMS[x] for x in graph.shape(n))
    index = {(True, True): f"{r}[:, None] * {cols} + {c}[None, :]", (True, False): f"{r}[:, None]",
             (False, True): f"{c}[None, :]", (False, False): "tl.zeros([1, 1], dtype=tl.int32)"}
    return f"{n}_ptr + srow * ({rows} * {cols}) + {index[bool(r), bool(c)]}"


def _stage_sizes(graph, staged, operands) -> list[tuple[str, str, str, bool]]:
    """(node, rows, cols, operand) of each stage buffer, the dims as the launcher's block sizes;
    `operand`: every kernel reads the tile only as a matmul operand, so the buffer holds it in
    the operands' dtype (loaded straight into a tensor-core operand: Triton puts a loaded one
    in shared memory, a converted one in registers)."""
    return [(n, *(_STAGE_DIMS[x][0] for x in graph.shape(n)), n in operands) for n in staged]


def _operand_reads(graph, stop, need, operands: dict[str, bool]) -> None:
    """Record in `operands` whether a kernel computing `need` reads each tile of `stop` only as
    a matmul operand (a tile it does not read leaves its record as it is)."""
    for n in stop:
        if any(c in need for c in graph.g.successors(n)):
            operands[n] = operands.get(n, True) and _tile_dtype(graph, n, need) == "DOT"


COSTLY = ("dot", "gdot", "gmix", "tri_inv")  # ops a kernel does not recompute from another's inputs


def _stage_parts(graph, targets, saved) -> list[tuple[str, ...]]:
    """A stage that passes over hidden blocks as one kernel per pass, in order: the tiles each
    stores, its share of `targets` and those a later kernel reads from it (handed over through
    memory rather than held in registers across the passes after it). A kernel makes its pass
    and computes what that pass completes, up to the next pass; a tile computed without a
    product or a hidden unit is recomputed where it is read instead. One part when the stage
    makes one pass or less, or a tile to hand over cannot be stored (not a tile of rows or a
    column). Memora, sm_90, bf16, D=64, 8 warps: its single stage kernel spilled 2352 B per
    thread, its four 0, 0, 552 and 384 B (with what follows a pass in the next kernel instead,
    the last two spilled 360 and 2064 B against 800 and 752, segments unrolled)."""
    passes = stream(graph, targets, stop=saved)
    last = len(passes.loops) - 1
    if last < 1:
        return [tuple(targets)]
    part = {n: min(max(j - 1, 0), last) for j, whole in enumerate(passes.whole) for n in whole}
    part |= {n: j for j, loop in enumerate(passes.loops) for n in loop.reduce}
    readers = {j: set(loop.nodes) for j, loop in enumerate(passes.loops)}
    for n, j in part.items():
        readers[j].add(n)

    def cheap(n):
        return all(graph.node(m)["op"] not in COSTLY and "DH" not in graph.shape(m)
                   for m in plan(graph, [n], saved) if m not in saved)

    handed = []
    for n in plan(graph, targets, saved):
        if n in saved or n not in part or graph.node(n)["op"] in ("input", "const"):
            continue
        later = any(c in readers[j] for j in range(part[n] + 1, last + 1)
                    for c in graph.g.successors(n) if c not in saved)
        if later and n not in targets and not cheap(n):
            if not _stageable(graph, n):
                return [tuple(targets)]
            handed.append(n)
    stored = [*targets, *handed]
    return [tuple(n for n in graph.order() if n in stored and part[n] == j)
            for j in range(last + 1)]


_BLOCK_HEADERS = {  # a pass over the blocks of a dim: the loop that redefines its offsets and masks
    "DH": """for i_hb in range(0, tl.cdiv(DH, BH)):  # the blocks of hidden units, one at a time
    offs_h = i_hb * BH + tl.arange(0, BH)
    mask_h = offs_h < DH
    hmask = tl.where(mask_h, 1.0, 0.0).to(ACC)[None, :]""",
    "DK": """for i_kb in range(0, tl.cdiv(DK, BK)):  # the blocks of key columns, one at a time
    offs_k = i_kb * BK + tl.arange(0, BK)
    mask_k = offs_k < DK
    kmask = tl.where(mask_k, 1.0, 0.0).to(ACC)[None, :]""",
    "DV": """for i_v in range(0, tl.cdiv(DV, BV)):  # the blocks of value columns, one at a time
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    vmask = tl.where(mask_v, 1.0, 0.0).to(ACC)[None, :]""",
}


def _emit_stream(graph, passes, loads: dict[str, str], stores: dict[str, list[str]],
                 indent: str, staged=(), dim: str = "DH", stored=()) -> list[str]:
    """Triton statements for a step run over blocks of `dim` (`stream`; hidden units, or key
    columns): each pass loads the blocks it reads (`loads`, statements per node), recomputes its
    blocked tiles, sums its reductions over the blocks and writes its blocked targets
    (`stores`). A `stored` tile (unblocked) goes to its stage buffer once complete."""
    inner = indent + " " * 4
    lines = []
    for whole, loop in zip(passes.whole, passes.loops, strict=False):
        lines += _emit(graph, whole, indent, staged, stored)
        for r in loop.reduce:
            dims = ", ".join(_DIMS[s] for s in graph.shape(r))
            fill = 'float("-inf")' if graph.node(r)["op"] == "max" else "0.0"
            lines.append(f"{indent}{r} = tl.full([{dims}], {fill}, ACC)")
        lines += [indent + line for line in _BLOCK_HEADERS[dim].splitlines()]
        for n in loop.nodes:
            if n in loads:
                lines += [inner + line for line in loads[n].splitlines()]
        lines += _emit(graph, loop.nodes, inner, staged)
        for r in loop.reduce:
            part = _expression(graph, r)
            lines.append(f"{inner}{r} = tl.maximum({r}, {part})" if graph.node(r)["op"] == "max"
                         else f"{inner}{r} += {part}")
        lines += [inner + line for t in loop.store for line in stores[t]]
        lines += [f"{indent}tl.store({_stage_at(graph, r)}, {r})" for r in loop.reduce if r in stored]
    return lines + _emit(graph, passes.whole[-1], indent, staged, stored)


def _loads(step, d, need, indent=_INDENT, clean=True) -> str:
    """The statements that load this step's tiles of the inputs among `need` (the nodes a kernel's
    body reads), with its row masks. Non-finite entries (`memories.taints.poisoned`) load as
    padding, unless not `clean`; `tainted` marks the rows from the first one on (it reads every
    input), `qbad` the rows of a bad q."""
    gates = d.op_gates()
    taint = "tainted" in need

    def dtype(x):
        return _tile_dtype(step.graph, x, need)

    lines = [
        "srow = ((first_chunk + i_t) * SEGMENTS + seg) * H + i_h  # the step's row of the buffers",
        "rows = i_t * CHUNK + offs_t",
        "valid = (offs_t < CHUNK) & (rows < eos - bos)",
        "if SEGMENTS == 2:  # the lag token: row 0 alone, then the rest of the chunk",
        "    valid = valid & tl.where(seg == 0, rows == i_t * CHUNK, rows > i_t * CHUNK)",
        "tok = bos + rows",
        "rowmask = tl.where(valid, 1.0, 0.0).to(ACC)[:, None]",
        "lastrow = tl.where(rows == tl.max(tl.where(valid, rows, -1), 0), 1.0, 0.0).to(ACC)[:, None]",
    ]
    pads = {}
    if "q" in need or "qbad" in need:
        pads["q"] = "0.0"
        lines.append(f"q = load_rows(q_ptr, tok * H + i_h, offs_k, valid, mask_k, DK, 0.0, "
                     f"{dtype('q')})")
    for x, dim, pad in (("k", "k", "0.0"), ("v", "v", "1.0")):
        if x in need or taint:
            pads[x] = pad
            lines.append(f"{x} = load_rows({x}_ptr, tok * H + i_h, offs_{dim}, valid, mask_{dim}, "
                         f"D{dim.upper()}, {pad}, {dtype(x)})")
    for p in step.params:  # per-head [1, DV]; padding columns read 0
        if p in need:
            lines.append(f"{p} = tl.load({p}_ptr + i_h * DV + offs_v, mask=mask_v, "
                         "other=0.0).to(ACC)[None, :]")
    for g in step.gates:
        if g not in need and not taint:
            continue
        pads[g] = "1.0" if g in ("delta", "momentum") else "0.0"  # padding: no log(0), no 1/0
        if gates[g].shape == "channel":
            dim = "v" if g == "delta" else "k"
            lines.append(f"{g} = load_rows({g}_ptr, tok * H + i_h, offs_{dim}, valid, "
                         f"mask_{dim}, D{dim.upper()}, {pads[g]}, ACC)")
        else:
            lines.append(f"{g} = tl.load({g}_ptr + tok * H + i_h, mask=valid, "
                         f"other={pads[g]}).to(ACC)[:, None]")
    if taint:
        lines += ["bad = " + " + ".join(_nonfinite(x) for x in pads if x != "q"),
                  "first = tl.min(tl.where(valid & (bad > 0), offs_t, BT), 0)",
                  "tainted = tl.where(offs_t >= first, 1.0, 0.0).to(ACC)[:, None]"]
    if "qbad" in need:
        lines.append(f"qbad = tl.where({_nonfinite('q')} > 0, 1.0, 0.0).to(ACC)[:, None]")
    if "d_o" in need:  # the cotangent of the output (backward kernels)
        lines.append("d_o = load_rows(do_ptr, tok * H + i_h, offs_v, valid, mask_v, DV, 0.0, "
                     f"{dtype('d_o')})")
    if "nanfill" in need:
        lines.append('nanfill = tl.full([1, 1], float("nan"), ACC)')
    if clean:
        lines += [f"{x} = tl.where({_finite(x)}, {x}, {pad})" for x, pad in pads.items()]
    return "\n".join(indent + line for line in lines)


def _tile_dtype(graph, x: str, need) -> str:
    """The dtype an input tile loads in: that of the matmul operands (DOT) where the kernel
    (its nodes `need`) uses it only as one, exact and half the registers at bf16; else ACC."""
    uses = [n for n in graph.g.successors(x) if n in need]
    return "DOT" if uses and all(graph.node(n)["op"] == "dot" for n in uses) else "ACC"


def _finite(x: str) -> str:
    """Whether each entry of tile x is finite (log_alpha may also be -inf: a decay to 0)."""
    return f"{x} < float(\"inf\")" if x == "log_alpha" else f"tl.abs({x}) < float(\"inf\")"


def _nonfinite(x: str) -> str:
    """Per row of tile x, how many entries are not `_finite`."""
    return f"tl.sum(tl.where({_finite(x)}, 0.0, 1.0), 1)"


def _state_tiles(step) -> list[dict]:
    """How the template loads and stores each state tile of the flattened state buffers."""
    tiles, offset = [], "0"
    for name in step.states:
        rows, cols = step.graph.shape(name)
        c = cols[1:].lower()
        if rows == 1:  # a vector state [1, D], [B, H, D] for the user
            tiles.append(dict(name=name, shape=f"({cols.lower()},)", block=f"1, B{c.upper()}",
                              tile=f"{offset} + offs_{c}[None, :]", mask=f"mask_{c}[None, :]"))
            size = cols
        else:
            r = rows[1:].lower()
            tiles.append(dict(
                name=name, shape=f"({rows.lower()}, {cols.lower()})",
                block=f"B{r.upper()}, B{c.upper()}",
                tile=f"{offset} + offs_{r}[:, None] * {cols} + offs_{c}[None, :]",
                mask=f"mask_{r}[:, None] & mask_{c}[None, :]"))
            size = f"{rows} * {cols}"
        offset = f"{offset} + {size}" if offset != "0" else size
    return tiles


def _streams(step, targets: dict, staged: dict, adjoint: dict) -> dict | None:
    """Each kernel's step as passes over blocks of hidden units (`stream`), stopping at the
    kernel's `staged` tiles, when a state has hidden units and every kernel's step runs so;
    else None."""
    graph = step.graph
    if not any("DH" in graph.shape(s) for s in step.states) or \
            any(adjoint[s] is None for s in step.states):
        return None
    streams = {k: stream(graph, t, stop=staged[k]) for k, t in targets.items()}
    return None if None in streams.values() else streams


def _key_blocks(step, tiles, stop, adjoint, summed, grads) -> tuple | None:
    """A backward output kernel (writing the gradients of the inputs `grads`) as passes over
    blocks of key columns (`stream` on DK), so that it holds a block of q, k, the states and
    their gradients at a time rather than all DK columns (fla's gradient kernels block the keys
    so): the stream, and the loads and stores of the blocked inputs, states and gradients. None
    where the step does not pass so (a tile with DK twice) or a key-column input of `grads` has
    no gradient to write per block."""
    graph = step.graph
    keyed = [x for x in ("q", "k", *step.gates) if "DK" in graph.shape(x)]
    if not keyed or any(adjoint[x] is None for x in keyed if x in grads):
        return None
    targets = [adjoint[x] for x in grads if adjoint[x] is not None]
    passes = stream(graph, targets, dim="DK", stop=stop)
    if passes is None or not passes.loops:
        return None
    loads, need = {}, set(plan(graph, targets, stop))
    for x in keyed:
        loads[x] = (f"{x} = load_rows({x}_ptr, tok * H + i_h, offs_k, valid, mask_k, DK, 0.0, "
                    f"{_tile_dtype(graph, x, need)})\n{x} = tl.where({_finite(x)}, {x}, 0.0)")
    state_loads, _ = _stream_io(step, tiles, "bwd_out", adjoint)
    loads |= {n: line for n, line in state_loads.items() if "DK" in graph.shape(n)}
    stores, keyed = {}, [x for x in keyed if x in grads]
    for x in keyed:
        store = "store_sum" if x in summed else "tl.store"
        stores.setdefault(adjoint[x], []).append(
            f"{store}(d{x}_ptr + (tok * H + i_h)[:, None] * DK + offs_k[None, :], "
            f"{adjoint[x]}, valid[:, None] & mask_k[None, :]{', i_v' if x in summed else ''})")
    return passes, loads, stores, keyed


def _gradient_groups(step, adjoint: dict, streamed: bool) -> dict[str, tuple[str, ...]]:
    """The backward's output kernels, each with the inputs whose gradients it writes. A matrix
    memory's split by the columns of the gradient: value columns ("bwd_dv": v, value-channel
    gates, per-head parameters), key columns ("bwd_dqk": q, k, key-channel gates) and one per row
    ("bwd_dg": per-head gates), so that each kernel holds only what its gradients read (sm_90,
    D=128, bf16, 8 warps: gated DeltaNet's single kernel spilled 1152 B per thread, simple GLA's
    664; their three spill none). An MLP memory passing over hidden blocks (`streamed`) splits
    what never reads the gradient of the step-end state (the query's gradient, which reaches only
    the outputs: "bwd_dq") from what does ("bwd_out"), each recomputing the memory over the
    hidden units (Memora, D=64: one kernel spilled 2160 B, these two 760 and 1352 B, for 1.3x
    the tensor-core instructions; by the columns as well, four kernels, 2.2x). An MLP memory held
    whole keeps one ("bwd_out")."""
    graph = step.graph
    inputs = ("q", "k", "v", *step.gates, *step.params)
    if any("DH" in graph.shape(s) for s in step.states):
        carried = {f"d{s}_new" for s in step.states}
        free = tuple(x for x in inputs if streamed and adjoint[x] is not None
                     and not carried & set(plan(graph, [adjoint[x]])))
        rest = tuple(x for x in inputs if x not in free)
        return {k: xs for k, xs in (("bwd_dq", free), ("bwd_out", rest)) if xs}
    kernel = {"DV": "bwd_dv", "DK": "bwd_dqk", 1: "bwd_dg"}
    groups = {}
    for x in inputs:
        groups.setdefault(kernel[graph.shape(x)[1]], []).append(x)
    return {k: tuple(groups[k]) for k in kernel.values() if k in groups}


def _stream_io(step, tiles, kernel: str, targets: dict) -> tuple[dict, dict]:
    """The loads of the state blocks a streamed step reads and the stores of the blocks it writes.
    Every kernel reads the step's state at state_ptr; the forward pass writes the next step's
    (next_ptr); the backward kernels read the gradient of the step-end state (dstate_ptr), and
    the backward pass writes that of the step-start state (dnext_ptr)."""
    loads, stores = {}, {}
    for s, tile in zip(step.states, tiles, strict=True):
        at = f"{tile['tile']}, mask={tile['mask']}"
        loads[s] = f"{s} = tl.load(state_ptr + {at}, other=0.0).to(ACC)"
        if kernel.startswith("bwd"):
            loads[f"d{s}_new"] = f"d{s}_new = tl.load(dstate_ptr + {at}, other=0.0).to(ACC)"
        if kernel in ("fwd", "bwd"):
            out = "next_ptr" if kernel == "fwd" else "dnext_ptr"
            stores.setdefault(targets[s], []).append(
                f"tl.store({out} + {tile['tile']}, {targets[s]}, mask={tile['mask']})")
    return loads, stores


def render_triton_module(spec: Spec) -> str:
    """The module with Triton forward/backward kernels, custom ops and autograd for `spec`. The
    chunk step splits by its dependence on the state (`_frontier`): per direction a stage kernel
    computes the state-free tiles the sequential pass reads, the pass carries the state (or its
    gradient) over the chunks, and an output kernel computes the rest per chunk from the stored
    states."""
    d = derive(spec)
    reason = triton_unsupported(d)
    if reason:
        raise CodegenError(f"{spec.name}: the Triton backend does not support {reason}")
    step = chunk_step(d)
    graph = step.graph
    _, wrt, adjoint = step_adjoint(step)
    states = list(step.states)
    targets = {
        "fwd": [step.outputs[s] for s in states],
        "fwd_out": [step.outputs["o"]],
        "bwd": [adjoint[s] for s in states if adjoint[s] is not None],
        "bwd_out": [adjoint[x] for x in wrt if x not in states and adjoint[x] is not None],
    }
    dstates = [f"d{s}_new" for s in states]
    staged = {"fwd": _frontier(graph, targets["fwd"], states),
              "bwd": _frontier(graph, targets["bwd"], states + dstates)}
    first = _stops(graph, targets, staged)[0]
    streamed = _streams(step, targets, first, adjoint) is not None
    if streamed:
        # The backward stage passes over the hidden blocks of the stored states too: what reads
        # them but not their gradients leaves the backward pass and output kernel (a
        # state-shaped tile among it stays there, recomputed per block).
        wide = _frontier(graph, targets["bwd"] + targets["bwd_out"], dstates)
        if stream(graph, wide, stop=first["fwd_out"]) is not None:
            staged["bwd"] = wide
    else:
        # The stored states are at hand: the backward pass carries dW alone. Its output kernel
        # passes over key blocks, so the backward stage computes the rows' taints (they read
        # every key column).
        staged["bwd"] = _frontier(graph, targets["bwd"], dstates)
        bwd_nodes = plan(graph, targets["bwd_out"], _stops(graph, targets, staged)[0]["bwd_out"])
        staged["bwd"] += tuple(c for c in STAGED_CONSTS if c in bwd_nodes)
    stops, kept = _stops(graph, targets, staged)
    staged["bwd"] = tuple(n for n in staged["bwd"] if n not in stops["fwd_out"])
    groups = _gradient_groups(step, adjoint, streamed)
    del targets["bwd_out"]
    for kernel, grads in groups.items():
        targets[kernel] = [adjoint[x] for x in grads if adjoint[x] is not None]
        stops[kernel] = stops["bwd_out"]
    streams = _streams(step, targets, stops, adjoint) if streamed else None
    tiles = _state_tiles(step)
    gates = d.op_gates()
    split_v = separable(step)
    summed = ["q", "k"] + [g for g in step.gates if not (g == "delta" and gates[g].shape == "channel")]
    summed = summed if split_v else []
    kernels, operands = {}, {}
    for kernel, t in targets.items():
        stop, stored = stops[kernel], kept if kernel == "fwd" else ()
        indent = _INDENT if kernel in ("fwd", "bwd") else " " * 8
        keys = _key_blocks(step, tiles, stop, adjoint, summed, groups[kernel]) \
            if kernel in groups and streams is None else None
        need = set(plan(graph, t, stop)) - set(stop)
        _operand_reads(graph, stop, need, operands)
        if keys is not None:
            passes, key_loads, key_stores, inside = keys
            body = _emit_stream(graph, passes, key_loads, key_stores, indent, stop, "DK")
            need -= set(key_loads)
        elif streams is None:
            inside = ()
            body = _emit(graph, plan(graph, t, stop), indent, stop, stored)
        else:  # a kept tile may be a sum over the hidden blocks: stored after the last
            inside = ()
            io = _stream_io(step, tiles, kernel, step.outputs if kernel == "fwd" else adjoint)
            body = _emit_stream(graph, streams[kernel], *io, indent, stop)
            body += [f"{indent}tl.store({_stage_at(graph, n)}, {n})" for n in stored]
        # A forward pass that writes only the next states (NaN wholesale after a tainted row,
        # memories.taints.poisoned) needs no padding in place of a non-finite input.
        loads = _loads(step, d, need, indent, clean=kernel != "fwd" or bool(stored))
        kernels[kernel] = dict(loads=loads, body="\n".join(body), inside=inside,
                               key_blocks=keys is not None,
                               reads=[s for s in states + dstates if s in need])
    handover = {}
    for direction, nodes in staged.items():
        saved = stops["fwd_out"] if direction == "bwd" else ()
        streamed_stage = streams is not None and any(
            s in plan(graph, nodes, saved) for s in states)
        parts = _stage_parts(graph, nodes, saved) if streamed_stage else [nodes] if nodes else []
        handover[direction] = tuple(n for part in parts for n in part if n not in nodes)
        done = ()
        for j, part in enumerate(parts):
            stop = (*saved, *done)
            part_nodes = plan(graph, part, stop)
            reads = [s for s in states if s in part_nodes]
            _operand_reads(graph, stop, set(part_nodes) - set(stop), operands)
            if reads and streams is not None:
                io = _stream_io(step, tiles, "bwd_stage", {})
                body = _emit_stream(graph, stream(graph, part, stop=stop), *io, " " * 8,
                                    stop, stored=part)
            else:
                body = _emit(graph, part_nodes, " " * 8, stop, stored=part)
            kernels[f"{direction}_stage{j + 1 if j else ''}"] = dict(
                loads=_loads(step, d, set(part_nodes) - set(stop), " " * 8), body="\n".join(body),
                reads=reads, direction=direction, stores=part)
            done += part
    zeros = {"q": "BT, BK", "k": "BT, BK", "v": "BT, BV"} | {
        s: ", ".join(_DIMS[x] for x in graph.shape(s)) for s in step.states}
    for g in step.gates:
        zeros[g] = "BT, 1" if gates[g].shape == "head" else ("BT, BV" if g == "delta" else "BT, BK")
    zeros |= dict.fromkeys(step.params, "1, BV")
    adjoint_code = {n: a if a is not None else f"tl.zeros([{zeros[n]}], dtype=ACC)"
                    for n, a in adjoint.items()}
    # Stage tiles read only as matmul operands are stored in the operands' dtype where the step
    # streams hidden blocks (sm_90, bf16, 8 warps, D=64: Moneta's backward output kernel spills
    # 1304 B rather than 1784, its pass needs 98 KiB of shared memory rather than 138, and at
    # D=128 176 KiB rather than 240). A matrix memory keeps them in float32: gated DeltaNet's
    # dq/dk kernel spilled 24 B at D=128 with its (I+A)^-1 in bf16, none without.
    halves = {n for n, only in operands.items() if only} if streams is not None else set()
    stage_order = {direction: [k for k, kernel in kernels.items()
                               if kernel.get("direction") == direction] for direction in staged}
    template = _environment().get_template("triton_chunk.py.j2")
    # The kernel of the q and k gradients walks the DV blocks, summing them (no partial copies
    # per block); it holds what each block reuses, so it takes narrower key blocks.
    v_summed = [k for k, xs in groups.items() if summed and "q" in xs]
    code = "\n".join(k["loads"] + k["body"] for k in kernels.values())
    helpers = set(re.findall(r"\b(" + "|".join(HELPERS) + r")\(", code))
    helpers |= {"store_sum"} if v_summed else set()  # the template's in-place sums
    return template.render(
        helpers=sorted(helpers), split_v=split_v, summed=summed, out_kernels=groups, v_summed=v_summed,
        configs={k: tuning.configs(k, split_v, streams is not None) for k in kernels},
        key_blocks={k: tuning.BK_WALKING_V if k in v_summed else tuning.BK
                    for k in groups if kernels[k]["key_blocks"]},
        bv_max=tuning.BV_MAX, bh_max=tuning.BH_MAX, whole_v=tuning.WHOLE_V,
        state_dims=[step.graph.shape(s)[1:] if step.graph.shape(s)[0] == 1 else step.graph.shape(s)
                    for s in step.states],
        name=spec.name, digest=spec.digest(), version=mirasc.__version__,
        op_name=f"{spec.name}_{spec.digest()}",
        spec_data=pprint.pformat(spec.model_dump(mode="json"), width=96, sort_dicts=True),
        chunk=spec.chunk_size, tile=max(16, 1 << (spec.chunk_size - 1).bit_length()),
        exact=d.exact, gates=list(step.gates), params=list(step.params),
        states=tiles, stream=streams is not None, outputs=step.outputs, memory=spec.memory.kind,
        segments=2 if spec.lag_token else 1,
        expansion=getattr(spec.memory, "expansion", 1),
        channel={g: ("V" if g == "delta" else "K") if gates[g].shape == "channel" else ""
                 for g in step.gates},
        prologue=_PROLOGUE, v_blocks=_BLOCK_HEADERS["DV"], kernels=kernels, adjoint=adjoint_code,
        staged=staged, kept=kept,
        buffers={k: _stage_sizes(graph, nodes, halves)
                 for k, nodes in [*staged.items(), ("fwd_pass", kept),
                                  *((f"{k}_handover", n) for k, n in handover.items() if n)]},
        handover=handover, stage_order=stage_order,
    )
