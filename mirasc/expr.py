"""Safe expressions: spec text -> sympy (a whitelist over Python's `ast`), sympy -> torch.

Nothing from a spec is ever passed to `eval`, `exec` or `sympify`: the text is parsed with
`ast.parse`, every node is checked against a small grammar (numbers, whitelisted names, + - * / **,
comparisons, whitelisted function calls) and translated node by node into sympy.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable, Mapping

import sympy as sp
import torch

from mirasc.errors import MAX_EXPONENT, FieldError

MAX_LENGTH = 400
MAX_LOG_MAGNITUDE = 709  # |ln c| for a constant power c: float64 range (and no huge integers)
MAX_NESTING = 24  # operations nested inside one another (sympy differentiates recursively)
MAX_NODES = 1_000  # the tree size of a parsed expression (softplus and sigmoid repeat their argument)
MAX_DERIVED_NODES = 20_000  # the tree size of a derived expression (a derivative, its derivative)


def _sigmoid(x):
    """(1 + tanh(x/2)) / 2: no exp overflow in the value or its derivatives."""
    return (1 + sp.tanh(x / 2)) / 2


def _softplus(x):
    """max(x, 0) + log(1 + exp(-|x|)): log(1 + exp(x)) without overflow."""
    return (x + sp.Abs(x)) / 2 + sp.log(1 + sp.exp(-sp.Abs(x)))


def _where(cond, a, b):
    return sp.Piecewise((a, cond), (b, True))


FUNCTIONS: dict[str, tuple[int, Callable]] = {
    "abs": (1, sp.Abs),
    "sign": (1, sp.sign),
    "sqrt": (1, sp.sqrt),
    "exp": (1, sp.exp),
    "log": (1, sp.log),
    "tanh": (1, sp.tanh),
    "sinh": (1, sp.sinh),
    "cosh": (1, sp.cosh),
    "atan": (1, sp.atan),
    "erf": (1, sp.erf),
    "sigmoid": (1, _sigmoid),
    "softplus": (1, _softplus),
    "where": (3, _where),
}
CONSTANTS = {"pi": sp.pi}

_BINARY = {ast.Add: sp.Add, ast.Sub: lambda a, b: a - b, ast.Mult: sp.Mul,
           ast.Div: lambda a, b: a / b, ast.Pow: sp.Pow}
_COMPARE = {ast.Lt: sp.Lt, ast.LtE: sp.Le, ast.Gt: sp.Gt, ast.GtE: sp.Ge}
_WHY = {ast.Attribute: "attribute access", ast.Lambda: "lambda", ast.Subscript: "subscripts",
        ast.BitXor: "'^' (use ** for powers)", ast.Starred: "starred arguments",
        ast.IfExp: "if-expressions (use where(cond, a, b))", ast.BoolOp: "and/or",
        ast.NamedExpr: "assignment", ast.JoinedStr: "f-strings", ast.Await: "await",
        ast.Mod: "'%'", ast.FloorDiv: "'//'", ast.MatMult: "'@'", ast.BitAnd: "'&'",
        ast.BitOr: "'|'", ast.LShift: "'<<'", ast.RShift: "'>>'", ast.Not: "'not'",
        ast.Invert: "'~'", ast.Compare: "chained comparisons, == and != (use where with < <= > >=)"}


def parse_expression(text: str, symbols: Mapping[str, sp.Symbol], field: str) -> sp.Expr:
    """Parse `text` into a sympy expression over `symbols` (plus `pi`), or raise `FieldError`."""
    allowed = ", ".join(sorted(symbols)) or "none"
    functions = ", ".join(FUNCTIONS)

    def fail(why: str) -> FieldError:
        return FieldError(field, f"{why} in {text!r}; allowed: numbers, + - * / **, < <= > >=, "
                                 f"the variables {allowed}, and the functions {functions}")

    if not isinstance(text, str) or len(text) > MAX_LENGTH:
        raise FieldError(field, f"an expression is a string of at most {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise fail(f"syntax error ({exc.msg})") from None

    sizes: dict = {}
    depth = 0

    def visit(node: ast.AST) -> sp.Expr:
        nonlocal depth
        depth += 1
        if depth > MAX_NESTING:
            raise FieldError(field, f"{text!r} nests operations more than {MAX_NESTING} deep; "
                                    f"allowed: at most {MAX_NESTING}")
        value = translate(node)
        depth -= 1
        if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            raise fail(f"{ast.unparse(node)} is undefined or infinite (a division by zero?)")
        if isinstance(value, sp.Expr) and not value.free_symbols and finite_real(value) is None:
            raise fail(f"{ast.unparse(node)} is not a finite real number in float64")
        if tree_size(value, sizes) > MAX_NODES:
            raise FieldError(field, f"{text!r} expands to over {MAX_NODES} terms (softplus, "
                                    "sigmoid and where repeat their arguments); allowed: at most "
                                    f"{MAX_NODES}")
        return value

    def translate(node: ast.AST) -> sp.Expr:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise fail(f"the constant {node.value!r} is not a number")
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise fail(f"the constant {node.value!r} is not a finite number")
            return sp.Float(node.value) if isinstance(node.value, float) else sp.Integer(node.value)
        if isinstance(node, ast.Name):
            if node.id in symbols:
                return symbols[node.id]
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise fail(f"unknown name {node.id!r}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = visit(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Pow) and right.is_number and abs(right) > MAX_EXPONENT:
                raise fail(f"an exponent above {MAX_EXPONENT}")
            if (isinstance(node.op, ast.Pow) and left.is_number and right.is_number and left != 0
                    and abs(right) * abs(sp.log(sp.Abs(left)).evalf()) > MAX_LOG_MAGNITUDE):
                raise fail("a constant power outside the float64 range")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](visit(node.left), visit(node.comparators[0]))
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in FUNCTIONS:
                raise fail(f"the call {ast.unparse(node.func)}(...) is not allowed")
            arity, build = FUNCTIONS[name]
            if node.keywords or len(node.args) != arity:
                raise fail(f"{name} takes {arity} positional argument(s)")
            return build(*(visit(arg) for arg in node.args))
        kind = type(node.op) if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node)
        raise fail(f"{_WHY.get(kind, type(node).__name__)} is not allowed")

    return visit(tree.body)


def tree_size(expr: sp.Basic, sizes: dict | None = None) -> int:
    """The number of nodes of `expr` written out as a tree (shared subexpressions counted each
    time they occur), in time linear in its distinct subexpressions."""
    sizes = {} if sizes is None else sizes
    stack = [expr]
    while stack:
        node = stack[-1]
        pending = [a for a in node.args if a not in sizes]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        sizes[node] = 1 + sum(sizes[a] for a in node.args)
    return sizes[expr]


def finite_real(value: sp.Expr, at: Mapping | None = None) -> float | None:
    """A constant (or `value` with the numbers `at` substituted) as a float64, or None when it
    is complex, infinite or beyond float64 (sympy's own evaluation overflowing included)."""
    try:
        number = complex((value if at is None else value.subs(at)).evalf(30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    if number.imag != 0 or not math.isfinite(number.real):
        return None
    return number.real


def check_derived(expr: sp.Expr, field: str, what: str) -> sp.Expr:
    """Refuse a derived expression (`what`: its name in the message) that has grown beyond
    MAX_DERIVED_NODES, or that holds a constant outside float64, NaN, or a power above
    MAX_EXPONENT (parameters are substituted after parsing, so the parser cannot see them)."""
    size = tree_size(expr)
    if size > MAX_DERIVED_NODES:
        raise FieldError(field, f"{what} grows to {size} terms; allowed: at most "
                                f"{MAX_DERIVED_NODES} (a simpler expression, fewer nested calls)")
    if expr.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        raise FieldError(field, f"{what} is undefined or infinite (a division by zero?)")
    stack, seen = [expr], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, sp.Expr) and not node.free_symbols:
            if finite_real(node) is None:
                raise FieldError(field, f"{what} holds {sp.N(node, 4)}, not a finite real number "
                                        "in float64")
            continue
        power = finite_real(node.exp) if isinstance(node, sp.Pow) and node.exp.is_number else 0
        if power is None or abs(power) > MAX_EXPONENT:
            raise FieldError(field, f"{what} raises to the power {sp.N(node.exp, 4)}; allowed: "
                                    f"exponents of at most {MAX_EXPONENT} in magnitude")
        stack.extend(node.args)
    return expr


# ---- sympy -> torch ---------------------------------------------------------------------------
# Constant subexpressions (numbers, pi, exp(2), ...) become Python floats; every other function
# argument contains a symbol and is a tensor at run time. A Piecewise whose branches are all
# constants takes the dtype and device of a variable in its conditions (not torch's default dtype).

TORCH_FUNCTIONS: dict[type, Callable] = {
    sp.Abs: torch.abs, sp.sign: torch.sign, sp.exp: torch.exp, sp.log: torch.log,
    sp.tanh: torch.tanh, sp.sinh: torch.sinh, sp.cosh: torch.cosh, sp.atan: torch.atan,
    sp.erf: torch.erf,
}
_COMPARE_OPS = {sp.StrictLessThan: "<", sp.LessThan: "<=", sp.StrictGreaterThan: ">",
                sp.GreaterThan: ">=", sp.Eq: "==", sp.Ne: "!=", sp.And: "&", sp.Or: "|"}
_COMPARE_FNS = {sp.StrictLessThan: torch.lt, sp.LessThan: torch.le, sp.StrictGreaterThan: torch.gt,
                sp.GreaterThan: torch.ge, sp.Eq: torch.eq, sp.Ne: torch.ne,
                sp.And: torch.logical_and, sp.Or: torch.logical_or}


def to_torch(expr: sp.Expr, env: Mapping[sp.Symbol, torch.Tensor]) -> torch.Tensor:
    """Evaluate a sympy expression on tensors (the reference's and `graph.evaluate`'s evaluator),
    by a function of `env` built once per expression (`_torch_fn`)."""
    return _torch_fn(expr)(env)


@functools.lru_cache(maxsize=4096)
def _torch_fn(expr: sp.Expr) -> Callable[[Mapping], torch.Tensor | float]:
    """env -> the value of `expr`, from one walk of its tree: a Symbol's tensor, a constant's
    float, and torch's function of its arguments' values for every other node."""
    if expr.is_Symbol:
        return lambda env: env[expr]
    if expr.is_number:
        value = float(expr)
        return lambda env: value
    if isinstance(expr, sp.Piecewise):
        *branches, (last, _) = expr.args
        otherwise = _torch_fn(last)
        symbols = sorted(expr.free_symbols, key=str)
        picks = [(_torch_fn(cond), _torch_fn(value)) for value, cond in reversed(branches)]

        def piecewise(env):
            out = otherwise(env)
            if not isinstance(out, torch.Tensor):
                like = next((t for s in symbols if isinstance(t := env[s], torch.Tensor)), None)
                out = out if like is None else like.new_tensor(out)
            for cond, value in picks:
                out = torch.where(cond(env), value(env), out)
            return out

        return piecewise
    args = [_torch_fn(a) for a in expr.args]
    if not args:
        raise TypeError(f"no torch form for {expr.func.__name__}")
    first, rest = args[0], args[1:]
    if isinstance(expr, sp.Add):
        return lambda env: sum((f(env) for f in rest), first(env))
    if isinstance(expr, sp.Mul):
        def product(env):
            out = first(env)
            for f in rest:
                out = out * f(env)
            return out

        return product
    if isinstance(expr, sp.Pow):
        return lambda env: first(env) ** args[1](env)
    if type(expr) in TORCH_FUNCTIONS:
        fn = TORCH_FUNCTIONS[type(expr)]
        return lambda env: fn(first(env))
    if type(expr) in _COMPARE_FNS:
        compare = _COMPARE_FNS[type(expr)]

        def chain(env):
            out = first(env)
            for f in rest:
                out = compare(out, f(env))
            return out

        return chain
    if isinstance(expr, sp.Heaviside):
        def step(env):
            x = first(env)
            return (x > 0).to(x.dtype)

        return step
    raise TypeError(f"no torch form for {expr.func.__name__}")


def torch_source(expr: sp.Expr, names: Mapping[sp.Symbol, str]) -> str:
    """Print a sympy expression as torch code in the variables `names` (for codegen)."""

    def show(e) -> str:
        if e.is_Symbol:
            return names[e]
        if e.is_number:
            return repr(float(e))
        if isinstance(e, sp.Add | sp.Mul):
            return "(" + (" + " if isinstance(e, sp.Add) else " * ").join(map(show, e.args)) + ")"
        if isinstance(e, sp.Pow):
            base = show(e.args[0])
            if e.args[0].is_Pow or base.startswith("-"):  # ** is right-assoc and binds before -
                base = f"({base})"
            return f"{base} ** {show(e.args[1])}"
        if type(e) in TORCH_FUNCTIONS:
            return f"torch.{TORCH_FUNCTIONS[type(e)].__name__}({show(e.args[0])})"
        if type(e) in _COMPARE_OPS:
            return "(" + f" {_COMPARE_OPS[type(e)]} ".join(map(show, e.args)) + ")"
        if isinstance(e, sp.Heaviside):
            return f"({show(e.args[0])} > 0).to({show(e.args[0])}.dtype)"
        if isinstance(e, sp.Piecewise):
            *branches, (out, _) = e.args
            if out.is_number:
                out = f"{names[min(e.free_symbols, key=str)]}.new_tensor({show(out)})"
            else:
                out = show(out)
            for value, cond in reversed(branches):
                out = f"torch.where({show(cond)}, {show(value)}, {out})"
            return out
        raise TypeError(f"no torch form for {e.func.__name__}")

    return show(expr)
