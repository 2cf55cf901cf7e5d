"""Triton functions the generated kernels call: row loads, exact elementwise functions, products
with per-pair decays, split-half products and the blocked triangular inverse.

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
def store_sum(ptr, value, mask, i_v):
    """*ptr = value for the first block of value columns (i_v = 0), *ptr += value after it."""
    tl.store(ptr, value + tl.load(ptr, mask=mask & (i_v > 0), other=0.0), mask=mask)


@triton.jit
def tanh(x):
    """tanh without cancellation: its odd series to x^15 near 0 (error below 1e-18), and
    (1 - e^-2|x|) / (1 + e^-2|x|) elsewhere."""
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
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
def gdot(a, b, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr):
    """out[t, i] = sum_d a[t, d] b[i, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET,
    else 0, a column at a time; the exponent is selected before exp, so no decay overflows."""
    offs = tl.arange(0, BT)
    out = tl.zeros([BT, BT], dtype=a.dtype)
    for i in range(0, BT):
        pick = offs[:, None] == i
        b_i = tl.sum(tl.where(pick, b, 0.0), 0)
        gb_i = tl.sum(tl.where(pick, gb, 0.0), 0)
        decay = tl.exp(tl.where(pairs(offs, i, OFFSET)[:, None], ga - gb_i[None, :], float("-inf")))
        column = tl.sum(a * b_i[None, :] * decay, 1)
        out = tl.where(offs[None, :] == i, column[:, None], out)
    return out


@triton.jit
def gmix(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr):
    """out[t, d] = sum_i m[t, i] x[i, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET."""
    offs = tl.arange(0, BT)
    out = tl.zeros_like(x)
    for i in range(0, BT):
        pick = offs[:, None] == i
        m_i = tl.sum(tl.where(offs[None, :] == i, m, 0.0), 1)
        x_i = tl.sum(tl.where(pick, x, 0.0), 0)
        gb_i = tl.sum(tl.where(pick, gb, 0.0), 0)
        decay = tl.exp(tl.where(pairs(offs, i, OFFSET)[:, None], ga - gb_i[None, :], float("-inf")))
        out += m_i[:, None] * x_i[None, :] * decay
    return out


@triton.jit
def gmix_t(m, x, ga, gb, BT: tl.constexpr, OFFSET: tl.constexpr):
    """out[i, d] = sum_t m[t, i] x[t, d] exp(ga[t, d] - gb[i, d]) on the pairs t - i >= OFFSET."""
    offs = tl.arange(0, BT)
    out = tl.zeros_like(x)
    for t in range(0, BT):
        pick = offs[:, None] == t
        m_t = tl.sum(tl.where(pick, m, 0.0), 0)
        x_t = tl.sum(tl.where(pick, x, 0.0), 0)
        ga_t = tl.sum(tl.where(pick, ga, 0.0), 0)
        before = pairs(t, offs, OFFSET)  # the columns i paired with row t
        decay = tl.exp(tl.where(before[:, None], ga_t[None, :] - gb, float("-inf")))
        out += m_t[:, None] * x_t[None, :] * decay
    return out


@triton.jit
def dot_fp32(a, b, PRECISION: tl.constexpr, HALF: tl.constexpr):
    """a @ b of float32 tiles: at PRECISION when that is exact or HALF is no half type, else as
    three tensor-core products in HALF of the splits a = a1 + a2, b = b1 + b2 (a1 = a rounded to
    HALF): a1 b1 + a1 b2 + a2 b1, about 16 significant bits with bfloat16 halves (tf32: 10)."""
    if PRECISION == "ieee" or HALF == tl.float32:  # noqa: SIM300 - HALF is the argument
        return tl.dot(a, b, input_precision=PRECISION)
    a1 = a.to(HALF)
    b1 = b.to(HALF)
    a2 = (a - a1.to(a.dtype)).to(HALF)
    b2 = (b - b1.to(b.dtype)).to(HALF)
    return tl.dot(a1, b1, tl.dot(a1, b2, tl.dot(a2, b1)))


@triton.jit
def tri_inv(a, BT: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [BT, BT] tile, blocked: the 16x16 diagonal
    blocks by forward substitution (row i = e_i - a_i X, all blocks at once), then blocks of 2s
    from blocks of s by X <- X - X L X, L the part of a below the diagonal s-blocks of each
    2s-block (the inverse of [[M11, 0], [M21, M22]] is [[X11, 0], [-X22 M21 X11, X22]])."""
    NB: tl.constexpr = BT // 16
    offs = tl.arange(0, BT)
    blk = tl.arange(0, NB)
    same = (blk[:, None, None, None] == blk[None, None, :, None])  # [NB, 1, NB, 1]
    diagonal = (offs[:, None] // 16) == (offs[None, :] // 16)
    diag = tl.sum(tl.reshape(tl.where(diagonal, a, 0.0), [NB, 16, NB, 16]), 2)  # [NB, 16, 16]
    row = tl.arange(0, 16)[None, :, None]
    inverse = tl.where(row == tl.arange(0, 16)[None, None, :], 1.0, 0.0).to(a.dtype)
    inverse = tl.broadcast_to(inverse, [NB, 16, 16])
    for i in tl.static_range(1, 16):
        a_i = tl.sum(tl.where(row == i, diag, 0.0), 1)  # [NB, 16]: row i of each block
        update = tl.sum(a_i[:, :, None] * inverse, 1)
        inverse = tl.where(row == i, inverse - update[:, None, :], inverse)
    x = tl.reshape(tl.where(same, inverse[:, :, None, :], 0.0), [BT, BT])  # block diagonal
    for level in tl.static_range(6):  # s = 16, 32, ..., 512: chunks up to 1024 rows
        if (16 << level) < BT:
            s = 16 << level
            below = ((offs[:, None] // (2 * s)) == (offs[None, :] // (2 * s))) & (
                (offs[:, None] // s) != (offs[None, :] // s))
            lx = dot_fp32(tl.where(below, a, 0.0), x, PRECISION, HALF)
            x = x - dot_fp32(x, lx, PRECISION, HALF)
    return x
