"""Taints: a step's outputs poisoned (NaN) where its inputs were not finite."""

from __future__ import annotations

import sympy as sp

from mirasc.graph import ew
from mirasc.memories.step import ChunkStep


def poisoned(step: ChunkStep) -> ChunkStep:
    """Non-finite inputs, causally. The loader replaces a row's non-finite k, v or gate
    (log_alpha -inf is a decay to 0, not an error) by padding and marks `tainted` [T, 1] the rows
    from the first such row on, and `qbad` the rows with a non-finite q: those rows read NaN, as
    does the new state after a tainted chunk, and a step whose state holds a NaN passes it on to
    all its rows and its new state (a retention map's or activation's `where` would turn it
    into a finite value). The rows before compute on finite values only, as if the rest of the
    sequence were finite; the selection keeps their gradients finite too."""
    gr = step.graph
    tainted, qbad = gr.const("tainted", ("T", 1), "tainted"), gr.const("qbad", ("T", 1), "qbad")
    nan = gr.const("nanfill", (1, 1), "nanfill")
    formula = "inherited = how many states hold an entry that is not finite"
    if len(step.states) == 1:
        inherited = gr.add("nonfinite", (1, 1), step.states, name="inherited", formula=formula)
    else:
        counts = [gr.add("nonfinite", (1, 1), (s,), name=f"nonfinite_{s}") for s in step.states]
        inherited = ew(gr, lambda *c: sp.Add(*c), *counts, name="inherited", formula=formula)
    spoiled = ew(gr, lambda a, b: a + b, gr.sum(tainted, 0, name="n_tainted"), inherited,
                 name="spoiled", formula="spoiled = n_tainted + inherited")

    def poison(flag, x, name):
        return ew(gr, lambda f, n, a: sp.Piecewise((n, f > 0), (a, True)), flag, nan, x, name=name,
                  formula=f"{name} = NaN if {flag} > 0 else {x}")

    bad_rows = ew(gr, lambda a, b, c: a + b + c, tainted, qbad, inherited, name="bad_rows",
                  formula="bad_rows = tainted + qbad + inherited")
    outputs = {"o": poison(bad_rows, step.outputs["o"], "o_out")}
    outputs |= {s: poison(spoiled, step.outputs[s], f"{s}_out") for s in step.states}
    return ChunkStep(gr, step.gates, step.states, outputs, step.params)
