"""Code generation: render a spec's derivation into the source of its Python module.

The same spec always renders the same bytes (sorted literals, deterministic printing)."""

from __future__ import annotations

import pprint
import re
import struct
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import jinja2
import sympy as sp

import mirasc
from mirasc import tuning
from mirasc.derive import DELTA, NS_COEFFICIENTS, NS_EPS, RNORM, RNORM_EPS, R, V, Z, derive
from mirasc.expr import torch_source
from mirasc.kernel_printer import BLOCKS, BUFFER_BLOCKS, KernelPrinter, indent
from mirasc.memories import chunk_step
from mirasc.schedule import schedule
from mirasc.source_tidy import drop_blank_lines_in_functions, drop_dead_assignments, wrap
from mirasc.spec import Gate, Spec

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
TRITON_FUNCTIONS = {sp.exp: "exp_flushed", sp.log: "tl.log", sp.Abs: "tl.abs", sp.erf: "tl.erf",
                    sp.tanh: "tanh", sp.atan: "atan"}  # mirasc.triton_helpers


def triton_source(expr: sp.Expr, names) -> str:
    """Print a sympy expression as Triton code over tiles named by `names`."""

    def show(e) -> str:
        if e.is_Symbol:
            return names[e] if e in names else KERNEL_CONSTANTS[e.name]
        if e.is_number:  # constant subexpressions (sqrt(2), pi/2, ...) are folded in float64
            return _number(float(e))
        if isinstance(e, sp.Add | sp.Mul):
            return "(" + (" + " if isinstance(e, sp.Add) else " * ").join(map(show, e.args)) + ")"
        if isinstance(e, sp.Pow):
            return _pow(show(e.args[0]), e.args[1])
        if type(e) in TRITON_FUNCTIONS:
            return f"{TRITON_FUNCTIONS[type(e)]}({show(e.args[0])})"
        if isinstance(e, sp.sinh | sp.cosh):
            x = show(e.args[0])
            sign = "-" if isinstance(e, sp.sinh) else "+"
            return f"((exp_flushed({x}) {sign} exp_flushed(-{x})) * 0.5)"
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
    # a positive base (smoothed norms)
    return f"exp_flushed({_number(float(exponent))} * tl.log({base}))"


def _number(value: float) -> str:
    """A constant as Triton code: a Python float where float32 holds it exactly, else a tile of
    the accumulator's dtype (Triton takes a Python float as float32: 0.8 would be 0.800000012
    in a float64 kernel)."""
    try:
        exact = value != value or struct.unpack("f", struct.pack("f", value))[0] == value
    except OverflowError:  # beyond float32's range
        exact = False
    return repr(value) if exact else f"tl.full([1, 1], {value!r}, ACC)"


HELPERS = ("atan", "dot_fp32", "exp_flushed", "gdot", "gdot_both", "gmix", "gmix_both",
           "gmix_pair", "gmix_t", "gmix_t_pair", "held_cumsum", "largest_magnitude", "load_rows",
           "newton_schulz", "nonfinite_rows", "sequence_bounds", "store_sum", "tanh", "tri_inv")
# the functions of mirasc.triton_helpers that kernel bodies call


def triton_unsupported(d) -> str | None:
    """Why the Triton backend cannot compile this spec yet (None when it can)."""
    spec = d.spec
    mem, ret = spec.memory, spec.retention
    muon = spec.learner.kind == "muon"
    reasons = [
        (muon and spec.learner.apply == "token",
         "learner.apply 'token' with learner.kind 'muon' (NS_k of every token's momentum needs a "
         "state-shaped tile per row of the chunk; allowed with kernels: 'chunk')"),
        (muon and mem.kind != "matrix", f"learner.kind 'muon' on a {mem.kind} memory (the kernels "
                                        "orthogonalise a matrix memory's state; allowed: 'matrix')"),
        (muon and mem.bias, "memory.bias with learner.kind 'muon'"),
        (muon and spec.bias.window is not None and spec.bias.window.size > 1
         and spec.learner.momentum.shape == "channel",
         "bias.window over more than one token with a channel-wise muon momentum"),
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
        (spec.bias.window is not None and spec.bias.window.size > 1 and any(
            g.shape == "channel" for f, g in spec.gates().items() if f != "bias.delta"),
         "bias.window over more than one token with a channel-wise decay or step (the band mixes "
         "the rows through per-head decays and steps)"),
    ]
    why = [text for failed, text in reasons if failed] + _unprintable(d)
    return "; ".join(why) if why else None


def _unprintable(d) -> list[str]:
    """Why the derivation's expressions (the bias's g, its norm term, the retention's map) do not
    print as Triton, one reason each."""
    why = []
    for expr in (d.bias.elem, d.bias.norm, d.retention.elementwise):
        try:
            if expr is not None:
                triton_source(expr, {s: s.name for s in expr.free_symbols})
        except CodegenError as exc:
            why.append(str(exc))
    return why


def render_triton_module(spec: Spec) -> str:
    """The module with Triton forward/backward kernels for `spec`, printed from its kernel
    schedule (`mirasc.schedule`): per kernel its input loads and its chunk step's statements
    (`mirasc.kernel_printer`), and the tables the launcher (`mirasc.launch`) reads."""
    d = derive(spec)
    reason = triton_unsupported(d)
    if reason:
        raise CodegenError(f"{spec.name}: the Triton backend does not support {reason}")
    step = chunk_step(d)
    previous = step.previous  # a window's rows of the previous chunk: per-token inputs as gates
    sched = schedule(replace(step, gates=step.gates + previous, previous=()))
    step = sched.step
    graph = step.graph
    environment = _environment()
    macros = environment.get_template("statements.j2").module
    gates = d.op_gates() | {p: Gate(shape="head" if graph.shape(p)[1] == 1 else "channel")
                            for p in previous}
    window = spec.bias.window
    printer = KernelPrinter(sched, macros, triton_source, gates, previous,
                            1 if window is None else window.size)
    kernels = {}
    for name, kernel in sched.kernels.items():
        depth = 12 if kernel.kind == "pass" else 8  # inside the chunk and segment loops
        kernels[name] = dict(plan=kernel, loads=indent(printer.loads(kernel), depth),
                             body=indent(printer.body(kernel), depth))
    per_token = ("q", "k", "v", *step.gates)  # a vector memory's q and k run along DV
    zeros = {x: [BLOCKS[d] for d in graph.shape(x)] for x in (*per_token, *step.states)}
    zeros |= dict.fromkeys(step.params, ("1", "BV"))
    adjoint_code = {n: a if a is not None else macros.zeros(zeros[n])
                    for n, a in sched.adjoint.items()}
    code = "\n".join(k["loads"] + k["body"] for k in kernels.values()) + macros.prologue()
    helpers = set(re.findall(r"\b(" + "|".join(HELPERS) + r")\(", code))
    walks = [k for k in sched.walks_v if sched.kernels[k].walk is not None]
    key_programs = [k for k in walks if sched.kernels[k].walk.per_key_block]
    key_shares = [x for k in key_programs if sched.kernels[k].walk.shares
                  for x in sched.groups[k] if sched.adjoint[x] in sched.kernels[k].walk.shares.shares]
    if set(sched.walks_v) - set(walks):
        helpers.add("store_sum")  # the template's in-place sums
    tables = {
        "GATES": list(step.gates), "PARAMS": list(step.params),
        "PREVIOUS": {p: p.removesuffix("_prev") for p in previous},
        "STATES": [t.dims for t in printer.tiles], "SUMMED": list(sched.summed),
        "V_SUMMED": list(sched.walks_v), "WALKS": walks, "KEY_PROGRAMS": key_programs,
        "KEY_SHARES": key_shares,
        "OUT_KERNELS": sched.groups, "STAGES": sched.stage_order,
        "BUFFERS": {k: [(b.node, *(BUFFER_BLOCKS[x][0] for x in b.dims), b.operand) for b in bs]
                    for k, bs in sched.buffers.items()},
        "CONFIGS": {k: p.configs for k, p in sched.kernels.items()}, "BV_MAX": tuning.BV_MAX,
        "BK_MAX": sched.key_blocks, "BH_MAX": tuning.BH_MAX, "WHOLE_V": tuning.WHOLE_V,
        "WHOLE_V_PROGRAMS": [k for k in tuning.WHOLE_V_PROGRAMS if k in sched.kernels],
        "OPERAND_STATES": list(sched.operand_states),
    }
    context = ModuleContext(
        name=spec.name, digest=spec.digest(), version=mirasc.__version__,
        spec_data=_literal(spec.model_dump(mode="json"), sort=True),
        tables={k: _literal(v) for k, v in tables.items()}, helpers=sorted(helpers),
        memory=spec.memory.kind, exact=d.exact, chunk=spec.chunk_size,
        tile=max(16, 1 << (spec.chunk_size - 1).bit_length()),
        segments=2 if spec.lag_token else 1, expansion=getattr(spec.memory, "expansion", 1),
        gates=list(step.gates), params=list(step.params), states=printer.tiles,
        split_v=sched.split_v, stream=sched.streamed, summed=sched.summed, v_summed=sched.walks_v,
        key_programs=key_programs, key_shares=key_shares, state_dtypes=sched.state_dtypes,
        out_kernels=sched.groups, stage_order=sched.stage_order, staged=sched.staged,
        kept=sched.kept, carried=sched.carried, handed=[b.node for b in sched.buffers["bwd_out"]],
        handover=sched.handover, kernels=kernels, adjoint=adjoint_code,
        outputs=step.outputs, previous=list(previous),
        columns={x: graph.shape(x)[1][1:] if graph.shape(x)[1] != 1 else "" for x in per_token},
        prologue=indent(macros.prologue().splitlines(), 4),
        prologue_walking=indent(macros.prologue(False).splitlines(), 4),
        v_blocks=macros.block_loop("DV"))
    text = environment.get_template("triton_chunk.py.j2").render(m=context)
    return wrap(drop_blank_lines_in_functions(drop_dead_assignments(text)))


# ---- the decode step ----------------------------------------------------------------------------


def step_unsupported(d) -> str | None:
    """Why the Triton step kernel does not cover this spec (None when it does): it steps a
    matrix memory W [Dv, Dk] (M(k) = W k, with its bias, residual and layer norm) whose state is
    the memory itself. Other specs decode by the torch step on every device."""
    mem = d.spec.memory
    reasons = [
        (mem.kind != "matrix", f"the {mem.kind} memory (the kernel steps a matrix memory W k)"),
        (d.retention.dual and not d.retention.linear,
         f"the {d.retention.kind} retention's dual state (W = phi^-1(Z) is a second track"
         + (", a whole-state reduction)" if d.retention.elementwise is None else ")")),
        (d.spec.learner.kind == "muon" and mem.bias,
         "memory.bias with learner.kind 'muon' (the kernel orthogonalises W alone)"),
        (d.spec.bias.window is not None,
         "bias.window (the kernel neither weighs a gradient by gamma nor keeps earlier tokens)"),
    ]
    why = [text for failed, text in reasons if failed] + _unprintable(d)
    return "; ".join(why) if why else None


STEP_GATES = {"log_alpha": "alpha", "eta": "eta", "momentum": "momentum", "delta": "delta"}
# the step kernel's name of each op gate (the decay enters as alpha = exp(log_alpha))


def step_tracks(spec: Spec) -> list[str]:
    """The step kernel's state pointers, in order: the gradient point, the running state read
    (SRC) and written (DST), the momentum buffer, the gradient sums read and written (eta_at
    'query'); each followed by its bias's with memory.bias."""
    learner = spec.learner
    by_query = learner.kind == "gd" and learner.eta_at == "query"
    roles = ["point", "src", "dst"] + (["s_buf"] if spec.has_momentum else []) \
        + (["g_src", "g_dst"] if by_query else [])
    return [n for r in roles for n in ([r, f"{r}_b"] if spec.memory.bias else [r])]


def render_step_module(spec: Spec) -> str:
    """The module holding the Triton decode step of `spec` (`templates/step.py.j2`): the bias
    gradient g(r) and the retention's elementwise map printed from the derivation."""
    d = derive(spec)
    reason = step_unsupported(d)
    if reason:
        raise CodegenError(f"{spec.name}: the Triton step kernel does not support {reason}")
    mem, learner = spec.memory, spec.learner
    muon = learner.kind == "muon"
    gates = {STEP_GATES[n]: g for n, g in d.op_gates().items()}
    loaded = [n for n in ("alpha", "eta", "momentum", "delta") if n in gates and gates[n].is_input]
    channel = {n: gates[n].shape == "channel" for n in loaded}

    def gate(name: str) -> str:
        return f"{name}_t" if name in loaded else _number(float(gates[name].value))

    names = {R: "r", V: "v_t", RNORM: "rnorm", DELTA: "delta_t"}
    elem, norm = d.bias.elem, d.bias.norm
    bias = triton_source(elem, names) if norm == 0 else \
        f"{triton_source(elem, names)} + {triton_source(norm, names)} * r"
    shrink = d.retention.elementwise
    retention_map = None if shrink is None else triton_source(shrink, {Z: "w"})
    code = bias + (retention_map or "")
    rnorm = any(e.has(RNORM) for e in (elem, norm))
    layer_norm = mem.norm
    linear = "W k" + (" + b" if mem.bias else "")
    memory_text = f"LN({linear})" if layer_norm else linear
    read = "LN(z)" if layer_norm else "z"
    if mem.residual:
        memory_text = f"k + {memory_text}"
        read = f"{'z' if mem.read_residual == 'output' else 'q_t'} + {read}"
    context = dict(
        name=spec.name, digest=spec.digest(), version=mirasc.__version__, gates=loaded,
        col_gates=[n for n in loaded if channel[n] and n != "delta"],  # along the key columns
        row_gates=[n for n in loaded if not channel[n] or n == "delta"],
        tracks=step_tracks(spec),
        gate_offsets={n: ("bh * DV + rows" if n == "delta" else "bh * DK + cols") if channel[n]
                      else "bh" for n in loaded},
        gate_masks={n: ("mask_r" if n == "delta" else "mask_c") if channel[n] else ""
                    for n in loaded},
        retained=learner.grad_at == "retained", decays="alpha" in gates,
        by_query=learner.kind == "gd" and learner.eta_at == "query",
        alpha=gate("alpha") if "alpha" in gates else "", eta=gate("eta"),
        momentum=learner.kind == "momentum", muon=muon,
        by_chunk=muon and learner.apply == "chunk", ns_steps=learner.ns_steps if muon else 0,
        ns=", ".join(map(repr, (*NS_COEFFICIENTS, NS_EPS))),
        momentum_gate=gate("momentum") if "momentum" in gates else "",
        bias_memory=mem.bias, residual=mem.residual, read_output=mem.read_residual == "output",
        norm=layer_norm is not None, affine=layer_norm is not None and layer_norm.affine,
        ln_eps=_number(layer_norm.eps) if layer_norm is not None else "",
        rnorm=rnorm, whole_v=rnorm or layer_norm is not None or muon, rnorm_eps=_number(RNORM_EPS),
        bias=bias, bias_text=sp.sstr(elem + norm * R), retention_map=retention_map,
        map_text=None if shrink is None else sp.sstr(shrink),
        memory_text=memory_text, read_text=read.replace("z", "z_t") + (
            ", z_t = W q_t" + (" + b" if mem.bias else "") if "z" in read else ""),
        helpers=sorted(set(re.findall(r"\b(" + "|".join(HELPERS) + r")\(", code))
                       | ({"newton_schulz"} if muon else set())))
    text = _environment().get_template("step.py.j2").render(s=context)
    return wrap(drop_blank_lines_in_functions(text))


@dataclass(frozen=True)
class ModuleContext:
    """What the module template prints: the spec's names, the launcher's tables (as literals),
    the schedule's kernels with their printed loads and bodies, and what the fixed parts of the
    kernels (signatures, state copies, gradient stores) need."""

    name: str
    digest: str
    version: str
    spec_data: str
    tables: dict
    helpers: list
    memory: str
    exact: bool
    previous: list
    chunk: int
    tile: int
    segments: int
    expansion: int
    gates: list
    params: list
    states: list
    split_v: bool
    stream: bool
    summed: tuple
    v_summed: tuple
    key_programs: list
    key_shares: list
    state_dtypes: dict  # the dtype each stored states' buffer loads in (Schedule.state_dtypes)
    out_kernels: dict
    stage_order: dict
    staged: dict
    kept: tuple  # the tiles the forward pass stores for the output kernels
    carried: tuple  # those the backward pass stores for its output kernels
    handed: list  # the tiles the backward's output kernels hand the later ones
    handover: dict
    kernels: dict
    adjoint: dict
    outputs: dict
    columns: dict  # q, k and the gates: "K" or "V", the columns they run along, or "" (per head)
    prologue: str
    prologue_walking: str
    v_blocks: str


def _literal(value, sort: bool = False) -> str:
    """A Python literal of `value`, wrapped to 100 columns."""
    return pprint.pformat(value, width=100, sort_dicts=sort)
