"""Triton functions the generated kernels call: row loads, exact elementwise functions, products
with per-pair decays, split-half products, the blocked triangular inverse and the decode step's
Newton-Schulz iteration.

Each is a `triton.jit` function; tests/test_triton_helpers.py checks them one by one."""

import triton
import triton.language as tl


@triton.jit
def sequence_bounds(cu_ptr, chunk_ptr, i_n, T, CHUNK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, eos, first_chunk) of sequence i_n: its first and past-the-end token and its first
    chunk counted over all sequences; packed sequences read them from cu_seqlens and the chunk
    offsets, a batch of length-T sequences computes them."""
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        first_chunk = tl.load(chunk_ptr + i_n).to(tl.int64)
    else:
        bos = tl.cast(i_n, tl.int64) * T
        eos = bos + T
        first_chunk = tl.cast(i_n, tl.int64) * tl.cdiv(T, CHUNK)
    return bos, eos, first_chunk


@triton.jit
def load_rows(ptr, tok, cols, valid, mask_cols, width, other, ACC: tl.constexpr):
    """Rows `tok` (token indices, already offset by head) of a [tokens, width] tile, in ACC."""
    return tl.load(ptr + tok[:, None] * width + cols[None, :], mask=valid[:, None] & mask_cols[None, :],
                   other=other).to(ACC)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def largest_magnitude(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
    """max |x| along `axis`, NaN where an entry is NaN: finite exactly where every entry is, at
    one max an entry."""
    return tl.reduce(tl.abs(x), axis, _max_nan, keep_dims=keep_dims)


@triton.jit
def nonfinite_rows(x, DOT: tl.constexpr):
    """1.0 for each row of x [R, C] that holds a NaN or an inf, else 0.0, as [R]. Half operands
    (DOT): the row's sum, each entry scaled by 1/C (a power of two), in one tensor-core product
    of exact float32 terms, which no finite row takes past float32's range (its sum is at most
    the largest half value) and a non-finite entry leaves non-finite (bf16, D=128, sm_90: a
    quarter of the instructions of a row's largest magnitude, one max an entry). Wider ones, or
    tiles under 16 rows or columns: that largest magnitude."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if DOT.primitive_bitwidth > 16 or R < 16 or C < 16:
        return tl.where(largest_magnitude(x, 1) < float("inf"), 0.0, 1.0)
    else:
        scale = tl.full([C, 16], 1.0 / C, DOT)
        sums = tl.dot(x.to(DOT), scale)  # [R, 16]: every column the row's sum
        return tl.where(largest_magnitude(sums, 1) < float("inf"), 0.0, 1.0)


@triton.jit
def store_sum(ptr, value, mask, i_v):
    """*ptr = value for the first block of value columns (i_v = 0), *ptr += value after it."""
    tl.store(ptr, value + tl.load(ptr, mask=mask & (i_v > 0), other=0.0), mask=mask)


@triton.jit
def held_cumsum(x, BT: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr):
    """sum_(s<=t) x_s (s >= t with REVERSE) of a [BT, n] tile whose values the matmul operands'
    dtype DOT holds exactly (the inputs', or a selection among them and such constants): one
    tensor-core product by the triangle of ones, its products exact and summed in float32
    (bf16, D=128, sm_90, 8 warps: a third of tl.cumsum's instructions, a scan across the warps).
    Float32 and float64 operands scan, where a product would not run on tensor cores."""
    if DOT.primitive_bitwidth > 16:
        return tl.cumsum(x, 0, reverse=REVERSE)
    offs = tl.arange(0, BT)
    ones = offs[:, None] <= offs[None, :] if REVERSE else offs[:, None] >= offs[None, :]
    return tl.dot(tl.where(ones, 1.0, 0.0).to(DOT), x.to(DOT))


@triton.jit
def newton_schulz(x, STEPS: tl.constexpr, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                  EPS: tl.constexpr, TALL: tl.constexpr):
    """NS_k(X) of a whole matrix tile (its padding 0): X / (||X||_F + EPS), then STEPS times
    X <- A X + (B G + C G^2) X with G = X X^T, or (TALL, more rows than columns) on X^T:
    X <- A X + X (B G + C G^2) with G = X^T X, the smaller Gram matrix. A float32 tile of up
    to 64 x 64 takes each product as three tf32 tensor-core products of the operands' splits
    (about float32's precision; as float32 products on the CUDA cores, the step at D=64, sm_90,
    8 warps, kept 3 KiB per thread in local memory); a larger one as one tf32 product (10 bits
    of each operand: at 128 x 128 the splits took 384 KiB of shared memory, over sm_90's 227).
    A float64 tile's are float64 products."""
    P: tl.constexpr = "ieee" if x.dtype == tl.float64 else \
        "tf32x3" if x.shape[0] * x.shape[1] <= 4096 else "tf32"
    y = x / (tl.sqrt(tl.sum(tl.sum(x * x, 1, keep_dims=True), 0, keep_dims=True)) + EPS)
    for _ in tl.static_range(STEPS):
        if TALL:
            gram = tl.dot(tl.trans(y), y, input_precision=P)
            poly = B * gram + C * tl.dot(gram, gram, input_precision=P)
            y = A * y + tl.dot(y, poly, input_precision=P)
        else:
            gram = tl.dot(y, tl.trans(y), input_precision=P)
            poly = B * gram + C * tl.dot(gram, gram, input_precision=P)
            y = A * y + tl.dot(poly, y, input_precision=P)
    return y


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp_flushed(x):
    """exp(x) as one ex2 of x log2(e), results below 2^-126 flushed to 0: in float32, tl.exp
    takes the same ex2 of the same product and spends three more instructions keeping those
    results subnormal (sm_90: 5 instructions rather than 2)."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def tanh(x):
    """tanh without cancellation: its odd series to x^15 near 0 (error below 1e-18), and
    (1 - e^-2|x|) / (1 + e^-2|x|) elsewhere."""
    a = tl.abs(x)
    t = exp_flushed(-2.0 * a)
    x2 = x * x
    series = 21844.0 / 6081075.0 - x2 * (929569.0 / 638512875.0)  # tanh(x)/x by Horner in x^2
    series = 62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * series)
    series = 1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * series)))
    return tl.where(x < 0, -1.0, 1.0) * tl.where(a < 0.125, a * series, (1.0 - t) / (1.0 + t))


@triton.jit
def atan(x):
    """atan by three half-angle reductions, atan(x) = 2 atan(x / (1 + sqrt(1 + x^2))), to
    |y| <= tan(pi/16), then its odd series to y^21 (error below 1e-17)."""
    y = x / (1.0 + tl.sqrt(1.0 + x * x))
    y = y / (1.0 + tl.sqrt(1.0 + y * y))
    y = y / (1.0 + tl.sqrt(1.0 + y * y))
    y2 = y * y
    series = 1.0 / 21.0
    for n in tl.static_range(19, 0, -2):
        series = (1.0 / n) - y2 * series
    return 8.0 * y * series


@triton.jit
def pairs(t, i, OFFSET: tl.constexpr):
    """Whether rows t and columns i pair: t - i >= OFFSET."""
    return t >= i + OFFSET


@triton.jit
def _row_of_blocks(x3, j):
    """Row j of each 16-row sub-chunk of x3 [NC, 16, D], as [NC, D]."""
    return tl.sum(tl.where(tl.arange(0, 16)[None, :, None] == j, x3, 0.0), 1)


@triton.jit
def _diagonal_blocks(m, BT: tl.constexpr):
    """The diagonal 16x16 blocks of m [BT, BT], as [BT // 16, 16, 16]."""
    NC: tl.constexpr = BT // 16
    offs = tl.arange(0, BT)
    diagonal = (offs[:, None] // 16) == (offs[None, :] // 16)
    return tl.sum(tl.reshape(tl.where(diagonal, m, 0.0), [NC, 16, NC, 16]), 2)


@triton.jit
def _block_diagonal(blocks, BT: tl.constexpr):
    """The [BT, BT] tile with blocks [BT // 16, 16, 16] on its diagonal, 0 elsewhere."""
    NC: tl.constexpr = BT // 16
    c = tl.arange(0, NC)
    same = c[:, None, None, None] == c[None, None, :, None]  # [NC, 1, NC, 1]
    return tl.reshape(tl.where(same, blocks[:, :, None, :], 0.0), [BT, BT])


# The pair terms of a diagonal block's product are taken W rows (or columns) of every sub-chunk
# at a time, [BT // 16, 16, W, D] of at most PAIR_TILE elements (at BT = 64: all 16 at once up
# to D = 16, 8 at D = 32, 2 at D = 128). GLA, bf16, D = 128, blocks of 32 key columns, sm_90
# (8, 4096, 16): its stage kernel of q k^T ran 739, 693 and 716 M warp-instructions at 32768,
# 16384 and 8192 (spilling 16, 0 and 0 B), its dq/dk kernel 2534, 2355 and 2209 M (spilling
# 1432, 1768 and 1512 B). gmix_both (dq's gmix with dk's gmix_t) holds more beside its tiles
# and takes half as many: its dq/dk kernel ran 1871, 1722 and 2209 M at 16384, 8192 and 4096,
# spilling 656, 304 and 1464 B (kda's: 3077, 2808, 3368 M; 2336, 1952, 2968 B).
PAIR_TILE = tl.constexpr(16384)
MIX_TILE = tl.constexpr(8192)


@triton.constexpr_function
def _group_width(rows, cols, budget):
    """W: the rows (or columns) of each diagonal block one step takes, a power of two from 1 to
    16 such that a [rows // 16, 16, W, cols] tile holds at most `budget` elements."""
    return max(1, min(16, budget // (rows * cols)))


@triton.jit
def _group(x3, g, W: tl.constexpr):
    """Rows g W .. g W + W - 1 of each sub-chunk of x3 [NC, 16, D], as [NC, W, D]."""
    NC: tl.constexpr = x3.shape[0]
    D: tl.constexpr = x3.shape[2]
    x4 = tl.reshape(x3, [NC, 16 // W, W, D])
    return tl.sum(tl.where(tl.arange(0, 16 // W)[None, :, None, None] == g, x4, 0.0), 1)


@triton.jit
def gdot(a, b, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
         PRECISION: tl.constexpr):
    """out[t, i] = sum_d a[t, d] b[i, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET,
    else 0, by sub-chunks of 16 rows. In each diagonal 16x16 block every pair's exponent is
    selected before exp, W columns of every block at a time; across sub-chunks, with r the first
    row of t's sub-chunk, a tensor-core product of factors at most 1:
    (a_t exp(ga_t - ga_r)) (b_i exp(ga_r - gb_i))^T (ga falls down the rows and no pair's
    exponent is positive), so nothing overflows and a weight underflows only below the float
    range. ga, gb: [BT, D] like a and b. (`gdot_both`'s first; the compiler drops the rest.)"""
    return gdot_both(a, a, b, ga, gb, BT, OFFSET, OFFSET, DOT, PRECISION)[0]


@triton.jit
def gdot_both(a, c, b, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, OFFSET_C: tl.constexpr,
              DOT: tl.constexpr, PRECISION: tl.constexpr):
    """`gdot`(a, b) on the pairs t - i >= OFFSET and `gdot`(c, b) on those t - i >= OFFSET_C,
    from the same pair decays (at the lower offset) and the same b factors across sub-chunks."""
    NC: tl.constexpr = BT // 16
    D: tl.constexpr = a.shape[1]
    W: tl.constexpr = _group_width(BT, D, PAIR_TILE)
    LOW: tl.constexpr = OFFSET if OFFSET < OFFSET_C else OFFSET_C
    inner = tl.arange(0, 16)
    a3 = tl.reshape(a, [NC, 16, D])
    c3 = tl.reshape(c, [NC, 16, D])
    b3 = tl.reshape(b, [NC, 16, D])
    ga3 = tl.reshape(ga, [NC, 16, D])
    gb3 = tl.reshape(gb, [NC, 16, D])
    diag = tl.zeros([NC, 16, 16 // W, W], dtype=a.dtype)
    diag_c = tl.zeros([NC, 16, 16 // W, W], dtype=a.dtype)
    for g in tl.static_range(16 // W):  # columns g W .. g W + W - 1 of every diagonal block
        paired = (inner[:, None] >= g * W + tl.arange(0, W)[None, :] + LOW)[None, :, :, None]
        decayed = _group(b3, g, W)[:, None, :, :] * exp_flushed(
            tl.where(paired, ga3[:, :, None, :] - _group(gb3, g, W)[:, None, :, :],
                     float("-inf")))  # [NC, 16, W, D]
        slot = tl.arange(0, 16 // W)[None, None, :, None] == g
        diag = tl.where(slot, tl.sum(a3[:, :, None, :] * decayed, 3)[:, :, None, :], diag)
        diag_c = tl.where(slot, tl.sum(c3[:, :, None, :] * decayed, 3)[:, :, None, :], diag_c)
    g_first = _row_of_blocks(ga3, 0)  # [NC, D]: ga at each sub-chunk's first row
    to_first = exp_flushed(ga3 - g_first[:, None, :])
    a_ref = tl.reshape(a3 * to_first, [BT, D])
    c_ref = tl.reshape(c3 * to_first, [BT, D])
    offs = tl.arange(0, BT)
    sub = offs // 16
    far = tl.zeros([BT, BT], dtype=a.dtype)
    far_c = tl.zeros([BT, BT], dtype=a.dtype)
    for s in tl.static_range(1, NC):  # the rows of sub-chunk s against every earlier row
        g_s = tl.sum(tl.where(tl.arange(0, NC)[:, None] == s, g_first, 0.0), 0)
        earlier = (sub < s)[:, None]
        b_s = tl.trans(b * exp_flushed(tl.where(earlier, g_s[None, :] - gb, float("-inf")))).to(DOT)
        rows = (sub == s)[:, None]
        far += tl.dot(tl.where(rows, a_ref, 0.0).to(DOT), b_s, input_precision=PRECISION)
        far_c += tl.dot(tl.where(rows, c_ref, 0.0).to(DOT), b_s, input_precision=PRECISION)
    out = _block_diagonal(tl.reshape(diag, [NC, 16, 16]), BT) + far
    out_c = _block_diagonal(tl.reshape(diag_c, [NC, 16, 16]), BT) + far_c
    return (tl.where(pairs(offs[:, None], offs[None, :], OFFSET), out, 0.0),
            tl.where(pairs(offs[:, None], offs[None, :], OFFSET_C), out_c, 0.0))


@triton.jit
def gmix(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
         PRECISION: tl.constexpr):
    """out[t, d] = sum_i m[t, i] x[i, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET,
    by sub-chunks as `gdot`: exact in the diagonal blocks; across them, with r the first row of
    t's sub-chunk, exp(ga_t - ga_r) (m @ (x exp(ga_r - gb)))_t on tensor cores."""
    return gmix_pair(m, x, ga, gb, BT, OFFSET, DOT, PRECISION, False)[0]


@triton.jit
def gmix_pair(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
              PRECISION: tl.constexpr, TWIN: tl.constexpr):
    """`gmix` on the pairs t - i >= OFFSET and, with TWIN, on those t - i >= OFFSET + 1 too
    (`gmix_both`'s first two; the compiler drops the rest)."""
    out, twin, _, _ = gmix_both(m, x, x, ga, gb, BT, OFFSET, DOT, PRECISION, TWIN)
    return out, twin


@triton.jit
def gmix_both(m, x, y, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
              PRECISION: tl.constexpr, TWIN: tl.constexpr):
    """`gmix`(m, x) and `gmix_t`(m, y) on the same pairs, from the same exponents, and with TWIN
    each on the pairs t - i >= OFFSET + 1 too (a gate's gradient leaves out the nearest pairs;
    at OFFSET 0 they share the products across sub-chunks): (gmix, its twin, gmix_t, its twin),
    without TWIN each twin is its first. The diagonal blocks' pair terms are taken W columns i
    at a time: gmix sums them over i, gmix_t over t into those W rows of its result."""
    NC: tl.constexpr = BT // 16
    D: tl.constexpr = x.shape[1]
    W: tl.constexpr = _group_width(BT, D, MIX_TILE)
    inner = tl.arange(0, 16)
    x3 = tl.reshape(x, [NC, 16, D])
    y3 = tl.reshape(y, [NC, 16, D])
    ga3 = tl.reshape(ga, [NC, 16, D])
    gb3 = tl.reshape(gb, [NC, 16, D])
    m_diag = tl.trans(_diagonal_blocks(m, BT), 0, 2, 1)  # [c, i, t]
    near = tl.zeros_like(x3)
    near_twin = tl.zeros_like(x3)
    near_t = tl.zeros([NC, 16 // W, W, D], dtype=x.dtype)
    near_t_twin = tl.zeros([NC, 16 // W, W, D], dtype=x.dtype)
    for g in tl.static_range(16 // W):  # columns i = g W .. g W + W - 1 of every diagonal block
        cols = g * W + tl.arange(0, W)[None, :]
        paired = (inner[:, None] >= cols + OFFSET)[None, :, :, None]
        decay = exp_flushed(tl.where(paired, ga3[:, :, None, :] - _group(gb3, g, W)[:, None, :, :],
                                     float("-inf")))  # [NC, 16, W, D]
        m_g = tl.trans(_group(m_diag, g, W), 0, 2, 1)[:, :, :, None] * decay  # [NC, 16, W, D]
        term = m_g * _group(x3, g, W)[:, None, :, :]
        term_t = m_g * y3[:, :, None, :]
        slot = tl.arange(0, 16 // W)[None, :, None, None] == g
        near += tl.sum(term, 2)
        near_t = tl.where(slot, tl.sum(term_t, 1)[:, None, :, :], near_t)
        if TWIN:
            twin = (inner[:, None] >= cols + OFFSET + 1)[None, :, :, None]
            near_twin += tl.sum(tl.where(twin, term, 0.0), 2)
            near_t_twin = tl.where(slot, tl.sum(tl.where(twin, term_t, 0.0), 1)[:, None, :, :],
                                   near_t_twin)
    g_first = _row_of_blocks(ga3, 0)
    to_rows = exp_flushed(ga3 - g_first[:, None, :])
    far = _mix_earlier(m, x, gb, g_first, BT, OFFSET, DOT, PRECISION)
    later = _mix_later(m, y, ga, gb, g_first, BT, OFFSET, DOT, PRECISION)
    out = tl.reshape(near + tl.reshape(far, x3.shape) * to_rows, x.shape)
    out_t = tl.reshape(near_t, x.shape) + later
    if not TWIN:
        return out, out, out_t, out_t
    if OFFSET > 0:  # the products across sub-chunks differ at the next offset
        far = _mix_earlier(m, x, gb, g_first, BT, OFFSET + 1, DOT, PRECISION)
        later = _mix_later(m, y, ga, gb, g_first, BT, OFFSET + 1, DOT, PRECISION)
    return (out, tl.reshape(near_twin + tl.reshape(far, x3.shape) * to_rows, x.shape),
            out_t, tl.reshape(near_t_twin, x.shape) + later)


@triton.jit
def _mix_earlier(m, x, gb, g_first, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
                 PRECISION: tl.constexpr):
    """sum_i m[t, i] x[i, d] exp(ga_r - gb[i, d]) over the rows i of earlier sub-chunks than t's
    with t - i >= OFFSET, r the first row of t's sub-chunk (g_first [NC, D]: ga there)."""
    NC: tl.constexpr = BT // 16
    offs = tl.arange(0, BT)
    sub = offs // 16
    m = tl.where(pairs(offs[:, None], offs[None, :], OFFSET), m, 0.0)
    far = tl.zeros(x.shape, dtype=x.dtype)
    for s in tl.static_range(1, NC):  # the rows of sub-chunk s from every earlier row
        g_s = tl.sum(tl.where(tl.arange(0, NC)[:, None] == s, g_first, 0.0), 0)
        x_s = x * exp_flushed(tl.where((sub < s)[:, None], g_s[None, :] - gb, float("-inf")))
        m_s = tl.where((sub == s)[:, None], m, 0.0)
        far += tl.dot(m_s.to(DOT), x_s.to(DOT), input_precision=PRECISION)
    return far


@triton.jit
def gmix_t(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
           PRECISION: tl.constexpr):
    """out[i, d] = sum_t m[t, i] x[t, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET,
    by sub-chunks as `gdot`: exact in the diagonal blocks; across them, with r the first row of
    the sub-chunk after i's, exp(ga_r - gb_i) (m^T @ (x exp(ga - ga_r)))_i on tensor cores."""
    return gmix_t_pair(m, x, ga, gb, BT, OFFSET, DOT, PRECISION, False)[0]


@triton.jit
def gmix_t_pair(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, TWIN: tl.constexpr):
    """`gmix_t` on the pairs t - i >= OFFSET and, with TWIN, on those t - i >= OFFSET + 1 too
    (`gmix_both`'s last two; the compiler drops the rest)."""
    _, _, out, twin = gmix_both(m, x, x, ga, gb, BT, OFFSET, DOT, PRECISION, TWIN)
    return out, twin


@triton.jit
def _mix_later(m, x, ga, gb, g_first, BT: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr,
               PRECISION: tl.constexpr):
    """sum_t m[t, i] x[t, d] exp(ga[t, d] - gb[i, d]) over the rows t of later sub-chunks than
    i's with t - i >= OFFSET, factored at r, the first row of the sub-chunk after i's
    (g_first [NC, D]: ga at each sub-chunk's first row)."""
    NC: tl.constexpr = BT // 16
    offs = tl.arange(0, BT)
    sub = offs // 16
    m = tl.where(pairs(offs[:, None], offs[None, :], OFFSET), m, 0.0)
    out = tl.zeros(x.shape, dtype=x.dtype)
    for s in tl.static_range(0, NC - 1):  # the rows of sub-chunk s from every later row
        g_s = tl.sum(tl.where(tl.arange(0, NC)[:, None] == s + 1, g_first, 0.0), 0)
        x_s = x * exp_flushed(tl.where((sub > s)[:, None], ga - g_s[None, :], float("-inf")))
        m_s = tl.where((sub == s)[None, :], m, 0.0)
        far = tl.dot(tl.trans(m_s).to(DOT), x_s.to(DOT), input_precision=PRECISION)
        out += far * exp_flushed(tl.where((sub == s)[:, None], g_s[None, :] - gb, float("-inf")))
    return out


@triton.jit
def dot_fp32(a, b, PRECISION: tl.constexpr, HALF: tl.constexpr):
    """a @ b of float32 tiles (the triangular inverse's merges), by the inputs' dtype HALF: exact
    at PRECISION "ieee" or for float inputs. For bfloat16 inputs one tf32 product: the tensor
    core reads 10 of each operand's 23 mantissa bits, and the inverse is stored in bf16, which
    keeps 7. For float16 inputs, stored with 10 bits, three fp16 products of the splits
    a = a1 + a2, b = b1 + b2 (a1 = a rounded to HALF): a1 b1 + a1 b2 + a2 b1, about 21 bits."""
    if PRECISION == "ieee" or HALF != tl.float16:  # noqa: SIM300 - HALF is the argument
        return tl.dot(a, b, input_precision=PRECISION)  # exact, or tf32 for half inputs
    a1 = a.to(HALF)
    b1 = b.to(HALF)
    a2 = (a - a1.to(a.dtype)).to(HALF)
    b2 = (b - b1.to(b.dtype)).to(HALF)
    return tl.dot(a1, b1, tl.dot(a1, b2, tl.dot(a2, b1)))


@triton.jit
def tri_inv(a, scratch, BT: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [BT, BT] tile, blocked: the 16x16 diagonal
    blocks by forward substitution (row i = e_i - a_i X, all blocks at once), then blocks of 2s
    from blocks of s by X <- X - X L X, L the part of a below the diagonal s-blocks of each
    2s-block (the inverse of [[M11, 0], [M21, M22]] is [[X11, 0], [-X22 M21 X11, X22]]).
    `scratch` (or None): BT * BT entries the program may overwrite (the inverse's buffer), where
    the diagonal blocks are stored in a's dtype, if they fit, so that each step loads its rows;
    taking them out of the registers is a reduction across the threads (gated DeltaNet's stage
    kernel, bf16, D=64, sm_90, 4 warps, split merges: 135.5 M warp-instructions that way, 124.7 M
    loading)."""
    NB: tl.constexpr = BT // 16
    offs = tl.arange(0, BT)
    row = tl.arange(0, 16)[None, :, None]
    stored: tl.constexpr = scratch is not None and \
        BT * scratch.dtype.element_ty.primitive_bitwidth >= 16 * a.dtype.primitive_bitwidth
    if stored:
        blocks = scratch.to(tl.pointer_type(a.dtype))  # the blocks [NB, 16, 16], row-major
        at = (offs[:, None] // 16) * 256 + (offs[:, None] % 16) * 16 + offs[None, :] % 16
        tl.store(blocks + at, a, mask=(offs[:, None] // 16) == (offs[None, :] // 16))
        tl.debug_barrier()
        rows = blocks + tl.arange(0, NB)[:, None] * 256 + tl.arange(0, 16)[None, :]
    else:
        diag = _diagonal_blocks(a, BT)  # [NB, 16, 16]
    inverse = tl.where(row == tl.arange(0, 16)[None, None, :], 1.0, 0.0).to(a.dtype)
    inverse = tl.broadcast_to(inverse, [NB, 16, 16])
    for i in tl.static_range(1, 16):
        a_i = tl.load(rows + i * 16) if stored else _row_of_blocks(diag, i)  # row i of each block
        update = tl.sum(a_i[:, :, None] * inverse, 1)
        inverse = tl.where(row == i, inverse - update[:, None, :], inverse)
    if stored:
        tl.debug_barrier()  # every row read before the caller writes over the scratch
    x = _block_diagonal(inverse, BT)
    for level in tl.static_range(6):  # s = 16, 32, ..., 512: chunks up to 1024 rows
        if (16 << level) < BT:
            s = 16 << level
            below = ((offs[:, None] // (2 * s)) == (offs[None, :] // (2 * s))) & (
                (offs[:, None] // s) != (offs[None, :] // s))
            lx = dot_fp32(tl.where(below, a, 0.0), x, PRECISION, HALF)
            x = x - dot_fp32(x, lx, PRECISION, HALF)
    return x
