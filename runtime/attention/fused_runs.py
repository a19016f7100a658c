"""A fused attention kernel of torch's, fed the paged KV cache with as few copies as possible.

torch ships fused attention kernels that return the log-sum-exp the contract asks for: a
FlashAttention-2 forward for CPUs, and the memory-efficient (xformers/cutlass) forward on CUDA,
which runs on every GPU from Volta on. They take contiguous-in-the-last-dim ``[B, H, N, D]``
tensors with any other strides, not block tables. This base class turns a paged step into calls
of such a kernel; a subclass supplies only :meth:`FusedRunsBackend.attend`, one call of its
kernel.

* a run of consecutive blocks in the cache (the allocator hands out runs) is a plain strided
  *view* of the cache, ``[1, Hkv, run_len, D]``: no key is copied. A sequence whose blocks form a
  few runs gets one kernel call per run, merged exactly through ``lse``; one scattered over more
  than ``MAX_RUNS`` runs gathers its blocks (whole blocks, not single slots) into one buffer.
* chunked prefill (queries at positions ``p0 .. p0+n-1`` over keys ``0 .. p0+n-1``) is two calls
  merged exactly through ``lse``: the earlier keys ``[0, p0)``, all visible, and the chunk's own
  keys ``[p0, p0+n)``, causal with the kernel's top-left diagonal, which is the right one there
  because queries and keys start at the same position. No ``n x seq_len`` mask exists.
* decode folds the query heads of one K/V head into the query rows (``[group, Hkv, D]``, a
  view), so each K/V byte is read once per step rather than once per query head.

The run analysis of the block tables is made once per step (per metadata object) and shared by
all layers.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata, gqa_group

MAX_RUNS = 8  # more runs of consecutive blocks than this: gather the sequence instead


class FusedRunsBackend(AttentionBackend):
    """Per-sequence calls of one fused kernel; K/V read in place, one call per run of
    consecutive blocks, partial results merged through ``lse``."""

    def __init__(self) -> None:
        self._plan_key: tuple | None = None  # (metadata, its block tables, its lengths)
        self._plan: list[list[tuple[int, int, int]] | None] = []

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One kernel call: queries ``q [n, Hq, D]`` over keys/values ``[1, Hkv, N, D]`` (any
        strides but the last; ``Hq`` a multiple of ``Hkv``; ``N >= 1``) -> ``out [n, Hq, D]``
        in ``q``'s dtype and float32 ``lse [n, Hq]``. ``causal``: query ``i`` sees keys
        ``0 .. i`` (top-left diagonal; ``n == N`` wherever it is asked for)."""

    def attend_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query ``q [1, Hq, D]`` over keys ``[1, Hkv, N, D]``: the query heads of a K/V
        head become its query rows (a view), so each K/V byte is read once, not once per
        query head."""
        hq, d = q.shape[1:]
        hkv = k.shape[1]
        rows = q.view(hkv, hq // hkv, d).transpose(0, 1)  # [group, Hkv, D]
        o, l_ = self.attend(rows, k, v, False, scale)
        return o.transpose(0, 1).reshape(1, hq, d), l_.transpose(0, 1).reshape(1, hq)

    # -- K/V without copies --------------------------------------------------------------------
    def runs(
        self, meta: AttentionMetadata, block_size: int
    ) -> list[list[tuple[int, int, int]] | None]:
        """Per sequence: its keys as runs ``(first_pos, end_pos, first_slot)`` of consecutive
        cache slots, or None when there are more than ``MAX_RUNS`` (then it is gathered).

        Computed once per metadata object (one step) and reused by every layer."""
        if same_step(self._plan_key, meta):
            return self._plan
        plan: list[list[tuple[int, int, int]] | None] = []
        for b, slen in enumerate(meta.seq_lens_cpu):
            found = block_runs(meta.block_tables[b, : -(-slen // block_size)], slen, block_size)
            plan.append(None if len(found) > MAX_RUNS else found)
        self._plan_key, self._plan = step_key(meta), plan
        return plan

    @staticmethod
    def _in_place(cache: torch.Tensor, lo: int, hi: int, slot: int) -> torch.Tensor:
        """Keys (or values) at positions ``[lo, hi)`` of a run starting at ``slot``, ``[1, Hkv,
        hi - lo, D]``: a view of the cache."""
        nb, bs, hkv, d = cache.shape
        if not cache.is_contiguous():
            flat = cache.reshape(nb * bs, hkv, d)[slot : slot + hi - lo]
            return flat.permute(1, 0, 2).unsqueeze(0)
        # one strided view straight from the cache (a slot is hkv*d apart, a head d apart)
        offset = cache.storage_offset() + slot * hkv * d
        return cache.as_strided((1, hkv, hi - lo, d), (0, d, hkv * d, 1), offset)

    @staticmethod
    def _gathered(cache: torch.Tensor, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Keys (or values) at positions ``[lo, hi)`` copied block by block, ``[1, Hkv, hi - lo,
        D]``."""
        nb, bs, hkv, d = cache.shape
        b0, b1 = lo // bs, -(-hi // bs)
        blocks = cache.index_select(0, table[b0:b1].to(torch.long))
        flat = blocks.view((b1 - b0) * bs, hkv, d)[lo - b0 * bs : hi - b0 * bs]
        return flat.permute(1, 0, 2).unsqueeze(0)

    def _segments(self, k_cache, v_cache, meta, b: int, lo: int, hi: int, runs):
        """``(k, v)`` pieces covering positions ``[lo, hi)`` of sequence ``b``, in place where
        its runs allow (one piece per run it crosses), else one gathered piece. No piece is
        empty (the kernels divide by the key count)."""
        if lo >= hi:
            return []
        if runs is None:
            table = meta.block_tables[b]
            return [
                (self._gathered(k_cache, table, lo, hi), self._gathered(v_cache, table, lo, hi))
            ]
        out = []
        for r0, r1, slot in runs:
            a, z = max(lo, r0), min(hi, r1)
            if a < z:
                s = slot + a - r0
                out.append((self._in_place(k_cache, a, z, s), self._in_place(v_cache, a, z, s)))
        return out

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
        gqa_group(hq, k_cache.shape[2])
        plan = self.runs(meta, k_cache.shape[1])
        results = []
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            qs = q[start : start + qlen]
            p0 = slen - qlen
            parts = []
            if qlen == 1:  # decode: the query sees every key; no causal part
                for k, v in self._segments(k_cache, v_cache, meta, b, 0, slen, plan[b]):
                    parts.append(self.attend_decode(qs, _as(k, q.dtype), _as(v, q.dtype), scale))
            else:
                # the chunk's own keys: causal, queries and keys start together (top-left)
                diag = self._segments(k_cache, v_cache, meta, b, p0, slen, plan[b])
                if len(diag) > 1:  # the chunk crosses runs: copy its keys (small) in one piece
                    diag = self._segments(k_cache, v_cache, meta, b, p0, slen, None)
                k, v = diag[0]
                parts.append(self.attend(qs, _as(k, q.dtype), _as(v, q.dtype), True, scale))
                # the earlier chunks' keys: all visible to every query
                for k, v in self._segments(k_cache, v_cache, meta, b, 0, p0, plan[b]):
                    parts.append(self.attend(qs, _as(k, q.dtype), _as(v, q.dtype), False, scale))
            results.append(merge_parts(parts))
            start += qlen
        if len(results) == 1:  # one sequence: no copies into a batch output
            o, l_ = results[0]
            return _as(o, q.dtype), l_
        out = torch.empty_like(q)
        lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
        start = 0
        for (o, l_), qlen in zip(results, meta.query_lens_cpu):
            out[start : start + qlen] = o
            lse[start : start + qlen] = l_
            start += qlen
        return out, lse


def step_key(meta: AttentionMetadata) -> tuple:
    """What identifies one step's metadata for a plan made from it (see :func:`same_step`)."""
    return meta, meta.block_tables, meta.seq_lens_cpu


def same_step(key: tuple | None, meta: AttentionMetadata) -> bool:
    """Whether a plan made under ``key`` holds for ``meta``: the same metadata object with the
    same tables and lengths (a metadata object reused across steps gets new lengths, so it is
    planned again)."""
    return (
        bool(key)
        and key[0] is meta
        and key[1] is meta.block_tables
        and key[2] == (meta.seq_lens_cpu)
    )


def block_runs(row: torch.Tensor, seq_len: int, block_size: int) -> list[tuple[int, int, int]]:
    """A sequence's keys as runs ``(first_pos, end_pos, first_slot)`` of consecutive cache
    slots; ``row`` is its first ``ceil(seq_len / block_size)`` block ids."""
    # block i starts a run where it does not follow block i-1
    starts = [0] + (torch.nonzero(row[1:] != row[:-1] + 1).view(-1) + 1).tolist()
    ends = starts[1:] + [row.numel()]
    return [
        (s * block_size, min(e * block_size, seq_len), first * block_size)
        for s, e, first in zip(starts, ends, row[starts].tolist())
    ]


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def merge_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial ``(out [n, H, D], lse [n, H])`` over disjoint key sets, in float32.
    Every part saw at least one key (no part is empty, no row of a part is fully masked), so
    every lse is finite and no guard against empty sides is needed."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([l_ for _, l_ in parts])  # [P, n, H]
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse).unsqueeze(-1)  # [P, n, H, 1]
    out = (torch.stack([o for o, _ in parts]).float() * w).sum(dim=0)
    return out, lse
