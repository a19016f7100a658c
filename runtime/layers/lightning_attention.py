"""MiniMax-01's lightning-attention layer: fused q|k|v projection with SiLU, the lightning core
over per-sequence states (``runtime.attention.lightning``), an RMSNorm over all heads, a sigmoid
output gate and the output projection (transformers' ``MiniMaxLightningAttention``)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.attention.base import AttentionMetadata
from runtime.attention.lightning import lightning_forward
from runtime.config import ModelConfig
from runtime.layers.linear import ColumnParallelLinear, RowParallelLinear
from runtime.layers.norm import RMSNorm
from runtime.lightning_states import LightningStates
from runtime.parallel import ParallelState


def decay_slopes(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay rates for ``layer``: ALiBi-like powers of ``2^(-8/H)``, scaled
    down towards the last layer (float32, as transformers computes them)."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads, dtype=torch.float32) + 1
    factor = 1 - layer / (num_layers - 1 + 1e-5) + 1e-5
    return base**exponent * factor


class LightningAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, index: int, tp: ParallelState, dtype, device
    ) -> None:
        """``layer``: the decoder layer's number (its decay rates); ``index``: its place among
        the lightning layers (its states)."""
        super().__init__()
        self.index = index
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        inner = self.num_heads * self.head_dim
        # rows head by head, each head's q, k, v in turn (transformers' layout)
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [3 * inner], tp, ["3*num_attention_heads*head_dim"], dtype, device
        )
        self.output_gate = ColumnParallelLinear(
            cfg.hidden_size, [inner], tp, ["num_attention_heads*head_dim"], dtype, device
        )
        self.norm = RMSNorm(inner, 1e-6, dtype, device)  # transformers' default eps here
        self.out_proj = RowParallelLinear(
            inner, cfg.hidden_size, tp, "out_proj input", dtype, device
        )
        slopes = decay_slopes(self.num_heads, layer, cfg.num_hidden_layers)
        self.register_buffer("slopes", slopes.to(device), persistent=False)

    def forward(
        self, x: torch.Tensor, states: LightningStates, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        h, d = self.num_heads, self.head_dim
        qkv = nn.functional.silu(self.qkv_proj(x)).view(t, h, 3 * d)
        q, k, v = qkv.split(d, dim=-1)
        s = states.gather(self.index)
        o = lightning_forward(q, k, v, self.slopes, list(meta.query_lens_cpu), s)
        states.scatter(self.index, s)
        o = self.norm(o.reshape(t, h * d))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o)
