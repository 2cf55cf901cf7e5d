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
from mirasc.memories import chunk_step
from mirasc.schedule import Schedule, schedule
from mirasc.schedule.kernels import KernelPlan
from mirasc.schedule.stages import tile_dtype
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
def _stage_at(graph, n) -> str:
    """The address of node n's tile in its stage buffer [chunks * SEGMENTS, H, rows * cols] (the
    tile padded to its blocks) at this step (`srow`)."""
    (rows, r), (cols, c) = (_STAGE_DIMS[x] for x in graph.shape(n))
    index = {(True, True): f"{r}[:, None] * {cols} + {c}[None, :]", (True, False): f"{r}[:, None]",
             (False, True): f"{c}[None, :]", (False, False): "tl.zeros([1, 1], dtype=tl.int32)"}
    return f"{n}_ptr + srow * ({rows} * {cols}) + {index[bool(r), bool(c)]}"


def _buffer_table(buffers) -> list[tuple[str, str, str, bool]]:
    """(node, rows, cols, operand) of each buffer, the dims as the launcher's block sizes."""
    return [(b.node, *(_STAGE_DIMS[x][0] for x in b.dims), b.operand) for b in buffers]


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
        return tile_dtype(step.graph, x, need)

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


def _key_io(step, tiles, kernel: KernelPlan) -> dict:
    """The loads of a kernel passing over key blocks, per block: the key columns of its inputs,
    states and state gradients."""
    graph = step.graph
    need = set(plan(graph, kernel.targets, kernel.loads))
    inputs = ("q", "k", *step.gates)
    loads = {x: f"{x} = load_rows({x}_ptr, tok * H + i_h, offs_k, valid, mask_k, DK, 0.0, "
                f"{tile_dtype(graph, x, need)})\n{x} = tl.where({_finite(x)}, {x}, 0.0)"
             for x in kernel.block_loads if x in inputs}
    state_loads, _ = _stream_io(step, tiles, "bwd_out", {})
    return loads | {n: line for n, line in state_loads.items() if n in kernel.block_loads}


def _key_stores(step, kernel: KernelPlan, adjoint, summed) -> dict:
    """Per gradient tile, the stores that write it per key block (summed over value blocks in
    place where the gradient is a sum over them)."""
    stores = {}
    for x in kernel.blocked:
        store = "store_sum" if x in summed else "tl.store"
        stores.setdefault(adjoint[x], []).append(
            f"{store}(d{x}_ptr + (tok * H + i_h)[:, None] * DK + offs_k[None, :], "
            f"{adjoint[x]}, valid[:, None] & mask_k[None, :]{', i_v' if x in summed else ''})")
    return stores


def _body(step, tiles, kernel: KernelPlan, sched: Schedule) -> list[str]:
    """The statements of a kernel's chunk step: flat, or its passes over blocks of a dim."""
    graph, adjoint = step.graph, sched.adjoint
    indent = _INDENT if kernel.kind == "pass" else " " * 8
    stop = kernel.loads
    if kernel.kind == "stage":
        if kernel.passes is not None:
            io = _stream_io(step, tiles, "bwd_stage", {})
            return _emit_stream(graph, kernel.passes, *io, indent, stop, stored=kernel.stores)
        return _emit(graph, plan(graph, kernel.targets, stop), indent, stop,
                     stored=kernel.stores)
    if kernel.dim == "DK":
        return _emit_stream(graph, kernel.passes, _key_io(step, tiles, kernel),
                            _key_stores(step, kernel, adjoint, sched.summed), indent, stop, "DK")
    if kernel.passes is None:
        return _emit(graph, plan(graph, kernel.targets, stop), indent, stop, kernel.stores)
    # a kept tile may be a sum over the hidden blocks: stored after the last
    io = _stream_io(step, tiles, kernel.name,
                    step.outputs if kernel.name == "fwd" else adjoint)
    body = _emit_stream(graph, kernel.passes, *io, indent, stop)
    return body + [f"{indent}tl.store({_stage_at(graph, n)}, {n})" for n in kernel.stores]


def render_triton_module(spec: Spec) -> str:
    """The module with Triton forward/backward kernels for `spec`, printed from its kernel
    schedule (`mirasc.schedule`): per kernel its input loads and its chunk step's statements,
    and the tables the launcher (`mirasc.launch`) reads."""
    d = derive(spec)
    reason = triton_unsupported(d)
    if reason:
        raise CodegenError(f"{spec.name}: the Triton backend does not support {reason}")
    sched = schedule(chunk_step(d))
    step = sched.step
    graph = step.graph
    tiles = _state_tiles(step)
    gates = d.op_gates()
    kernels = {}
    for name, kernel in sched.kernels.items():
        indent = _INDENT if kernel.kind == "pass" else " " * 8
        body = _body(step, tiles, kernel, sched)
        loads = _loads(step, d, kernel.needs, indent, clean=kernel.pads_nonfinite)
        kernels[name] = dict(loads=loads, body="\n".join(body), inside=kernel.blocked,
                             reads=list(kernel.reads), direction=kernel.direction,
                             stores=kernel.stores)
    zeros = {"q": "BT, BK", "k": "BT, BK", "v": "BT, BV"} | {
        s: ", ".join(_DIMS[x] for x in graph.shape(s)) for s in step.states}
    for g in step.gates:
        zeros[g] = "BT, 1" if gates[g].shape == "head" else ("BT, BV" if g == "delta" else "BT, BK")
    zeros |= dict.fromkeys(step.params, "1, BV")
    adjoint_code = {n: a if a is not None else f"tl.zeros([{zeros[n]}], dtype=ACC)"
                    for n, a in sched.adjoint.items()}
    code = "\n".join(k["loads"] + k["body"] for k in kernels.values())
    helpers = set(re.findall(r"\b(" + "|".join(HELPERS) + r")\(", code))
    helpers |= {"store_sum"} if sched.walks_v else set()  # the template's in-place sums
    template = _environment().get_template("triton_chunk.py.j2")
    return template.render(
        helpers=sorted(helpers), split_v=sched.split_v, summed=list(sched.summed),
        out_kernels=sched.groups, v_summed=list(sched.walks_v),
        configs={k: p.configs for k, p in sched.kernels.items()},
        key_blocks=sched.key_blocks,
        bv_max=tuning.BV_MAX, bh_max=tuning.BH_MAX, whole_v=tuning.WHOLE_V,
        state_dims=[graph.shape(s)[1:] if graph.shape(s)[0] == 1 else graph.shape(s)
                    for s in step.states],
        name=spec.name, digest=spec.digest(), version=mirasc.__version__,
        spec_data=pprint.pformat(spec.model_dump(mode="json"), width=96, sort_dicts=True),
        chunk=spec.chunk_size, tile=max(16, 1 << (spec.chunk_size - 1).bit_length()),
        exact=d.exact, gates=list(step.gates), params=list(step.params),
        states=tiles, stream=sched.streamed, outputs=step.outputs, memory=spec.memory.kind,
        segments=2 if spec.lag_token else 1,
        expansion=getattr(spec.memory, "expansion", 1),
        channel={g: ("V" if g == "delta" else "K") if gates[g].shape == "channel" else ""
                 for g in step.gates},
        prologue=_PROLOGUE, v_blocks=_BLOCK_HEADERS["DV"], kernels=kernels, adjoint=adjoint_code,
        staged=sched.staged, kept=sched.kept,
        buffers={k: _buffer_table(b) for k, b in sched.buffers.items()},
        handover=sched.handover, stage_order=sched.stage_order,
    )
