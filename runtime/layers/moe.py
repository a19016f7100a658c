"""A mixture-of-experts MLP (Mixtral / MiniMax-01): a softmax router picks each token's top-k
experts, their SwiGLU outputs are summed with the renormalised router weights.

Experts run one after another on the tokens routed to them (gathered rows), in expert order, as
transformers' reference loop does, so sums happen in the same order. Under tensor parallelism
every rank holds every expert's slice of the intermediate size (its gate/up rows, its down
columns), routes the same way (the router is whole on every rank), and the partial outputs are
summed over the ranks once per layer."""

from __future__ import annotations

import torch
from torch import nn

from collectives.tiled_allreduce import sum_over_ranks
from runtime.config import ModelConfig
from runtime.layers.linear import Loadable, take
from runtime.parallel import ParallelState, shard_size


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        e, h = cfg.num_local_experts, cfg.hidden_size
        i = shard_size(cfg.intermediate_size, tp.world_size, "intermediate_size")
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.intermediate = i  # this rank's slice of each expert
        self.gate = nn.Parameter(torch.empty(e, h, dtype=dtype, device=device), requires_grad=False)
        # expert e's gate (w1) and up (w3) rows stacked, and its down projection (w2)
        self.gate_up = nn.Parameter(
            torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False
        )
        self.down = nn.Parameter(
            torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False
        )
        self.gate_up.weight_loader = self._load_gate_up
        self.down.weight_loader = self._load_down

    def _load_gate_up(self, src: Loadable, part: int = 0) -> None:
        """``part`` = 2 * expert + (0 for w1, the gate; 1 for w3, the up projection)."""
        e, which = divmod(part, 2)
        i = self.intermediate
        start = self.tp.rank * i
        self.gate_up.data[e, which * i : (which + 1) * i].copy_(take(src, 0, start, start + i))

    def _load_down(self, src: Loadable, part: int = 0) -> None:
        start = self.tp.rank * self.intermediate
        self.down.data[part].copy_(take(src, 1, start, start + self.intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(nn.functional.linear(x, self.gate).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)
            gate, up = nn.functional.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            y = nn.functional.linear(nn.functional.silu(gate) * up, self.down[e])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return sum_over_ranks(out, self.tp.comm, self.tp.wait_clock)
