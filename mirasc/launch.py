"""Launching a generated module's kernels: the chunk op's forward and backward as PyTorch custom
ops with autograd, driven by the module's tables (KERNELS, STAGES, OUT_KERNELS, BUFFERS, CONFIGS,
block limits), so that a generated module holds only its spec, its tables and its kernels.

Forward: per chunk the stage kernels, the pass over the chunks (the state carried, each chunk's
start state stored), the output kernel. Backward: the stage kernels, the reverse pass (the
state's gradient carried) and the output kernels that write the inputs' gradients."""

from __future__ import annotations

import math
import os
import subprocess

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

from mirasc import cubin


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_CUSTOM_OPS: dict[str, tuple] = {}  # (forward, backward) ops by name, the first registered


def operands(dtype: torch.dtype):
    """The dtype of matmul operands: the inputs' for bf16/fp16 (tensor cores, float32
    accumulation), else the tiles' own (float32 or float64 dots, exact: input_precision "ieee").
    Triton 3.9's interpreter computes bf16 dots wrongly, so there bf16 inputs take float32
    operands (fp16 runs the half-precision path). The float32 dots left (the merges of the
    triangular inverse) are exact for float inputs; for half inputs `dot_fp32` makes them tf32
    products (bf16) or splits their operands in two fp16 halves (about 21 bits)."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreting()):
        return tl.float16 if dtype == torch.float16 else tl.bfloat16
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stored(dtype: torch.dtype, operand: bool) -> torch.dtype:
    """The dtype of a buffer between kernels, for inputs of `dtype`: the matmul operands' where
    every reader takes it only as one (half inputs: their own), else the accumulators'."""
    if operand and operands(dtype) in (tl.float16, tl.bfloat16):
        return dtype
    return _accumulator(dtype)


def spills(compiled) -> int | None:
    """Bytes per thread that a compiled kernel spills to local memory: its cubin's stack, read
    by Triton's cuobjdump without loading it (so also where `mirasc.resources` compiles for a GPU
    that is not there); 0 where there is no cubin or no cuobjdump to read it (then the spills
    prune nothing); None where it needs more shared memory than its target has
    (`cubin.SHARED_LIMIT`)."""
    if compiled.metadata.shared > cubin.SHARED_LIMIT.get(compiled.metadata.target.arch, math.inf):
        return None
    binary = compiled.asm.get("cubin")
    try:
        return 0 if binary is None else cubin.resource_usage(binary)[1]
    except (OSError, subprocess.CalledProcessError):
        return 0


def fewest_spills(spilled: dict) -> list:
    """The keys of `spilled` (a configuration's spill bytes per thread, None where it does not
    fit), in order, that spill the fewest bytes of those that fit; none where none fits."""
    least = min((n for n in spilled.values() if n is not None), default=None)
    return [c for c, n in spilled.items() if least is not None and n == least]


def least_spilling(kernel, spilled=spills):
    """The autotuner's first cut (`early_config_prune`): each configuration compiled (the timer
    compiles them anyway, and reuses these), only those that spill the fewest bytes per thread
    are timed; one that ptxas refuses or that does not fit is dropped, and where none is left
    the autotuner gets them all back and reports its own error."""

    def prune(configs, named_args, **meta):
        if len(configs) < 2:
            return configs
        found = {}
        meta = {k: v for k, v in meta.items() if k not in ("grid", "warmup")}  # the call's own
        for config in configs:
            try:
                found[config] = spilled(kernel.warmup(**named_args, **meta, **config.all_kwargs(),
                                                      grid=(1,)))
            except PTXASError:  # the timer skips it too
                continue
        return fewest_spills(found) or configs

    return prune


def _autotuner(kernel, configs, value_blocks=()):
    """Triton's autotuner of `kernel` over `configs` (each with each block of `value_blocks`,
    which then sets BV in place of the launch), keyed by the head dims and the DV block (Triton
    adds the inputs' dtypes), timing only the configurations that spill least
    (`least_spilling`)."""
    return triton.autotune([triton.Config({"BV": b} if b else {}, num_warps=w, num_stages=s)
                            for b in value_blocks or (None,) for w, s in configs],
                           key=["DK", "DV", "BV"],
                           prune_configs_by={"early_config_prune": least_spilling(kernel)})(kernel)


def tuned(kernel, configs, narrow: int | None = None):
    """The kernel under `_autotuner` over `configs`, as `WalkedBlocks` where its program walks
    the value blocks (`narrow`: its blocks where Dv is past `WHOLE_V`); in the interpreter, which
    has no timer, the kernel as is."""
    if interpreting():
        return kernel
    return WalkedBlocks(kernel, configs, narrow) if narrow else _autotuner(kernel, configs)


def walked_blocks(meta: dict, narrow: int) -> tuple[int, ...]:
    """The value blocks that the autotuner of a kernel walking them (`WalkedBlocks`) times for a
    launch of `meta`: the launch's, and where that takes Dv in one block (BV = BDV: at most
    `WHOLE_V`) also the `narrow` blocks it takes past that."""
    block = meta["BV"]
    return (block, narrow) if block == meta["BDV"] and block > narrow else (block,)


class WalkedBlocks:
    """The autotuner of a kernel whose program walks the value blocks (`V_SUMMED`). A launch
    that takes Dv in one block is also timed in the kernel's narrow blocks (`walked_blocks`):
    more, shorter steps, each holding fewer value columns (the figures: `tuning.WHOLE_V`). Any
    other launch, and every attribute (configs, fn, warmup), is the autotuner over `configs`
    alone's."""

    def __init__(self, kernel, configs, narrow: int):
        self.kernel, self.pairs, self.narrow = kernel, configs, narrow
        self.whole = _autotuner(kernel, configs)
        self.blocked = {}  # by the blocks timed

    def __getattr__(self, name):
        return getattr(self.whole, name)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            blocks = walked_blocks(meta, self.narrow)
            if len(blocks) == 1:
                return self.whole[grid](*args, **meta)
            if blocks not in self.blocked:
                self.blocked[blocks] = _autotuner(self.kernel, self.pairs, blocks)
            del meta["BV"]  # the configuration's
            return self.blocked[blocks][grid](*args, **meta)

        return launch


class ChunkKernels:
    """The Triton path of one generated module, read from its globals `m` at every call (so a
    test may swap a table or a launcher): `self(q, k, v, gates, initial_state, cu_seqlens)` ->
    (o, final states)."""

    def __init__(self, m: dict):
        self.m = m
        name = m["SPEC"]["name"]
        self.launchers = {k: tuned(m[f"{name}_{k}_kernel"], m["CONFIGS"][k],
                                   m["BV_MAX"][k] if k in m["V_SUMMED"] else None)
                          for k in m["KERNELS"]}
        self.forward, self.backward = self._register(f"mirasc::{name}_{m['DIGEST']}")

    # ---- sizes ------------------------------------------------------------------------------

    def state_shapes(self, dk: int, dv: int) -> list[tuple[int, ...]]:
        """Per-head shapes of the state tiles, in order; flattened and concatenated in buffers."""
        sizes = {"DK": dk, "DV": dv, "DH": self.m["EXPANSION"] * dk}
        return [tuple(sizes[d] for d in dims) for dims in self.m["STATES"]]

    def state_size(self, q, v) -> int:
        """Elements of the flattened state per sequence and head."""
        return sum(math.prod(s) for s in self.state_shapes(q.shape[-1], v.shape[-1]))

    def layout(self, q, cu_seqlens):
        """Sequences, chunk offsets, total chunks and each chunk's sequence (None unless packed),
        for a batch or for packed varlen input."""
        chunk = self.m["CHUNK"]
        batch, length = q.shape[:2]
        if cu_seqlens is None:
            return batch, None, batch * triton.cdiv(length, chunk), None
        chunks = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk - 1) // chunk
        offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
        seq = torch.repeat_interleave(torch.arange(len(chunks), device=q.device), chunks)
        return len(cu_seqlens) - 1, offsets, int(offsets[-1]), seq

    def meta(self, q, v, cu_seqlens, kernel: str) -> dict:
        """The constexprs of a `kernel` launch: head dims, block sizes within the module's limits
        (a stage takes whole rows of value columns; a stage's key block is its width at head
        dims up to 64; up to WHOLE_V, the kernels of V_SUMMED and WHOLE_V_PROGRAMS take the value
        columns in one block), dtypes and precision."""
        m = self.m
        _, length, heads, dk = q.shape
        dv, dh = v.shape[-1], m["EXPANSION"] * dk
        bv = min(_block(dv), m["BV_MAX"][kernel]) if m["SPLIT_V"] and kernel in m["BV_MAX"] \
            else _block(dv)
        whole = kernel in m["V_SUMMED"] or kernel in m["WHOLE_V_PROGRAMS"]
        bv = _block(dv) if whole and _block(dv) <= m["WHOLE_V"] else bv
        widest = max(16, m["BH_MAX"].get(kernel, 16) * 64 // max(64, _block(max(dk, dv))))
        bh = min(_block(dh), widest) if m["STREAM_H"] else _block(dh)
        bk = m["BK_MAX"].get(kernel, _block(dk))
        if kernel in m["BK_MAX"] and any(kernel in stage for stage in m["STAGES"].values()):
            bk = max(16, bk * 64 // max(64, _block(dk)))  # halved per doubling past 64
        return dict(T=length, H=heads, DK=dk, DV=dv, DH=dh, CHUNK=m["CHUNK"], BT=m["BT"],
                    BK=min(_block(dk), bk), BDK=_block(dk),
                    BV=bv, BDV=_block(dv), BH=bh, STATE=self.state_size(q, v),
                    SEGMENTS=m["SEGMENTS"], IS_VARLEN=cu_seqlens is not None,
                    ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                    DOT=operands(q.dtype),
                    PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32")

    def buffers(self, q, v, chunks: int, key: str) -> list[torch.Tensor]:
        """The `BUFFERS[key]` tiles [chunks * SEGMENTS, H, rows * cols]: in the accumulators'
        dtype, or in the matmul operands' where every reader takes the tile only as one."""
        meta = self.meta(q, v, None, "fwd") | {"1": 1}
        return [q.new_empty((chunks * self.m["SEGMENTS"], q.shape[2], meta[rows] * meta[cols]),
                            dtype=_stored(q.dtype, half))
                for _, rows, cols, half in self.m["BUFFERS"].get(key, [])]

    def state_dtype(self, q, buffer: str) -> torch.dtype:
        """The dtype of the stored states ("hs") or of their gradients ("dhs"): the matmul
        operands' where every reader takes them only as operands (`OPERAND_STATES`), else the
        accumulators'."""
        return _stored(q.dtype, buffer in self.m["OPERAND_STATES"])

    def zero_padding_columns(self, tiles: list[torch.Tensor], key: str, dv: int) -> None:
        """Zero the columns past Dv of the `BUFFERS[key]` tiles of rows [T, DV]: their writer's
        blocks may end short of a reader's wider ones, which then read 0 there."""
        for tile, (_, rows, _, _) in zip(tiles, self.m["BUFFERS"].get(key, []), strict=True):
            if rows == "BT":
                tile.view(*tile.shape[:2], self.m["BT"], -1)[..., dv:].zero_()

    # ---- launches ---------------------------------------------------------------------------

    def launch(self, kernel: str, grid, *args, **meta) -> None:
        """Launch one of KERNELS; when no launch configuration fits the GPU, say which spec,
        kernel and head dims, and where to see what they need."""
        try:
            self.launchers[kernel][grid](*args, **meta)
        except OutOfResources as exc:
            raise RuntimeError(
                f"{self.m['SPEC']['name']}: the {kernel} kernel at Dk={meta['DK']}, "
                f"Dv={meta['DV']} needs {exc.required} ({exc.name}), over this GPU's {exc.limit}; "
                f"`mirasc resources SPEC --head-dim {meta['DK']}` shows what each kernel needs, a "
                "smaller head dim, expansion or chunk_size needs less, and op(..., "
                "backend='torch') runs the chunk step in torch instead") from exc

    def stage_tiles(self, direction, inputs, saved, extra, cu_seqlens, layout):
        """The tiles that a pass's stage computes for every chunk (segment) and head (none when
        the pass reads none); the backward's stage reads the forward's (`saved`)."""
        q, v = inputs[0], inputs[2]
        _, offsets, chunks, seq = layout
        tiles = self.buffers(q, v, chunks, direction)
        handover = self.buffers(q, v, chunks, f"{direction}_handover")  # between its kernels
        for kernel in self.m["STAGES"][direction] if chunks else ():
            self.launch(kernel, (chunks, q.shape[2]), *inputs, *saved, *tiles, *handover, *extra,
                        cu_seqlens, offsets, seq, **self.meta(q, v, cu_seqlens, kernel))
        return tiles

    def run_forward(self, inputs, h0, cu_seqlens) -> list[torch.Tensor]:
        """o [B,T,H,DV], final states [N,H,STATE], chunk-start states [chunks,H,STATE]
        (flattened), and the tiles the forward's stage and pass stored (the backward reads
        them)."""
        q, v = inputs[0], inputs[2]
        layout = seqs, offsets, chunks, seq = self.layout(q, cu_seqlens)
        staged = self.stage_tiles("fwd", inputs, (), (), cu_seqlens, layout)
        acc, meta = _accumulator(q.dtype), self.meta(q, v, cu_seqlens, "fwd")
        heads, size = q.shape[2], self.state_size(q, v)
        ht = q.new_empty(seqs, heads, size, dtype=acc)
        hs = q.new_empty(chunks * self.m["SEGMENTS"], heads, size, dtype=self.state_dtype(q, "hs"))
        kept = self.buffers(q, v, chunks, "fwd_pass")
        blocks = triton.cdiv(v.shape[-1], meta["BV"])
        self.zero_padding_columns(kept, "fwd_pass", v.shape[-1])
        staged += kept
        self.launch("fwd", (seqs, heads, blocks), *inputs, *staged, h0, ht, hs, cu_seqlens,
                    offsets, HAS_H0=h0 is not None, **meta)
        o = torch.empty_like(v)
        if chunks:
            meta = self.meta(q, v, cu_seqlens, "fwd_out")
            self.launch("fwd_out", (chunks, heads, triton.cdiv(v.shape[-1], meta["BV"])), *inputs,
                        *staged, hs, o, cu_seqlens, offsets, seq, **meta)
        return [o, ht, hs, *staged]

    def run_backward(self, inputs, hs, saved, do, dht, cu_seqlens) -> list[torch.Tensor]:
        """dq, dk, dv, the gates' gradients, the per-head parameters' (summed over sequences) and
        d initial state."""
        m = self.m
        q, v = inputs[0], inputs[2]
        layout = seqs, offsets, chunks, seq = self.layout(q, cu_seqlens)
        do = do.contiguous()
        acc, meta = _accumulator(q.dtype), self.meta(q, v, cu_seqlens, "bwd")
        staged = [*saved, *self.stage_tiles("bwd", inputs, saved, (do, hs), cu_seqlens, layout)]
        staged += self.buffers(q, v, chunks, "bwd_pass")  # what the pass keeps for the others
        dh0 = q.new_empty(seqs, q.shape[2], self.state_size(q, v), dtype=acc)
        dhs = hs.new_empty(hs.shape, dtype=self.state_dtype(q, "dhs"))  # each step-end state's gradient
        self.launch("bwd", (seqs, q.shape[2], triton.cdiv(v.shape[-1], meta["BV"])), *inputs,
                    *staged, do, hs, dht, dhs, dh0, cu_seqlens, offsets, HAS_DHT=dht is not None,
                    **meta)
        metas = {out: self.meta(q, v, cu_seqlens, out) for out in m["OUT_KERNELS"]}
        handed = self.buffers(q, v, chunks, "bwd_out")  # between the output kernels
        self.zero_padding_columns(handed, "bwd_out", v.shape[-1])
        # the programs per chunk and head: per key block, one walking the value blocks, or per
        # value block
        blocks = {out: triton.cdiv(q.shape[-1], meta["BK"]) if out in m["KEY_PROGRAMS"]
                  else 1 if out in m["V_SUMMED"] else triton.cdiv(v.shape[-1], meta["BV"])
                  for out, meta in metas.items()}
        # 0: stored once; a key block's share (`KeyShares`) per key block, as a value block's
        # partial sums per value block
        parts = {x: 0 if out in m["WALKS"] and x not in m["KEY_SHARES"] else blocks[out]
                 for out, xs in m["OUT_KERNELS"].items() for x in xs}
        tokens = dict(zip(("q", "k", "v", *m["GATES"]), inputs, strict=False))
        grads = [x.new_empty(parts[name], *x.shape, dtype=acc) if name in m["SUMMED"] and
                 parts[name] else torch.empty_like(x) for name, x in tokens.items()]
        for i, name in enumerate(tokens):  # a sequence's last chunk has no rows of the next
            if name in m.get("PREVIOUS", {}):
                grads[i].zero_()
        per_chunk = [q.new_zeros(max(chunks, 1), *p.shape, dtype=acc)
                     for p in inputs[len(tokens):]]
        for out, meta in metas.items() if chunks else ():
            self.launch(out, (chunks, q.shape[2], blocks[out]), *inputs, *staged, *handed, do, hs, dhs,
                        *grads, *per_chunk, cu_seqlens, offsets, seq, NTOK=q.shape[0] * q.shape[1],
                        **meta)
        grads = [(g[0] if len(g) == 1 else g.sum(0)).to(x.dtype) if g.dim() > x.dim() else g
                 for g, x in zip(grads, tokens.values(), strict=True)]
        grads += [d.sum(0).to(p.dtype) for d, p in zip(per_chunk, inputs[len(tokens):], strict=True)]
        return [*grads, dh0]

    # ---- custom ops and autograd --------------------------------------------------------------

    def _register(self, name: str):
        """The forward and backward custom ops of this module, the backward as the forward's
        autograd formula; once per process. A generated module run a second time (a copy
        imported from `mirasc compile`'s output beside the cached one) takes the ops the first
        registered: a second registration under the name would take the first's place under the
        ops that call it (the same code either way, as the name includes the spec's digest)."""
        if name in _CUSTOM_OPS:
            return _CUSTOM_OPS[name]

        def forward(inputs: list[torch.Tensor], h0: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
            return self.run_forward(inputs, h0, cu_seqlens)

        def backward(inputs: list[torch.Tensor], hs: torch.Tensor, saved: list[torch.Tensor],
                     do: torch.Tensor, dht: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
            return self.run_backward(inputs, hs, saved, do, dht, cu_seqlens)

        forward_op = torch.library.custom_op(f"{name}_fwd", mutates_args=())(forward)
        backward_op = torch.library.custom_op(f"{name}_bwd", mutates_args=())(backward)
        forward_op.register_fake(self._fake_forward)
        backward_op.register_fake(self._fake_backward)

        def setup_context(ctx, inputs, output):
            tensors, h0, cu_seqlens = inputs
            ctx.set_materialize_grads(False)  # no zeros for the saved states and tiles
            ctx.mark_non_differentiable(*output[2:])
            ctx.save_for_backward(*tensors, *output[2:])
            ctx.inputs, ctx.cu_seqlens = len(tensors), cu_seqlens
            ctx.h0_dtype = None if h0 is None else h0.dtype

        def gradients(ctx, grads):
            do, dht = grads[0], grads[1]
            saved = ctx.saved_tensors
            tensors, hs, tiles = saved[:ctx.inputs], saved[ctx.inputs], list(saved[ctx.inputs + 1:])
            if do is None:  # only the final state reaches the loss
                do = torch.zeros_like(tensors[2])
            *dinputs, dh0 = backward_op(list(tensors), hs, tiles, do, dht, ctx.cu_seqlens)
            return dinputs, None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype), None

        forward_op.register_autograd(gradients, setup_context=setup_context)
        _CUSTOM_OPS[name] = forward_op, backward_op
        return forward_op, backward_op

    def _fake_forward(self, inputs, h0, cu_seqlens):
        q, v = inputs[0], inputs[2]
        acc = _accumulator(q.dtype)
        heads, size, chunk = q.shape[2], self.state_size(q, v), self.m["CHUNK"]
        if cu_seqlens is None:
            seqs, chunks = q.shape[0], q.shape[0] * ((q.shape[1] + chunk - 1) // chunk)
        else:
            seqs, chunks = cu_seqlens.shape[0] - 1, torch.library.get_ctx().new_dynamic_size()
        return [torch.empty_like(v), q.new_empty(seqs, heads, size, dtype=acc),
                q.new_empty(chunks * self.m["SEGMENTS"], heads, size, dtype=self.state_dtype(q, "hs")),
                *self.buffers(q, v, chunks, "fwd"),
                *self.buffers(q, v, chunks, "fwd_pass")]

    def _fake_backward(self, inputs, hs, saved, do, dht, cu_seqlens):
        q, v = inputs[0], inputs[2]
        seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return [*(torch.empty_like(x) for x in inputs),
                q.new_empty(seqs, q.shape[2], self.state_size(q, v), dtype=_accumulator(q.dtype))]

    # ---- the op's Triton path -----------------------------------------------------------------

    def __call__(self, q, k, v, gates: dict, initial_state, cu_seqlens):
        """(o, final state tuple) of checked inputs; `gates` holds GATES and PARAMS by name."""
        h0 = None if initial_state is None else torch.cat([s.flatten(2) for s in initial_state], 2)
        own = {"k": k, "v": v} | gates  # a window's previous rows: the kernels load them
        gates = gates | {p: own[x] for p, x in self.m.get("PREVIOUS", {}).items()}
        inputs = [q.contiguous(), k.contiguous(), v.contiguous(),
                  *(gates[g].contiguous() for g in self.m["GATES"] + self.m["PARAMS"])]
        o, ht, *_ = self.forward(inputs, h0, cu_seqlens)
        shapes = self.state_shapes(q.shape[-1], v.shape[-1])
        parts = ht.split([math.prod(shape) for shape in shapes], 2)
        return o, tuple(p.unflatten(2, shape) for p, shape in zip(parts, shapes, strict=True))

