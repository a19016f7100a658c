"""Reference backend on ``torch.nn.functional.scaled_dot_product_attention``.

One SDPA call per sequence over its keys gathered from the blocks. Simple and trusted rather than
fast: it materialises each sequence's contiguous K/V and, for ``lse``, its score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.attention.base import AttentionBackend, AttentionMetadata, gqa_group
from runtime.attention.reference import gather_kv

# enable_gqa arrived in torch 2.5; before it, K/V heads are repeated
_HAS_ENABLE_GQA = torch.__version__ >= (2, 5)


class SdpaBackend(AttentionBackend):
    """Per-sequence SDPA with the causal offset mask of chunked prefill; ``lse`` from the scores."""

    name = "sdpa"

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, hq, d = q.shape
        hkv = k_cache.shape[2]
        group = gqa_group(hq, hkv)
        out = torch.empty_like(q)
        lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            qs = q[start : start + qlen].transpose(0, 1)  # [Hq, qlen, D]
            k = gather_kv(k_cache, meta.block_tables[b], slen).to(q.dtype).transpose(0, 1)
            v = gather_kv(v_cache, meta.block_tables[b], slen).to(q.dtype).transpose(0, 1)
            # queries are the last qlen positions: query i sees keys 0 .. slen - qlen + i.
            # (SDPA's is_causal aligns top-left, which is right only when qlen == slen.)
            qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
            visible = torch.arange(slen, device=q.device)[None, :] <= qpos  # [qlen, slen]
            if _HAS_ENABLE_GQA:
                o = F.scaled_dot_product_attention(
                    qs, k, v, attn_mask=visible, scale=scale, enable_gqa=group > 1
                )
            else:
                kr, vr = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
                o = F.scaled_dot_product_attention(qs, kr, vr, attn_mask=visible, scale=scale)
            out[start : start + qlen] = o.transpose(0, 1)
            # lse separately, in float32, from the grouped scores [Hkv, group*qlen, slen]
            qg = qs.to(torch.float32).reshape(hkv, group * qlen, d)
            s = torch.matmul(qg, k.to(torch.float32).transpose(1, 2)) * scale
            s = s.view(hq, qlen, slen).masked_fill(~visible, float("-inf"))
            lse[start : start + qlen] = torch.logsumexp(s, dim=-1).transpose(0, 1)
            start += qlen
        return out, lse
