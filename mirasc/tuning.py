"""Tuning: the block sizes, warps and pipeline stages of each kind of kernel, in one table.

A generated module carries the values it was rendered with (its BV_MAX, BH_MAX, BK_MAX, WHOLE_V
and CONFIGS tables); the figures behind each choice are sm_90 compilations without a GPU
(`mirasc resources`, benchmarks/RESULTS.md)."""

from __future__ import annotations

# The (num_warps, num_stages) pairs the autotuner compiles for a kernel; of those it times only
# the ones that spill least (`launch.least_spilling`), so a pair that spills for one spec or head
# dim may stay for another. 16 warps caps registers at 128 per thread and spills more than 4 or
# 8. Bf16, sm_90, D=128, (8, 4096, 16) (2026-12-06): at 4 warps the head-decay specs' dq/dk
# kernels spill none and run 0.55-0.62x the warp-instructions of 8 (gated DeltaNet 787 -> 432 M),
# where simple GLA's dv and gate kernels spill 24 and 48 B at 4 and none at 8; GLA's stage
# kernels spill 432-896 B at 4 warps and none at 8.
CONFIGS = [(4, 1), (8, 1)]
# The stage kernels and the passes over blocks of value columns: also 2 warps, as fla's state
# kernels run 1 or 2 (the passes also 8 warps with their loads prefetched a chunk step ahead:
# 2 stages). Bf16, sm_90, (8, 4096, 16), 2 warps against 4, neither spilling: the forward
# passes of linear attention and simple GLA ran 0.74-0.85x the warp-instructions at D=64 and
# 128, the backward's stage of simple GLA 0.34-0.42x (a per-row tile in its [BT, BT] sums laid
# out over 4 warps cost 9.5 M instructions to load at D=64); gated DeltaNet's stages spill at
# 2 warps, and its passes at D=128 (the autotuner drops them). Gated DeltaNet at D=128: its
# passes spill none at 4 warps and run 0.64-0.68x the warp-instructions of 8 (each warp's step
# is longer: 4 warps took 1.1-1.6x the step's instructions of 8).
STAGE_CONFIGS = [(2, 1), (4, 1), (8, 1)]
PASS_CONFIGS = [(2, 1), (4, 1), (8, 1), (8, 2)]
# The stage and output kernels of a memory that streams hidden blocks: 8 warps. Moneta, Yaad and
# Memora at D=64: 4 warps spilled 1.2-4.4x more in each of them (and compiling those MLP kernels
# a second time would only add to the autotuner's first call); their passes keep CONFIGS
# (their backward passes spill less at 4 warps at D=64, more at D=128).
STREAM_CONFIGS = [(8, 1)]

# The widest block of value columns per program where the step never mixes them: the passes take
# narrow ones, for more programs and shorter sequential steps (gated DeltaNet, bf16, D=128:
# forward step 1126 instructions at 64, 917 at 32; the backward pass spilled at 32); the gate
# and dq/dk kernels hold [BT, BT] tiles beside their [BT, BV] ones. The forward output kernel
# takes up to 128, so that at D=128 one program computes the chunk's q k^T and its decays once:
# bf16, sm_90, (8, 4096, 16), 4 warps, no spills either way, 0.57-0.59x the warp-instructions
# of blocks of 64 (simple GLA 95 -> 56 M, gated DeltaNet 76 -> 44, DeltaNet and linear
# attention 60 -> 34). Blocks of 64 in the dv kernel ran 0.65-1.2x those of 32 (simple GLA's
# rose to 334 M from 277).
BV_MAX = {"fwd": 32, "fwd_out": 128, "bwd": 16, "bwd_out": 32, "bwd_dv": 32, "bwd_dqk": 16,
          "bwd_dg": 16}
# Up to this DV, an output kernel that walks the value blocks (summing its gradients over them)
# takes DV in one block, and its autotuner also times its BV_MAX blocks, which it takes past
# that (`launch.WalkedBlocks`). Bf16, sm_90, D=64, (8, 4096, 16) (2026-12-07, `python -m
# benchmarks static`, each configuration counted with its own blocks' trips): simple GLA's
# dq/dk kernel spills 296 B at 4 warps in one block, none in blocks of 16 (129 M
# warp-instructions, against 147 M at 8 warps in one block); gated DeltaNet's spills in every
# configuration but blocks of 16 at 8 warps (264 M; 504 B spilled at 8 warps in one block, 239
# M); DeltaNet's and linear attention's run fewest in one block (115 M at 8 warps, 35 M at 4).
# Which is faster is the timer's to say.
WHOLE_V = 64
# The output kernels with a program per block of value columns that take DV in one block up to
# WHOLE_V: each program computes the chunk's products free of the value columns (q k^T and its
# decays) for its own block, so in one block once per chunk. Bf16, sm_90, D=64, (8, 4096, 16)
# (2026-12-07), 4 warps, none spilling: the dv kernels of simple GLA, linear attention, DeltaNet
# and gated DeltaNet ran 46.0, 33.7, 31.2 and 34.9 M warp-instructions in one block against
# 71.6, 49.1, 38.9 and 41.0 in blocks of 32 (at D=128 blocks of 64 ran simple GLA's in 1.2x
# those of 32: see BV_MAX).
WHOLE_V_PROGRAMS = ("bwd_dv",)
# The widest block of hidden units per pass where the state streams, at head dims up to 64
# (halved per doubling beyond, at least 16); 16 for the kernels not named. bf16, D=64, 8 warps:
# at 64 Moneta's forward pass spilled 144 B (at 32 none); at 32 the forward output kernels of
# Moneta, Yaad and Memora 456, 136 and 856 B (at 16: 128, 0 and 560).
BH_MAX = {"fwd": 32}
# The widest block of key columns of a gradient kernel that passes over them: 16 where its
# program also walks the value blocks (it holds what each block reuses), else 32.
BK_WALKING_V, BK = 16, 32
# The key block of a stage kernel that passes over the key columns (the products under
# per-channel decays, `schedule.kernels._key_stage`) at head dims up to 64, halved per doubling
# beyond (`launch`). Bf16, sm_90, 8 warps, (8, 4096, 16): at D=64 one block of 64 ran GLA's
# stage in 235 M warp-instructions rather than 354 in blocks of 32, and KDA's in 353 M (168 B
# spilled) rather than 623 (280 B); at D=128 blocks of 64 ran GLA's in 656 M rather than 575,
# and KDA's in 1074 M (416 B) rather than 1010 (232 B).
BK_STAGE = 64
# A gradient kernel with a program per key block that walks the value blocks, summing over them
# in registers (`schedule.streams.ValueWalk`): its key block. Wider blocks run the value side of
# the walk (its [T, T] products over DV) for fewer key blocks. Bf16, sm_90, D=128,
# (8, 4096, 16), blocks of 16 value columns: the dq/dk kernels of DeltaNet, gated DeltaNet,
# simple GLA and linear attention ran 358, 432, 289 and 199 M warp-instructions in key blocks of
# 32, 204, 422, 171 and 126 in blocks of 64, 197, 247, 106 and 123 in one of 128, none spilling;
# but at 128 those of Titans and Omega spill (192 and 312 B at 8 warps; none at 32 or 64), and
# at D=64 Omega's spills 368 B in one block of 64 against 72 B in two of 32. The key block is
# not the autotuner's to choose yet (the grid would have to follow it).
BK_PER_PROGRAM = 64
# Such a kernel holding products under per-channel decays (their [NC, 16, W, D] pair tiles):
# key blocks of 16. Bf16, sm_90, (8, 4096, 16), 8 warps: GLA's dq/dk kernel spills none at D=128
# and 64 (2198 and 923 M warp-instructions) where blocks of 32 spilled 168 and 888 B (1575 and
# 751 M); KDA's spills 320 B at D=128 (3587 M) rather than 1400 (2613 M), 656 B at D=64 (1558 M)
# rather than 2192 (1215 M).
BK_PAIRS = 16
# The most products per value block (dots over the program's key block: q W^T, ...) that the
# per-head gates' gradients may add to such a kernel's walk when they join it as key-block
# shares (`schedule.streams.KeyShares`); with more, they keep a kernel of their own. Bf16, sm_90,
# (8, 4096, 16), 8 warps, D=128: joined, the dq/dk kernels of simple GLA (2 products), gated
# DeltaNet (2) and DeltaNet (none) spill none, where Titans' (4) spilled 432 B (1312 at D=64)
# and Omega's (3) 992 B (1632), against none and 0 / 368 B apart.
SHARE_PRODUCTS = 2

# Whether the stored states and their gradients may take the matmul operands' dtype where a
# reader also multiplies them elementwise into sums alone (a decay's gradient: the sum of
# W exp(gamma_end) dW over the state), as fla's states are: each summand then carries the
# rounding of a half-precision state entry, and every result else stays bit for bit
# (`schedule.operand_states`). Bf16, D=128, (8, 4096, 16), sm_90: gated DeltaNet's backward
# moves 11.2 GB rather than 12.2 (1.27x fla's rather than 1.39x), simple GLA's 6.6 rather
# than 7.7, in 0.997x and 1.006x the warp-instructions; fp16 results within the precision table.
STATES_INTO_SUMS = True


def configs(kernel: str, split_v: bool, streamed: bool) -> list[tuple[int, int]]:
    """The (num_warps, num_stages) pairs of `kernel` ('fwd', 'bwd' are the passes)."""
    if split_v and kernel in ("fwd", "bwd"):
        return PASS_CONFIGS
    if streamed and kernel not in ("fwd", "bwd"):
        return STREAM_CONFIGS
    return STAGE_CONFIGS if "_stage" in kernel else CONFIGS
