"""The attention block: fused QKV projection, RoPE, KV write, backend attention, output projection."""

from __future__ import annotations

import torch
from torch import nn

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.config import ModelConfig
from runtime.layers.linear import ColumnParallelLinear, RowParallelLinear
from runtime.layers.rotary import apply_rotary
from runtime.parallel import ParallelState, shard_size


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = shard_size(cfg.num_attention_heads, tp.world_size, "num_attention_heads")
        self.num_kv_heads = shard_size(
            cfg.num_key_value_heads, tp.world_size, "num_key_value_heads"
        )
        self.scale = self.head_dim**-0.5
        q_size = cfg.num_attention_heads * self.head_dim
        kv_size = cfg.num_key_value_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [q_size, kv_size, kv_size],
            tp,
            ["num_attention_heads*head_dim", "num_key_value_heads*head_dim"] * 2,
            dtype,
            device,
        )
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, tp, "o_proj input", dtype, device)

    def weight_map(self, prefix: str) -> dict[str, tuple[nn.Parameter, int]]:
        """Checkpoint names (``prefix`` + ``q_proj.weight``, ...) -> (parameter, fused part)."""
        qkv = self.qkv_proj.weight
        return {
            prefix + "q_proj.weight": (qkv, 0),
            prefix + "k_proj.weight": (qkv, 1),
            prefix + "v_proj.weight": (qkv, 2),
            prefix + "o_proj.weight": (self.o_proj.weight, 0),
        }

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q_local = self.num_heads * self.head_dim
        kv_local = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_local, kv_local, kv_local], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)  # rope: this step's (cos, sin)
        k_cache, v_cache = kv_cache
        if meta.spill is not None:  # some KV blocks live on the host, or blocks move this step
            out = meta.spill.attention(q.contiguous(), k, v, k_cache, v_cache, backend, self.scale)
            return self.o_proj(out.reshape(t, q_local))
        backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out, _lse = backend.forward(q.contiguous(), k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, q_local))
