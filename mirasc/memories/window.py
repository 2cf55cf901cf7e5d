"""bias.window (Atlas's Omega rule) in a chunk step: row t's update is eta_t sum_i gamma_i
grad_i(W_s) over the window i = t-c+1..t, so a read or a chunk-end sum of the updates,
sum_t M_t. eta_t U_t, regroups by the gradient rows i with the band B_ti = [0 <= t - i < c]:
(M diag(eta) B) for the chunk's own rows and (M diag(eta) B') for the previous chunk's last
c - 1 rows (B'_ti = [t + T - i < c]), whose gradients at W_s the step takes from the tiles
k_prev, v_prev (and the gates' rows) of the previous chunk, masked by `prevmask` to its rows
of the same sequence. A window of one token only weighs each gradient by gamma."""

from __future__ import annotations

import sympy as sp

from mirasc.derive import Derivation
from mirasc.graph import Graph, ew

PREVIOUS = ("k", "v", "delta", "window_weight")  # the tiles loaded again for the previous rows


def banded(d: Derivation) -> bool:
    """Whether the window holds more than one token (then updates mix through the band)."""
    window = d.spec.bias.window
    return window is not None and window.size > 1


def previous_rows(gr: Graph, d: Derivation, ctx: dict, key_dim: str) -> dict:
    """The previous chunk's tiles of the inputs a gradient reads (k_prev [T, key_dim], v_prev,
    and the row gates delta_prev, window_weight_prev), and `prevmask` [T, 1]: its last c - 1 rows
    where they exist in the same sequence. Their names, by the current rows' ones."""
    shapes = {"k": ("T", key_dim), "v": ("T", "DV")}
    rows = {"rowmask": gr.const("prevmask", ("T", 1), "prevmask")}
    for name in PREVIOUS:
        if name in shapes:
            rows[name] = gr.input(f"{name}_prev", shapes[name])
        elif name in ctx["gates"]:
            rows[name] = gr.input(f"{name}_prev", gr.shape(name))
    return rows


def eta_rows(gr: Graph, d: Derivation, rowmask: str, by_query: bool) -> str | None:
    """eta per row [T, 1], which the band carries into the mix (None when the step is the reading
    token's: it scales the reads instead)."""
    if by_query:
        return None
    gate = d.spec.learner.eta
    if gate.is_input:
        return "eta"
    return ew(gr, lambda m: m * sp.Float(gate.value), rowmask, name="eta_rows",
              formula=f"eta_rows = {gate.value:g} on real rows")


def _bands(gr: Graph) -> tuple[str, str]:
    band = "band" if "band" in gr.g else gr.const("band", ("T", "T"), "band")
    prev = "band_prev" if "band_prev" in gr.g else gr.const("band_prev", ("T", "T"), "band_prev")
    return band, prev


def window_mix(gr: Graph, mat: str, eta: str | None, name: str) -> tuple[str, str]:
    """A read's mix of the updates, mat [T, T] over (reading row, updating row), regrouped by the
    gradient rows: (mat diag(eta) B, mat diag(eta) B')."""
    band, prev = _bands(gr)
    if eta is not None:
        mat = ew(gr, lambda m, e: m * e, mat, gr.trans(eta, name=f"{name}_eta_row"),
                 name=f"{name}_eta", formula=f"{name}_eta = {mat} diag(eta)")
    return (gr.dot(mat, band, name=name, formula=f"{name} = {mat} diag(eta) band"),
            gr.dot(mat, prev, name=f"{name}_prev", formula=f"{name}_prev = {mat} diag(eta) band_prev"))


def window_weights(gr: Graph, x: str, eta: str | None, name: str) -> tuple[str, str]:
    """A chunk-end sum's weights x [T, 1] of the updating rows, regrouped by the gradient rows:
    (B^T (eta x), B'^T (eta x))."""
    band, prev = _bands(gr)
    if eta is not None:
        x = ew(gr, lambda a, e: a * e, x, eta, name=f"{name}_eta", formula=f"{name}_eta = eta {x}")
    return (gr.dot(band, x, ta=True, name=name, formula=f"{name} = band^T {x}"),
            gr.dot(prev, x, ta=True, name=f"{name}_prev", formula=f"{name}_prev = band_prev^T {x}"))
