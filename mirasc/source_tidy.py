"""Tidying generated Python source: dead assignments dropped, long lines wrapped.

Both passes work on the text Python itself parses (`ast`, `tokenize`), so they never change
what the code computes: an assignment goes only when no statement reads its name, and a line
breaks only inside brackets, between tokens."""

from __future__ import annotations

import ast
import io
import tokenize

LIMIT = 120  # the longest line a generated module holds


def drop_dead_assignments(source: str) -> str:
    """`source` without the single-name assignments inside its functions whose name nothing in
    the function reads, repeated until none is left; a block keeps at least one statement."""
    while True:
        dead = []
        for function in ast.parse(source).body:
            if not isinstance(function, ast.FunctionDef):
                continue
            read = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
            for block in _blocks(function):
                unread = [stmt for stmt in block if isinstance(stmt, ast.Assign) and all(
                    isinstance(t, ast.Name) and t.id not in read for t in stmt.targets)]
                dead += unread[:len(block) - 1]  # a block keeps a statement
        if not dead:
            return source
        lines = source.splitlines(keepends=True)
        for stmt in sorted(dead, key=lambda s: -s.lineno):
            del lines[stmt.lineno - 1:stmt.end_lineno]
        source = "".join(lines)


def drop_blank_lines_in_functions(source: str) -> str:
    """`source` without blank lines between two indented lines (inside a function's body)."""
    lines = source.splitlines(keepends=True)
    keep = [line for i, line in enumerate(lines)
            if line.strip() or not (0 < i < len(lines) - 1 and _indented(lines[i - 1])
                                    and _indented(_next_text(lines, i)))]
    return "".join(keep)


def _indented(line: str) -> bool:
    return line[:1] in (" ", "\t") and bool(line.strip())


def _next_text(lines: list[str], i: int) -> str:
    return next((line for line in lines[i + 1:] if line.strip()), "")


def _blocks(tree: ast.AST):
    """Every statement list in the tree (function bodies, loop and branch bodies)."""
    for node in ast.walk(tree):
        for name in ("body", "orelse"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def wrap(source: str, limit: int = LIMIT) -> str:
    """`source` with every code line over `limit` characters broken inside brackets (after a
    comma of the outermost brackets that hold one where one fits, else before an operator, else
    between any two tokens), the
    continuation indented 8 spaces past the line's start; a trailing comment moves above the
    line. A line with no place to break (a comment, a docstring) stays as it is."""
    by_line: dict[int, list] = {}
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        by_line.setdefault(tok.start[0], []).append((tok, depth))
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        tokens = by_line.get(number, [])
        fits = len(line) <= limit or not tokens or tokens[0][0].start[0] != tokens[-1][0].end[0]
        out += [line] if fits else _wrap_line(line, tokens, limit)
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def _wrap_line(line: str, tokens: list, limit: int) -> list[str]:
    """One physical line broken as `wrap` says; `tokens` its (token, bracket depth) pairs."""
    indent = line[:len(line) - len(line.lstrip())]
    comments = [t for t, _ in tokens if t.type == tokenize.COMMENT]
    code = line[:comments[0].start[1]].rstrip() if comments else line
    head = [indent + comments[0].string] if comments else []
    cuts: dict[str, list[int]] = {"comma": [], "operator": [], "token": []}
    commas = []
    for tok, depth in tokens:
        inside = depth > 0 and 0 < tok.start[1] < len(code)
        if inside:
            kind = "operator" if tok.type == tokenize.OP and tok.string in _OPERATORS else "token"
            cuts[kind].append(tok.start[1])
        if depth > 0 and tok.type == tokenize.OP and tok.string == "," and tok.end[1] < len(code):
            commas.append((depth, tok.end[1]))
    shallowest = min((d for d, _ in commas), default=0)
    cuts["comma"] = [at for d, at in commas if d == shallowest]
    pieces, start, prefix = [], 0, ""
    while len(prefix) + len(code) - start > limit:
        fits = [[c for c in at if c > start and len(prefix) + c - start <= limit]
                for at in cuts.values()]
        cut = next((at[-1] for at in fits if at), None)
        if cut is None:
            break
        pieces.append(prefix + code[start:cut].rstrip())
        start, prefix = cut, indent + " " * 8
        while code[start:start + 1] == " ":
            start += 1
    return head + pieces + [prefix + code[start:]]


_OPERATORS = ("+", "-", "*", "/", "&", "|", "<", ">", "<=", ">=", "==", "!=")
