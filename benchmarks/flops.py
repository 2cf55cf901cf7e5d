"""FLOP models: 2 x the multiply-adds of the matmuls each algorithm performs, from the shapes.

Per (batch, head) and chunk of C tokens, with Dk = K and Dv = V. Elementwise work (gates,
activations, layer norms, retention maps, masks) is not counted. The backward is counted as twice
the forward (each matmul Y = A B has two gradient matmuls, dA and dB), so forward + backward is
3x the forward; a kernel that recomputes forward pieces in its backward does more than counted.
"""

from __future__ import annotations

import math

from mirasc.op import MirasOp
from mirasc.reference import memory_shapes

BACKWARD_FACTOR = 2.0


def linear_attention_chunk(c: int, dk: int, dv: int) -> float:
    """Exact chunking of a state-free bias (linear attention, simple GLA): scores Q K^T
    (2C^2 K), intra-chunk output S V (2C^2 V), the state read Q W^T (2CKV) and the state update
    W += V^T K (2CKV)."""
    return 2 * c * c * (dk + dv) + 4 * c * dk * dv


def wy_chunk(c: int, dk: int, dv: int) -> float:
    """Exact WY/UT chunking of the delta rule (DeltaNet, Gated DeltaNet): A = beta K K^T
    (2C^2 K), (I + A)^-1 of a unit lower-triangular C x C matrix (C^3 / 3 multiply-adds),
    W = T beta K (2C^2 K), U = T beta V (2C^2 V), U - W S^T (2CKV), the output Q S^T (2CKV)
    + (Q K^T) U (2C^2 K + 2C^2 V) and the state update S += U^T K (2CKV)."""
    return 2 * c * c * (3 * dk + 2 * dv) + 6 * c * dk * dv + 2 * c**3 / 3


def minibatch_chunk(c: int, layers: list[tuple[int, int]]) -> float:
    """Mini-batch GD in the dual form, per memory layer of input width a and output width b:
    the keys' forward at the chunk-start weights (2Cab), the backward to the layer's input for
    every layer but the first (2Cab), the queries' read X W_s^T (2Cab) corrected inside the
    chunk by (X_q X_k^T) G (2C^2 a + 2C^2 b), and the weight update G^T X_k (2Cab)."""
    total = 0.0
    for i, (a, b) in enumerate(layers):
        total += 2 * c * c * (a + b) + (6 + 2 * (i > 0)) * c * a * b
    return total


def op_forward(op: MirasOp, batch: int, length: int, heads: int, dk: int, dv: int) -> float | None:
    """Forward FLOPs of a generated op's chunked algorithm (mini-batch chunks are counted at
    chunk_size, a lag token as part of its chunk); None for what is not modelled (a vector
    memory, the momentum learner)."""
    d, spec = op.derivation, op.spec
    c = spec.chunk_size
    if spec.memory.kind == "vector" or spec.learner.kind == "momentum":
        return None
    if d.exact:
        chunk = (linear_attention_chunk if d.bias.kind == "state_free" else wy_chunk)(c, dk, dv)
    else:  # memory_shapes: each weight as (out, in), then any bias vectors (not counted)
        weights = [shape for shape in memory_shapes(d, dk, dv) if len(shape) == 2]
        chunk = minibatch_chunk(c, [(a, b) for b, a in weights])
    return batch * heads * math.ceil(length / c) * chunk


def causal_attention_forward(batch: int, length: int, heads: int, dk: int, dv: int) -> float:
    """Causal softmax attention: Q K^T (2T^2 K) and P V (2T^2 V), half of each under the mask."""
    return batch * heads * length * length * (dk + dv)


def total(forward: float | None, backward: bool) -> float | None:
    """FLOPs of a forward, or of a forward + backward pass."""
    if forward is None:
        return None
    return forward * (1 + BACKWARD_FACTOR) if backward else forward
