"""The precision of the triangular inverse (I + A)^-1 by the merges' products, modelled in torch on
the CPU: `tri_inv`'s arithmetic (float32 substitution of the 16-row diagonal blocks, then
X <- X - X (L X) per doubling) with each merge product as the GPU computes it for an input dtype.
The error is ||X - X_exact|| / ||X_exact||, before and after the inverse is stored in the inputs'
dtype (the buffer the other kernels read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.float().to(dtype).to(F64)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x as a tensor core reads a float32 operand for a tf32 product: the top 10 mantissa bits,
    the rest dropped (Triton passes the float32 registers, no rounding instruction)."""
    bits = x.float().view(torch.int32) & ~((1 << 13) - 1)
    return bits.view(torch.float32).to(F64)


def _product(a: torch.Tensor, b: torch.Tensor, merge: str) -> torch.Tensor:
    """a @ b with float32 accumulation, operands as `merge` takes them."""
    if merge == "float32":
        return (a.float() @ b.float()).to(F64)
    if merge == "tf32":
        return (_tf32(a) @ _tf32(b)).float().to(F64)
    half = {"split bf16": torch.bfloat16, "split fp16": torch.float16}[merge]
    a1, b1 = _round(a, half), _round(b, half)
    a2, b2 = _round(a - a1, half), _round(b - b1, half)
    return (a1 @ b1 + a1 @ b2 + a2 @ b1).float().to(F64)


def inverse(a: torch.Tensor, merge: str) -> torch.Tensor:
    """(I + a)^-1 of strictly lower-triangular [..., BT, BT] tiles, as `tri_inv` computes it."""
    bt = a.shape[-1]
    a = a.float().to(F64)
    x = torch.zeros_like(a)
    for s in range(0, bt, 16):
        block = a[..., s:s + 16, s:s + 16].float()
        inv = torch.eye(16).expand_as(block).clone()
        for i in range(1, 16):  # row i = e_i - a_i X
            inv[..., i, :] -= (block[..., i, :, None] * inv).sum(-2)
        x[..., s:s + 16, s:s + 16] = inv.to(F64)
    rows = torch.arange(bt)
    s = 16
    while s < bt:
        below = (rows[:, None] // (2 * s) == rows[None, :] // (2 * s)) & \
            (rows[:, None] // s != rows[None, :] // s)
        x = (x - _product(x, _product(torch.where(below, a, 0.0), x, merge), merge)).float().to(F64)
        s *= 2
    return x


@dataclass(frozen=True)
class Case:
    """A = diag(beta) (K K^T * decay), strictly lower, from keys with a shared component of
    weight `shared` (nearly parallel keys make I + A ill-conditioned), rounded to bf16."""
    name: str
    gated: bool
    shared: float


CASES = (Case("gated, independent keys", True, 0.0),
         Case("beta 1, shared key component 1", False, 1.0),
         Case("beta 1, shared key component 3", False, 3.0))
CHOICES = (("float32", torch.bfloat16), ("split bf16", torch.bfloat16), ("tf32", torch.bfloat16),
           ("split fp16", torch.float16), ("tf32", torch.float16))  # (merge products, stored as)


def tiles(case: Case, n: int, bt: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, bt, d, generator=g, dtype=F64) + \
        case.shared * torch.randn(n, 1, d, generator=g, dtype=F64)
    k = _round(k / k.norm(dim=-1, keepdim=True), torch.bfloat16)
    beta = torch.ones(n, bt, 1, dtype=F64)
    gam = torch.zeros(n, bt, dtype=F64)
    if case.gated:
        beta = _round(torch.sigmoid(torch.randn(n, bt, 1, generator=g, dtype=F64)), torch.bfloat16)
        gam = torch.nn.functional.logsigmoid(torch.randn(n, bt, generator=g, dtype=F64) + 4).cumsum(-1)
    decay = torch.exp(gam[:, :, None] - gam[:, None, :])
    return torch.tril(beta * (k @ k.transpose(-1, -2)) * decay, -1).float().to(F64)


def _error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return ((x - exact).norm() / exact.norm()).item()


def benchmark(n: int = 64, bt: int = 64, d: int = 64) -> list[dict]:
    rows = []
    eye = torch.eye(bt, dtype=F64)
    for case in CASES:
        a = tiles(case, n, bt, d)
        exact = torch.linalg.inv(eye + a)
        cond = torch.linalg.cond(eye + a).median().item()
        for merge, stored in CHOICES:
            x = inverse(a, merge)
            rows.append({"case": case.name, "median_cond": cond, "merge": merge,
                         "error": _error(x, exact), "stored": str(stored).removeprefix("torch."),
                         "stored_error": _error(_round(x, stored), exact)})
    return rows


def report(rows: list[dict], n: int, bt: int, d: int) -> str:
    lines = [f"(I + A)^-1 of {n} tiles of {bt} rows (keys of {d}), error against float64:",
             "| A | median cond | merge products | error | stored as | error stored |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['median_cond']:.0f} | {r['merge']} | {r['error']:.1e} | "
              f"{r['stored']} | {r['stored_error']:.1e} |" for r in rows]
    return "\n".join(lines)
