"""The whole work of a recorded launch without a GPU: dynamic warp-instructions and bytes.

A launch's instructions per warp are the SASS's, each counted as often as its loops run:
instructions outside every loop once, those inside a loop once per trip of the loop around them.
The trip counts at the shape come from one program of the launch (the middle one of its grid) run
in Triton's interpreter with its source lines counted: a loop's backward branch carries the
line of its `for`, which Python reaches once per entry and once per trip. The same run counts
the bytes the program's loads and stores move and which argument tensors they hit. A launch's
totals are then per warp x warps x programs, and per program x programs: every program is
taken to do the middle one's work (true of fixed-length batches; a masked tail is counted
full)."""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch


@dataclass
class Instruction:
    """One SASS instruction: its address, text and the source line it came from."""

    address: int
    text: str
    source: tuple[str, int] | None


@dataclass
class ProgramRun:
    """What one program of a launch did in the interpreter."""

    lines: Counter = field(default_factory=Counter)   # (file, line) -> times Python reached it
    bytes_moved: int = 0                              # loaded + stored, masked-off lanes excluded
    tensors: set = field(default_factory=set)         # the argument tensors hit: index or name


@contextlib.contextmanager
def compiled_afresh():
    """Triton compiling into an empty cache: a cubin from its cache carries the line table of
    the first file that held the same kernel source (a spec's module under another cache
    directory), whose lines the interpreted run never reaches, so no loop would count a trip."""
    with tempfile.TemporaryDirectory() as cache, \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        yield


def sass_with_lines(cubin: bytes) -> list[Instruction]:
    """The cubin's SASS (nvdisasm with line information), label targets as addresses."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([str(tool), "-g", "-c", f.name], capture_output=True,
                                 text=True, check=True).stdout
    labels, pending, source, rows = {}, [], None, []
    for line in listing.splitlines():
        if found := re.search(r'//## File "([^"]+)", line (\d+)', line):
            source = (found[1], int(found[2]))
        elif found := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(found[1])
        elif found := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            address = int(found[1], 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            rows.append(Instruction(address, found[2], source))
    for row in rows:
        row.text = re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels.get(m[1], -1)), row.text)
    return rows


def loops(instructions: list[Instruction]) -> list[tuple[int, int, Instruction]]:
    """(first, last address, branch) of each loop: a branch back to an earlier address."""
    spans = []
    for row in instructions:
        found = re.search(r"\bBRA\s+0x([0-9a-f]+)", row.text)
        if found and int(found[1], 16) <= row.address:
            spans.append((int(found[1], 16), row.address, row))
    return spans


def split_loops(instructions: list[Instruction]) -> int:
    """Loops of the SASS whose `for` line another loop also carries: a loop LLVM split into an
    unrolled main loop and a remainder, each of which `per_warp` counts with every trip."""
    lines = Counter(branch.source for _, _, branch in loops(instructions)
                    if _is_for(branch.source))
    return sum(n for n in lines.values() if n > 1)


def _is_for(source: tuple[str, int] | None) -> bool:
    return source is not None and linecache.getline(*source).lstrip().startswith("for ")


def per_warp(instructions: list[Instruction], run: ProgramRun) -> int:
    """Dynamic instructions of one warp of the program: each instruction times the trips of the
    innermost loop around it (a loop's trips: its `for` line's count less its entries, the trips
    of the loop around it; a loop whose branch carries no `for` line: that line's count)."""
    spans = sorted(loops(instructions), key=lambda s: s[0] - s[1])  # outermost first
    trips: dict[tuple[int, int], int] = {}
    for first, last, branch in spans:
        around = [s for s in spans if s[0] <= first and last <= s[1] and (s[0], s[1]) != (first, last)]
        entries = trips[min(around, key=lambda s: s[1] - s[0])[:2]] if around else 1
        reached = run.lines.get(branch.source, 0)
        trips[first, last] = max(reached - entries, 0) if _is_for(branch.source) else reached
    total = 0
    for row in instructions:
        inside = [s for s in spans if s[0] <= row.address <= s[1]]
        total += trips[min(inside, key=lambda s: s[1] - s[0])[:2]] if inside else 1
    return total


class LoopInt(int):
    """The variable of a `range` loop in the interpreter: a Python int that also converts as a
    Triton scalar does (fla calls `.to` on such variables)."""

    def to(self, dtype, **_):
        from triton.runtime.interpreter import interpreter_semantic

        return interpreter_semantic.to_tensor(int(self), False).to(dtype)


def _interpreted(fn):
    """`fn` rewritten for Triton's interpreter, its `range` loops counting in `LoopInt`s."""
    import ast

    from triton.runtime.interpreter import ASTTransformer, InterpretedFunction

    class LoopInts(ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            call = node.iter
            if isinstance(call, ast.Call) and ast.unparse(call.func) in ("range", "tl.range"):
                node.iter = ast.parse("map(_work_loop_int, ())", mode="eval").body
                node.iter.args[1] = call
                ast.fix_missing_locations(node)
            return node

    fn.__globals__.setdefault("_work_loop_int", LoopInt)
    function = InterpretedFunction(fn)
    function.rewriter.ast_transformer = LoopInts()
    return function


@contextlib.contextmanager
def _device_calls_interpreted(files: set):
    """A @triton.jit helper called from an interpreted kernel runs interpreted too; the files
    of the helpers called join `files`."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        files.add(self.fn.__code__.co_filename)
        return _interpreted(self.fn)(*args, **kwargs)

    # an interpreted helper patches the language for good: put its members back as they were
    # (names the interpreter adds stay: its rewritten functions, cached, refer to them)
    patched = (tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.tensor_descriptor_base)
    saved = [(owner, dict(vars(owner))) for owner in patched]
    try:
        with mock.patch.object(JITFunction, "__call__", call):
            yield
    finally:
        for owner, members in saved:
            for name, value in members.items():
                if vars(owner).get(name) is not value:
                    setattr(owner, name, value)


def run_program(kernel, args: tuple, kwargs: dict, grid: tuple[int, ...]) -> ProgramRun:
    """The middle program of `kernel`'s launch on `grid`, run in Triton's interpreter: its
    source lines reached, bytes moved and argument tensors hit."""
    from triton.runtime.interpreter import GridExecutor, interpreter_builder

    grid = tuple(grid) + (1,) * (3 - len(grid))
    middle = tuple(n // 2 for n in grid)
    run = ProgramRun()
    spans = [(name, a.data_ptr(), a.data_ptr() + a.numel() * a.element_size())
             for name, a in [*enumerate(args), *kwargs.items()] if isinstance(a, torch.Tensor)]

    def moved(ptrs, mask):
        lanes = np.broadcast_to(mask.data, ptrs.data.shape)
        addresses = ptrs.data[lanes]
        run.bytes_moved += addresses.size * ptrs.get_element_ty().primitive_bitwidth // 8
        for i, start, end in spans:
            if addresses.size and ((addresses >= start) & (addresses < end)).any():
                run.tensors.add(i)

    builder = type(interpreter_builder)
    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def masked_load(self, ptrs, mask, *rest):
        moved(ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        moved(ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    def atomic(self, op, ptr, val, mask, *rest):
        moved(ptr, mask)
        return rmw(self, op, ptr, val, mask, *rest)

    files = {kernel.fn.__code__.co_filename}

    def trace(frame, event, arg):
        if frame.f_code.co_filename not in files:
            return None
        if event == "line":
            run.lines[frame.f_code.co_filename, frame.f_lineno] += 1
        return trace

    interpreted = _interpreted(kernel.fn)
    dims, index = builder.set_grid_dim, builder.set_grid_idx
    with _device_calls_interpreted(files), \
            mock.patch.object(builder, "create_masked_load", masked_load), \
            mock.patch.object(builder, "create_masked_store", masked_store), \
            mock.patch.object(builder, "create_atomic_rmw", atomic), \
            mock.patch.object(builder, "set_grid_dim", lambda self, *_: dims(self, *grid)), \
            mock.patch.object(builder, "set_grid_idx", lambda self, *_: index(self, *middle)):
        executor = GridExecutor(interpreted.rewrite(), interpreted.arg_names, (1, 1, 1))
        sys.settrace(trace)
        try:
            executor(*args, **kwargs)
        finally:
            sys.settrace(None)
    return run
