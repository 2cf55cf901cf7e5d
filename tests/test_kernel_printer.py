"""mirasc.kernel_printer: which products under per-pair decays one helper call prints together,
where a prefix sum prints as a product, and where a reverse pass reads the tiles it loads."""

import re
from types import SimpleNamespace

from conftest import axis_spec

from mirasc.catalog import checked_spec, resolve
from mirasc.codegen import render_module
from mirasc.graph import Graph
from mirasc.kernel_printer import KernelPrinter


def _graph():
    g = Graph()
    for name in ("q", "k", "v"):
        g.input(name, ("T", "DK"))
    g.input("m", ("T", "T"))
    g.input("gam", ("T", "DK"))
    return g


def _calls(g, loaded=()):
    """The calls of the graph's computed nodes, in the order they were added."""
    nodes = [n for n in g.g.nodes if g.node(n)["op"] != "input"]
    return KernelPrinter.joint_products(SimpleNamespace(graph=g), nodes, loaded)


def test_a_product_its_mate_and_their_twins_are_one_call():
    """gmix(m, k) and gmix_t(m, q) on the same weights, exponents and offset, each with its twin
    at the next offset: one gmix_both call returning the four, by each of them."""
    g = _graph()
    a = g.gmix("m", "k", "gam", "gam", name="a")
    a1 = g.gmix("m", "k", "gam", "gam", offset=1, name="a1")
    b = g.gmix("m", "q", "gam", "gam", ta=True, name="b")
    b1 = g.gmix("m", "q", "gam", "gam", offset=1, ta=True, name="b1")
    calls = _calls(g)
    call = (["a", "a1", "b", "b1"], "gmix_both", ["m", "k", "q", "gam", "gam"], 0, True)
    assert calls == dict.fromkeys([a, a1, b, b1], call)


def test_mates_without_twins_and_a_twin_pair_alone():
    """Mates at offset 1 with no twins: gmix_both without TWIN, its twins' outputs dropped (`_`);
    a product whose only partner is its twin: gmix_pair; a product alone: no call (its
    expression prints it)."""
    g = _graph()
    g.gmix("m", "k", "gam", "gam", offset=1, name="a")
    g.gmix("m", "k", "gam", "gam", offset=1, ta=True, name="b")
    g.gmix("m", "v", "gam", "gam", offset=2, name="c")
    g.gmix("m", "v", "gam", "gam", offset=3, name="c1")
    g.gmix("m", "q", "gam", "gam", offset=5, ta=True, name="lone")
    calls = _calls(g)
    assert calls["a"] == calls["b"] == (["a", "_", "b", "_"], "gmix_both",
                                        ["m", "k", "k", "gam", "gam"], 1, False)
    assert calls["c"] == calls["c1"] == (["c", "c1"], "gmix_pair", ["m", "v", "gam", "gam"], 2, True)
    assert "lone" not in calls


def test_mates_stay_apart_where_the_call_would_come_before_an_argument():
    """A mate whose own operand is computed after the first product: printing both at the first
    would read it before it exists, so each is printed alone (with its twin)."""
    g = _graph()
    g.gmix("m", "k", "gam", "gam", name="a")
    g.gmix("m", "k", "gam", "gam", offset=1, name="a1")
    late = g.add("ew", ("T", "DK"), ("q",), name="late", expr=None, symbols=())
    g.gmix("m", late, "gam", "gam", ta=True, name="b")
    g.gmix("m", late, "gam", "gam", offset=1, ta=True, name="b1")
    calls = _calls(g)
    assert calls["a"][1] == "gmix_pair" and calls["b"][1] == "gmix_t_pair"
    assert calls["b"] == (["b", "b1"], "gmix_t_pair", ["m", "late", "gam", "gam"], 0, True)


def test_loaded_products_are_not_computed():
    g = _graph()
    g.gmix("m", "k", "gam", "gam", name="a")
    g.gmix("m", "q", "gam", "gam", ta=True, name="b")
    g.gmix("m", "q", "gam", "gam", offset=1, ta=True, name="b1")
    calls = _calls(g, loaded=("b",))
    assert "a" not in calls and "b" not in calls and "b1" not in calls


def test_two_sums_of_products_on_the_same_decays_are_one_call():
    """Among a pass's sums over key blocks, two gdots on the same b and exponents (KDA's q k^T
    and k k^T) take their parts from one gdot_both call; a third gdot on other exponents, and
    a sum of another op, are added alone."""
    g = _graph()
    g.input("lag", ("T", "DK"))
    g.gdot("q", "k", "gam", "gam", name="attn")
    g.gdot("k", "k", "gam", "gam", offset=1, name="kk")
    g.gdot("v", "k", "lag", "gam", offset=1, name="other")
    macros = SimpleNamespace(
        joint_gdots=lambda parts, args, offsets: f"{parts} = gdot_both({args}, {offsets})",
        accumulate=lambda name, part, op: f"{name} += {part}")
    printer = SimpleNamespace(graph=g, m=macros, ref=lambda n: n,
                              expression=lambda n: f"expr({n})")
    lines = KernelPrinter.accumulations(printer, ["attn", "kk", "other"])
    assert lines == ["['attn_block', 'kk_block'] = gdot_both(['q', 'k', 'k', 'gam', 'gam'], [0, 1])",
                     "attn += attn_block", "kk += kk_block", "other += expr(other)"]


def test_held_prefix_sums_are_products_outside_passes_over_blocks():
    """gamma = cumsum(max(log_alpha, -110)) prints as held_cumsum (a tensor-core product) where
    a kernel holds every key column, and as tl.cumsum inside a pass over key blocks (beside
    the pass's pair tiles): KDA's stage computes it both ways, the key-block pass nested one
    level deeper than the segment loop."""
    text = render_module(resolve("kda"))
    printed = set(re.findall(r"^( +)gam = (tl.cumsum|held_cumsum)\(", text, re.M))
    assert {(len(indent) > 8, call) for indent, call in printed} == {
        (True, "tl.cumsum"), (False, "held_cumsum")}


def test_a_reverse_pass_reads_the_kept_iterates_where_it_needs_them():
    """Muon per chunk: the backward pass loads each Newton-Schulz iterate the backward's stage
    stored just before the reverse of its step, last to first, and computes the first step's
    Gram matrix (from the recomputed X_0) only for the reverse of that step; every other shipped
    spec's kernels print in the graph's order (gated DeltaNet's module is tests/golden's)."""
    learner = "{kind: muon, eta: {}, momentum: {}, apply: chunk, ns_steps: 4}"
    text = render_module(checked_spec(axis_spec(learner=learner)))
    body = text[text.index("def axis_case_bwd_kernel"):text.index("def axis_case_bwd_dv_kernel")]

    def at(pattern):
        found = [m.start() for m in re.finditer(pattern, body)]
        assert len(found) == 1, (pattern, found)
        return found[0]

    loads = [at(rf"\bns{j} = tl\.load") for j in (3, 2)] + [at(r"\bns_moved1 = tl\.load")]
    reverse = [at(rf"\bdns{j} = ") for j in (3, 2, 1)]
    assert loads[0] < reverse[0] < loads[1] < reverse[1] < loads[2] < reverse[2]
    assert reverse[2] < at(r"\bns_gram1 = tl\.dot") < at(r"\bdns0 = ")
