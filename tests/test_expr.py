"""The safe expression language: spec text -> sympy (a whitelist, nothing is executed) and
sympy -> torch (the tree evaluator `to_torch` and the printer `torch_source` used by codegen)."""

from __future__ import annotations

import builtins
import contextlib
import math
import os
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
import sympy as sp
import sympy.parsing.sympy_parser
import torch
import torch.nn.functional as F

from mirasc.errors import FieldError
from mirasc.expr import MAX_EXPONENT, MAX_LENGTH, parse_expression, to_torch, torch_source

R = sp.Symbol("r", real=True)
V = sp.Symbol("v", real=True)
RNORM = sp.Symbol("rnorm", positive=True)
DELTA = sp.Symbol("delta", positive=True)
SYMBOLS = {"r": R, "v": V, "rnorm": RNORM, "delta": DELTA}
NAMES = {symbol: name for name, symbol in SYMBOLS.items()}
FIELD = "bias.loss"
PWNED = Path("/tmp/pwned")


@contextlib.contextmanager
def no_code_execution():
    """Fail loudly (and record) if anything reaches eval/exec/os.system/subprocess or sympy's
    string parser while the block runs."""
    calls = []

    def trap(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called with {args!r}")
        return call

    with contextlib.ExitStack() as stack:
        for target, name in ((builtins, "eval"), (builtins, "exec"), (os, "system"),
                             (subprocess, "Popen"), (sympy.parsing.sympy_parser, "parse_expr")):
            stack.enter_context(mock.patch.object(target, name, trap(name)))
        yield calls
    assert calls == []


def parse(text):
    return parse_expression(text, SYMBOLS, FIELD)


# ---- unsafe or invalid text -------------------------------------------------------------------

UNSAFE = [
    ("import-os-system", "__import__('os').system('touch /tmp/pwned')",
     "the call __import__('os').system(...) is not allowed"),
    ("import-call", "__import__('os')", "the call __import__(...) is not allowed"),
    ("dunder-attribute", "r.__class__", "attribute access is not allowed"),
    ("dunder-subclasses", "().__class__.__bases__[0].__subclasses__()", "is not allowed"),
    ("lambda-call", "(lambda x: x)(r)", "the call lambda x: x(...) is not allowed"),
    ("subscript", "r[0]", "subscripts is not allowed"),
    ("open", "open('x')", "the call open(...) is not allowed"),
    ("eval", "eval('1')", "the call eval(...) is not allowed"),
    ("exec", "exec('import os')", "the call exec(...) is not allowed"),
    ("method-call", "r.conjugate()", "the call r.conjugate(...) is not allowed"),
    ("xor-power", "r ^ 2", "'^' (use ** for powers) is not allowed"),
    ("if-expression", "r if r > 0 else 0", "use where(cond, a, b)"),
    ("and", "r and v", "and/or is not allowed"),
    ("or", "r or v", "and/or is not allowed"),
    ("not", "not r", "'not' is not allowed"),
    ("huge-exponent", "2 ** 1000", f"an exponent above {MAX_EXPONENT}"),
    ("huge-symbolic-exponent", "r ** 65", f"an exponent above {MAX_EXPONENT}"),
    ("huge-negative-exponent", "r ** -100", f"an exponent above {MAX_EXPONENT}"),
    ("power-tower", "9 ** 9 ** 9", f"an exponent above {MAX_EXPONENT}"),
    ("nested-powers", "(((9 ** 64) ** 64) ** 64) ** 64", "a constant power outside the float64 range"),
    ("overflowing-power", "(2 ** 64) ** 64", "a constant power outside the float64 range"),
    ("long-text", "r + " * 150 + "r", f"a string of at most {MAX_LENGTH} characters"),
    ("not-a-string", 3, f"a string of at most {MAX_LENGTH} characters"),
    ("keyword-argument", "exp(x=r)", "exp takes 1 positional argument(s)"),
    ("too-few-arguments", "where(r, 1)", "where takes 3 positional argument(s)"),
    ("too-many-arguments", "log(r, 2)", "log takes 1 positional argument(s)"),
    ("starred-argument", "exp(*r)", "starred arguments is not allowed"),
    ("string", "'a'", "the constant 'a' is not a number"),
    ("bytes", "b'a'", "the constant b'a' is not a number"),
    ("boolean", "True", "the constant True is not a number"),
    ("none", "None", "the constant None is not a number"),
    ("complex", "1j", "the constant 1j is not a number"),
    ("infinite-float", "1e400", "the constant inf is not a finite number"),
    ("division-by-zero", "r / 0", "is undefined or infinite"),
    ("nan", "r ** (0 / 0)", "is undefined or infinite"),
    ("log-zero-in-condition", "where(log(0) < r, r, 0)", "is undefined or infinite"),
    ("unknown-name", "x * r", "unknown name 'x'"),
    ("unknown-function", "floor(r)", "the call floor(...) is not allowed"),
    ("chained-comparison", "0 < r < 1", "chained comparisons"),
    ("equality", "r == 0", "chained comparisons, == and !="),
    ("modulo", "r % 2", "'%' is not allowed"),
    ("floor-division", "r // 2", "'//' is not allowed"),
    ("bit-invert", "~r", "'~' is not allowed"),
    ("walrus", "(x := r)", "assignment is not allowed"),
    ("list", "[r, v]", "List is not allowed"),
    ("comprehension", "[x for x in r]", "ListComp is not allowed"),
    ("f-string", "f'{r}'", "f-strings is not allowed"),
    ("statement", "import os", "syntax error"),
    ("two-statements", "r; v", "syntax error"),
    ("incomplete", "r +", "syntax error"),
    ("empty", "", "syntax error"),
]


@pytest.mark.parametrize(("text", "hint"), [pytest.param(t, h, id=i) for i, t, h in UNSAFE])
def test_rejected(text, hint):
    PWNED.unlink(missing_ok=True)
    start = time.perf_counter()
    with no_code_execution(), pytest.raises(FieldError) as info:
        parse(text)
    assert time.perf_counter() - start < 2.0
    assert not PWNED.exists()
    error = info.value
    assert error.field == FIELD
    assert str(error).startswith(f"{FIELD}: ")
    assert hint in error.message, (hint, error.message)


def test_rejections_list_what_is_allowed():
    with pytest.raises(FieldError) as info:
        parse_expression("q * r", {"r": R, "v": V}, "retention.potential")
    assert info.value.field == "retention.potential"
    message = info.value.message
    assert message.startswith("unknown name 'q' in 'q * r'; allowed: numbers, + - * / **")
    assert "the variables r, v," in message
    assert "the functions abs, sign, sqrt, exp, log" in message and "where" in message


def test_limits_are_inclusive():
    assert parse("r ** 64") == R**64
    assert parse("r" + " " * (MAX_LENGTH - 1)) is R
    with pytest.raises(FieldError):
        parse("r" + " " * MAX_LENGTH)


# ---- valid text parses to the sympy expression built by hand ----------------------------------

HALF = sp.Float(0.5)
VALID = [
    ("log(cosh(r))", sp.log(sp.cosh(R))),
    # sigmoid and softplus in their overflow-free forms (their values are checked numerically
    # against torch.sigmoid and F.softplus below)
    ("sigmoid(r)", (1 + sp.tanh(R / 2)) / 2),
    ("softplus(r - v)", (R - V + sp.Abs(R - V)) / 2 + sp.log(1 + sp.exp(-sp.Abs(R - V)))),
    ("where(abs(r) <= 1, r**2/2, abs(r) - 0.5)",
     sp.Piecewise((R**2 / 2, sp.Abs(R) <= 1), (sp.Abs(R) - HALF, True))),
    ("where(rnorm <= delta, r**2 / 2, delta * abs(r))",
     sp.Piecewise((R**2 / 2, sp.Le(RNORM, DELTA)), (DELTA * sp.Abs(R), True))),
    ("where(r > v, r, v)", sp.Piecewise((R, sp.Gt(R, V)), (V, True))),
    ("where(r >= 0, r, 0) + where(r < 0, -r, 0)",
     sp.Piecewise((R, sp.Ge(R, 0)), (0, True)) + sp.Piecewise((-R, sp.Lt(R, 0)), (0, True))),
    ("r < v", sp.Lt(R, V)),
    ("r <= v", sp.Le(R, V)),
    ("r > v", sp.Gt(R, V)),
    ("r >= v", sp.Ge(R, V)),
    ("-r**2", -(R**2)),                     # ** binds tighter than unary minus
    ("r ** 2 ** 3", R**8),                  # ** is right-associative
    ("1 - r - v", 1 - R - V),               # - is left-associative
    ("r / 2 * v", R * V / 2),               # / and * are left-associative
    ("2 ** -1 * r", R / 2),
    ("+r", R),
    ("sqrt(r**2 + 1e-6)", sp.sqrt(R**2 + sp.Float(1e-6))),
    ("pi * r", sp.pi * R),
    ("sign(r) * exp(-abs(r))", sp.sign(R) * sp.exp(-sp.Abs(R))),
    ("erf(r) + atan(v) - tanh(r) * sinh(v)", sp.erf(R) + sp.atan(V) - sp.tanh(R) * sp.sinh(V)),
    ("  delta * rnorm  ", DELTA * RNORM),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=t.strip()) for t, e in VALID])
def test_parses(text, expected):
    with no_code_execution():
        got = parse(text)
    assert got == expected, (got, expected)
    assert got.free_symbols == expected.free_symbols


def test_numbers_and_symbols_keep_their_kind():
    assert isinstance(parse("3"), sp.Integer) and parse("3") == 3
    assert isinstance(parse("0.25"), sp.Float) and float(parse("0.25")) == 0.25
    assert parse("2 ** -1") == sp.Rational(1, 2)
    assert parse("r") is R and parse("rnorm").is_positive  # the caller's symbols, not new ones


# ---- sympy -> torch: the evaluator, the printer and a hand-written formula agree ----------------

def _inputs():
    gen = torch.Generator().manual_seed(1234)
    r = torch.rand(4096, generator=gen, dtype=torch.float64) * 4 - 2
    v = torch.rand(4096, generator=gen, dtype=torch.float64) * 4 - 2
    v[:256] = r[:256]  # ties, so that < and <= (> and >=) differ
    rnorm = torch.rand(4096, generator=gen, dtype=torch.float64) * 3 + 0.1
    delta = torch.rand(4096, generator=gen, dtype=torch.float64) + 0.5
    return {"r": r, "v": v, "rnorm": rnorm, "delta": delta}


TORCH_CASES = [
    ("log(cosh(r))", lambda r, v, rnorm, delta: torch.log(torch.cosh(r))),
    ("sigmoid(r) * v", lambda r, v, rnorm, delta: torch.sigmoid(r) * v),
    ("softplus(r - v)", lambda r, v, rnorm, delta: F.softplus(r - v)),
    ("where(abs(r) <= 1, r**2/2, abs(r) - 0.5)",
     lambda r, v, rnorm, delta: torch.where(r.abs() <= 1, r * r / 2, r.abs() - 0.5)),
    ("where(rnorm <= delta, r**2 / 2, delta * abs(r))",
     lambda r, v, rnorm, delta: torch.where(rnorm <= delta, r * r / 2, delta * r.abs())),
    ("where(r > 0, r / 3, -r)", lambda r, v, rnorm, delta: torch.where(r > 0, r / 3, -r)),
    ("where(r > 0, 1 / 3, -1)",  # constant branches: float64 like r, and 1/3 exact in float64
     lambda r, v, rnorm, delta: torch.where(r > 0, torch.full_like(r, 1 / 3), torch.full_like(r, -1.0))),
    ("where(r < -1, -1, where(r >= 1, 1, r))", lambda r, v, rnorm, delta: r.clamp(-1, 1)),
    ("where(r > v, r, v)", lambda r, v, rnorm, delta: torch.maximum(r, v)),
    ("where(r >= v, sqrt(r**2 + 1e-6), exp(-abs(v)))",
     lambda r, v, rnorm, delta: torch.where(r >= v, (r * r + 1e-6).sqrt(), (-v.abs()).exp())),
    ("sign(r) * abs(r)**1.5 + erf(v) - atan(r * v)",
     lambda r, v, rnorm, delta: r.sign() * r.abs() ** 1.5 + torch.erf(v) - torch.atan(r * v)),
    ("tanh(r) * sinh(v) / cosh(v)",
     lambda r, v, rnorm, delta: torch.tanh(r) * torch.sinh(v) / torch.cosh(v)),
    ("exp(2) * r + log(3) - pi * v",  # constant function calls fold to floats
     lambda r, v, rnorm, delta: math.exp(2) * r + math.log(3) - math.pi * v),
    ("(r**3)**delta",  # a power of a power: printed with parentheses (** is right-associative)
     lambda r, v, rnorm, delta: (r**3) ** delta),
    ("r**-2 + 1 / (1 + rnorm)", lambda r, v, rnorm, delta: r.pow(-2) + 1 / (1 + rnorm)),
]


@pytest.mark.parametrize(("text", "formula"), [pytest.param(t, f, id=t) for t, f in TORCH_CASES])
def test_torch_forms_agree(text, formula):
    expr = parse(text)
    values = _inputs()
    env = {SYMBOLS[name]: tensor for name, tensor in values.items()}
    expected = formula(**values)
    assert expected.dtype == torch.float64 and expected.shape == (4096,)
    if isinstance(expr, sp.Piecewise):  # the inputs take both sides of the first condition
        first = to_torch(expr.args[0][1], env)
        assert first.any() and not first.all()

    evaluated = to_torch(expr, env)
    source = torch_source(expr, NAMES)
    printed = eval(source, {"torch": torch, **values})  # generated code, not spec text
    for got in (evaluated, printed):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert not expected.isnan().all()


@pytest.mark.parametrize(("op", "fn"), [("<", torch.lt), ("<=", torch.le), (">", torch.gt),
                                        (">=", torch.ge)])
def test_comparisons(op, fn):
    values = _inputs()
    r, v = values["r"], values["v"]
    expr = parse(f"r {op} v")
    expected = fn(r, v)
    evaluated = to_torch(expr, {R: r, V: v})
    printed = eval(torch_source(expr, NAMES), {"torch": torch, "r": r, "v": v})
    assert evaluated.dtype == printed.dtype == torch.bool
    assert torch.equal(evaluated, expected) and torch.equal(printed, expected)


def test_piecewise_source_is_a_where():
    source = torch_source(parse("where(abs(r) <= 1, r**2/2, abs(r) - 0.5)"), NAMES)
    assert source.startswith("torch.where(") and "<=" in source and "torch.abs(r)" in source


def test_sigmoid_and_softplus_do_not_overflow():
    x = torch.tensor([-800.0, -30.0, 0.0, 30.0, 800.0], dtype=torch.float64, requires_grad=True)
    for text, want in (("sigmoid(r)", torch.sigmoid), ("softplus(r)", F.softplus)):
        got = to_torch(parse(text), {R: x})
        # accurate to 1e-15 absolutely; in the far lower tail (1e-13) not to 1e-12 relatively
        assert torch.allclose(got, want(x), rtol=1e-12, atol=1e-15)
        (grad,) = torch.autograd.grad(got.sum(), x)
        assert torch.isfinite(grad).all()
