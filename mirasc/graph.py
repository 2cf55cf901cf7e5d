"""The graph: one chunk step as a networkx DAG of tile operations, its reverse mode, and its
evaluation in torch.

Every value is a 2-D tile whose dims are symbolic ("T" chunk rows, "DK", "DV", or 1). Node ops:
  input    a tile loaded by the kernel (q, k, v, gates, the chunk-start state W)
  const    a tile the kernel builds (row mask, causal mask)
  dot      a @ b with optional transposes (tl.dot)
  ew       an elementwise sympy expression of its inputs (broadcasting, like numpy)
  sum      a reduction over one axis, keeping dims
  cumsum   an inclusive prefix sum over the rows
  trans    a transpose
  tri_inv  (I + A)^-1 for a strictly lower-triangular A (forward substitution)
  max      a reduction by max over one axis, keeping dims; used only as a constant offset (a
           softmax's stabiliser), so it passes no gradient
  gdot     a causal product under per-channel decays: out[t, i] = sum_d a[t, d] b[i, d]
           exp(ga[t, d] - gb[i, d]) for the pairs t - i >= offset, 0 elsewhere
  gmix     its companion: out[t, d] = sum_i m[t, i] x[i, d] exp(ga[t, d] - gb[i, d]) over the
           same pairs, or with `ta` out[i, d] = sum_t m[t, i] x[t, d] exp(ga[t, d] - gb[i, d])
           (every pair's exponent is selected before exp: exact for any decay, no overflow).
           `flat`: the exponent of the nearest pairs (t - i = offset) is 0 whatever the gates
  nonfinite  1 where an entry of a tile is NaN or +-inf, else 0, as [1, 1]; it passes no gradient
The backward is derived here, on the graph: `backward(graph, seeds, wrt)` adds the adjoint nodes
by reverse mode, with sympy differentiating every `ew` node, so no rule is written per model.
`plan` picks the nodes some targets need, in order; `evaluate` runs them on torch tiles (the
oracle for the emitted kernels and the CPU path). The chunk steps built on it are in
`mirasc.memories`, the kernels' layout in `mirasc.schedule`.
"""

from __future__ import annotations

import functools
import keyword
import math
import re
from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

# Names a node may not take: the kernels' own variables, helpers and constants (a node is a
# Triton variable of that name), Python's keywords and the builtins a kernel may call.
RESERVED = frozenset((
    "tl", "triton", "torch", "seg", "seg_back", "srow", "rows", "tok", "valid", "rowmask", "lastrow",
    "bos", "dln_weight_sum", "dln_bias_sum",
    "eos", "causal", "strict", "strict2", "vmask", "kmask", "hmask", "first_chunk", "n_chunks",
    "part", "step", "bad", "first", "clean", "q_rows", "offs_dv", "kernel", "op", "load_rows",
    "store_sum", "tri_inv",
    "dot_fp32", "gdot", "gmix", "gmix_t", "tanh", "atan", "pairs", "ChunkKernels", "MirasOp",
    "abs", "all", "any", "float", "int", "len", "max", "min", "pow", "range", "sum",
    "ACC", "BDK", "BDV", "BH", "BK", "BT", "BV", "CHUNK", "DH", "DK", "DOT", "DV", "H",
    "HAS_DHT", "HAS_H0", "IS_VARLEN", "PRECISION", "SEGMENTS", "STATE", "T", "NTOK",
))


def reserved(name: str) -> bool:
    """Whether a computed node may not be called `name` (inputs and consts are named as the
    kernels load or build them)."""
    return (name in RESERVED or keyword.iskeyword(name) or name.endswith("_ptr")
            or name.startswith(("offs_", "mask_", "i_")) or re.fullmatch(r"t\d+", name) is not None)


# The name of an unnamed node: its op, or for an elementwise node the head of its expression.
_OP_NAMES = {"sum": "total", "max": "peak", "tri_inv": "inv", "gdot": "gprod", "gmix": "gmixed",
             "broadcast": "bcast"}
_HEAD_NAMES = {sp.exp: "exp", sp.log: "log", sp.erf: "erf", sp.Piecewise: "where", sp.Add: "add",
               sp.Mul: "mul", sp.Symbol: "copy"}


def _fallback(op: str, attrs: dict) -> str:
    if op != "ew":
        return _OP_NAMES.get(op, op)
    expr = attrs["expr"]
    if isinstance(expr, sp.Mul) and len(expr.args) == 2 and expr.args[0] == -1:
        return "neg"
    if isinstance(expr, sp.Pow):
        return "sqrt" if expr.exp == sp.Rational(1, 2) else "recip" if expr.exp == -1 else "power"
    return _HEAD_NAMES.get(expr.func, "ew")


@dataclass
class Graph:
    """A DAG of named tile nodes (insertion order is a topological order). Every node's name is
    a Triton variable of the kernels: the builders name what they compute after the math, reverse
    mode names adjoints after their nodes, and an unnamed node is named after its op; a name
    taken (or `reserved`) gets the first free suffix _2, _3, ... A node may carry a `formula`,
    a one-line statement of what it computes."""

    g: nx.DiGraph = field(default_factory=nx.DiGraph)

    def add(self, op: str, shape: tuple, inputs: tuple[str, ...] = (), name: str | None = None,
            formula: str | None = None, **attrs) -> str:
        if op in ("input", "const"):
            assert name is not None and name not in self.g, name
        else:
            name = self.free(name or _fallback(op, attrs))
        if formula is not None:
            attrs["formula"] = formula
        self.g.add_node(name, op=op, shape=shape, inputs=inputs, **attrs)
        for src in inputs:
            self.g.add_edge(src, name)
        return name

    def free(self, name: str) -> str:
        """`name`, or with the first suffix _2, _3, ... that no node has and is not reserved."""
        assert name.isidentifier(), name
        out, i = name, 1
        while out in self.g or reserved(out):
            i += 1
            out = f"{name}_{i}"
        return out

    def rename(self, names: dict[str, str]) -> None:
        """Rename nodes, keeping the insertion order (the order of `order` and of the code)."""
        if not names:
            return
        g = nx.DiGraph()
        for n, data in self.g.nodes(data=True):
            inputs = tuple(names.get(i, i) for i in data["inputs"])
            g.add_node(names.get(n, n), **(data | {"inputs": inputs}))
        g.add_edges_from((names.get(a, a), names.get(b, b)) for a, b in self.g.edges)
        self.g = g

    def node(self, name: str) -> dict:
        return self.g.nodes[name]

    def shape(self, name: str) -> tuple:
        return self.node(name)["shape"]

    # -- builders ---------------------------------------------------------------------------

    def input(self, name: str, shape: tuple, differentiable: bool = True) -> str:
        return self.add("input", shape, name=name, differentiable=differentiable)

    def const(self, name: str, shape: tuple, kind: str) -> str:
        return self.add("const", shape, name=name, kind=kind)

    def dot(self, a: str, b: str, ta: bool = False, tb: bool = False, name=None,
            formula=None) -> str:
        rows = self.shape(a)[1 if ta else 0]
        cols = self.shape(b)[0 if tb else 1]
        return self.add("dot", (rows, cols), (a, b), name=name, formula=formula, ta=ta, tb=tb)

    def ew(self, expr: sp.Expr, args: dict[sp.Symbol, str], name=None, formula=None) -> str:
        """An elementwise node computing `expr` with each symbol bound to a node."""
        used = {s: n for s, n in args.items() if expr.has(s)}
        symbols = tuple(used)
        inputs = tuple(used[s] for s in symbols)
        shape = broadcast(*(self.shape(n) for n in inputs)) if inputs else (1, 1)
        return self.add("ew", shape, inputs, name=name, formula=formula, expr=expr,
                        symbols=symbols)

    def sum(self, x: str, axis: int, name=None, formula=None) -> str:
        shape = tuple(1 if i == axis else d for i, d in enumerate(self.shape(x)))
        return self.add("sum", shape, (x,), name=name, formula=formula, axis=axis)

    def cumsum(self, x: str, name=None, formula=None) -> str:
        return self.add("cumsum", self.shape(x), (x,), name=name, formula=formula)

    def trans(self, x: str, name=None) -> str:
        return self.add("trans", self.shape(x)[::-1], (x,), name=name)

    def gdot(self, a: str, b: str, ga: str, gb: str, offset: int = 0, flat: bool = False,
             name=None, formula=None) -> str:
        flat = flat or (ga == gb and offset == 0)
        return self.add("gdot", ("T", "T"), (a, b, ga, gb), name=name, formula=formula,
                        offset=offset, flat=flat)

    def gmix(self, m: str, x: str, ga: str, gb: str, offset: int = 0, ta: bool = False,
             flat: bool = False, name=None, formula=None) -> str:
        flat = flat or (ga == gb and offset == 0)
        return self.add("gmix", self.shape(x), (m, x, ga, gb), name=name, formula=formula,
                        offset=offset, ta=ta, flat=flat)

    def order(self) -> list[str]:
        return list(nx.topological_sort(self.g))


def broadcast(*shapes: tuple) -> tuple:
    out = []
    for dims in zip(*shapes, strict=True):
        sized = {d for d in dims if d != 1}
        assert len(sized) <= 1, f"cannot broadcast {shapes}"
        out.append(sized.pop() if sized else 1)
    return tuple(out)


def _x(i: int) -> sp.Symbol:
    return sp.Symbol(f"x{i}", real=True)


def ew(graph: Graph, text_expr, *nodes: str, name=None, formula=None) -> str:
    """Shorthand: an elementwise node from a function of sympy symbols x0, x1, ..."""
    symbols = [_x(i) for i in range(len(nodes))]
    return graph.ew(text_expr(*symbols), dict(zip(symbols, nodes, strict=True)), name=name,
                    formula=formula)


def plan(graph: Graph, targets, stop=()) -> tuple[str, ...]:
    """The nodes `targets` depend on, in topological order (what `evaluate` must run); a node in
    `stop` is taken as given (its inputs are not needed for it)."""
    keep, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            if n not in stop:
                todo.extend(graph.g.predecessors(n))
    return tuple(n for n in graph.order() if n in keep)


def held_by_inputs(graph: Graph, n: str) -> bool:
    """Whether every value of node n is an input's or a constant that float16 and bfloat16 hold
    exactly: an input, or a selection among such values (max(log_alpha, -110)). Inputs share
    q's dtype, the matmul operands' (`launch.operands`), so a product of such a tile by 0s and 1s
    is exact on tensor cores."""
    node = graph.node(n)
    if node["op"] == "input":
        return True
    if node["op"] != "ew":
        return False
    held = {s for s, i in zip(node["symbols"], node["inputs"], strict=True)
            if held_by_inputs(graph, i)}
    return _selects(node["expr"], held)


def _selects(expr: sp.Expr, held: set) -> bool:
    """Whether expr takes only the values of the `held` symbols and of half-exact constants."""
    if isinstance(expr, sp.Symbol):
        return expr in held
    if isinstance(expr, sp.Number):
        return _half_exact(float(expr))
    if isinstance(expr, sp.Piecewise):
        return all(_selects(value, held) for value, _ in expr.args)
    if isinstance(expr, sp.Max | sp.Min):
        return all(_selects(a, held) for a in expr.args)
    return False


def _half_exact(c: float) -> bool:
    """Whether float16 and bfloat16 both hold c: zero, or a normal float16 of at most 8
    significant bits."""
    mantissa = math.frexp(c)[0]
    return c == 0 or 2.0 ** -14 <= abs(c) <= 65504 and (mantissa * 2 ** 8).is_integer()


# ---- reverse mode --------------------------------------------------------------------------------


def _ae(expr: sp.Expr) -> sp.Expr:
    return expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0))


def backward(graph: Graph, seeds: dict[str, str], wrt: tuple[str, ...],
             prefix: str = "d") -> dict[str, str]:
    """Add adjoint nodes for d(sum <output, seed>)/d(wrt) to `graph`; returns {wrt: adjoint}.

    `seeds` maps forward outputs to the input nodes holding their cotangents. The adjoint of a
    node x is named `{prefix}x` (a pullback inside the forward step, such as the memory's own
    gradient, takes another prefix than the training gradient's "d"); where x has several
    consumers, the contribution through consumer c is `{prefix}x_from_c` and `{prefix}x` their
    sum."""
    forward = [n for n in graph.order() if n not in seeds.values()]
    made = set(graph.g)
    index = {n: i for i, n in enumerate(graph.g)}
    needed = set()
    for n in wrt:
        needed |= nx.descendants(graph.g, n) | {n}
    contributions: dict[str, list[str]] = {n: [] for n in forward}
    for out, seed in seeds.items():
        contributions[out].append(seed)
    adjoint: dict[str, str] = {}
    for n in reversed(forward):
        if n not in needed or not contributions.get(n):
            continue
        adjoint[n] = _accumulate(graph, n, contributions[n], prefix)
        node = graph.node(n)
        for src, grad in _vjp(graph, n, node, adjoint[n], prefix, index[n]):
            if src in needed:
                contributions[src].append(grad)
    # A node with one contribution has it as its adjoint: named so, where it is no one else's.
    uses = [p for parts in contributions.values() for p in parts] + list(adjoint.values())
    names = {}
    for n, a in adjoint.items():
        if a not in made and uses.count(a) == 2 and f"{prefix}{n}" not in graph.g:
            names[a] = graph.free(f"{prefix}{n}")
    graph.rename(names)
    return {n: names.get(adjoint[n], adjoint[n]) if n in adjoint else None for n in wrt}


def _accumulate(graph: Graph, n: str, parts: list[str], prefix: str) -> str:
    shape = graph.shape(n)
    name = f"{prefix}{n}"
    parts = _one_sum(graph, parts, name)
    if len(parts) == 1:
        total = parts[0]
    else:
        wide = broadcast(*(graph.shape(p) for p in parts)) != shape
        total = ew(graph, lambda *xs: sp.Add(*xs), *parts, name=f"{name}_parts" if wide else name)
    if graph.shape(total) != shape:
        total = graph.add("broadcast", shape, (total,), name=name)
    return total


def _one_sum(graph: Graph, parts: list[str], name: str) -> list[str]:
    """`parts` with its sums of pair tiles [T, T] along one axis (read by nothing else yet) made
    one sum of their sum, sum(X) + sum(Y) = sum(X + Y): one reduction (a column sum crosses the
    warps) where there were several. Gated DeltaNet, bf16, D=64, sm_90, (8, 4096, 16): its gate
    gradient's two row and two column sums (from its two decay matrices) as one each cut its
    dq/dk kernel from 264 to 257 M warp-instructions. Pair tiles only: they live in the kernels
    holding a chunk's pairs, where a sum of tiles [T, DV] may be a stage's (a [1, DV] tile
    through memory, not a [T, DV] one)."""
    groups: dict[int, list[str]] = {}
    for p in parts:
        node = graph.node(p)
        if node["op"] == "sum" and graph.g.out_degree(p) == 0 and \
                graph.shape(node["inputs"][0]) == ("T", "T"):
            groups.setdefault(node["axis"], []).append(p)
    merged, dropped = {}, set()
    for axis, group in groups.items():
        if len(group) > 1:
            tiles = [graph.node(p)["inputs"][0] for p in group]
            graph.g.remove_nodes_from(group)
            total = ew(graph, lambda *xs: sp.Add(*xs), *tiles, name=f"{name}_summands")
            merged[group[0]] = graph.sum(total, axis, name=f"{name}_sum")
            dropped.update(group[1:])
    return [merged.get(p, p) for p in parts if p not in dropped]


def _reduce_to(graph: Graph, grad: str, shape: tuple, name: str) -> str:
    """grad summed over the axes where `shape` is 1; the last sum is `name`."""
    axes = [axis for axis, (have, want) in enumerate(zip(graph.shape(grad), shape, strict=True))
            if want == 1 and have != 1]
    for i, axis in enumerate(axes):
        grad = graph.sum(grad, axis, name=name if i == len(axes) - 1 else f"{name}_half")
    return grad


def symmetric(graph: Graph, n: str) -> bool:
    """Whether node n is a symmetric matrix by construction: a Gram matrix x x^T (x^T x), a
    product of a symmetric matrix with itself, or an elementwise function of symmetric matrices
    and scalars (Newton-Schulz's A, A^2 and b A + c A^2)."""
    node, shape = graph.node(n), graph.shape(n)
    if shape[0] != shape[1] or 1 in shape:
        return False
    if node["op"] == "dot":
        a, b = node["inputs"]
        return a == b and (node["ta"] != node["tb"] or symmetric(graph, a))
    return node["op"] == "ew" and all(graph.shape(i) == (1, 1) or symmetric(graph, i)
                                      for i in node["inputs"])


def _vjp(graph: Graph, n: str, node: dict, dy: str, prefix: str, index: int):
    """(input, its contribution) of node n (the graph's `index`-th) with adjoint dy; a
    contribution to x is named `{prefix}x_from_n`, n without a `_from_` part of its own (and the
    node it sums over broadcast axes `..._full`)."""
    op, inputs = node["op"], node["inputs"]

    def part(src):
        return f"{prefix}{src}_from_{n.split('_from_')[0]}"

    if op == "dot" and inputs[0] == inputs[1] and node["ta"] != node["tb"] and \
            "T" not in graph.shape(n):
        # a Gram matrix of a state-sized tile, x x^T (x^T x): d x = (dy + dy^T) x (x (dy + dy^T)),
        # one product where there were two (Newton-Schulz's reverse holds one operand fewer)
        x = inputs[0]
        both = ew(graph, lambda u, v: u + v, dy, graph.trans(dy, name=f"{dy}_t"),
                  name=f"{dy}_sym")
        yield x, graph.dot(x, both, name=part(x)) if node["ta"] else \
            graph.dot(both, x, name=part(x))
    elif op == "dot":
        a, b = inputs
        # a symmetric operand is its own transpose: every product reads it one way round
        sa, sb = symmetric(graph, a), symmetric(graph, b)
        ta, tb = node["ta"] and not sa, node["tb"] and not sb
        da = graph.dot(b, dy, ta=tb, tb=True, name=part(a)) if ta else \
            graph.dot(dy, b, tb=not (tb or sb), name=part(a))
        db = graph.dot(dy, a, ta=True, tb=ta, name=part(b)) if tb else \
            graph.dot(a, dy, ta=not (ta or sa), name=part(b))
        yield a, da
        yield b, db
    elif op == "ew":
        expr, symbols = node["expr"], node["symbols"]
        # fresh: the expression may be an adjoint itself. Named by the node's place, not its
        # name: sympy orders a product's factors by name, and so the code's products.
        dsym = sp.Symbol(f"d_{index:05d}", real=True)
        # the node's own value where its partials repeat it (d exp(x) = exp(x) dx): a kernel
        # that loads it does not recompute it
        ysym = sp.Symbol(f"y_{index:05d}", real=True)
        for sym, src in zip(symbols, inputs, strict=True):
            partial = _ae(sp.diff(expr, sym))
            if partial == 0:
                continue
            if expr.has(sp.exp):
                partial = partial.subs(expr, ysym)
            args = {s: i for s, i in zip(symbols, inputs, strict=True)} | {dsym: dy, ysym: n}
            chain = _chain(graph, dsym, partial, args)
            used = [i for s, i in args.items() if chain.has(s)]
            full = broadcast(*(graph.shape(i) for i in used)) if used else (1, 1)
            reduced = _reduced(full, graph.shape(src))
            grad = graph.ew(chain, args, name=part(src) + ("_full" if reduced else ""))
            yield src, _reduce_to(graph, grad, graph.shape(src), part(src))
    elif op == "sum":
        yield inputs[0], graph.add("broadcast", graph.shape(inputs[0]), (dy,), name=part(inputs[0]))
    elif op == "cumsum":
        yield inputs[0], graph.add("revcumsum", graph.shape(dy), (dy,), name=part(inputs[0]))
    elif op == "trans":
        yield inputs[0], graph.trans(dy, name=part(inputs[0]))
    elif op == "broadcast":
        yield inputs[0], _reduce_to(graph, dy, graph.shape(inputs[0]), part(inputs[0]))
    elif op == "tri_inv":  # X = (I + A)^-1: dA = -X^T dX X^T
        name = part(inputs[0])
        left = graph.dot(n, dy, ta=True, name=f"{name}_left")
        yield inputs[0], ew(graph, lambda m: -m, graph.dot(left, n, tb=True, name=f"{name}_neg"),
                            name=name)
    elif op in ("gdot", "gmix"):
        yield from _decayed_vjp(graph, n, node, dy, part)


def _reduced(have: tuple, want: tuple) -> bool:
    return any(w == 1 and h != 1 for h, w in zip(have, want, strict=True))


def _chain(graph: Graph, dy: sp.Symbol, partial: sp.Expr, args: dict) -> sp.Expr:
    """dy * partial; a partial that is a where on a per-step flag ([1, 1], e.g. whether a state
    is spoiled) between constants selects dy instead, so that a NaN dy (a spoiled state's
    gradient) does not pass as 0 * NaN. (A where on bits of another shape may feed a tl.dot,
    whose operand layouts Triton cannot give to bits; such cotangents are finite.)"""
    chain = dy * partial
    if isinstance(partial, sp.Piecewise) and all(v.is_number for v, _ in partial.args):
        flags = set().union(*(c.free_symbols for _, c in partial.args))
        if all(graph.shape(args[f]) == (1, 1) for f in flags):
            return sp.piecewise_fold(chain)
    return chain


def _decayed_vjp(graph: Graph, n: str, node: dict, dy: str, part):
    """Reverse mode of gdot and gmix (E_tid = exp(ga_td - gb_id) on the causal pairs): each
    adjoint of a or b (m or x) is the other op with dy in its place; with y the node's output,
    dga = a * da and dgb = -b * db for gdot; dga = dy * y, dgb = -x * dx for gmix (dga = x * dx,
    dgb = -dy * y for its transpose)."""
    ga, gb, offset, flat = *node["inputs"][2:], node["offset"], node["flat"]
    # The nearest pairs of a flat node have the exponent 0: their terms in dga and dgb cancel,
    # so the gates' gradients sum the farther pairs only (the cancellation would leave rounding,
    # which swamps the gradient of a large decay).
    far = dict(offset=offset + 1) if flat else None
    same = dict(offset=offset, flat=flat)

    def gate(g, fn, *xs):
        """A gate's contribution (before its sum over the broadcast axes, if any)."""
        full = broadcast(*(graph.shape(x) for x in xs))
        return ew(graph, fn, *xs, name=part(g) + ("_full" if _reduced(full, graph.shape(g)) else ""))

    if node["op"] == "gdot":
        a, b = node["inputs"][:2]
        da = graph.gmix(dy, b, ga, gb, **same, name=part(a))
        db = graph.gmix(dy, a, ga, gb, ta=True, **same, name=part(b))
        da_g = da if far is None else graph.gmix(dy, b, ga, gb, **far, name=f"{part(a)}_far")
        db_g = db if far is None else graph.gmix(dy, a, ga, gb, ta=True, **far,
                                                 name=f"{part(b)}_far")
        grads = [(a, da), (b, db), (ga, gate(ga, lambda x, y: x * y, a, da_g)),
                 (gb, gate(gb, lambda x, y: -x * y, b, db_g))]
    else:
        m, x = node["inputs"][:2]
        ta = node["ta"]
        if ta:  # y_i = sum_t m_ti x_t E_ti
            dm = graph.gdot(x, dy, ga, gb, **same, name=part(m))
            dx = graph.gmix(m, dy, ga, gb, **same, name=part(x))
        else:  # y_t = sum_i m_ti x_i E_ti
            dm = graph.gdot(dy, x, ga, gb, **same, name=part(m))
            dx = graph.gmix(m, dy, ga, gb, ta=True, **same, name=part(x))
        y = n if far is None else graph.gmix(m, x, ga, gb, ta=ta, **far, name=f"{n}_far")
        dx_g = dx if far is None else graph.gmix(m, dy, ga, gb, ta=not ta, **far,
                                                 name=f"{part(x)}_far")
        if ta:
            dga = gate(ga, lambda u, w: u * w, x, dx_g)
            dgb = gate(gb, lambda u, w: -u * w, dy, y)
        else:
            dga = gate(ga, lambda u, w: u * w, dy, y)
            dgb = gate(gb, lambda u, w: -u * w, x, dx_g)
        grads = [(m, dm), (x, dx), (ga, dga), (gb, dgb)]
    for src, grad in grads:
        yield src, _reduce_to(graph, grad, graph.shape(src), part(src))

# ---- evaluation in torch -------------------------------------------------------------------------


def evaluate(graph: Graph, values: dict, sizes: dict, nodes=None) -> dict:
    """Run the graph (or the `nodes` of a `plan`, in order) on torch tiles [..., rows, cols] with
    any leading batch dims: the oracle for the emitted code and the reverse mode, and the CPU
    path (`mirasc.torch_chunk`). `values` holds the input and const nodes needed; `sizes` the
    kernel constants (e.g. {"T": 64, "DV": 5}). gdot and gmix run by sub-chunks
    (`decayed_pairs`), their decays shared by the nodes on the same gates."""
    import torch

    from mirasc.expr import to_torch

    env = dict(values)
    decays = {}  # (ga, gb) -> PairDecays: shared by the gdot and gmix nodes on the same gates
    constants = {sp.Symbol(n, positive=True): v for n, v in sizes.items()}
    like = next(iter(values.values()))
    for n in graph.order() if nodes is None else nodes:
        if n in env:
            continue
        node = graph.node(n)
        x = [env[i] for i in node["inputs"]]
        op = node["op"]
        if op == "dot":
            a = x[0].transpose(-1, -2) if node["ta"] else x[0]
            b = x[1].transpose(-1, -2) if node["tb"] else x[1]
            out = a @ b
        elif op == "ew":
            scope = dict(zip(node["symbols"], x, strict=True)) | constants
            out = to_torch(node["expr"], scope)
            if not isinstance(out, torch.Tensor):
                out = like.new_full((1, 1), float(out))
        elif op == "sum":
            out = x[0].sum(node["axis"] - 2, keepdim=True)
        elif op == "nonfinite":
            out = (~torch.isfinite(x[0])).any(-1, keepdim=True).any(-2, keepdim=True).to(x[0].dtype)
        elif op == "max":  # a stabiliser: no gradient flows through it
            out = x[0].amax(node["axis"] - 2, keepdim=True).detach()
        elif op == "cumsum":
            out = x[0].cumsum(-2)
        elif op == "revcumsum":
            out = x[0].flip(-2).cumsum(-2).flip(-2)
        elif op == "trans":
            out = x[0].transpose(-1, -2)
        elif op in ("gdot", "gmix"):
            gates = tuple(node["inputs"][2:])
            if gates not in decays:
                decays[gates] = PairDecays(*x[2:])
            out = decayed_pairs("gmix_t" if node.get("ta") else op, *x[:2], decays[gates],
                                node["offset"])
        elif op == "tri_inv":  # (I + A)^-1, A strictly lower triangular
            eye = torch.eye(x[0].shape[-1], dtype=x[0].dtype, device=x[0].device)
            out = torch.linalg.solve_triangular(eye + x[0], eye.expand_as(x[0]), upper=False,
                                                unitriangular=True)
        else:  # broadcast
            dims = [1 if d == 1 else sizes[d] for d in node["shape"]]
            out = x[0].expand(*x[0].shape[:-2], *dims)
        env[n] = out
    return env


SUB = 16  # rows of a sub-chunk in `decayed_pairs`


class PairDecays:
    """The decays E_tid = exp(ga_td - gb_id) of two gate tiles [..., T, D] (or [..., T, 1]) by
    sub-chunks of SUB rows (the last may be shorter; padded with the gates' last row), each
    computed once and shared by the ops on the same gates:
      near(offset)  the diagonal SUB x SUB blocks, every pair's exponent selected before exp
                    (t - i >= offset), [..., n, t, i, D];
      earlier()     exp(ga_t - ga_r) [..., n, SUB, D] and exp(ga_r - gb_i) for the rows i before
                    sub-chunk s [..., n, nT, D], r = the first row of s (gdot, gmix);
      later()       exp(ga_t - ga_r) for the rows t after sub-chunk s [..., n, nT, D] and
                    exp(ga_r - gb_i) [..., n, SUB, D], r = the first row of s + 1 (gmix_t).
    Every factor is at most 1 when ga is non-increasing in t and ga_t - gb_i <= 0 for t > i
    (a running sum of log decays, and its exclusive form against it, as the graphs build them):
    no exp overflows whatever the decays."""

    def __init__(self, ga, gb):
        import torch

        ga, gb = torch.broadcast_tensors(ga, gb)
        self.length = length = ga.shape[-2]
        self.blocks = -(-length // SUB)
        pad = self.blocks * SUB - length
        if pad:
            ga, gb = (torch.cat([g, g[..., -1:, :].expand(*g.shape[:-2], pad, g.shape[-1])], -2)
                      for g in (ga, gb))
        self.ga, self.gb = ga, gb
        self.ga_b, self.gb_b = (g.unflatten(-2, (self.blocks, SUB)) for g in (ga, gb))
        self.masks = functools.partial(_sub_chunk_masks, length, dtype=ga.dtype, device=ga.device)
        self._near, self._far = {}, {}

    def near(self, offset: int):
        if offset not in self._near:
            exponent = self.ga_b.unsqueeze(-2) - self.gb_b.unsqueeze(-3)
            self._near[offset] = (exponent + self.masks(offset)["near"]).exp()
        return self._near[offset]

    def earlier(self):
        if "earlier" not in self._far:
            ref = self.ga_b[..., :1, :]  # [..., n, 1, D]: each sub-chunk's first row
            self._far["earlier"] = ((self.ga_b - ref).exp(), (
                ref - self.gb.unsqueeze(-3) + self.masks(0)["earlier"]).exp())
        return self._far["earlier"]

    def later(self):
        import torch

        if "later" not in self._far:
            ga_b, masks = self.ga_b, self.masks(0)
            ref = torch.cat([ga_b[..., 1:, :1, :], ga_b[..., -1:, :1, :]], -3)  # the next's first
            self._far["later"] = ((self.ga.unsqueeze(-3) - ref + masks["later"]).exp(),
                                  (ref - self.gb_b + masks["has_later"]).exp())
        return self._far["later"]


def decayed_pairs(kind: str, u, w, decays: PairDecays, offset: int):
    """gdot (u = a, w = b), gmix or gmix_t (u = m, w = x) of torch tiles [..., T, *] on the
    pairs t - i >= offset with the `decays` E_tid: the diagonal SUB x SUB blocks by their
    exact terms, the pairs (t, i) in different sub-chunks factored at a reference row r between
    them, exp(ga_t - gb_i) = exp(ga_t - ga_r) exp(ga_r - gb_i), so that each block row is one
    matmul, e.g. gdot's sum_d (a_td exp(ga_td - ga_rd)) (b_id exp(ga_rd - gb_id)). Such pairs
    have t - i >= 1: a larger offset also masks the pair weights (m) or the product (gdot)."""
    import torch

    length, blocks = decays.length, decays.blocks
    pad = blocks * SUB - length
    if pad:  # rows past T: zero data
        u = torch.nn.functional.pad(u, (0, pad if kind != "gdot" else 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, 0, 0, pad))
    w_b = w.unflatten(-2, (blocks, SUB))
    near = decays.near(offset)
    if kind != "gdot" and offset > 1:
        u = torch.where(decays.masks(offset)["pairs"], u, 0.0)
    if kind == "gmix_t":  # out_i = sum_(t >= i + offset) m_ti x_t E_ti
        sources, rows = decays.later()
        far = (u.transpose(-1, -2).unflatten(-2, (blocks, SUB)) @ (w.unsqueeze(-3) * sources)) \
            * rows
        near = (_diagonal_blocks(u, blocks).unsqueeze(-1) * near * w_b.unsqueeze(-2)).sum(-3)
        return (far + near).flatten(-3, -2)[..., :length, :]
    rows, sources = decays.earlier()
    if kind == "gmix":  # out_t = sum_(i <= t - offset) m_ti x_i E_ti
        far = (u.unflatten(-2, (blocks, SUB)) @ (w.unsqueeze(-3) * sources)) * rows
        near = (_diagonal_blocks(u, blocks).unsqueeze(-1) * near * w_b.unsqueeze(-3)).sum(-2)
        return (far + near).flatten(-3, -2)[..., :length, :]
    a_b = u.unflatten(-2, (blocks, SUB))
    far = (a_b * rows) @ (w.unsqueeze(-3) * sources).transpose(-1, -2)
    near = (a_b.unsqueeze(-2) * w_b.unsqueeze(-3) * near).sum(-1)
    eye = decays.masks(offset)["eye"]  # [n, 1, n, 1]: the block-diagonal's placement
    out = far.flatten(-3, -2) + (near.unsqueeze(-2) * eye).flatten(-4, -3).flatten(-2, -1)
    if offset > 1:
        out = torch.where(decays.masks(offset)["pairs"], out, 0.0)
    return out[..., :length, :length]


@functools.lru_cache(maxsize=32)
def _sub_chunk_masks(length: int, offset: int, dtype, device) -> dict:
    """For `decayed_pairs` on T = `length` rows padded to n sub-chunks: the pairs [nT, nT]
    (t - i >= offset, t real), the identity [n, 1, n, 1] and, as exponents' masks (0 where
    kept, -inf where not: exp of the sum is 0 there, whatever the finite exponent), the pairs'
    diagonal blocks [n, SUB, SUB, 1] and per sub-chunk s the rows i before it ("earlier",
    [n, nT, 1]), the rows t after it ("later") and whether it has any ("has_later", [n, 1, 1])."""
    import torch

    blocks = -(-length // SUB)
    rows = torch.arange(blocks * SUB, device=device)
    pairs = (rows[:, None] - rows[None, :] >= offset) & (rows[:, None] < length)
    block = torch.arange(blocks, device=device)[:, None]
    keep = {"near": _diagonal_blocks(pairs, blocks)[..., None],
            "earlier": (rows // SUB < block)[..., None], "later": (rows // SUB > block)[..., None],
            "has_later": (block < blocks - 1)[..., None]}
    drop = torch.tensor(float("-inf"), dtype=dtype, device=device)
    eye = torch.eye(blocks, dtype=dtype, device=device)[:, None, :, None]
    return {"pairs": pairs, "eye": eye} | {n: torch.where(k, 0.0, drop) for n, k in keep.items()}


def _diagonal_blocks(x, blocks: int):
    """The SUB x SUB diagonal blocks of [..., T, T] as [..., blocks, SUB, SUB]."""
    x = x.unflatten(-1, (blocks, SUB)).unflatten(-3, (blocks, SUB))  # [..., n, t, n', i]
    return x.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
