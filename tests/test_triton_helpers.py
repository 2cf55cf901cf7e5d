"""The Triton functions the generated kernels call (mirasc.triton_helpers), each against torch,
run one at a time through a small kernel (Triton's interpreter on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from mirasc import triton_helpers as th
from mirasc.check import relative_error


@triton.jit
def _offsets(BT: tl.constexpr, D: tl.constexpr):
    """The entries of a row-major [BT, BT] tile and of a [BT, D] one."""
    rows = tl.arange(0, BT)[:, None]
    return rows * BT + tl.arange(0, BT)[None, :], rows * D + tl.arange(0, D)[None, :]


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, th.tanh(tl.load(x_ptr + offs)))


@triton.jit
def _atan_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, th.atan(tl.load(x_ptr + offs)))


@triton.jit
def _exp_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, th.exp_flushed(tl.load(x_ptr + offs)))


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_exp_flushed_is_exp(dtype, rtol):
    """exp_flushed(x) = exp(x) to the rounding of x log2(e): a relative error below
    |x| eps log2(e) ln 2 = |x| eps (|x| <= 80 here); exact at the gates' edges: exp(-inf) = 0,
    exp(0) = 1, exp(inf) = inf, and NaN stays NaN."""
    x = torch.cat([torch.linspace(-80, 80, 124, dtype=torch.float64),
                   torch.tensor([0.0, -float("inf"), float("inf"), float("nan")], dtype=torch.float64)])
    out = torch.full_like(x, 7.0, dtype=dtype)
    _exp_kernel[(1,)](x.to(dtype), out, N=128)
    want = torch.exp(x[:124])
    assert torch.all((out[:124].double() - want).abs() <= rtol * want), \
        ((out[:124].double() - want).abs() / want).max()
    assert out[124] == 1.0 and out[125] == 0.0 and out[126] == float("inf") and out[127].isnan()


@triton.jit
def _largest_magnitude_kernel(x_ptr, rows_ptr, whole_ptr, R: tl.constexpr, C: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    tl.store(rows_ptr + tl.arange(0, R), th.largest_magnitude(x, 1))
    whole = th.largest_magnitude(th.largest_magnitude(x, 1, True), 0, True)
    tl.store(whole_ptr + tl.zeros([1, 1], dtype=tl.int32), whole)


@pytest.mark.parametrize("whole_nan", [False, True])
def test_largest_magnitude_keeps_nan(whole_nan):
    """max |x| per row and over the tile: NaN where an entry is NaN, wherever it sits among
    the row's entries (a plain max passes over it), inf where one is +-inf."""
    x = torch.randn(8, 16) * 100
    x[1, 0], x[2, 15], x[3, 7], x[5, 2] = float("nan"), float("nan"), -float("inf"), float("inf")
    x[5, 9] = float("nan")  # after an inf in its row
    if not whole_nan:
        x[[1, 2, 5], [0, 15, 9]] = 3.0
    rows, whole = torch.empty(8), torch.empty(1)
    _largest_magnitude_kernel[(1,)](x, rows, whole, R=8, C=16)
    torch.testing.assert_close(rows, x.abs().amax(1), rtol=0, atol=0, equal_nan=True)
    assert rows.isnan().sum() == (3 if whole_nan else 0)
    assert whole.isnan().item() == whole_nan and (whole_nan or whole.item() == float("inf"))


@triton.jit
def _nonfinite_rows_kernel(x_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    tl.store(out_ptr + tl.arange(0, R), th.nonfinite_rows(x, x.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(16, 8), (8, 64), (16, 64)])
def test_nonfinite_rows(dtype, rows, cols):
    """1 exactly for the rows holding a NaN or an inf, in fp16 (a tensor-core row sum from 16
    rows and columns) and float32 (each entry's magnitude): rows of the dtype's largest values,
    of one sign or both, stay finite; a NaN among them, or an inf of either sign, does not."""
    big = torch.finfo(dtype).max
    x = torch.randn(16, cols).to(dtype)
    x[1], x[2, ::2], x[2, 1::2] = big, big, -big
    x[3], x[3, cols - 1] = big, float("nan")
    x[5, 0], x[6, 3], x[8, cols // 2], x[9, 1] = float("nan"), float("inf"), -float("inf"), float("nan")
    x[9, 2] = float("inf")
    x = x[:rows].contiguous()
    out = torch.empty(rows)
    _nonfinite_rows_kernel[(1,)](x, out, R=rows, C=cols)
    want = (~torch.isfinite(x).all(1)).float()
    assert torch.equal(out, want), (out, want)
    assert want.sum() == (5 if rows == 16 else 3)


@pytest.mark.parametrize(("kernel", "expected"), [(_tanh_kernel, torch.tanh),
                                                  (_atan_kernel, torch.atan)])
def test_elementwise_functions_are_exact_in_float64(kernel, expected):
    """tanh and atan within a few float64 ulps over many scales, both signs and 0 (where the series
    take over from the closed forms)."""
    x = torch.cat([torch.logspace(-12, 3, 126, dtype=torch.float64), torch.tensor([0.125, 0.0])])
    x = torch.cat([x, -x])
    out = torch.full_like(x, float("nan"))
    kernel[(1,)](x, out, N=256)
    want = expected(x)
    assert torch.all((out - want).abs() <= 1e-15 * want.abs()), (out - want).abs().max()


@triton.jit
def _product_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr, PRECISION: tl.constexpr,
                    HALF: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(out_ptr + offs, th.dot_fp32(tl.load(a_ptr + offs), tl.load(b_ptr + offs), PRECISION,
                                         HALF))


def test_split_half_products_keep_float32_precision():
    """The merges of the triangular inverse for fp16 inputs: three products of the operands'
    two-half splits, near float32 (a single fp16 product of the rounded operands errs ~3e-4)."""
    a, b = (torch.randn(32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    exact = a.double() @ b.double()
    errors = {}
    for half in (tl.float16, tl.float32):
        out = torch.full((32, 32), float("nan"))
        _product_kernel[(1,)](a, b, out, N=32, PRECISION="tf32", HALF=half)
        errors[half] = relative_error(out, exact)
    rounded = a.half().double() @ b.half().double()
    assert errors[tl.float16] < 1e-5 < relative_error(rounded, exact), errors
    assert errors[tl.float32] < 1e-6, errors


def test_merge_precision_by_input_dtype():
    """Why dot_fp32 takes tf32 for bf16 inputs and split fp16 products for fp16 ones, on the
    torch model of tri_inv's arithmetic (`benchmarks inverse`, run from the repository root):
    with tf32 merges the inverse stored in bf16 errs at most 2x as much as with exact ones, even
    for ill-conditioned I + A; stored in fp16 tf32 merges would err 2.7x to 10x more than split
    ones. The model itself, with float32 merges, is the inverse to float32 precision."""
    model = ("import json; from benchmarks import inverse; "
             "print(json.dumps(inverse.benchmark(8, 64, 32)))")
    done = subprocess.run([sys.executable, "-c", model], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    err = {(r["case"], r["merge"], r["stored"]): r for r in rows}
    for case in {r["case"] for r in rows}:
        assert err[case, "float32", "bfloat16"]["error"] < 1e-6
        exact = err[case, "float32", "bfloat16"]["stored_error"]
        assert err[case, "tf32", "bfloat16"]["stored_error"] < 2 * exact
        split = err[case, "split fp16", "float16"]["stored_error"]
        assert err[case, "tf32", "float16"]["stored_error"] > 2 * split
    assert len(rows) == 15


@triton.jit
def _invert_kernel(a_ptr, x_ptr, scratch_ptr, BT: tl.constexpr, PRECISION: tl.constexpr,
                   HALF: tl.constexpr, SCRATCH: tl.constexpr):
    offs = tl.arange(0, BT)
    tile = offs[:, None] * BT + offs[None, :]
    x = th.tri_inv(tl.load(a_ptr + tile), scratch_ptr if SCRATCH else None, BT, PRECISION, HALF)
    tl.store(x_ptr + tile, x)


@triton.jit
def _held_cumsum_kernel(x_ptr, out_ptr, BT: tl.constexpr, D: tl.constexpr, REVERSE: tl.constexpr,
                        DOT: tl.constexpr):
    offs = _offsets(BT, D)[1]
    tl.store(out_ptr + offs, th.held_cumsum(tl.load(x_ptr + offs), BT, REVERSE, DOT))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("dtype", "dot"), [(torch.float16, tl.float16),
                                            (torch.float32, tl.float32),
                                            (torch.float64, tl.float64)])
def test_prefix_sums_of_held_tiles(dtype, dot, reverse):
    """Prefix sums over the rows (from the last row with `reverse`) of a tile the operand dtype
    holds, by the product with a triangle of ones for half operands (float32 sums) and a scan
    otherwise: each within rounding of the float64 sum. A float16 tile of steep log decays
    (down to -110, and -inf clamped there) holds its values exactly."""
    g = torch.Generator().manual_seed(4)
    x = -torch.rand(64, 32, generator=g, dtype=torch.float64) ** 4 * 110.0
    x[5, 3] = -110.0
    held = x.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.full((64, 32), float("nan"), dtype=acc)
    _held_cumsum_kernel[(1,)](held.to(acc), out, BT=64, D=32, REVERSE=reverse, DOT=dot)
    want = (held.double().flip(0).cumsum(0).flip(0) if reverse else held.double().cumsum(0))
    bound = 1e-15 if dtype == torch.float64 else 1e-6
    assert relative_error(out, want) < bound


@pytest.mark.parametrize("scratch", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [16, 32, 128])
def test_blocked_triangular_inverse(rows, scratch):
    """(I + A)^-1 (16-row blocks by substitution, merged by products) equals a triangular solve,
    for one block, one merge and three; A with entries of either sign. In float64 exactly; in
    float32 with the merges of half inputs (split fp16 products) to 1e-5. The substitution takes
    the rows of A from registers, or loads them from a scratch buffer of BT * BT entries (a half
    one holds A's float32 diagonal blocks from BT = 32 on; at 16 the rows stay in registers)."""
    a = (torch.randn(rows, rows, dtype=torch.float64) * 0.4).tril(-1)
    eye = torch.eye(rows, dtype=a.dtype)
    expected = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)
    for dtype, precision, half, tolerance in ((torch.float64, "ieee", tl.float64, 1e-13),
                                              (torch.float32, "tf32", tl.float16, 1e-5)):
        x = torch.full_like(a, float("nan"), dtype=dtype)
        space = torch.full_like(a, float("nan"), dtype=scratch or dtype)
        _invert_kernel[(1,)](a.to(dtype), x, space, rows, precision, half, scratch is not None)
        assert relative_error(x, expected) < tolerance, dtype


@triton.jit
def _decayed_kernel(a_ptr, b_ptr, ga_ptr, gb_ptr, out_ptr, BT: tl.constexpr, D: tl.constexpr,
                    OFFSET: tl.constexpr, FN: tl.constexpr, SQUARE_OUT: tl.constexpr):
    square, wide = _offsets(BT, D)
    a = tl.load(a_ptr + (square if FN is not th.gdot else wide))
    out = FN(a, tl.load(b_ptr + wide), tl.load(ga_ptr + wide), tl.load(gb_ptr + wide), BT, OFFSET,
             tl.float64, "ieee")
    tl.store(out_ptr + (square if SQUARE_OUT else wide), out)


def _decays(rows: int, width: int, gen: torch.Generator, steep: bool) -> torch.Tensor:
    """Running sums of log decays down the rows, a channel-wise gamma. `steep`: up to -400 a row,
    so that the factors exp(gamma_t) and exp(-gamma_i) apart overflow float64 where their ratio
    does not; else mild decays (-0.1 a row) beside channels of -20 a row and rows at the floor
    -110 in every channel, so the products across sub-chunks matter."""
    if steep:
        return -torch.rand(rows, width, dtype=torch.float64, generator=gen).mul(400.0).cumsum(0)
    steps = -torch.rand(rows, width, dtype=torch.float64, generator=gen) * 0.2
    steps[:, 1] = -20.0
    steps[rows // 2 + 3] = -110.0
    return steps.cumsum(0)


def _pair_weights(ga: torch.Tensor, gb: torch.Tensor, at: int) -> torch.Tensor:
    """exp(ga_t - gb_i) on the pairs t - i >= at, else 0, as [t, i, d]."""
    rows = torch.arange(ga.shape[0])
    exponent = ga[:, None, :] - gb[None, :, :]
    return exponent.masked_fill(~(rows[:, None] - rows[None, :] >= at)[:, :, None],
                                float("-inf")).exp()


@pytest.mark.parametrize("d", [8, 128])
@pytest.mark.parametrize("steep", [True, False])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_products_with_pairwise_decays(offset, steep, d):
    """gdot, gmix and gmix_t against their sums written out in torch, on the pairs t - i >=
    offset, over 64 rows (four sub-chunks of 16), with decays whose factors alone overflow and
    with mild ones beside steep channels and a reset row; 8 columns (a diagonal block's pairs
    at once) and 128 (4 rows or columns of each block at a time)."""
    bt = 64
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(bt, d, dtype=torch.float64, generator=gen) for _ in range(2))
    m = torch.randn(bt, bt, dtype=torch.float64, generator=gen)
    ga = _decays(bt, d, gen, steep)
    gb = ga - torch.rand(bt, d, dtype=torch.float64, generator=gen)  # gamma as q and k see it
    weight = _pair_weights(ga, gb, offset)
    expected = {
        th.gdot: torch.einsum("td,id,tid->ti", a, b, weight),
        th.gmix: torch.einsum("ti,id,tid->td", m, b, weight),
        th.gmix_t: torch.einsum("ti,td,tid->id", m, b, weight),
    }
    for fn, want in expected.items():
        out = torch.full((bt, bt) if fn is th.gdot else (bt, d), float("nan"), dtype=torch.float64)
        first = a if fn is th.gdot else m
        _decayed_kernel[(1,)](first, b, ga, gb, out, BT=bt, D=d, OFFSET=offset, FN=fn,
                              SQUARE_OUT=fn is th.gdot)
        assert relative_error(out, want) < 1e-13, fn.__name__


@triton.jit
def _gdot_both_kernel(a_ptr, c_ptr, b_ptr, ga_ptr, gb_ptr, out_ptr, BT: tl.constexpr,
                      D: tl.constexpr, OFFSET: tl.constexpr, OFFSET_C: tl.constexpr):
    square, wide = _offsets(BT, D)
    out, out_c = th.gdot_both(tl.load(a_ptr + wide), tl.load(c_ptr + wide), tl.load(b_ptr + wide),
                              tl.load(ga_ptr + wide), tl.load(gb_ptr + wide), BT, OFFSET, OFFSET_C,
                              tl.float64, "ieee")
    tl.store(out_ptr + square, out)
    tl.store(out_ptr + BT * BT + square, out_c)


@pytest.mark.parametrize("d", [8, 128])
@pytest.mark.parametrize(("offset", "offset_c"), [(0, 1), (1, 0), (2, 2)])
def test_two_products_on_the_same_decays(offset, offset_c, d):
    """gdot_both: gdot of a and b at one offset and of c and b at another, from the same pair
    decays, each against its sum written out in torch."""
    bt = 64
    gen = torch.Generator().manual_seed(11)
    a, b, c = (torch.randn(bt, d, dtype=torch.float64, generator=gen) for _ in range(3))
    ga = _decays(bt, d, gen, steep=False)
    gb = ga - torch.rand(bt, d, dtype=torch.float64, generator=gen)

    out = torch.full((2, bt, bt), float("nan"), dtype=torch.float64)
    _gdot_both_kernel[(1,)](a, c, b, ga, gb, out, BT=bt, D=d, OFFSET=offset, OFFSET_C=offset_c)
    for got, first, at in ((out[0], a, offset), (out[1], c, offset_c)):
        want = torch.einsum("td,id,tid->ti", first, b, _pair_weights(ga, gb, at))
        assert relative_error(got, want) < 1e-13


@triton.jit
def _twin_kernel(m_ptr, x_ptr, ga_ptr, gb_ptr, out_ptr, twin_ptr, BT: tl.constexpr, D: tl.constexpr,
                 OFFSET: tl.constexpr, FN: tl.constexpr):
    square, wide = _offsets(BT, D)
    out, twin = FN(tl.load(m_ptr + square), tl.load(x_ptr + wide), tl.load(ga_ptr + wide),
                   tl.load(gb_ptr + wide), BT, OFFSET, tl.float64, "ieee", True)
    tl.store(out_ptr + wide, out)
    tl.store(twin_ptr + wide, twin)


@pytest.mark.parametrize("d", [8, 128])
@pytest.mark.parametrize("offset", [0, 1])
def test_twin_products_at_the_next_offset(offset, d):
    """gmix_pair and gmix_t_pair give gmix (gmix_t) at the offset and at the next one, each
    against its sum written out in torch, with mild and steep decays over four sub-chunks."""
    bt = 64
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(bt, bt, dtype=torch.float64, generator=gen)
    x = torch.randn(bt, d, dtype=torch.float64, generator=gen)
    ga = _decays(bt, d, gen, steep=False)
    gb = ga - torch.rand(bt, d, dtype=torch.float64, generator=gen)

    patterns = {th.gmix_pair: "ti,id,tid->td", th.gmix_t_pair: "ti,td,tid->id"}
    for fn, pattern in patterns.items():
        out, twin = (torch.full((bt, d), float("nan"), dtype=torch.float64) for _ in range(2))
        _twin_kernel[(1,)](m, x, ga, gb, out, twin, BT=bt, D=d, OFFSET=offset, FN=fn)
        for got, at in ((out, offset), (twin, offset + 1)):
            assert relative_error(got, torch.einsum(pattern, m, x, _pair_weights(ga, gb, at))) < 1e-13


@triton.jit
def _both_kernel(m_ptr, x_ptr, y_ptr, ga_ptr, gb_ptr, out_ptr, BT: tl.constexpr, D: tl.constexpr,
                 OFFSET: tl.constexpr, TWIN: tl.constexpr):
    square, wide = _offsets(BT, D)
    outs = th.gmix_both(tl.load(m_ptr + square), tl.load(x_ptr + wide), tl.load(y_ptr + wide),
                        tl.load(ga_ptr + wide), tl.load(gb_ptr + wide), BT, OFFSET, tl.float64,
                        "ieee", TWIN)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * BT * D + wide, outs[i])


@pytest.mark.parametrize("d", [8, 128])
@pytest.mark.parametrize(("offset", "twin"), [(0, True), (1, True), (1, False)])
def test_a_product_and_its_mate_from_one_call(offset, twin, d):
    """gmix_both: gmix of m and x, gmix_t of m and y (other operands), each at the offset and,
    with twin, the next, against their sums written out in torch (without twin the second of
    each is the first)."""
    bt = 64
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(bt, bt, dtype=torch.float64, generator=gen)
    x, y = (torch.randn(bt, d, dtype=torch.float64, generator=gen) for _ in range(2))
    ga = _decays(bt, d, gen, steep=False)
    gb = ga - torch.rand(bt, d, dtype=torch.float64, generator=gen)

    second = offset + 1 if twin else offset
    expected = [torch.einsum("ti,id,tid->td", m, x, _pair_weights(ga, gb, offset)),
                torch.einsum("ti,id,tid->td", m, x, _pair_weights(ga, gb, second)),
                torch.einsum("ti,td,tid->id", m, y, _pair_weights(ga, gb, offset)),
                torch.einsum("ti,td,tid->id", m, y, _pair_weights(ga, gb, second))]
    out = torch.full((4, bt, d), float("nan"), dtype=torch.float64)
    _both_kernel[(1,)](m, x, y, ga, gb, out, BT=bt, D=d, OFFSET=offset, TWIN=twin)
    for got, want in zip(out, expected, strict=True):
        assert relative_error(got, want) < 1e-13


@triton.jit
def _bounds_kernel(cu_ptr, chunk_ptr, out_ptr, T, CHUNK: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_n = tl.program_id(0)
    bos, eos, first_chunk = th.sequence_bounds(cu_ptr, chunk_ptr, i_n, T, CHUNK, IS_VARLEN)
    tl.store(out_ptr + i_n * 3, bos)
    tl.store(out_ptr + i_n * 3 + 1, eos)
    tl.store(out_ptr + i_n * 3 + 2, first_chunk)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_bounds(packed):
    """Each sequence's first and past-the-end token and its first chunk over all sequences: a
    batch of 3 sequences of 37 tokens in chunks of 16 (3 chunks each), or packed sequences of
    5, 0 and 40 tokens (1, 0 and 3 chunks)."""
    lengths = [5, 0, 40] if packed else [37] * 3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    chunks = torch.tensor([0, *torch.tensor([-(-n // 16) for n in lengths]).cumsum(0).tolist()])
    out = torch.full((3, 3), -1, dtype=torch.int64)
    _bounds_kernel[(3,)](cu, chunks, out, 37, CHUNK=16, IS_VARLEN=packed)
    expected = [[cu[i], cu[i + 1], chunks[i]] for i in range(3)]
    assert out.tolist() == torch.tensor(expected).tolist()


@triton.jit
def _newton_schulz_kernel(x_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr,
                          BC: tl.constexpr, STEPS: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                          CC: tl.constexpr, EPS: tl.constexpr):
    rows, cols = tl.arange(0, BR)[:, None], tl.arange(0, BC)[None, :]
    mask = (rows < R) & (cols < C)
    x = tl.load(x_ptr + rows * C + cols, mask=mask, other=0.0)
    tl.store(out_ptr + rows * C + cols, th.newton_schulz(x, STEPS, A, B, CC, EPS, R > C), mask=mask)


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (16, 16)])
def test_newton_schulz_of_a_padded_tile(shape):
    """The decode step's NS_k of a matrix padded to a 16 x 16 tile, on X^T where it has more
    rows (as the reference), float64: the reference's iteration to 1e-12; a zero matrix stays 0."""
    from mirasc.derive import NS_COEFFICIENTS, NS_EPS
    from mirasc.reference import newton_schulz

    a, b, c = NS_COEFFICIENTS
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for given, steps in ((x, 5), (x, 1), (torch.zeros_like(x), 5)):
        out = torch.full_like(given, float("nan"))
        _newton_schulz_kernel[(1,)](given, out, R=shape[0], C=shape[1], BR=16, BC=16,
                                    STEPS=steps, A=a, B=b, CC=c, EPS=NS_EPS)
        want = newton_schulz(given[None, None], steps)[0, 0]
        assert torch.allclose(out, want, rtol=1e-12, atol=1e-12), (out - want).abs().max()
