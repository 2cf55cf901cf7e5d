"""Decoding in O(1) per token: the chunked form's recurrence stepped one token at a time.

Inside a chunk that starts at state Z_s the mini-batch form is linear around it. With
A_t = prod_(s<i<=t) alpha_i the decay since the boundary and grad_i taken at W_s = phi^-1(Z_s)
(grad_at 'previous') or at the retained phi^-1(A_i Z_s) (grad_at 'retained'):
    U_t = alpha_t U_(t-1) + eta_t grad_t            (momentum: S_t = m_t S_(t-1) + eta_t grad_t,
                                                      U_t = alpha_t U_(t-1) + S_t; muon:
                                                      S_t = m_t S_(t-1) + grad_t, U_t =
                                                      alpha_t U_(t-1) + eta_t NS_k(S_t), with
                                                      apply: chunk at the chunk's last token only)
    o_t = M_(A_t W_s - U_t)(q_t)                    (eta_at 'query': A_t W_s - eta_t G_t, with G
                                                      the decayed sum of raw gradients)
(with bias.window, grad_t sums gamma_i grad_i over the window, the c - 1 tokens before t kept in
the state) and at the chunk's last token Z_e = A_t Z_s - U_t, mapped by the retention (phi^-1)
and read there: o_t = M_(phi^-1(Z_e))(q_t); then Z_e is the next chunk's start and the sums restart at 0.
So a step keeps a few memory-sized tracks whatever the position (W_s, A_t Z_s - U_t and its read
A_t W_s - U_t, or what grad_at and eta_at ask for instead; see `StepState`), and Z alone at a
boundary. Each piece comes from the spec's derivation through the reference's functions (the
bias gradient by sympy's rule, the memory's vjp, the retention's map), the same math the chunked
oracle (`reference.chunked`) and the chunk-step graph compute, so the step equals the parallel
chunked forward. A lag token is a chunk of one; an exact (WY) spec steps with chunks of one: the
token recurrence.

On CUDA tensors and under TRITON_INTERPRET=1 a generated Triton kernel steps the specs that
`codegen.step_unsupported` admits (a matrix memory whose state is W itself: `mirasc.step_op`),
one token per launch, the tracks updated in place; the torch step below runs the other specs, any
spec on CPU tensors, and any step that autograd records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mirasc import reference
from mirasc.codegen import step_unsupported
from mirasc.derive import Derivation

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class StepState:
    """One batch of sequences' memory between tokens: head-major [B, H, ...] tensors in the
    accumulator's dtype (float64 for float64 inputs, else float32), one per memory tensor in
    each track the spec needs:

    zs: Z at a chunk boundary, alone (the tracks start from it at the next token);
    start: W_s = phi^-1(Z_s) (grad_at 'previous'); base: A_t Z_s (grad_at 'retained' or eta_at
    'query'); running: A_t Z_s - U_t, and running_read: A_t W_s - U_t (a dual retention), for a
    step of the token's own eta; with eta_at 'query' instead sums: G_t and base_read: A_t W_s
    (dual); window: with bias.window of c > 1 tokens, the last c - 1 tokens' k, v, whether each
    is a token of the sequence (`live`) and their data-dependent delta and gamma [B, H, c - 1,
    ...], whose gradients at the gradient point join each token's. position: tokens since the
    last chunk boundary; momentum: the buffers S, or None."""

    position: int
    tracks: dict[str, Tensors]
    momentum: Tensors | None

    @property
    def boundary(self) -> Tensors:
        """The op's state at a chunk boundary: Z, then the momentum buffers."""
        if "zs" not in self.tracks:
            raise ValueError(f"StepState.boundary: the state is {self.position} tokens into a "
                             "chunk; the op's state exists at chunk boundaries only")
        return self.tracks["zs"] + (self.momentum or ())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds."""
        return [x for group in (*self.tracks.values(), self.momentum or ()) for x in group]

    def clone(self) -> StepState:
        """A copy that later steps (which update in place) leave as it is."""
        def copy(group):
            return tuple(x.clone() for x in group)

        return StepState(self.position, {n: copy(g) for n, g in self.tracks.items()},
                         None if self.momentum is None else copy(self.momentum))

    def nbytes(self) -> int:
        """The state's size in bytes."""
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def select(self, index: torch.Tensor) -> StepState:
        """The state of the sequences `index` picks along the batch (beam search)."""
        def pick(group):
            return tuple(x.index_select(0, index.to(x.device)) for x in group)

        return StepState(self.position, {n: pick(g) for n, g in self.tracks.items()},
                         None if self.momentum is None else pick(self.momentum))


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
        self.dual = derivation.retention.dual and not derivation.retention.linear  # W != Z
        self.retained = spec.learner.grad_at == "retained"
        self.by_query = spec.learner.kind == "gd" and spec.learner.eta_at == "query"
        self.momentum = spec.has_momentum
        self.muon = spec.learner.kind == "muon"
        self.by_chunk = self.muon and spec.learner.apply == "chunk"  # one NS at a chunk's end
        self.ns_steps = spec.learner.ns_steps if self.muon else 0
        self.kernel_unsupported = step_unsupported(derivation)  # why the kernel does not step it
        self._kernel = None  # its `step_op.StepKernel`, made on first use
        window = spec.bias.window
        self.window = 1 if window is None else window.size
        self.window_gates = [n for n in ("delta", "window_weight")  # kept with the window's tokens
                             if (g := derivation.op_gates().get(n)) is not None and g.is_input]

    def start(self, state: Tensors, recent: reference.Inputs | None = None) -> StepState:
        """The step state at a chunk boundary from the op's state (Z, then the momentum); with a
        window of c > 1 tokens, `recent` holds the tokens before it (the last c - 1 are kept)."""
        n = len(state) // 2 if self.momentum else len(state)
        own = tuple(s.clone() for s in state)  # later steps update the state in place
        tracks = {"zs": own[:n]}
        if self.window > 1 and recent is not None:
            tracks["window"] = self._window_of(recent, own[0].dtype)
        return StepState(0, tracks, own[n:] if self.momentum else None)

    def _window_of(self, inputs: reference.Inputs, dtype: torch.dtype) -> Tensors:
        """The window's track from the last c - 1 tokens of `inputs` (fewer at a sequence's
        start: those slots not `live`): k, v, live [B, H, c - 1(, D)], then the data-dependent
        delta and gamma of those tokens."""
        keep = self.window - 1
        taken = min(keep, inputs.k.shape[2])

        def last(x, fill):  # [B, H, T(, D)] -> its last c - 1 tokens, left-padded with `fill`
            x = x[:, :, x.shape[2] - taken:].to(dtype)
            pad = x.new_full((*x.shape[:2], keep - taken, *x.shape[3:]), fill)
            return torch.cat([pad, x], 2)

        live = last(torch.ones_like(inputs.k[..., 0]), 0.0)
        gates = [last(inputs.gates[n], 1.0) for n in self.window_gates]
        return (last(inputs.k, 0.0), last(inputs.v, 0.0), live, *gates)

    def _read(self, zs: Tensors) -> Tensors:
        """W = phi^-1(Z) for a dual retention (a proximal one keeps W itself)."""
        return tuple(reference.read(self.derivation, z) for z in zs) if self.dual else zs

    def _tracks(self, zs: Tensors) -> dict[str, Tensors]:
        """The tracks at a chunk's first token from the boundary's Z (which they take over):
        the sums 0, and no tensor in two tracks, as the steps update them in place."""
        read = self._read(zs)
        tracks = {} if self.retained else {"start": read}
        free = [zs] if self.retained or read is not zs else []  # zs, unless start holds it

        def take(group):
            return free.pop() if free else tuple(x.clone() for x in group)

        if self.retained or self.by_query:
            tracks["base"] = take(zs)
        if self.by_query:
            tracks["sums"] = tuple(torch.zeros_like(z) for z in zs)
            if self.dual:
                tracks["base_read"] = tuple(w.clone() for w in read)
        else:
            tracks["running"] = take(zs)
            if self.dual:
                tracks["running_read"] = tuple(w.clone() for w in read)
        return tracks

    def chunk_end(self, position: int) -> bool:
        """Whether the token at `position` inside a chunk closes a chunk (or the lag token's)."""
        return position == self.chunk - 1 or (self.lag and position == 0)

    def __call__(self, state: StepState, inputs: reference.Inputs) -> tuple[torch.Tensor,
                                                                              StepState]:
        """Step every token of `inputs` (head-major, [B, H, T, D]): (o [B, H, T, Dv], state).
        Without autograd the state's tensors are updated in place (`StepState.clone` keeps a
        copy); with it, new tensors are made."""
        if self._uses_kernel(state, inputs):
            return self._kernel_steps(state, inputs)
        d = self.derivation
        update = _in_place if not torch.is_grad_enabled() else _new
        outputs = []
        for t in range(inputs.q.shape[2]):
            k, v = inputs.k[:, :, t], inputs.v[:, :, t]
            alpha, eta = _gate(inputs, t, "alpha"), _gate(inputs, t, "eta")
            window = state.tracks.get("window")
            tracks = self._tracks(state.tracks["zs"]) if "zs" in state.tracks \
                else {n: x for n, x in state.tracks.items() if n != "window"}
            for name in ("base", "base_read", "sums"):
                if name in tracks:
                    tracks[name] = update(tracks[name], alpha)
            point = tracks["start"] if not self.retained else self._read(tracks["base"])
            grads = reference.memory_grad(d, point, k, v, inputs.gate("delta", t, v), ln=inputs.ln)
            if d.spec.bias.window is not None:
                grads, window = self._windowed(point, grads, inputs, t, window)
            momentum = state.momentum
            if self.by_query:  # the decayed sum of raw gradients, scaled by this token's eta
                tracks["sums"] = update(tracks["sums"], None, grads, 1)
                scaled = tuple(g * eta(g) for g in tracks["sums"])
                end = update(tracks["base"], None, scaled, -1, fresh=True)
                read = update(tracks["base_read"], None, scaled, -1, fresh=True) if self.dual \
                    else end
            else:
                if self.muon:  # S_t = m_t S_(t-1) + grad_t, and U moves by eta_t NS_k(S_t)
                    momentum = update(momentum, _gate(inputs, t, "momentum"), grads, 1)
                    new = None if self.by_chunk and not self.chunk_end(state.position) else tuple(
                        reference.newton_schulz(s, self.ns_steps) * eta(s) for s in momentum)
                else:
                    new = update(grads, eta)
                    if self.momentum:  # S_t = m_t S_(t-1) + eta_t grad_t, and U moves by S_t
                        momentum = new = update(momentum, _gate(inputs, t, "momentum"), new, 1)
                for name in ("running", "running_read"):
                    if name in tracks:
                        tracks[name] = update(tracks[name], alpha, new, -1)
                end = tracks["running"]
                read = tracks["running_read"] if self.dual else end
            position = (state.position + 1) % self.chunk
            kept = {} if window is None else {"window": window}
            if self.chunk_end(state.position):  # the boundary: phi^-1, then the sums restart
                zs = end if self.dual else self._read_map(end)
                read = self._read(zs)
                state = StepState(position, {"zs": zs} | kept, momentum)
            else:
                state = StepState(position, tracks | kept, momentum)
            outputs.append(reference.memory_apply(d, read, inputs.q[:, :, t], inputs.ln,
                                                  read=True))
        return reference._stacked(outputs, inputs), state

    def _windowed(self, point: Tensors, grads: Tensors, inputs: reference.Inputs, t: int,
                  window: Tensors | None) -> tuple[Tensors, Tensors | None]:
        """grad_t with bias.window: token t's gradient `grads` times gamma_t, plus gamma_j times
        the gradient at `point` of each live token j the window's track holds; and the track
        after t (its oldest token dropped, t's appended)."""
        d = self.derivation
        grads = tuple(g * w if (w := inputs.gate("window_weight", t, g)) is not None else g
                      for g in grads)
        if self.window == 1:
            return grads, None
        k, v = inputs.k[:, :, t], inputs.v[:, :, t]
        if window is None:  # a sequence's first token: no earlier ones
            window = self._window_of(reference.Inputs(
                inputs.q[:, :, :0], inputs.k[:, :, :0], inputs.v[:, :, :0],
                {n: inputs.gates[n][:, :, :0] for n in self.window_gates}), k.dtype)
        kw, vw, live, *held = window
        held = dict(zip(self.window_gates, held, strict=True))
        for j in range(self.window - 1):
            delta = held["delta"][:, :, j] if "delta" in held else inputs.gates.get("delta")
            if isinstance(delta, torch.Tensor) and delta.dim() == 2:  # per head: onto v's columns
                delta = delta[..., None]
            extra = reference.memory_grad(d, point, kw[:, :, j], vw[:, :, j], delta, ln=inputs.ln)
            gamma = held["window_weight"][:, :, j] if "window_weight" in held \
                else inputs.gates.get("window_weight", 1.0)
            weight = live[:, :, j] * gamma
            grads = tuple(g + e * weight.reshape(*weight.shape, *([1] * (e.dim() - 2)))
                          for g, e in zip(grads, extra, strict=True))
        now = [k, v, torch.ones_like(k[..., 0])] + [inputs.gates[n][:, :, t]
                                                    for n in self.window_gates]
        return grads, tuple(torch.cat([x[:, :, 1:], y[:, :, None].to(x.dtype)], 2)
                            for x, y in zip(window, now, strict=True))

    def _uses_kernel(self, state: StepState, inputs: reference.Inputs) -> bool:
        """Whether the Triton step runs: a spec it covers, on CUDA tensors (or under the
        interpreter), with no tensor whose gradient autograd would record."""
        from mirasc.step_op import runs_here

        if self.kernel_unsupported is not None or not runs_here(inputs.q):
            return False
        tensors = [inputs.q, inputs.k, inputs.v, *state.tensors(), *(
            g for g in inputs.gates.values() if isinstance(g, torch.Tensor))]
        return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))

    def _kernel_steps(self, state: StepState, inputs: reference.Inputs) -> tuple[torch.Tensor,
                                                                                  StepState]:
        """`__call__` by the Triton step, token by token: the kernel writes the tracks in place
        (a chunk's first token writes them into new tensors, or into Z where a track takes it
        over: a chunk of one token, W_s's track keeps it)."""
        from mirasc.step_op import StepKernel

        if self._kernel is None:
            self._kernel = StepKernel(self.derivation)
        kernel = self._kernel
        ln, acc = [], state.tensors()[0].dtype
        if kernel.layer_norm:
            dv, heads = inputs.v.shape[-1], inputs.v.shape[1]
            ln = [x.to(acc).contiguous() for x in inputs.ln] if inputs.ln is not None else [
                inputs.v.new_ones(heads, dv, dtype=acc), inputs.v.new_zeros(heads, dv, dtype=acc)]
        outputs = []
        for t in range(inputs.q.shape[2]):
            close = self.chunk_end(state.position)
            roles, tracks = self._roles(state, close)
            pointers = [None if roles.get(n.removesuffix("_b")) is None
                        else roles[n.removesuffix("_b")][n.endswith("_b")] for n in kernel.tracks]
            gates = [inputs.gates[n][:, :, t].contiguous() for n in kernel.gates]
            outputs.append(kernel.op(
                *(x[:, :, t].contiguous() for x in (inputs.q, inputs.k, inputs.v)), gates,
                pointers, ln, "zs" in state.tracks, close))
            state = StepState((state.position + 1) % self.chunk, tracks, state.momentum)
        return reference._stacked(outputs, inputs), state

    def _roles(self, state: StepState, close: bool) -> tuple[dict, dict]:
        """The kernel's pointers by role (`codegen.step_tracks`) for the next token, and the
        tracks after it (the tensors the kernel writes, named as `_tracks` names them)."""
        def new(group):
            return tuple(torch.empty_like(x) for x in group)

        tracks = state.tracks
        roles = {"s_buf": state.momentum}
        if "zs" in tracks:  # a chunk's first token: the tracks start from Z
            zs = tracks["zs"]
            roles |= {"point": zs, "src": zs}
            if self.by_query:  # Z stays as W_s, or becomes the decayed base (grad_at retained)
                roles |= {"dst": zs if close or self.retained else new(zs),
                          "g_dst": None if close else new(zs)}
                after = ({} if self.retained else {"start": zs}) | {"base": roles["dst"],
                                                                    "sums": roles["g_dst"]}
            elif self.retained:  # Z becomes the running state, the decayed base a new tensor
                roles |= {"point": None if close else new(zs), "dst": zs}
                after = {"base": roles["point"], "running": zs}
            else:  # Z stays as W_s
                roles["dst"] = zs if close else new(zs)
                after = {"start": zs, "running": roles["dst"]}
        elif self.by_query:
            roles |= {"point": tracks["base" if self.retained else "start"],
                      "src": tracks["base"], "dst": tracks["base"], "g_src": tracks["sums"],
                      "g_dst": tracks["sums"]}
            after = tracks
        else:
            roles |= {"point": tracks["base" if self.retained else "start"],
                      "src": tracks["running"], "dst": tracks["running"]}
            after = tracks
        return roles, {"zs": roles["dst"]} if close else dict(after)

    def _read_map(self, zs: Tensors) -> Tensors:
        """The retention's map W = phi^-1(Z), dual or not (a proximal one's at the chunk end)."""
        return tuple(reference.read(self.derivation, z) for z in zs)


def _gate(inputs: reference.Inputs, t: int, name: str):
    """x -> gate `name` at token t shaped to broadcast onto x (None or a float when fixed)."""
    return lambda x: inputs.gate(name, t, x)


def _new(xs: Tensors, scale, add: Tensors | None = None, sign: int = 1,
         fresh: bool = False) -> Tensors:
    """x * scale(x) + sign * add, tensor by tensor (scale None: 1; add None: 0), new tensors."""
    out = []
    for i, x in enumerate(xs):
        factor = None if scale is None else scale(x)
        y = x if factor is None else x * factor
        out.append(y if add is None else y + sign * add[i])
    return tuple(out)


def _in_place(xs: Tensors, scale, add: Tensors | None = None, sign: int = 1,
              fresh: bool = False) -> Tensors:
    """`_new` written into xs (into new tensors when `fresh`: xs is read again later)."""
    if fresh:
        return _new(xs, scale, add, sign)
    for i, x in enumerate(xs):
        factor = None if scale is None else scale(x)
        if factor is not None:
            x.mul_(factor)
        if add is not None:
            x.add_(add[i], alpha=sign)
    return xs
