"""CPU attention on torch's fused flash-attention kernel for CPUs, over the paged KV cache.

torch ships a FlashAttention-2 forward for CPUs (``aten._scaled_dot_product_flash_attention_for_cpu``:
blocked online softmax, vectorised, split over heads and query blocks on the intra-op threads)
that returns the log-sum-exp the contract asks for and reads grouped-query K/V heads without
repeating them. This backend feeds it the paged cache with as few copies as possible:

* a sequence whose blocks are consecutive in the cache (the usual case: the allocator hands out
  runs) is a plain strided *view* of the cache, ``[seq_len, Hkv, D]``; no key is copied. Other
  sequences gather their blocks (whole blocks, not single slots) into one contiguous buffer.
* chunked prefill (queries at positions ``p0 .. p0+n-1`` over keys ``0 .. p0+n-1``) is two calls
  merged exactly through ``lse``: the earlier keys ``[0, p0)``, all visible, and the chunk's own
  keys ``[p0, p0+n)``, causal with the kernel's top-left diagonal, which is the right one there
  because queries and keys start at the same position. No ``n x seq_len`` mask exists.
* decode folds the query heads of one K/V head into the query rows (``[1, Hkv, group, D]``, a
  view), so each K/V byte is read once per step rather than once per query head.

The block-table analysis is made once per step (the metadata object) and shared by all layers.
"""

from __future__ import annotations

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.attention.merge import merge_attention_states

_OP_NAME = "_scaled_dot_product_flash_attention_for_cpu"


def _flash(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [1, Hq, n, D]``, ``k``/``v`` ``[1, Hkv, N, D]`` (any strides) -> out, lse ``[1, Hq, n]``."""
    return getattr(torch.ops.aten, _OP_NAME)(q, k, v, 0.0, causal, scale=scale)


class CpuFlashBackend(AttentionBackend):
    """Per-sequence calls of torch's CPU flash-attention kernel; K/V read in place when the
    sequence's blocks are consecutive, else gathered block by block."""

    name = "flash_cpu"

    def __init__(self) -> None:
        self._plan_meta: AttentionMetadata | None = None
        self._plan: list[int | None] = []

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "it is torch's CPU kernel; use triton or torch on accelerators"
        if not hasattr(torch.ops.aten, _OP_NAME):
            return f"this torch ({torch.__version__}) has no aten.{_OP_NAME}"
        return None

    # -- K/V without copies --------------------------------------------------------------------
    def _first_blocks(self, meta: AttentionMetadata, block_size: int) -> list[int | None]:
        """Per sequence: the first block id when its blocks are consecutive, else None.

        Computed once per metadata object (one step) and reused by every layer."""
        if self._plan_meta is meta:
            return self._plan
        plan: list[int | None] = []
        tables = meta.block_tables
        for b, slen in enumerate(meta.seq_lens_cpu):
            n = -(-slen // block_size)
            row = tables[b, :n]
            first = int(row[0])
            # consecutive iff the row equals first, first+1, ...: one comparison, no Python loop
            ok = n == 1 or bool((row == torch.arange(first, first + n, dtype=row.dtype)).all())
            plan.append(first if ok else None)
        self._plan_meta, self._plan = meta, plan
        return plan

    @staticmethod
    def _kv(cache: torch.Tensor, meta: AttentionMetadata, b: int, slen: int, first: int | None):
        """Sequence ``b``'s keys (or values) in position order, ``[1, Hkv, slen, D]``."""
        nb, bs, hkv, d = cache.shape
        if first is not None:
            flat = cache.view(nb * bs, hkv, d)[first * bs : first * bs + slen]
        else:
            n = -(-slen // bs)
            blocks = cache.index_select(0, meta.block_tables[b, :n].to(torch.long))
            flat = blocks.view(n * bs, hkv, d)[:slen]
        return flat.permute(1, 0, 2).unsqueeze(0)

    # -- the contract ----------------------------------------------------------------------------
    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, hq, d = q.shape
        _group(hq, k_cache.shape[2])
        plan = self._first_blocks(meta, k_cache.shape[1])
        out = torch.empty_like(q)
        lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            k = self._kv(k_cache, meta, b, slen, plan[b]).to(q.dtype)
            v = self._kv(v_cache, meta, b, slen, plan[b]).to(q.dtype)
            qs = q[start : start + qlen]
            if qlen == 1:
                o, l_ = self._decode_one(qs, k, v, scale)
            else:
                o, l_ = self._chunk(qs, k, v, slen - qlen, scale)
            out[start : start + qlen] = o
            lse[start : start + qlen] = l_
            start += qlen
        return out, lse

    @staticmethod
    def _chunk(q, k, v, p0: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``q [n, Hq, D]`` at positions ``p0 ..``; keys ``[1, Hkv, p0 + n, D]``."""
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D], a view
        o, l_ = _flash(qh, k[:, :, p0:], v[:, :, p0:], True, scale)
        o, l_ = o[0].transpose(0, 1), l_[0].transpose(0, 1)  # [n, Hq, D], [n, Hq]
        if p0:  # the earlier chunks' keys: every query sees all of them
            o_prev, l_prev = _flash(qh, k[:, :, :p0], v[:, :, :p0], False, scale)
            o, l_ = merge_attention_states(
                o_prev[0].transpose(0, 1), l_prev[0].transpose(0, 1), o, l_
            )
        return o, l_

    @staticmethod
    def _decode_one(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One query ``q [1, Hq, D]`` over all keys: the group's heads become query rows."""
        hq, d = q.shape[1:]
        hkv = k.shape[1]
        qh = q.view(1, hkv, hq // hkv, d)
        o, l_ = _flash(qh, k, v, False, scale)
        return o.reshape(1, hq, d), l_.reshape(1, hq)


def _group(hq: int, hkv: int) -> int:
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return hq // hkv
