"""MiniMax-01's lightning-attention layer: fused q|k|v projection with SiLU, the lightning core
over per-sequence states (``runtime.attention.lightning_kernels``: Triton on CUDA, torch
elsewhere), an RMSNorm over all heads, a sigmoid output gate and the output projection
(transformers' ``MiniMaxLightningAttention``).

Under tensor parallelism a rank holds whole heads: their q|k|v and gate rows, their decay rates
and states, their columns of the output projection (row-parallel) and their slice of the norm's
weight. The norm spans all heads, so each rank's sum of squares is summed over the ranks before
it normalises its own heads."""

from __future__ import annotations

import torch
from torch import nn

from collectives.tiled_allreduce import sum_over_ranks
from runtime.attention.base import AttentionMetadata
from runtime.attention.lightning_kernels import lightning_step
from runtime.config import ModelConfig
from runtime.layers.linear import ColumnParallelLinear, Loadable, RowParallelLinear, take
from runtime.layers.norm import RMSNorm
from runtime.lightning_states import LightningStates
from runtime.parallel import ParallelState, shard_size


def decay_slopes(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay rates for ``layer``: ALiBi-like powers of ``2^(-8/H)``, scaled
    down towards the last layer (float32, as transformers computes them)."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads, dtype=torch.float32) + 1
    factor = 1 - layer / (num_layers - 1 + 1e-5) + 1e-5
    return base**exponent * factor


class HeadShardedRMSNorm(RMSNorm):
    """RMSNorm over ``total`` features of which this rank holds a contiguous slice (its heads'
    outputs): the plain RMSNorm at one rank; across ranks, the sums of squares are summed."""

    def __init__(self, total: int, eps: float, tp: ParallelState, dtype, device) -> None:
        local = shard_size(total, tp.world_size, "num_attention_heads*head_dim")
        super().__init__(local, eps, dtype, device)
        self.tp, self.total = tp, total
        self.weight.weight_loader = self._load

    def _load(self, src: Loadable, part: int = 0) -> None:
        n = self.weight.shape[0]
        self.weight.data.copy_(take(src, 0, self.tp.rank * n, (self.tp.rank + 1) * n))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.tp.world_size == 1 or residual is not None:
            return super().forward(x, residual)
        dtype = x.dtype
        xf = x.float()
        squares = sum_over_ranks(xf.pow(2).sum(-1, keepdim=True), self.tp.comm, self.tp.wait_clock)
        y = xf * squares.div_(self.total).add_(self.eps).rsqrt_()
        return y.mul_(self.weight) if dtype == torch.float32 else self.weight * y.to(dtype)


class LightningAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, index: int, tp: ParallelState, dtype, device
    ) -> None:
        """``layer``: the decoder layer's number (its decay rates); ``index``: its place among
        the lightning layers (its states)."""
        super().__init__()
        self.index = index
        world = tp.world_size
        self.num_heads = shard_size(cfg.num_attention_heads, world, "num_attention_heads")
        self.head_dim = cfg.head_dim
        inner = cfg.num_attention_heads * self.head_dim
        # rows head by head, each head's q, k, v in turn (transformers' layout)
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [3 * inner], tp, ["3*num_attention_heads*head_dim"], dtype, device
        )
        self.output_gate = ColumnParallelLinear(
            cfg.hidden_size, [inner], tp, ["num_attention_heads*head_dim"], dtype, device
        )
        self.norm = HeadShardedRMSNorm(inner, 1e-6, tp, dtype, device)  # transformers' eps
        self.out_proj = RowParallelLinear(
            inner, cfg.hidden_size, tp, "out_proj input", dtype, device
        )
        slopes = decay_slopes(cfg.num_attention_heads, layer, cfg.num_hidden_layers)
        mine = slopes[tp.rank * self.num_heads : (tp.rank + 1) * self.num_heads]
        self.register_buffer("slopes", mine.to(device), persistent=False)

    def forward(
        self, x: torch.Tensor, states: LightningStates, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        h, d = self.num_heads, self.head_dim
        qkv = nn.functional.silu(self.qkv_proj(x)).view(t, h, 3 * d)
        q, k, v = qkv.split(d, dim=-1)
        s = states.gather(self.index)
        o = lightning_step(q, k, v, self.slopes, list(meta.query_lens_cpu), s)
        states.scatter(self.index, s)
        o = self.norm(o.reshape(t, h * d))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o)
