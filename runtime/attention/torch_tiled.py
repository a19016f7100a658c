"""Portable tiled attention: the FlashAttention-2 forward pass in plain torch ops.

Runs wherever torch runs (CPU, any CUDA GPU including Volta, NPU through torch_npu): no Triton,
no SDPA, only matmul, elementwise and indexing ops. For each sequence and each query tile it walks
the key/value tiles with an online softmax (running row max ``m``, running sum ``l``, one rescale
of the float32 accumulator per tile). Causality comes from a *tiling mask*: every (query tile,
key tile) pair is classified from positions alone as fully visible (no mask), fully above the
diagonal (never computed) or on the diagonal (a tile-sized mask from two aranges), so no
``S x S`` mask ever exists. Grouped-query heads share their key/value head by folding the group
into the query rows, so K/V are never repeated in memory. Keys are read through the block table.

Precision: float32 inputs run all in float32. Half/bfloat16 inputs on CUDA run *mixed*, as the
FlashAttention kernels do: both matmuls take the input dtype (tensor cores) and produce float32
(``bmm(..., out_dtype=float32)``), the scale is applied to the float32 scores, softmax statistics
and the accumulator stay float32, and ``P`` is rounded to the input dtype only as the second
matmul's operand (the row sums add that rounded ``P`` too, so ``lse`` is good to the input
dtype's rounding, 2^-8 relative for bfloat16, rather than float32's). Elsewhere (CPU, NPU, a torch without ``out_dtype``) half inputs are cast to
float32 tile by tile.
"""

from __future__ import annotations

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata, gqa_group


def _check_tile(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TorchTiledBackend(AttentionBackend):
    """FlashAttention-2 forward in portable torch ops over the paged KV cache.

    ``q_tile`` is the number of query tokens per tile (each tile holds ``q_tile * group`` rows,
    one per query head of a key/value head); ``kv_tile`` is the number of keys per tile and need
    not be a multiple of the cache's block size. All arithmetic is float32 whatever the input
    dtype; ``out`` comes back in ``q``'s dtype and ``lse`` in float32.
    """

    name = "torch"

    def __init__(self, q_tile: int = 128, kv_tile: int = 512, mixed: bool | None = None) -> None:
        """``mixed``: None picks mixed precision for half inputs on CUDA (see the module doc);
        True forces it (its matmuls fall back to float32 ones where ``out_dtype`` is missing,
        which is how the CPU tests exercise its arithmetic); False never uses it."""
        self.q_tile = _check_tile("q_tile", q_tile)
        self.kv_tile = _check_tile("kv_tile", kv_tile)
        self.mixed = mixed

    def _is_mixed(self, q: torch.Tensor) -> bool:
        if self.mixed is not None:
            return self.mixed and q.dtype in _HALF
        return q.dtype in _HALF and q.device.type == "cuda"

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, hq, d = q.shape
        nb, bs, hkv, _ = k_cache.shape
        group = gqa_group(hq, hkv)
        k_flat = k_cache.view(nb * bs, hkv, d)
        v_flat = v_cache.view(nb * bs, hkv, d)
        out = torch.empty_like(q)
        lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            # flat cache slot of every key of this sequence: O(seq_len) ints, read tile by tile
            pos = torch.arange(slen, device=q.device)
            table = meta.block_tables[b].to(torch.long)
            slots = table[pos // bs] * bs + pos % bs
            for i0 in range(0, qlen, self.q_tile):
                i1 = min(i0 + self.q_tile, qlen)
                qt = q[start + i0 : start + i1]
                o, l_ = self._query_tile(qt, k_flat, v_flat, slots, slen - qlen + i0, group, scale)
                out[start + i0 : start + i1] = o
                lse[start + i0 : start + i1] = l_
            start += qlen
        return out, lse

    def _query_tile(
        self,
        q: torch.Tensor,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
        slots: torch.Tensor,
        first_pos: int,
        group: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``n`` consecutive queries (positions from ``first_pos``) over their keys."""
        n, hq, d = q.shape
        hkv = hq // group
        last_pos = first_pos + n - 1
        mixed = self._is_mixed(q)
        # fold the query heads of one kv head into the rows: [Hkv, n*group, D], row r is query
        # r // group, so K/V are shared by broadcasting over the batch dim, never repeated
        qh = q.reshape(n, hkv, group, d).transpose(0, 1).reshape(hkv, n * group, d)
        qh = qh if mixed else qh.to(torch.float32) * scale
        row_pos = first_pos + torch.arange(n * group, device=q.device) // group
        rows = n * group
        m = torch.full((hkv, rows), float("-inf"), dtype=torch.float32, device=q.device)
        l_ = torch.zeros(hkv, rows, dtype=torch.float32, device=q.device)
        acc = torch.zeros(hkv, rows, d, dtype=torch.float32, device=q.device)
        # tiles starting past the last query's position are above the diagonal: never visited
        for j0 in range(0, last_pos + 1, self.kv_tile):
            j1 = min(j0 + self.kv_tile, last_pos + 1)
            idx = slots[j0:j1]
            kdt = q.dtype if mixed else torch.float32
            k = k_flat.index_select(0, idx).to(kdt).transpose(0, 1)  # [Hkv, N, D]
            v = v_flat.index_select(0, idx).to(kdt).transpose(0, 1)
            mask = None
            if j1 - 1 > first_pos:
                # on the diagonal: only this tile's mask, from positions
                kpos = torch.arange(j0, j1, device=q.device)
                mask = kpos[None, :] > row_pos[:, None]  # [rows, N], broadcast over Hkv
            if mixed:
                self._tile_step_mixed(qh, k, v, mask, m, l_, acc, scale)
            else:
                self._tile_step(qh, k, v, mask, m, l_, acc)
        out = acc / l_.unsqueeze(-1)
        lse = m + torch.log(l_)
        out = out.view(hkv, n, group, d).transpose(0, 1).reshape(n, hq, d)
        lse = lse.view(hkv, n, group).transpose(0, 1).reshape(n, hq)
        return out, lse

    @staticmethod
    def _tile_step_mixed(q, k, v, mask, m, l_, acc, scale: float) -> None:
        """``_tile_step`` for half inputs: ``q`` ``[B, R, D]`` unscaled and ``k``/``v``
        ``[B, N, D]`` in the input dtype; products accumulate in float32 and the scale is applied
        to the float32 scores. Per score: one float32 write (QK), a max, one fused
        scale-and-subtract, one exp written in the input dtype, a row sum and the PV read."""
        s = _mm_f32(q, k.transpose(-1, -2))
        if mask is not None:
            s.masked_fill_(mask, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1) * scale)
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        torch.add(-m_safe.unsqueeze(-1), s, alpha=scale, out=s)  # scale * s - m, in place
        p = torch.empty(s.shape, dtype=v.dtype, device=s.device)
        torch.exp(s, out=p)
        alpha = torch.exp(m - m_safe)
        l_.mul_(alpha).add_(p.sum(dim=-1, dtype=torch.float32))
        acc.mul_(alpha.unsqueeze(-1)).add_(_mm_f32(p, v))
        m.copy_(m_new)

    @staticmethod
    def _tile_step(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        m: torch.Tensor,
        l_: torch.Tensor,
        acc: torch.Tensor,
    ) -> None:
        """Fold one key/value tile into the running state ``(m, l, acc)`` in place.

        ``q`` ``[..., R, D]`` is float32 and already scaled; ``k``/``v`` ``[..., N, D]`` float32;
        ``mask`` is True where a key is hidden (broadcast to ``[..., R, N]``), or None when the
        tile is fully visible; ``m``/``l`` ``[..., R]`` and ``acc`` ``[..., R, D]`` float32.
        """
        s = torch.matmul(q, k.transpose(-1, -2))
        if mask is not None:
            s.masked_fill_(mask, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        # a row that has seen no key yet still has max -inf: subtract 0 so exp gives 0, not nan
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()
        # the one rescale per tile: earlier sums were relative to the old max
        alpha = torch.exp(m - m_safe)
        l_.mul_(alpha).add_(p.sum(dim=-1))
        acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, v))
        m.copy_(m_new)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per sequence: all sequences at once, walking key tiles.

        Sequences are sorted longest first, so the ones still having keys in tile ``[j0, j1)``
        are a prefix of the batch and the state of the others is left alone; only a tile that
        crosses some sequence's end needs a mask. Same tiles and arithmetic as ``prefill``.
        """
        B, hq, d = q.shape
        nb, bs, hkv, _ = k_cache.shape
        group = gqa_group(hq, hkv)
        lens = list(meta.seq_lens_cpu)
        if B == 0:
            return torch.empty_like(q), torch.empty(0, hq, dtype=torch.float32, device=q.device)
        order = sorted(range(B), key=lambda b: -lens[b])
        lens = [lens[b] for b in order]
        order_t = torch.tensor(order, dtype=torch.long, device=q.device)
        k_flat = k_cache.view(nb * bs, hkv, d)
        v_flat = v_cache.view(nb * bs, hkv, d)
        # [B, Hkv, group, D]: each sequence's query heads grouped under their kv head
        qh = q.index_select(0, order_t).view(B, hkv, group, d).to(torch.float32) * scale
        seq_lens = torch.tensor(lens, device=q.device)
        # [B, max_len] slots; past its end a sequence re-reads its last key (masked below), so
        # only its own blocks are touched, never the block table's padding
        pos = torch.arange(lens[0], device=q.device)
        pos = torch.minimum(pos[None, :], seq_lens[:, None] - 1)
        tables = meta.block_tables.index_select(0, order_t).to(torch.long)
        slots = tables.gather(1, pos // bs) * bs + pos % bs
        m = torch.full((B, hkv, group), float("-inf"), dtype=torch.float32, device=q.device)
        l_ = torch.zeros(B, hkv, group, dtype=torch.float32, device=q.device)
        acc = torch.zeros(B, hkv, group, d, dtype=torch.float32, device=q.device)
        active = B
        for j0 in range(0, lens[0], self.kv_tile):
            j1 = min(j0 + self.kv_tile, lens[0])
            while lens[active - 1] <= j0:
                active -= 1
            idx = slots[:active, j0:j1].reshape(-1)
            k = k_flat.index_select(0, idx).view(active, j1 - j0, hkv, d)
            v = v_flat.index_select(0, idx).view(active, j1 - j0, hkv, d)
            k = k.to(torch.float32).transpose(1, 2)  # [active, Hkv, N, D]
            v = v.to(torch.float32).transpose(1, 2)
            mask = None
            if lens[active - 1] < j1:
                kpos = torch.arange(j0, j1, device=q.device)
                mask = (kpos[None, :] >= seq_lens[:active, None])[:, None, None, :]
            self._tile_step(qh[:active], k, v, mask, m[:active], l_[:active], acc[:active])
        out = (acc / l_.unsqueeze(-1)).view(B, hq, d)
        lse = (m + torch.log(l_)).view(B, hq)
        # back to batch order
        out_b = torch.empty_like(q)
        lse_b = torch.empty(B, hq, dtype=torch.float32, device=q.device)
        out_b[order_t] = out.to(q.dtype)
        lse_b[order_t] = lse
        return out_b, lse_b


_HALF = (torch.float16, torch.bfloat16)
_OUT_DTYPE_WORKS: dict[str, bool] = {}  # device type -> whether bmm(..., out_dtype=) runs there


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half ``[B, M, K] x [B, K, N]`` operands as float32: tensor-core products with
    float32 accumulation and output where torch has ``bmm(out_dtype=)`` for the device (CUDA),
    else a float32 matmul of the upcast operands (same values, slower)."""
    kind = a.device.type
    if _OUT_DTYPE_WORKS.get(kind, True):
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_WORKS[kind] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_WORKS[kind] = False
    return torch.matmul(a.float(), b.float())
