"""The decode step's Triton kernel (`codegen.render_step_module`) as a PyTorch custom op.

One launch steps one token: one program per sequence, head and block of value rows (the whole
state, for the muon learner's Newton-Schulz iteration), which reads the gradient point P (W_s,
or A_t Z_s with grad_at 'retained') and the running state R = A_t Z_s - U_t (with eta_at
'query': A_t Z_s and the decayed gradient sum), and writes them (and the momentum) in place.
`mirasc.decode.Decoder` runs it on CUDA tensors and under TRITON_INTERPRET=1 for the specs
`codegen.step_unsupported` admits; the torch step (`Decoder`'s own) runs the others, and every
spec on CPU tensors.
"""

from __future__ import annotations

import torch
import triton

from mirasc.cache import load_step_module
from mirasc.derive import Derivation
from mirasc.launch import interpreting

BV_SPLIT = 32  # value rows per program when g(r) is elementwise in r
TILE = 4096  # elements of a [BV, BK] tile: the key columns pass in blocks of TILE / BV
ELEMENTS_PER_THREAD = 16  # of each tile: num_warps = TILE / (32 * this), fewer for smaller tiles
MOST_WARPS = 8  # a whole state's tile (NS_k) of 128 x 128 holds more elements per thread

_CUSTOM_OPS: dict[str, tuple] = {}  # by name: the step op and [the StepKernel it runs]


def meta(dk: int, dv: int, whole_v: bool, dtype: torch.dtype, whole_k: bool = False) -> dict:
    """The constexprs and num_warps of a launch at head dims (dk, dv) with a state of `dtype`:
    BV value rows per program (all of them with `whole_v`), key columns in blocks of BK (all
    of them with `whole_k`, in a tile of at least 16 x 16, the least a product takes)."""
    import triton.language as tl

    bdk, bdv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    bv = bdv if whole_v else min(bdv, BV_SPLIT)
    bk = min(bdk, max(16, TILE // bv))
    if whole_k:
        bv, bk = max(16, bv), max(16, bdk)
    warps = max(1, bv * bk // (32 * ELEMENTS_PER_THREAD))
    return dict(DK=dk, DV=dv, BK=bk, BV=bv, num_warps=min(warps, MOST_WARPS),
                ACC=tl.float64 if dtype == torch.float64 else tl.float32)


class StepKernel:
    """The step of one spec: `self.op(q, k, v, gates, tracks, ln, first, close)` -> o [B, H, Dv]
    in the state's dtype, for one token's q, k [B, H, Dk], v [B, H, Dv] and gates [B, H(, D)]
    (named by `self.gates`, contiguous), the state's pointers named by `self.tracks` (W
    [B, H, Dv, Dk], a bias [B, H, Dv]; None where this variant reads none) and the affine layer
    norm's (ln_weight, ln_bias) [H, Dv] or nothing. `first`: the token opens a chunk (point and
    src are the boundary's Z); `close`: it ends one. dst may be src (in place) or a new tensor."""

    def __init__(self, derivation: Derivation):
        spec = derivation.spec
        module = load_step_module(spec)
        self.gates: list[str] = module.GATES
        self.tracks: list[str] = module.TRACKS
        self.layer_norm: bool = module.LAYER_NORM
        self.whole_v: bool = module.WHOLE_V
        self.whole_k: bool = module.WHOLE_K
        self.launcher = getattr(module, f"{spec.name}_step_kernel")
        self.op = self._register(f"mirasc::{spec.name}_{module.DIGEST}_step")

    def run(self, q, k, v, gates, tracks, ln, first: bool, close: bool):
        """Launch the kernel: o [B, H, Dv]."""
        batch, heads, dk = q.shape
        dv = v.shape[-1]
        o = tracks[self.tracks.index("src")].new_empty(batch, heads, dv)
        launch = meta(dk, dv, self.whole_v, o.dtype, self.whole_k)
        grid = (batch, heads, triton.cdiv(dv, launch["BV"]))
        self.launcher[grid](q, k, v, *gates, *tracks, *ln, o, H=heads, FIRST=first, CLOSE=close,
                            **launch)
        return o

    def _register(self, name: str):
        """The custom op, registered once per process under `name` (which includes the spec's
        digest); it runs the latest `StepKernel` made for it (the same code, unless a test swaps
        the module), so a launcher swapped on that instance is the one called."""
        if name not in _CUSTOM_OPS:
            runs = [self]

            def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     gates: list[torch.Tensor], tracks: list[torch.Tensor | None],
                     ln: list[torch.Tensor], first: bool, close: bool) -> torch.Tensor:
                return runs[0].run(q, k, v, gates, tracks, ln, first, close)

            op = torch.library.custom_op(name, mutates_args=("tracks",))(step)
            src = self.tracks.index("src")
            op.register_fake(lambda q, k, v, gates, tracks, ln, first, close:
                             tracks[src].new_empty(*q.shape[:2], v.shape[-1]))
            _CUSTOM_OPS[name] = op, runs
        op, runs = _CUSTOM_OPS[name]
        runs[0] = self
        return op


def runs_here(x: torch.Tensor) -> bool:
    """Whether the kernel runs on tensors like `x`: CUDA ones, or any under the interpreter."""
    return x.is_cuda or interpreting()
