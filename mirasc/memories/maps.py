"""The maps around a memory's linear core: the retention's read map W = phi^-1(Z) and the
memory's output M(x) = [x +] [LN](z)."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation, Z
from mirasc.graph import Graph, ew
from mirasc.memories.step import dim_mask


def read_map(gr: Graph, d: Derivation, z: str, name: str) -> str:
    """W = phi^-1(Z), the retention's map, over the real (unpadded) entries of the state; the
    node `name` (z itself for a linear retention)."""
    ret, rule = d.spec.retention, d.retention
    if rule.linear:
        return z
    formula = f"{name} = phi^-1({z})"
    rows, cols = gr.shape(z)
    smask = f"smask_{rows}_{cols}"
    if rows == 1:  # a vector memory: its norm or softmax runs over the whole vector
        smask = dim_mask(gr, cols)
    elif smask not in gr.g:
        rowmask = dim_mask(gr, rows)
        ew(gr, lambda a, b: a * b, gr.trans(rowmask, name=f"{rowmask}_col"), dim_mask(gr, cols),
           name=smask)
    if rule.elementwise is not None:  # selected, not multiplied: phi^-1' may be inf at a padded 0
        return ew(gr, lambda a, m: sp.Piecewise((rule.elementwise.subs(Z, a), m > 0), (0, True)),
                  z, smask, name=name, formula=formula)
    axes = {"matrix": (1, 0), "row": (1,), "column": (0,)} if rows != 1 else dict.fromkeys(
        ("matrix", "row", "column"), (1,))
    if rule.kind == "lq":  # Z / (sum |Z|^q + eps)^((q-2)/q), or the p-norm link's sign(Z)|Z|^(q-1)
        q = sp.nsimplify(ret.q)
        powered = ew(gr, lambda a: sp.Abs(a) ** q, z, name=f"{name}_pow")
        for i, axis in enumerate(axes[ret.scope]):
            powered = gr.sum(powered, axis, name=f"{name}_norm" if i == len(axes[ret.scope]) - 1
                             else f"{name}_rownorm")
        scale = ew(gr, lambda s: (s + ret.eps) ** (-(q - 2) / q), powered, name=f"{name}_scale")
        core = (lambda a: a) if ret.link == "scale" else (lambda a: sp.sign(a) * sp.Abs(a) ** (q - 1))
        return ew(gr, lambda a, s: core(a) * s, z, scale, name=name, formula=formula)
    # kl: c * softmax over the axis; the max is a constant offset (it cancels in the softmax)
    masked = ew(gr, lambda a, m: sp.Piecewise((a, m > 0), (-1e30, True)), z, smask,
                name=f"{name}_masked")
    peak, last = masked, len(axes[ret.axis]) - 1
    for j, axis in enumerate(axes[ret.axis]):
        peak = gr.add("max", tuple(1 if i == axis else s for i, s in enumerate(gr.shape(peak))),
                      (peak,), name=f"{name}_peak" if j == last else None, axis=axis)
    expo = ew(gr, lambda a, p, m: sp.Piecewise((sp.exp(a - p), m > 0), (0, True)), z, peak, smask,
              name=f"{name}_exp")
    total = expo
    for j, axis in enumerate(axes[ret.axis]):
        total = gr.sum(total, axis, name=f"{name}_total" if j == last else None)
    return ew(gr, lambda e, t: sp.Piecewise((ret.scale * e / t, t > 0), (0, True)), expo, total,
              name=name, formula=formula)


def finish(gr: Graph, d: Derivation, z: str, x: str, vmask: str, name: str,
            read: bool = False) -> str:
    """M(x) from its pre-activation z = W x: [x +] [LN](z), LN over DV (times ln_weight plus
    ln_bias when affine); on the `read` path read_residual 'output' adds z instead of x. The
    layer norm's tiles are named after z."""
    mem = d.spec.memory
    norm = mem.norm
    out = z
    text = z
    if norm is not None:
        dv = sp.Symbol("DV", positive=True)
        masked = ew(gr, lambda a, m: a * m, z, vmask, name=f"{z}_masked")
        mean = ew(gr, lambda s: s / dv, gr.sum(masked, 1, name=f"{z}_sum"), name=f"{z}_mean")
        centred = ew(gr, lambda a, b, m: (a - b) * m, z, mean, vmask, name=f"{z}_centred")
        squares = ew(gr, lambda a: a * a, centred, name=f"{z}_sq")
        var = ew(gr, lambda s: s / dv, gr.sum(squares, 1, name=f"{z}_sqsum"), name=f"{z}_var")
        out = ew(gr, lambda c, s: c / sp.sqrt(s + norm.eps), centred, var, name=f"{z}_ln")
        text = f"LN({z})"
        if norm.affine:
            out = ew(gr, lambda a, w, b: a * w + b, out, "ln_weight", "ln_bias",
                     name=f"{z}_affine")
            text = f"LN({z}) * ln_weight + ln_bias"
    if mem.residual:
        skip = z if read and mem.read_residual == "output" else x
        out = ew(gr, lambda a, b: a + b, skip, out, name=f"{z}_res")
        text = f"{skip} + {text}"
    return ew(gr, lambda a: a, out, name=name, formula=f"{name} = {text}")
