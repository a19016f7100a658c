"""Attention of queries over keys they all see: the host part of cooperative attention.

Host-resident blocks are full and lie before every query of the step (the scheduler's
invariant), so no causal mask applies; the result is a partial ``(out, lse)`` that merges with
the device part through ``runtime.attention.merge``. Same arithmetic as the portable tiled
backend: float32, grouped-query heads folded into rows, one key tile at a time with the online
softmax, so it runs with torch's intra-op CPU threads and bounded memory.
"""

from __future__ import annotations

import torch

from runtime.attention.torch_tiled import TorchTiledBackend


def visible_attention(
    q: torch.Tensor,
    k: torch.Tensor | list[torch.Tensor],
    v: torch.Tensor | list[torch.Tensor],
    scale: float,
    kv_tile: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, Hq, D]`` over ``k``/``v`` ``[N, Hkv, D]``, every key visible to every query.

    ``k``/``v`` may also be lists of such segments (runs of host blocks read in place, never
    concatenated). Returns float32 ``out [n, Hq, D]`` and ``lse [n, Hq]``; with no keys the rows
    are zeros with lse ``-inf`` (they merge as "saw nothing").
    """
    ks = k if isinstance(k, list) else [k]
    vs = v if isinstance(v, list) else [v]
    n, hq, d = q.shape
    hkv = ks[0].shape[1]
    group = hq // hkv
    qh = q.reshape(n, hkv, group, d).transpose(0, 1).reshape(hkv, n * group, d)
    qh = qh.to(torch.float32) * scale
    rows = n * group
    m = torch.full((hkv, rows), float("-inf"), dtype=torch.float32, device=q.device)
    l_ = torch.zeros(hkv, rows, dtype=torch.float32, device=q.device)
    acc = torch.zeros(hkv, rows, d, dtype=torch.float32, device=q.device)
    keys = 0
    for k, v in zip(ks, vs):
        keys += k.shape[0]
        for j0 in range(0, k.shape[0], kv_tile):
            kt = k[j0 : j0 + kv_tile].to(torch.float32).transpose(0, 1)  # [Hkv, N, D]
            vt = v[j0 : j0 + kv_tile].to(torch.float32).transpose(0, 1)
            TorchTiledBackend._tile_step(qh, kt, vt, None, m, l_, acc)
    out = acc if keys == 0 else acc / l_.unsqueeze(-1)
    lse = m + torch.log(l_)
    out = out.view(hkv, n, group, d).transpose(0, 1).reshape(n, hq, d)
    lse = lse.view(hkv, n, group).transpose(0, 1).reshape(n, hq)
    return out, lse
