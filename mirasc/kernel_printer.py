"""Printing one kernel of a schedule: walk its plan (`mirasc.schedule.KernelPlan`) and emit its
statements through the named macros of templates/statements.j2 (a load of a tile, a loop over
the blocks of a dim, a store, a dot, ...); expressions of sympy nodes through `triton_source`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirasc.graph import held_by_inputs, plan
from mirasc.memories import ChunkStep
from mirasc.memories.step import masked_input
from mirasc.schedule import KernelPlan, Schedule
from mirasc.schedule.stages import ACROSS_V, tile_dtype

INLINE_WIDTH = 60  # the longest expression a reader takes in rather than a named value
# what a masked or non-finite entry of an input loads as (0.0 where not named): no log(0), no 1/0
PADS = {"v": "1.0", "delta": "1.0", "momentum": "1.0", "v_prev": "1.0", "delta_prev": "1.0"}
WINDOW_CONSTS = ("band", "band_prev", "prevmask")  # bias.window's masks, built per step
BLOCKS = {"T": "BT", "DK": "BK", "DV": "BV", "DH": "BH", 1: "1"}  # a dim's block in a kernel
# a dim's block in a buffer between kernels, and the offsets of its entries
BUFFER_BLOCKS = {"T": ("BT", "offs_t"), "DK": ("BDK", "offs_k"), "DV": ("BDV", "offs_v"),
                 1: ("1", "")}


@dataclass(frozen=True)
class StateTile:
    """How a state tile sits in the flattened state of a sequence and head: its entries'
    offsets (`tile`), mask and block shape (`block`), and its dims."""

    name: str
    dims: tuple
    tile: str
    mask: str
    block: str


def state_tiles(step: ChunkStep, macros) -> list[StateTile]:
    """Each state tile's place in the flattened state of a sequence and head: the tiles one
    after another, a tile [rows, cols] row-major (a vector state [1, D] as its D entries)."""
    tiles, offset = [], "0"
    for name in step.states:
        rows, cols = step.graph.shape(name)
        c = cols[1:].lower()
        r = "" if rows == 1 else rows[1:].lower()
        block = f"{'B' + r.upper() if r else 1}, B{c.upper()}"
        tiles.append(StateTile(name, (rows, cols) if r else (cols,),
                               macros.state_entries(offset, r, c, cols),
                               macros.state_mask(r, c), block))
        size = f"{rows} * {cols}" if r else cols
        offset = f"{offset} + {size}" if offset != "0" else size
    return tiles


class KernelPrinter:
    """Prints the kernels of one schedule: `loads(kernel)` (the step's rows and its input tiles)
    and `body(kernel)` (its chunk step), each as lines of Triton."""

    def __init__(self, sched: Schedule, macros, source, gates: dict, previous: tuple = (),
                 window: int = 1):
        self.sched, self.step, self.graph = sched, sched.step, sched.step.graph
        self.m = macros  # templates/statements.j2's macros
        self.source = source  # sympy expression, {symbol: name} -> Triton text
        self.gates = gates  # the op's gates by name (head or channel), the previous rows' too
        self.previous = previous  # the gates that are the previous chunk's rows (a window's)
        self.window = window  # bias.window's size
        self.tiles = state_tiles(self.step, macros)
        self.state_shapes = {self.graph.shape(s) for s in self.step.states}
        self.buffer_dims = {b.node: b.dims for bs in sched.buffers.values() for b in bs}
        self.constants = {}  # the kernel's key-block shares with a constant term (`begin`)
        self.masked = {}  # the masked inputs the kernel loads (`begin`)
        self.stores = set()  # the tiles the kernel stores (`begin`)

    # ---- expressions ----------------------------------------------------------------------

    def expression(self, n: str) -> str:
        """The Triton expression of node n over its inputs (each by its name, or inlined)."""
        graph, m = self.graph, self.m
        node = graph.node(n)
        x = [self.ref(i) for i in node["inputs"]]
        op = node["op"]
        if op == "dot":
            return m.dot(x[0], x[1], node["ta"], node["tb"])
        if op == "ew" and n in self.constants:  # a key block's share: the first counts it
            names = dict(zip(node["symbols"], x, strict=True))
            constant = self.constants[n]
            return m.first_key_block(self.source(node["expr"] - constant, names),
                                     self.source(constant, names))
        if op == "ew":
            return self.source(node["expr"], dict(zip(node["symbols"], x, strict=True)))
        if op in ("cumsum", "revcumsum"):
            column = graph.shape(node["inputs"][0])[1] == 1
            # as a product outside a pass over blocks only: inside one its operands sit beside
            # the pass's tiles (KDA's key-block stage, bf16, D=128, sm_90: spilled 1760 B per
            # thread rather than 232, and ran 1.8x the instructions)
            held = held_by_inputs(graph, node["inputs"][0]) and n not in self.looped
            return m.prefix_sum(x[0], column, op == "revcumsum", held)
        if op in ("gdot", "gmix"):
            return m.pair_decays("gmix_t" if node.get("ta") else op, x, node["offset"])
        if op in ("sum", "max"):
            return m.reduce(op, x[0], node["axis"])
        if op == "trans":
            return m.trans(x[0])
        if op == "tri_inv":  # its buffer holds the tile for its rows, where the kernel stores it
            return m.tri_inv(x[0], self.buffer_at(n, base=True) if n in self.stores else "None")
        if op == "nonfinite":
            return m.nonfinite_flag(x[0])
        return m.broadcast(x[0], [BLOCKS[s] for s in node["shape"]])

    def ref(self, n: str) -> str:
        """How a statement reads node n: its name, or its expression where it is inlined."""
        return self.inlined.get(n, n)

    def buffer_at(self, n: str, base: bool = False) -> str:
        """The address of node n's tile in its buffer at this step (`base`: of its first entry)."""
        (rows, r), (cols, c) = (BUFFER_BLOCKS[x] for x in self.buffer_dims.get(n, self.graph.shape(n)))
        return self.m.buffer_base(n, rows, cols) if base else self.m.buffer_at(n, rows, cols, r, c)

    # ---- statements -----------------------------------------------------------------------

    def compute(self, nodes, loaded=(), stored=(), sinks=()) -> list[str]:
        """Statements computing `nodes` (in order), skipping inputs and constants: a `loaded`
        node is read from the buffer another kernel wrote, a `stored` one written to its buffer
        as soon as it is computed. A node read once, by a node of the same statements (or a sum
        of `sinks`), is inlined there rather than named; a node that is another's plain name is
        never named. Some tiles are printed just before the first statement that reads them
        (`_late`)."""
        lines = []
        scope = {*nodes, *sinks}
        calls = self.joint_products(nodes, loaded)
        reverse = any(self._kept_state(n, loaded) for n in nodes)
        done, late = set(), {}
        for n in nodes:
            if n in done:
                continue
            deferred = n not in stored and n not in calls and self._late(n, loaded, late, reverse)
            for r in () if deferred else calls[n][0] if n in calls else (n,):
                lines += self._late_inputs(self.reads(r), late)
            if n in calls:  # every product of the call at the first of them
                outputs, helper, args, offset, twin = calls[n]
                refs = [self.ref(a) for a in args]
                lines.append(self.m.joint_decays(outputs, helper, refs, offset, twin))
                done.update(outputs)
                lines += [self.m.store_tile(t, self.buffer_at(t)) for t in outputs if t in stored]
                continue
            statements = []
            if n in loaded and self.graph.node(n)["op"] in ACROSS_V:
                statements.append(self.m.load_across_v(n))
            elif n in loaded:
                statements.append(self.m.load_tile(n, self.buffer_at(n)))
            elif self.graph.node(n)["op"] not in ("input", "const") and n not in self.masked:
                value = self.expression(n)
                if self.inlinable(n, value, scope):
                    self.inlined[n] = value if _atomic(value) else f"({value})"
                else:
                    formula = self.graph.node(n).get("formula")
                    statements.append(self.m.assign(n, value, formula))
            if deferred:  # with what it reads: nothing where loaded
                late[n] = statements, () if n in loaded else self.reads(n)
                continue
            lines += statements
            if n in stored:
                lines.append(self.m.store_tile(n, self.buffer_at(n)))
        return lines + self._late_inputs([n for n in nodes if n in late], late)  # for the sums

    def _kept_state(self, n: str, loaded) -> bool:
        """Whether node n is a state-shaped tile a pass kept (`stages.kept`), loaded here."""
        shape = self.graph.shape(n)
        return n in loaded and 1 not in shape and shape in self.state_shapes

    def _late(self, n: str, loaded, late: dict, reverse: bool) -> bool:
        """Whether node n is printed just before its first reader rather than in the graph's
        order: a loaded state-shaped tile, a tile without the chunk's rows computed from a late
        one, and, in a kernel that loads such a tile (a `reverse` pass over the forward's
        Newton-Schulz iterates, which it reads last to first), every state- or Gram-sized tile.
        Printed in order, each iterate and the Gram matrices of the first would stay live
        through the reverse, as a product's operand in shared memory: the muon spec's backward
        pass at D=128 (sm_90, bf16, 8 warps) needed 496 KiB of it, printed late 176."""
        shape = self.graph.shape(n)
        if n in loaded:
            return self._kept_state(n, loaded)
        return "T" not in shape and (reverse and 1 not in shape or any(
            m in late for m in self.graph.node(n)["inputs"]))

    def _late_inputs(self, nodes, late: dict) -> list[str]:
        """The statements of the `late` nodes among `nodes`, each after those of the late nodes
        it reads; taken out of `late`."""
        lines = []
        for m in nodes:
            if m in late:
                own, reads = late.pop(m)
                lines += self._late_inputs(reads, late) + own
        return lines

    def reads(self, n: str) -> tuple[str, ...]:
        """The nodes node n is computed from (none for a joint call's unused output `_`)."""
        return self.graph.node(n)["inputs"] if n in self.graph.g else ()

    def joint_products(self, nodes, loaded) -> dict[str, tuple]:
        """The gmix products among `nodes` (none `loaded`) that one helper call computes
        together, by each of them: (outputs, helper, arguments, offset, twin). A product's twin is
        one on the same operands at the next offset (a gate's gradient leaves out the nearest
        pairs); its mate is a transposed one (gmix_t) on the same weights, exponents and offset:
        `gmix_both` computes a product, its mate and their twins from the same pair decays
        (outputs it returns that no node takes are `_`, and the compiler drops them). Mates are
        joined only where the call can stand at the first of them: every argument comes
        before it."""
        graph = self.graph
        at = {n: i for i, n in enumerate(nodes)}
        products = [n for n in nodes if n not in loaded and graph.node(n)["op"] == "gmix"]

        def key(n, shift=0):
            node = graph.node(n)
            m, x, ga, gb = node["inputs"]
            return m, ga, gb, bool(node.get("ta")), node["offset"] + shift, x

        by_key = {key(n): n for n in products}
        twin_of = {n: by_key.get(key(n, 1)) for n in products}
        bases = [n for n in products if n not in twin_of.values()]
        calls = {}
        for n in bases:
            if n in calls:
                continue
            m, ga, gb, ta, offset, x = key(n)
            mates = [b for b in bases if b != n and b not in calls
                     and key(b)[:5] == (m, ga, gb, not ta, offset)]
            group = sorted([n, *mates[:1]], key=lambda b: bool(graph.node(b).get("ta")))
            first = min(at[p] for b in group for p in (b, twin_of[b]) if p is not None)
            args = [graph.node(b)["inputs"][1] for b in group]  # gmix's x, then gmix_t's
            if any(at.get(a, -1) > first for a in (*args, m, ga, gb)):
                group = [n]
            twin = any(twin_of[b] is not None for b in group)
            if len(group) == 1 and not twin:  # a product alone: its expression, maybe inlined
                continue
            if len(group) == 2:
                outputs = [p or "_" for b in group for p in (b, twin_of[b])]
                call = (outputs, "gmix_both", [m, *args, ga, gb], offset, twin)
            else:
                outputs = [n, twin_of[n]]
                call = (outputs, "gmix_t_pair" if ta else "gmix_pair", [m, x, ga, gb], offset, twin)
            calls.update(dict.fromkeys([p for p in outputs if p != "_"], call))
        return calls

    def inlinable(self, n: str, value: str, scope) -> bool:
        """Whether node n (its expression `value`) is written into its reader rather than
        named: not a tile the kernel keeps, loads, stores or sums, printed in one place only,
        and either a plain name or read once, there, short, with no formula of its own and not
        named in its reader's."""
        if n in self.pinned or self.places.get(n, 0) != 1:
            return False
        readers = self.readers(n)
        if not readers or not readers <= scope:
            return False
        if value.isidentifier():
            return True
        node = self.graph.node(n)
        named = any(re.search(rf"\b{n}\b", self.graph.node(c).get("formula", "")) for c in readers)
        return len(readers) == 1 and "formula" not in node and not named and \
            len(value) <= INLINE_WIDTH

    def readers(self, n: str) -> set[str]:
        """The nodes this kernel computes from node n (not those it loads from a buffer)."""
        return {c for c in self.graph.g.successors(n) if c in self.places and c not in self.loaded}

    def begin(self, kernel: KernelPlan) -> None:
        """Start printing `kernel`: where each node is printed, what must keep its name."""
        self.inlined, self.loaded, self.stores = {}, set(kernel.loads), set(kernel.stores)
        self.masked = self.masked_loads(kernel)
        walk = kernel.walk
        shares = walk.shares if walk else None
        self.constants = shares.constants if shares else {}
        streams = (walk.before, walk.walk) if walk else (kernel.passes,) if kernel.passes else ()
        sums = (*walk.sums, *(shares.sums if shares else ())) if walk else ()
        if streams:
            scopes = [*(part for s in streams for part in (*s.whole, *(loop.nodes for loop in s.loops))),
                      *((walk.after,) if walk else ()),
                      *((shares.pre, shares.inner, shares.after) if shares else ())]
            self.places = {}
            for n in (n for scope in scopes for n in scope):
                self.places[n] = self.places.get(n, 0) + 1
        else:
            self.places = dict.fromkeys(plan(self.graph, kernel.targets, kernel.loads), 1)
        self.looped = {n for s in streams for loop in s.loops for n in loop.nodes}
        reduced = [r for s in streams for loop in s.loops for r in loop.reduce]
        self.places.update(dict.fromkeys([*reduced, *sums], 1))
        self.pinned = {*kernel.targets, *kernel.stores, *kernel.loads, *kernel.block_loads,
                       *(shares.targets if shares else ()),
                       *reduced, *sums, *self.step.states, *(f"d{s}_new" for s in self.step.states)}

    def passes(self, passes, loads: dict, stores: dict, loaded=(), dim="DH",
               stored=()) -> list[str]:
        """Statements for a step run over blocks of `dim` (hidden units, or key columns): each
        pass loads the blocks it reads (`loads`, statements per node), recomputes its blocked
        tiles, sums its reductions over the blocks and writes its blocked targets (`stores`). A
        `stored` tile (unblocked) goes to its buffer once complete."""
        graph, m = self.graph, self.m
        lines = []
        for whole, loop in zip(passes.whole, passes.loops, strict=False):
            lines += self.compute(whole, loaded, stored)
            lines += [m.accumulator(r, [BLOCKS[s] for s in graph.shape(r)], graph.node(r)["op"])
                      for r in loop.reduce]
            inner = [line for n in loop.nodes if n in loads for line in loads[n]]
            inner += self.compute(loop.nodes, loaded, sinks=loop.reduce)
            inner += self.accumulations(loop.reduce)
            inner += [line for t in loop.store for line in stores[t]]
            lines += [*m.block_loop(dim).splitlines(), *_indented(inner)]
            lines += [m.store_tile(r, self.buffer_at(r)) for r in loop.reduce if r in stored]
        return lines + self.compute(passes.whole[-1], loaded, stored)

    def accumulations(self, reduced) -> list[str]:
        """Statements adding each block's part to the sums (or maxima) `reduced`: two gdot sums
        on the same b and exponents (mates: KDA's q k^T and k k^T, each over a key block) from one
        `gdot_both` call, which computes their pair decays once."""
        graph, m = self.graph, self.m
        gdots = [r for r in reduced if graph.node(r)["op"] == "gdot"]
        mates = {}
        for r in gdots:
            same = [o for o in gdots if o != r and o not in mates and r not in mates
                    and graph.node(o)["inputs"][1:] == graph.node(r)["inputs"][1:]]
            if same:
                mates[r], mates[same[0]] = same[0], r
        lines, done = [], set()
        for r in reduced:
            if r in done:
                continue
            if r in mates:
                pair = (r, mates[r])
                parts = [graph.free(f"{n}_block") for n in pair]
                args = [self.ref(graph.node(n)["inputs"][0]) for n in pair]
                args += [self.ref(i) for i in graph.node(r)["inputs"][1:]]
                lines.append(m.joint_gdots(parts, args, [graph.node(n)["offset"] for n in pair]))
                lines += [m.accumulate(n, part, "sum") for n, part in zip(pair, parts, strict=True)]
                done.update(pair)
                continue
            lines.append(m.accumulate(r, self.expression(r), graph.node(r)["op"]))
        return lines

    def state_io(self, kernel: str, targets: dict) -> tuple[dict, dict]:
        """The loads of the state blocks a streamed step reads and the stores of the blocks it
        writes. Every kernel reads the step's state at state_ptr; the forward pass writes the
        next step's (next_ptr); the backward kernels read the gradient of the step-end state
        (dstate_ptr), and the backward pass writes that of the step-start state (dnext_ptr)."""
        m = self.m
        dtype = self.sched.state_dtypes
        loads, stores = {}, {}
        for tile in self.tiles:
            s = tile.name
            loads[s] = [m.load_state(s, "state_ptr", tile.tile, tile.mask, dtype["hs"])]
            if kernel.startswith("bwd"):
                loads[f"d{s}_new"] = [m.load_state(f"d{s}_new", "dstate_ptr", tile.tile, tile.mask,
                                                   dtype["dhs"])]
            if kernel in ("fwd", "bwd"):
                out = "next_ptr" if kernel == "fwd" else "dnext_ptr"
                stores.setdefault(targets[s], []).append(
                    m.store_state(out, tile.tile, targets[s], tile.mask))
        return loads, stores

    def key_io(self, kernel: KernelPlan) -> tuple[dict, dict]:
        """A kernel passing over key blocks: per block, the loads of the key columns of its
        inputs, states and state gradients, and the stores of its gradients."""
        graph, m, adjoint = self.graph, self.m, self.sched.adjoint
        need = set(plan(graph, kernel.targets, kernel.loads))
        inputs = ("q", "k", *self.step.gates)
        rows = self.row_masks(kernel)
        loads = {x: [m.load_rows(x, f"{x}_ptr", "k", PADS.get(x, "0.0"), tile_dtype(graph, x, need),
                                 *self.rows_of(x, rows))]
                 + ([] if x in rows else [m.pad_nonfinite(x, PADS.get(x, "0.0"))])
                 for x in kernel.block_loads if x in inputs}
        states, _ = self.state_io("bwd_out", {})
        loads |= {n: lines for n, lines in states.items() if n in kernel.block_loads}
        stores = {}
        for x in kernel.blocked:
            stores.setdefault(adjoint[x], []).append(
                m.store_key_grad(x, adjoint[x], x in self.sched.summed, *self.rows_of(x)[::-1]))
        return loads, stores

    def rows_of(self, x: str, masks: dict | None = None) -> tuple[str, str]:
        """The mask and the token index of input x's rows: a window's previous rows, one chunk
        earlier in the sequence (`prev_rows`, `prev_tok`), else its mask in `masks` (the valid
        rows by default) at the step's own tokens."""
        if x in self.previous:
            return "prev_rows", "prev_tok"
        return (masks or {}).get(x, "valid"), "tok"

    def value_inputs(self, kernel: KernelPlan) -> list[str]:
        """The inputs a kernel that walks the value blocks loads per block: v, the output's
        cotangent, value-channel gates and per-head parameters."""
        if kernel.walk is None:
            return []
        candidates = ("v", *self.masked_loads(kernel), "d_o", *self.step.gates, *self.step.params)
        return [x for x in candidates if x in kernel.needs and "DV" in self.graph.shape(x)]

    def masked_loads(self, kernel: KernelPlan) -> dict[str, str]:
        """The tiles of an input under its masks (`masked_input`) that the kernel loads, padded
        with 0, rather than computes, each with its input: where the input loads raw (a kernel
        that pads no non-finite entry) or under the rows a stage flagged, not by key blocks."""
        rows = self.row_masks(kernel)
        found = {n: masked_input(self.graph, n) for n in self.graph.order() if n in kernel.needs}
        return {n: x for n, x in found.items() if x is not None and x not in kernel.block_loads
                and (x in rows or not kernel.pads_nonfinite)}

    def walk_body(self, kernel: KernelPlan) -> list[str]:
        """A program per key block walking the value blocks (`ValueWalk`): the value-free tiles
        over every key block, then per value block its step (its last pass on the program's key
        block) adding to the sums, then what follows from the sums, and the gradients stored."""
        graph, m, walk, loaded = self.graph, self.m, kernel.walk, kernel.loads
        loads, _ = self.key_io(kernel)
        lines = ["i_k = tl.program_id(2)  # the program's block of key columns"] \
            if walk.per_key_block else []
        shares = walk.shares
        lines += self.passes(walk.before, loads, {}, loaded, "DK")
        lines += self.compute(shares.pre, loaded) if shares else []
        sums = (*walk.sums, *(shares.sums if shares else ()))
        columns = {n: graph.free(f"{n}_cols") for n in sums if self.by_columns(n)}
        lines += [m.accumulator(columns.get(n, n), [BLOCKS[d] for d in graph.shape(
            graph.node(n)["inputs"][0] if n in columns else n)], "sum") for n in sums]

        def add(n):  # a value block's part of a sum over them
            if n in columns:
                return m.accumulate(columns[n], self.ref(graph.node(n)["inputs"][0]), "sum")
            return m.accumulate(n, self.expression(n), "sum")

        inner, rows = [], self.row_masks(kernel)
        for x in self.value_inputs(kernel):
            if x in self.step.params:
                inner.append(m.load_param(x))
                continue
            if x in self.masked:
                inner.append(m.load_rows(x, f"{self.masked[x]}_ptr", "v", "0.0", tile_dtype(
                    graph, x, kernel.needs), *self.rows_of(self.masked[x], rows)))
                continue
            pad = PADS.get(x, "0.0")
            inner.append(m.load_rows(x, "do_ptr" if x == "d_o" else f"{x}_ptr", "v", pad,
                                     tile_dtype(graph, x, kernel.needs), *self.rows_of(x, rows)))
            if x != "d_o" and x not in rows and kernel.pads_nonfinite:
                inner.append(m.pad_nonfinite(x, pad))
        states, _ = self.state_io("bwd_out", {})
        inner += [line for n, lines in states.items()
                  if n in kernel.reads and n not in kernel.block_loads for line in lines]
        sums = set(walk.sums)
        own = walk.walk.loops[-1] if walk.per_key_block else None
        for whole, loop in zip(walk.walk.whole, walk.walk.loops, strict=False):
            inner += self.compute([n for n in whole if n not in sums], loaded, sinks=sums)
            inner += [add(n) for n in whole if n in sums]
            body = [line for n in loop.nodes if n in loads for line in loads[n]]
            body += self.compute([n for n in loop.nodes if n not in sums], loaded,
                                 sinks=(*loop.reduce, *loop.store))
            body += [m.accumulate(r, self.expression(r), graph.node(r)["op"]) for r in loop.reduce]
            body += [add(n) for n in loop.store]
            if loop is own:
                inner += [*m.own_key_block().splitlines(), *body]
            else:  # a sum over the value blocks too starts before the walk
                inner += [m.accumulator(r, [BLOCKS[d] for d in graph.shape(r)],
                                        graph.node(r)["op"]) for r in loop.reduce if r not in sums]
                inner += [*m.block_loop("DK").splitlines(), *_indented(body)]
        last = walk.walk.whole[len(walk.walk.loops)]
        inner += self.compute([n for n in last if n not in sums], loaded, sinks=sums)
        inner += [add(n) for n in last if n in sums]
        if shares:  # on the program's key block, as the walk's own pass
            inner += self.block_loads(shares.inner, loads, own.nodes)
            inner += self.compute(shares.inner, loaded, sinks=shares.sums)
            inner += [add(n) for n in shares.sums]
        lines += [*m.block_loop("DV").splitlines(), *_indented(inner)]
        lines += [m.assign(n, m.reduce("sum", c, graph.node(n)["axis"])) for n, c in columns.items()]
        if walk.per_key_block:
            lines += m.own_key_block().splitlines()
            lines += self.block_loads(walk.after, loads)
        lines += self.compute([n for n in walk.after if n not in loads], loaded)
        adjoint = self.sched.adjoint
        lines += [m.store_key_grad(x, adjoint[x], False, *self.rows_of(x)[::-1])
                  for x in kernel.blocked]
        if shares:  # after the walk's own gradients are stored: it holds them no longer
            lines += self.block_loads(shares.after, loads, walk.after)
            lines += self.compute(shares.after, loaded)
        return lines

    def by_columns(self, n: str) -> bool:
        """Whether a sum over the value blocks adds up its input's entries across the walk,
        reduced over the value columns once after it: a sum over the rows of a tile [DV, ...]
        (a state's), which each value block would otherwise reduce across the warps. Sm_90,
        bf16, D=128, (8, 4096, 16), the dq/dk kernels: summed so, simple GLA's ran 501 M
        warp-instructions at 8 warps rather than 549; with the rows' sums over a tile [T, DV]
        summed so too (476 M), DeltaNet's spilled 8 B at 4 warps, where it spills none (246 M;
        at 8 warps 382)."""
        node = self.graph.node(n)
        return node["op"] == "sum" and node["axis"] == 0 and \
            self.graph.shape(node["inputs"][0])[0] == "DV"

    @staticmethod
    def block_loads(nodes, loads: dict, held=()) -> list[str]:
        """The loads of the key block of each of `nodes` that has one, but those `held`."""
        return [line for n in nodes if n in loads and n not in held for line in loads[n]]

    def body(self, kernel: KernelPlan) -> list[str]:
        """The statements of a kernel's chunk step: flat, or its passes over blocks of a dim."""
        step, loaded = self.step, kernel.loads
        self.begin(kernel)
        if kernel.walk is not None:
            return self.walk_body(kernel)
        if kernel.kind == "stage" and kernel.dim != "DK":
            if kernel.passes is not None:
                io = self.state_io("bwd_stage", {})
                return self.passes(kernel.passes, *io, loaded, stored=kernel.stores)
            return self.compute(plan(self.graph, kernel.targets, loaded), loaded, kernel.stores)
        if kernel.dim == "DK":
            return self.passes(kernel.passes, *self.key_io(kernel), loaded, "DK", kernel.stores)
        if kernel.passes is None:
            return self.compute(plan(self.graph, kernel.targets, loaded), loaded, kernel.stores)
        # a kept tile may be a sum over the hidden blocks: stored after the last
        targets = step.outputs if kernel.name == "fwd" else self.sched.adjoint
        body = self.passes(kernel.passes, *self.state_io(kernel.name, targets), loaded)
        return body + [self.m.store_tile(n, self.buffer_at(n)) for n in kernel.stores]

    def row_masks(self, kernel: KernelPlan) -> dict[str, str]:
        """The row mask each input loads under where the kernel pads non-finite entries and a
        stage stored the rows' flags (`tainted`, `qbad`, in its loads): a flagged row loads
        whole as padding, so no entry is tested. k, v and the gates load the rows before the
        first bad one (`clean`), q its finite rows (`q_rows`); every other input, the valid
        rows."""
        if not kernel.pads_nonfinite:
            return {}
        own = [g for g in self.step.gates if g not in self.previous]
        masks = dict.fromkeys(("k", "v", *own), "clean") if "tainted" in kernel.loads else {}
        return masks | ({"q": "q_rows"} if "qbad" in kernel.loads else {})

    def loads(self, kernel: KernelPlan) -> list[str]:
        """The rows of the step and the input tiles the kernel's body reads (`needs`), with
        their masks. Non-finite entries (`memories.taints.poisoned`) load as padding unless the
        kernel pads none: the rows a stage flagged (`row_masks`), or each entry tested where
        the kernel computes the flags itself; `tainted` marks the rows from the first bad one on
        (it reads every input), `qbad` the rows of a bad q."""
        m, walked = self.m, self.value_inputs(kernel)
        need = kernel.needs - set(walked)
        taint = "tainted" in need
        rows = self.row_masks(kernel)
        read = need | set(walked) | set(kernel.block_loads)

        def dtype(x):
            return tile_dtype(self.graph, x, kernel.needs)

        def columns(x):  # a vector memory's q, k and gates run along its value columns
            return "v" if self.graph.shape(x)[1] == "DV" else "k"

        lines = m.step_rows().splitlines()
        flags = {"clean": ("tainted", "rows before the first with a non-finite input"),
                 "q_rows": ("qbad", "rows with a finite q")}
        for mask in dict.fromkeys(mask for x, mask in rows.items() if x in read):
            lines.append(m.finite_rows(mask, *flags[mask]))
        pads = {}
        if "q" in need or "qbad" in need:
            pads["q"] = "0.0"
            lines.append(m.load_rows("q", "q_ptr", columns("q"), "0.0", dtype("q"),
                                     rows.get("q", "valid")))
        for x in ("k", "v"):
            if x in need or taint:
                pads[x] = PADS.get(x, "0.0")
                lines.append(m.load_rows(x, f"{x}_ptr", columns(x), pads[x], dtype(x),
                                         rows.get(x, "valid")))
        lines += [m.load_rows(n, f"{x}_ptr", columns(x), "0.0", dtype(n), rows.get(x, "valid"))
                  for n, x in self.masked_loads(kernel).items() if n in need]
        lines += [m.load_param(p) for p in self.step.params if p in need]
        for g in self.step.gates:
            if g not in need and (not taint or g in self.previous):
                continue
            pads[g] = PADS.get(g, "0.0")
            if g in self.previous and self.gates[g].shape == "channel":  # k_prev, v_prev
                lines.append(m.load_rows(g, f"{g}_ptr", columns(g), pads[g], dtype(g),
                                         *self.rows_of(g)))
            elif self.gates[g].shape == "channel":
                lines.append(m.load_rows(g, f"{g}_ptr", columns(g), pads[g], "ACC",
                                         *self.rows_of(g, rows)))
            else:
                lines.append(m.load_gate(g, pads[g], *self.rows_of(g, rows)))
        groups = {}
        if taint:  # one count per shape of tile: the tiles of a shape tested together
            for x in pads:
                if x != "q" and x not in self.previous:
                    groups.setdefault(self.graph.shape(x), []).append(x)
            lines += m.taint(list(groups.values())).splitlines()
        lines += [getattr(m, c)(self.window) for c in WINDOW_CONSTS if c in need]
        if "qbad" in need:
            lines.append(m.bad_query())
        if "d_o" in need:  # the cotangent of the output (backward kernels)
            lines.append(m.load_rows("d_o", "do_ptr", "v", "0.0", dtype("d_o")))
        if "nanfill" in need:
            lines.append(m.nan_fill())
        if kernel.pads_nonfinite:  # where the kernel flags the rows itself, whole rows
            flags = {x: "bad[:, None]" for group in groups.values() for x in group}
            flags |= {"q": "qbad"} if "qbad" in need else {}
            lines += [m.pad_nonfinite(x, pad, flags.get(x)) for x, pad in pads.items() if x not in rows]
        return lines


def _atomic(text: str) -> bool:
    """Whether an expression reads as one operand: a name, a call or a bracketed whole."""
    if text.replace(".", "_").isidentifier():
        return True
    head = text.find("(")
    if head < 0 or not text.endswith(")") or not (head == 0 or text[:head].replace(".", "_")
                                                    .isidentifier()):
        return False
    depth = 0
    for i, ch in enumerate(text[head:], head):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i == len(text) - 1
    return False


def _indented(lines: list[str], by: int = 4) -> list[str]:
    return [" " * by + line for ln in lines for line in ln.splitlines()]


def indent(lines: list[str], by: int) -> str:
    """Lines (each possibly several) as one block indented by `by` spaces."""
    return "\n".join(_indented(lines, by))

