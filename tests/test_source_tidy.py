"""Tidying generated source: dropping dead assignments and wrapping long lines never changes
what the code means (the same syntax tree, or the same tree less the dropped statements)."""

from __future__ import annotations

import ast
import textwrap

from mirasc.catalog import resolve
from mirasc.codegen import render_module
from mirasc.kernel_printer import _atomic
from mirasc.source_tidy import drop_blank_lines_in_functions, drop_dead_assignments, wrap

FUNCTION = textwrap.dedent("""\
    def kernel(x_ptr, n):
        unused = n + 1  # nothing reads it
        chain = n * 2  # read only by the dead one below
        dead = chain + 1
        used = n - 1
        if n > 0:
            only = 3  # its block's only statement: stays
        else:
            other = used
            alone = 4  # both unread: the block keeps one
        for i in range(n):
            acc = i
        tl.store(x_ptr, used)
    """)


def test_dead_assignments_go_and_reads_stay():
    tidy = drop_dead_assignments(FUNCTION)
    names = {n.id for n in ast.walk(ast.parse(tidy)) if isinstance(n, ast.Name)}
    assert not {"unused", "chain", "dead", "other"} & names
    assert {"used", "only", "alone", "acc"} <= names  # read, or the last one of their block
    assert "tl.store(x_ptr, used)" in tidy and "# read only by" not in tidy


def test_dead_assignments_are_per_function():
    """A name read in one function keeps no assignment of it alive in another."""
    source = "def a():\n    x = 1\n    y = 2\n    return y\n\n\ndef b():\n    x = 3\n    return x\n"
    tidy = drop_dead_assignments(source)
    assert tidy == "def a():\n    y = 2\n    return y\n\n\ndef b():\n    x = 3\n    return x\n"


def test_blank_lines_inside_functions_go():
    source = "x = 1\n\n\ndef f():\n    a = 1\n\n    return a\n\n\ny = 2\n"
    assert drop_blank_lines_in_functions(source) == \
        "x = 1\n\n\ndef f():\n    a = 1\n    return a\n\n\ny = 2\n"


def test_wrapping_keeps_the_syntax_tree():
    """Every line of a generated module (gated DeltaNet's, MLP Moneta's) within 120 characters
    after wrapping, and the module's syntax tree unchanged; a long line with a trailing comment
    moves the comment above it."""
    line = "    value = some_function(" + ", ".join(f"argument_{i}" for i in range(20)) + ")  # why"
    source = f"def f():\n{line}\n    return value\n"
    for text in (source, render_module(resolve("gated_deltanet")),
                 render_module(resolve("moneta"))):
        wrapped = wrap(text)
        assert all(len(x) <= 120 for x in wrapped.splitlines())
        assert ast.dump(ast.parse(wrapped)) == ast.dump(ast.parse(text))
    assert wrap(source).splitlines()[1] == "    # why"
    assert wrap("x = 1  # " + "c" * 130 + "\n") == "# " + "c" * 130 + "\nx = 1\n"


def test_atomic_expressions_need_no_brackets():
    assert all(_atomic(x) for x in ("a", "tl.dot(a, b)", "(a + b)", "f(g(a), (b))", "x.y"))
    assert not any(_atomic(x) for x in ("a + b", "(a) + (b)", "f(a) * g(b)", "-a", "1.0"))
