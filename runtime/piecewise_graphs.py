"""CUDA-graph decode in pieces, for attention backends that cannot be captured whole.

A backend whose decode reads host lengths (``efficient_cuda``: a per-step plan of pieces and one
varlen launch; ``torch`` and ``sdpa``: loops over the sequences) declares no captured decode, and
an eager decode step of a 7B model is ~1,000 launches from Python. Here everything *between* two
attention calls is captured -- embedding, each layer's norms, projections, RoPE and MLP, the LM
head -- as one graph per stretch (33 for 32 layers), and each layer's KV write and attention run
eagerly between the replays with the step's real lengths, as vLLM's piecewise graphs do. The
model code is unchanged: it is captured with a stand-in backend whose ``write_kv`` and
``forward`` end the graph being captured, run the real backend and begin the next graph.

The stretches share one memory pool and are replayed in the order they were captured. What one
stretch hands to the eager call and back -- the layer's ``q``, ``k``, ``v`` (outputs of the graph
before, at fixed addresses) and the attention output (a buffer allocated outside the pool) -- is
kept alive with the graphs, so no later capture reuses it. Only the step's real rows are written
and attended: padding rows of a bucket neither write the cache nor read it (their output rows
keep finite values from capture; their logits are ignored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime.attention.base import AttentionMetadata
from runtime.cuda_graphs import DecodeGraphs

log = logging.getLogger(__name__)


@dataclass
class _Break:
    """One eager KV write and attention between two captured stretches; static tensors."""

    key: torch.Tensor  # [bucket, Hkv, D], written by the stretch before
    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    q: torch.Tensor  # [bucket, Hq, D], written by the stretch before
    out: torch.Tensor  # [bucket, Hq, D], read by the stretch after
    scale: float


@dataclass
class _Pieces:
    graphs: list[torch.cuda.CUDAGraph]  # one more than breaks
    breaks: list[_Break]
    logits: torch.Tensor  # [bucket, vocab] float32, written by the last graph


class _Splitter:
    """The backend the model is captured with: its KV write and attention are the breaks."""

    captured_decode_params = 0

    def __init__(self, owner: PiecewiseDecodeGraphs) -> None:
        self.owner = owner
        self.name = owner.backend.name

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        self.owner._pending = (key, value, k_cache, v_cache)

    def forward(self, q, k_cache, v_cache, meta, scale) -> tuple[torch.Tensor, None]:
        return self.owner._break(q, scale), None


class PiecewiseDecodeGraphs(DecodeGraphs):
    """``DecodeGraphs`` for a backend without captured decode: stretches between attention
    calls captured and replayed, attention eager (see the module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._capturing: torch.cuda.CUDAGraph | None = None
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._breaks: list[_Break] | None = None  # None: a warm-up forward (no capture)
        self._pending: tuple | None = None
        self._warm_meta: AttentionMetadata | None = None
        self._splitter = _Splitter(self)

    # -- capture ------------------------------------------------------------------------------
    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_layers, meta, self._splitter
        )
        return self.model.compute_logits(hidden)

    def _begin(self) -> None:
        self._capturing = torch.cuda.CUDAGraph()
        self._capturing.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def _end(self) -> None:
        self._capturing.capture_end()
        self._graphs.append(self._capturing)
        self._capturing = None

    def _break(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        key, value, k_cache, v_cache = self._pending
        self._pending = None
        if self._breaks is not None:
            self._end()
        # allocated outside the capture: the regular allocator, not the graphs' pool
        brk = _Break(key, value, k_cache, v_cache, q, torch.empty_like(q), scale)
        # padding rows only (seq_len 1 over block 0, no KV write): compiles and settles the
        # eager kernels, and leaves finite values in the output buffer
        self._attend(brk, self._warm_meta, write=False)
        if self._breaks is not None:
            self._breaks.append(brk)
            self._begin()
        return brk.out

    def _attend(self, brk: _Break, meta: AttentionMetadata, write: bool = True) -> None:
        n = meta.num_seqs
        if write:
            self.backend.write_kv(
                brk.key[:n], brk.value[:n], brk.k_cache, brk.v_cache, meta.slot_mapping
            )
        out, _lse = self.backend.forward(brk.q[:n], brk.k_cache, brk.v_cache, meta, brk.scale)
        brk.out[:n].copy_(out)

    @torch.inference_mode()
    def capture(self, bs: int) -> None:
        """Capture the stretches of bucket ``bs`` (all rows padding while capturing)."""
        if bs in self.graphs:
            return
        self._stage([], bs)
        meta = self._meta(bs)
        self._warm_meta = AttentionMetadata.build(
            [1] * bs, [1] * bs, [[0]] * bs, self.block_size, self.device
        )
        side = self._warm_up(bs, meta)
        self._graphs, self._breaks = [], []
        try:
            with torch.cuda.stream(side):
                self._begin()
                logits = self._forward(bs, meta)
                self._end()
        finally:
            if self._capturing is not None:  # a failed capture: end it so the stream is usable
                graph, self._capturing = self._capturing, None
                try:
                    graph.capture_end()
                except RuntimeError as e:  # already invalidated by the failure being raised
                    log.debug("ending a failed capture: %s", e)
            graphs, breaks = self._graphs, self._breaks
            self._graphs, self._breaks = [], None
        torch.cuda.synchronize(self.device)
        self.graphs[bs] = _Pieces(graphs, breaks, logits)
        log.info(
            "captured decode for batch size %d in %d pieces around eager %s attention",
            bs,
            len(graphs),
            self.backend.name,
        )

    # -- replay -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, chunks, fill_pending=None) -> torch.Tensor:
        """Replay the stretches for these decode chunks with eager attention between them;
        float32 logits ``[len(chunks), vocab]`` (a view: read it before the next run)."""
        bs = self.bucket_for(len(chunks))
        if bs not in self.graphs:
            self.capture(bs)
        self._stage(chunks, bs)
        n = len(chunks)
        if fill_pending is not None and any(c.token_ids[0] < 0 for c in chunks):
            fill_pending(self.input_ids[:n], chunks)
        # the step's real rows, read from the buffers just staged (no copies of their own)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            block_tables=self.block_tables[:n],
            slot_mapping=self.slot_mapping[:n],
            query_lens_cpu=(1,) * n,
            seq_lens_cpu=tuple(c.seq_len for c in chunks),
        )
        p = self.graphs[bs]
        for graph, brk in zip(p.graphs, p.breaks):
            graph.replay()
            self._attend(brk, meta)
        p.graphs[-1].replay()
        return p.logits[:n]
