"""Float64 reference attention over the paged layout: the oracle the kernels are tested against.

Deliberately naive (gathers each sequence's keys, builds its full causal score matrix), so it is
easy to check by eye; never used on the serving path.
"""

from __future__ import annotations

import torch

from runtime.attention.base import AttentionMetadata


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Keys (or values) of one sequence in position order: ``[seq_len, Hkv, D]``."""
    bs = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_table.to(torch.long)[pos // bs]
    return cache[blocks, pos % bs]


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal paged attention in float64; returns ``(out [T,Hq,D] float64, lse [T,Hq] float64)``."""
    T, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.empty(T, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.empty(T, hq, dtype=torch.float64, device=q.device)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qs = q[start : start + qlen].double()  # [qlen, Hq, D]
        k = gather_kv(k_cache, meta.block_tables[b], slen).double().repeat_interleave(group, 1)
        v = gather_kv(v_cache, meta.block_tables[b], slen).double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qs, k) * scale
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, qlen]
        p = torch.exp(s - row_lse[..., None])
        out[start : start + qlen] = torch.einsum("hqk,khd->qhd", p, v)
        lse[start : start + qlen] = row_lse.transpose(0, 1)
        start += qlen
    return out, lse
