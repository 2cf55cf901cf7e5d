"""Decoding in O(1) per token: the chunked form's recurrence stepped one token at a time.

Inside a chunk that starts at state Z_s the mini-batch form is linear around it. With
A_t = prod_(s<i<=t) alpha_i the decay since the boundary and grad_i taken at W_s = phi^-1(Z_s)
(grad_at 'previous') or at the retained phi^-1(A_i Z_s) (grad_at 'retained'):
    U_t = alpha_t U_(t-1) + eta_t grad_t            (momentum: S_t = m_t S_(t-1) + eta_t grad_t,
                                                      U_t = alpha_t U_(t-1) + S_t)
    o_t = M_(A_t W_s - U_t)(q_t)                    (eta_at 'query': A_t W_s - eta_t G_t, with G
                                                      the decayed sum of raw gradients)
and at the chunk's last token Z_e = A_t Z_s - U_t, mapped by the retention (phi^-1) and read there:
o_t = M_(phi^-1(Z_e))(q_t); then Z_e is the next chunk's start and the sums restart at 0.
So a step needs Z_s (as read), A_t Z_s, the sums and the momentum: memory-sized tensors whatever
the position. Each piece comes from the spec's derivation through the reference's functions (the
bias gradient by sympy's rule, the memory's vjp, the retention's map), the same math the chunked
oracle (`reference.chunked`) and the chunk-step graph compute, so the step equals the parallel
chunked forward. A lag token is a chunk of one; an exact (WY) spec steps with chunks of one: the
token recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mirasc import reference
from mirasc.derive import Derivation


@dataclass(frozen=True)
class StepState:
    """One batch of sequences' memory between tokens, head-major [B, H, ...] tensors in the
    accumulator's dtype (float64 for float64 inputs, else float32).

    position: tokens since the last chunk boundary; start: W_s = phi^-1(Z_s) as the chunk reads
    it; base: A_t Z_s; base_read: A_t W_s (None unless the retention is dual, as W_s is Z_s
    otherwise); summed: U_t (0 at a boundary); momentum: the momentum buffers S (None without)."""

    position: int
    start: tuple[torch.Tensor, ...]
    base: tuple[torch.Tensor, ...]
    base_read: tuple[torch.Tensor, ...] | None
    summed: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...] | None

    @property
    def boundary(self) -> tuple[torch.Tensor, ...]:
        """The op's state at a chunk boundary (position 0): Z, then the momentum buffers."""
        if self.position:
            raise ValueError(f"StepState.boundary: the state is {self.position} tokens into a "
                             "chunk; the op's state exists at chunk boundaries only")
        return self.base + (self.momentum or ())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds."""
        return [x for group in (self.start, self.base, self.base_read, self.summed,
                                self.momentum) for x in group or ()]

    def nbytes(self) -> int:
        """The state's size in bytes."""
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def select(self, index: torch.Tensor) -> StepState:
        """The state of the sequences `index` picks along the batch (beam search)."""
        pick = lambda group: None if group is None else tuple(  # noqa: E731
            x.index_select(0, index.to(x.device)) for x in group)
        return StepState(self.position, pick(self.start), pick(self.base),
                         pick(self.base_read), pick(self.summed), pick(self.momentum))


class Decoder:
    """The O(1) step of a spec (see the module docstring). chunk: the chunking the step equals,
    `MirasOp.oracle_chunk_size` (None for an exact spec: the token recurrence)."""

    def __init__(self, derivation: Derivation, chunk: int | None):
        if chunk is not None and chunk < 1:
            raise ValueError(f"Decoder: chunk must be a positive number of tokens or None, got "
                             f"{chunk}")
        self.derivation = derivation
        self.chunk = chunk or 1
        spec = derivation.spec
        self.lag = spec.lag_token
        self.dual = derivation.retention.dual
        self.retained = spec.learner.grad_at == "retained"
        self.by_query = spec.learner.kind == "gd" and spec.learner.eta_at == "query"
        self.momentum = spec.learner.kind == "momentum"

    def start(self, state: tuple[torch.Tensor, ...], position: int = 0) -> StepState:
        """The step state at a chunk boundary from the op's state (Z, then the momentum)."""
        n = len(state) // 2 if self.momentum else len(state)
        zs, momentum = tuple(state[:n]), (tuple(state[n:]) if self.momentum else None)
        read = tuple(reference.read(self.derivation, z) for z in zs) if self.dual else zs
        summed = tuple(torch.zeros_like(z) for z in zs)
        base = tuple(z.clone() for z in zs)  # no tensor shared: the state's size is fixed
        base_read = tuple(w.clone() for w in read) if self.dual else None
        return StepState(position, read, base, base_read, summed, momentum)

    def chunk_end(self, position: int) -> bool:
        """Whether the token at `position` inside a chunk closes a chunk (or the lag token's)."""
        return position == self.chunk - 1 or (self.lag and position == 0)

    def __call__(self, state: StepState, inputs: reference.Inputs) -> tuple[torch.Tensor,
                                                                              StepState]:
        """Step every token of `inputs` (head-major, [B, H, T, D]): (o [B, H, T, Dv], state)."""
        d = self.derivation
        outputs = []
        for t in range(inputs.q.shape[2]):
            k, v = inputs.k[:, :, t], inputs.v[:, :, t]
            base = reference._decay(inputs, t, state.base)
            base_read = reference._decay(inputs, t, state.base_read) if self.dual else base
            if not self.retained:
                point = state.start
            else:
                point = tuple(reference.read(d, z) for z in base) if self.dual else base
            grads = reference.memory_grad(d, point, k, v, inputs.gate("delta", t, v), ln=inputs.ln)
            momentum = state.momentum
            if self.by_query:
                new = grads
            else:
                new, momentum = reference._learn(d, inputs, t, grads, momentum)
            summed = tuple(s + n for s, n in zip(reference._decay(inputs, t, state.summed), new,
                                                 strict=True))
            update = tuple(s * inputs.gate("eta", t, s) for s in summed) if self.by_query \
                else summed
            position = (state.position + 1) % self.chunk
            if self.chunk_end(state.position):  # the boundary: phi^-1, then the sums restart
                end = tuple(z - u for z, u in zip(base, update, strict=True))
                zs = end if self.dual else tuple(reference.read(d, z) for z in end)
                state = replace(self.start(zs + (momentum or ())), position=position)
                read = state.start
            else:
                read = tuple(w - u for w, u in zip(base_read, update, strict=True))
                state = StepState(position, state.start, base,
                                  base_read if self.dual else None, summed, momentum)
            outputs.append(reference.memory_apply(d, read, inputs.q[:, :, t], inputs.ln,
                                                  read=True))
        return reference._stacked(outputs, inputs), state
