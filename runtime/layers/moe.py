"""A mixture-of-experts MLP (Mixtral / MiniMax-01): a softmax router picks each token's top-k
experts, their SwiGLU outputs are summed with the renormalised router weights.

Experts run one after another on the tokens routed to them (gathered rows), in expert order, as
transformers' reference loop does, so sums happen in the same order. Under tensor parallelism
every rank holds every expert's slice of the intermediate size (its gate/up rows, its down
columns), or with ``expert_parallel`` a contiguous 1/N of the experts whole; every rank routes
the same way (the router is whole on every rank), runs what it holds for the tokens routed
there, and the partial outputs are summed over the ranks once per layer either way.

On CUDA a step of at most ``SYNC_FREE_ROWS`` tokens (decode), and any step a CUDA graph
captures, routes without reading anything back to the host, so a graph can hold it: the loop
above asks the host which experts were picked (``torch.unique``, ``torch.where``), a stall per
layer that made an eager MiniMax decode step host-bound on an H200 (a 1.7B-parameter, 8-layer
model: 12 ms a token, 1.7 of it on the GPU)."""

from __future__ import annotations

import torch
from torch import nn

from collectives.tiled_allreduce import sum_over_ranks
from runtime.config import ModelConfig
from runtime.layers.expert_gemv import expert_gemv, expert_gemv_enabled
from runtime.layers.linear import Loadable, take
from runtime.parallel import ParallelState, shard_size

# Steps this small (decode) route on the device alone. Products of so few rows are bound by
# reading the weights, so the form that runs every expert on every row (route_on_device) costs
# about what reading the experts costs; on a few hundred rows it would be E/k times the
# arithmetic. Captured steps route on the device at any size (a larger bucket's graph does the
# extra arithmetic; not measured).
SYNC_FREE_ROWS = 32


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        h = cfg.hidden_size
        if tp.expert_parallel:  # whole experts, a contiguous block of them per rank
            e = shard_size(cfg.num_local_experts, tp.world_size, "num_local_experts")
            i = cfg.intermediate_size
            self.first = tp.rank * e
        else:  # every expert, a slice of each
            e = cfg.num_local_experts
            i = shard_size(cfg.intermediate_size, tp.world_size, "intermediate_size")
            self.first = 0
        self.tp = tp
        self.num_experts = cfg.num_local_experts  # the router's, over all ranks
        self.top_k = cfg.num_experts_per_tok
        self.intermediate = i  # of each expert this rank holds
        self.gate = nn.Parameter(
            torch.empty(self.num_experts, h, dtype=dtype, device=device), requires_grad=False
        )
        # expert e's gate (w1) and up (w3) rows stacked, and its down projection (w2)
        self.gate_up = nn.Parameter(
            torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False
        )
        self.down = nn.Parameter(
            torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False
        )
        self.gate_up.weight_loader = self._load_gate_up
        self.down.weight_loader = self._load_down

    def holds(self, expert: int) -> bool:
        """Whether this rank holds (a slice of) ``expert``: all of them unless expert-parallel."""
        return 0 <= expert - self.first < self.gate_up.shape[0]

    def _slice(self) -> int:
        """Where this rank's part of an expert's intermediate size starts."""
        return 0 if self.tp.expert_parallel else self.tp.rank * self.intermediate

    def _load_gate_up(self, src: Loadable, part: int = 0) -> None:
        """``part`` = 2 * expert + (0 for w1, the gate; 1 for w3, the up projection)."""
        e, which = divmod(part, 2)
        i, start = self.intermediate, self._slice()
        rows = self.gate_up.data[e - self.first, which * i : (which + 1) * i]
        rows.copy_(take(src, 0, start, start + i))

    def _load_down(self, src: Loadable, part: int = 0) -> None:
        start = self._slice()
        self.down.data[part - self.first].copy_(take(src, 1, start, start + self.intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(nn.functional.linear(x, self.gate).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        # (asked only on CUDA: a CPU-only torch cannot answer whether a stream is capturing)
        on_device = x.device.type == "cuda" and (
            x.shape[0] <= SYNC_FREE_ROWS or torch.cuda.is_current_stream_capturing()
        )
        if on_device:
            out = self.route_on_device(x, weights, experts)
        else:
            out = torch.zeros_like(x)
            for e in torch.unique(experts).tolist():
                if not self.holds(e):
                    continue  # another rank's expert: its output comes in the sum below
                token, slot = torch.where(experts == e)
                here = e - self.first
                gate, up = nn.functional.linear(x[token], self.gate_up[here]).chunk(2, dim=-1)
                y = nn.functional.linear(nn.functional.silu(gate) * up, self.down[here])
                out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return sum_over_ranks(out, self.tp.comm, self.tp.wait_clock)

    def route_on_device(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        gemv: bool | None = None,
        every: bool | None = None,
    ) -> torch.Tensor:
        """The experts' weighted sum with no host sync. With fewer (token, expert) pairs than
        experts (a small decode batch) each pair's products read only its expert's weights;
        otherwise every expert runs on every token, weighted 0 where it was not picked (a large
        batch reads every expert anyway). Each token's terms are added in expert order, in the
        model dtype, as the loop adds them.

        The pairs' products run as batched products over a gathered copy of the weights (read,
        written, read back), or in ``expert_gemv`` (each picked expert's weights read once,
        where they lie) where it is enabled (``gemv=None``: ``expert_gemv_enabled``).
        ``every`` forces the every-expert form (True) or the picked one (False), for
        benchmarks."""
        n, k = experts.shape
        num_experts = self.gate_up.shape[0]  # this rank's
        if every is None:
            every = n * k >= num_experts
        if gemv is None:
            gemv = expert_gemv_enabled(x)
        if not every:
            experts, order = experts.sort(dim=-1)
            weights = weights.gather(1, order)
            here = experts - self.first
            held = (here >= 0) & (here < num_experts)
            weights = weights * held  # another rank's expert adds nothing here
            flat = here.clamp(0, num_experts - 1).reshape(-1)
            if gemv:
                pairs = torch.arange(n * k, device=x.device)
                gate_up = expert_gemv(x, self.gate_up, flat, pairs // k)
                gate, up = gate_up.chunk(2, dim=-1)
                act = (nn.functional.silu(gate) * up).contiguous()
                y = expert_gemv(act, self.down, flat, pairs).view(n, k, -1)
            else:
                xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [n*k, hidden, 1]
                gate, up = torch.bmm(self.gate_up[flat], xs).squeeze(-1).chunk(2, dim=-1)
                act = (nn.functional.silu(gate) * up).unsqueeze(-1)
                y = torch.bmm(self.down[flat], act).view(n, k, -1)
            terms = (y * weights.unsqueeze(-1)).to(x.dtype)
            out = terms[:, 0]
            for j in range(1, k):
                out = out + terms[:, j]
            return out
        out = torch.zeros_like(x)
        for e in range(num_experts):
            picked = experts == self.first + e
            w = (weights * picked).sum(dim=-1, keepdim=True)  # 0: not picked
            gate, up = nn.functional.linear(x, self.gate_up[e]).chunk(2, dim=-1)
            y = nn.functional.linear(nn.functional.silu(gate) * up, self.down[e])
            out += (y * w).to(out.dtype)
        return out
