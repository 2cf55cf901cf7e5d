"""The chunk-parallel torch path: the kernels' chunk-step graph (mirasc/memories) run in torch.

A spec with Triton kernels runs them on CUDA (or in Triton's interpreter); on CPU `MirasOp` runs
this instead: the same forward graph the kernels are emitted from, evaluated on tiles batched
over every (sequence, head) pair, looping only over chunks (and the lag token's segments). Each
chunk step is an autograd function whose backward evaluates the graph's reverse mode
(`graph.backward`, the kernels' backward), so the gradients are the kernels' math too, with no
NaN from the masked branches of a `where`. Inputs are fed as the kernels load them: rows past a
sequence's end padded (q, k 0; v 1; log_alpha, eta 0; delta, momentum 1) and masked, gates per
head [T, 1] or per channel, the layer norm's parameters per head, and the compute dtype is the
kernels' accumulator (float64 for float64 inputs, else float32; o is cast back to v's dtype).
A sequence shorter than a chunk runs in a tile of its own rows (the rest would be masked).
A window (bias.window) takes the previous chunk's tiles of k, v and the row gates as inputs too
(padding before the first chunk), with the bands of the window as masks.
Non-finite inputs are loaded as the kernels load them (`memories.taints.poisoned`): a row's
non-finite k, v or gate as padding, marking the rows from it on as tainted, a non-finite q as 0
(row marked).
"""

from __future__ import annotations

import torch

from mirasc.graph import evaluate, plan
from mirasc.memories import chunk_step, step_adjoint

_PAD = {"q": 0.0, "k": 0.0, "v": 1.0, "log_alpha": 0.0, "eta": 0.0, "delta": 1.0,
        "momentum": 1.0, "window_weight": 0.0}


class Step:
    """A spec's chunk step with its reverse mode (as `mirasc.schedule.schedule` takes it)."""

    def __init__(self, derivation):
        spec = derivation.spec
        self.step = step = chunk_step(derivation)
        graph = step.graph
        self.forward_targets = (step.outputs["o"], *(step.outputs[s] for s in step.states))
        self.seeds, self.wrt, self.adjoint = step_adjoint(step)  # wrt: the passing order
        self.forward_plan = plan(graph, self.forward_targets)
        self.backward_plan = plan(graph, [a for a in self.adjoint.values() if a is not None])
        self.consts = tuple(n for n in graph.g if graph.node(n)["op"] == "const")
        self.chunk = spec.chunk_size
        self.segments = 2 if spec.lag_token else 1
        self.expansion = getattr(spec.memory, "expansion", 1)
        self.window = 1 if spec.bias.window is None else spec.bias.window.size


class _ChunkFn(torch.autograd.Function):
    """One chunk step: forward by the forward graph, backward by its reverse mode."""

    @staticmethod
    def forward(ctx, step, consts, sizes, *tensors):
        values = dict(zip(step.wrt, tensors, strict=True)) | consts
        env = evaluate(step.step.graph, values, sizes, step.forward_plan)
        ctx.step, ctx.consts, ctx.sizes = step, consts, sizes
        ctx.save_for_backward(*tensors)
        return tuple(env[t] for t in step.forward_targets)

    @staticmethod
    def backward(ctx, *grads):
        step, tensors = ctx.step, ctx.saved_tensors
        values = dict(zip(step.wrt, tensors, strict=True)) | ctx.consts
        outs = _ChunkFn.forward_shapes(step, tensors, ctx.sizes)
        for seed, g, shape in zip(step.seeds.values(), grads, outs, strict=True):
            values[seed] = g if g is not None else tensors[0].new_zeros(shape)
        env = evaluate(step.step.graph, values, ctx.sizes, step.backward_plan)
        result = []
        for name, x in zip(step.wrt, tensors, strict=True):
            a = step.adjoint[name]
            if a is None or not ctx.needs_input_grad[3 + len(result)]:
                result.append(None)
                continue
            g = env[a]
            for dim in (-2, -1):  # an adjoint broadcast wider than its input tile
                if x.shape[dim] == 1 and g.shape[dim] != 1:
                    g = g.sum(dim, keepdim=True)
            result.append(g.expand_as(x))
        return (None, None, None, *result)

    @staticmethod
    def forward_shapes(step, tensors, sizes):
        graph = step.step.graph
        lead = tensors[0].shape[:-2]
        return [(*lead, *(1 if d == 1 else sizes[d] for d in graph.shape(t)))
                for t in step.forward_targets]


def run(step: Step, q, k, v, given: dict, state):
    """o [B, T, H, DV] (v's dtype) and the final states (the accumulator's dtype), like the
    kernels, for one batch of sequences (`op.per_sequence` splits packed ones); `given`
    holds what the kernels take besides q, k, v: the op's data-dependent gates [B, T, H(, D)] and
    ln_weight/ln_bias [H, DV]."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n, chunk = batch * heads, step.chunk
    n_chunks = max(1, -(-length // chunk))
    if n_chunks == 1:  # a short sequence: a tile of its rows (the rest would be masked padding)
        chunk = max(1, length)
    graph = step.step.graph
    sizes = {"T": chunk, "DK": dk, "DV": dv, "DH": step.expansion * dk}
    padded = n_chunks * chunk

    def tiles(name, x):  # [B, T, H(, D)] -> [N, chunks, CHUNK, D], padded rows
        x = x.to(acc)
        if x.dim() == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 2, 1, 3).reshape(n, length, x.shape[-1])
        if padded > length:
            x = torch.cat([x, x.new_full((n, padded - length, x.shape[-1]), _PAD[name])], 1)
        return x.unflatten(1, (n_chunks, chunk))

    data = {"q": tiles("q", q), "k": tiles("k", k), "v": tiles("v", v)}
    data |= {g: tiles(g, given[g]) for g in step.step.gates}
    bad, qbad = _nonfinite_rows(data, ("k", "v", *step.step.gates)), _nonfinite_rows(data, ("q",))
    data = {x: torch.where((qbad if x == "q" else bad)[..., None], _PAD[x], t)
            for x, t in data.items()}
    # each chunk's tiles as a tensor of its own: autograd then stacks their gradients once (a
    # slice of the whole would scatter each into a zero tensor of all the chunks: O(chunks^2))
    chunks = {x: t.unbind(1) for x, t in data.items()}
    per_head = {p: given[p].to(acc).unsqueeze(0).expand(batch, heads, dv).reshape(n, 1, dv)
                for p in step.step.params}
    shapes = [graph.shape(s) for s in step.step.states]
    dims = [tuple(1 if d == 1 else sizes[d] for d in s) for s in shapes]
    if state is None:
        carried = [q.new_zeros((n, *d), dtype=acc) for d in dims]
    else:
        carried = [s.to(acc).reshape(n, *d) for s, d in zip(state, dims, strict=True)]
    if length == 0:  # no chunk runs: the state passes through
        return v.new_zeros(v.shape), _finals(carried, batch, heads, shapes, sizes)

    ones = {"vmask": (1, dv), "kmask": (1, dk), "hmask": (1, sizes["DH"])}
    rows_in_chunk = torch.arange(chunk, device=q.device)
    causal = (rows_in_chunk[:, None] >= rows_in_chunk[None, :]).to(acc)
    strict = (rows_in_chunk[:, None] > rows_in_chunk[None, :]).to(acc)
    strict2 = (rows_in_chunk[:, None] > rows_in_chunk[None, :] + 1).to(acc)
    apart = rows_in_chunk[:, None] - rows_in_chunk[None, :]  # a window's bands (t, i): t - i < c
    band = ((apart >= 0) & (apart < step.window)).to(acc)
    band_prev = (apart + chunk < step.window).to(acc)
    o_chunks = []
    for i in range(n_chunks):
        rows = i * chunk + rows_in_chunk
        o = None
        for seg in range(step.segments):
            valid = rows < length
            if step.segments == 2:
                valid = valid & ((rows_in_chunk == 0) if seg == 0 else (rows_in_chunk > 0))
            last = torch.where(valid, rows, -1).max()
            tainted = (bad[:, i] & valid).cumsum(-1) > 0  # [N, chunk]: from the first bad row on
            masks = {"causal": causal, "strict": strict, "strict2": strict2, "band": band,
                     "band_prev": band_prev,
                     "prevmask": (i > 0) * (rows_in_chunk >= chunk - step.window + 1).to(acc)[:, None],
                     "rowmask": valid.to(acc)[:, None], "lastrow": (rows == last).to(acc)[:, None],
                     "tainted": tainted.to(acc)[..., None], "qbad": qbad[:, i].to(acc)[..., None]}
            consts = _consts(step.consts, masks, ones, q.new_ones((1, 1), dtype=acc))
            loaded = ("q", "k", "v", *step.step.gates)
            if step.segments == 2:  # rows of the other segment load as padding, as in the kernel
                values = {x: torch.where(valid[:, None], chunks[x][i], _PAD[x]) for x in loaded}
            else:
                values = {x: chunks[x][i] for x in loaded}
            values |= dict(zip(step.step.states, carried, strict=True)) | per_head
            for name in step.step.previous:  # the window's rows of the previous chunk
                x = name.removesuffix("_prev")
                values[name] = data[x][:, i - 1] if i > 0 else torch.full_like(data[x][:, i], _PAD[x])
            out = _ChunkFn.apply(step, consts, sizes, *(values[m] for m in step.wrt))
            o_seg, carried = out[0], list(out[1:])
            mask = valid[:, None]
            o = o_seg if o is None else torch.where(mask, o_seg, o)
        o_chunks.append(o)
    o = torch.stack(o_chunks, 1).flatten(1, 2)[:, :length]  # [N, T, DV]
    o = o.reshape(batch, heads, length, dv).transpose(1, 2).to(v.dtype)
    return o, _finals(carried, batch, heads, shapes, sizes)


def _consts(names, masks: dict, ones: dict, one: torch.Tensor) -> dict:
    """The values of the step's const nodes: the chunk's masks, rows of ones for the column
    masks (every column is real here) and a NaN for the poisoned outputs."""
    consts = {}
    for c in names:
        if c in ones:
            consts[c] = one.new_ones(ones[c])
        elif c in masks:
            consts[c] = masks[c]
        elif c == "nanfill":
            consts[c] = one * float("nan")
        else:
            raise ValueError(f"unknown const node {c!r}")
    return consts


def _nonfinite_rows(data: dict, names) -> torch.Tensor:
    """[N, chunks, chunk]: the rows where a tile of `names` holds NaN or +-inf (log_alpha may be
    -inf: a decay to 0)."""
    rows = []
    for name in names:
        x = data[name]
        finite = x < float("inf") if name == "log_alpha" else x.abs() < float("inf")
        rows.append(~finite.all(-1))
    return torch.stack(rows).any(0)


def _finals(carried, batch, heads, shapes, sizes):
    """The carried state tiles [N, rows, cols] as the op's states [B, H, ...] ([1, D]: [D])."""
    out = []
    for s, (rows, cols) in zip(carried, shapes, strict=True):
        shape = (sizes[cols],) if rows == 1 else (sizes[rows], sizes[cols])
        out.append(s.reshape(batch, heads, *shape))
    return tuple(out)
