"""Vocabulary-parallel embedding and LM head: each rank owns a contiguous slice of the vocabulary.

The vocabulary is padded up to a multiple of the TP size so any vocabulary size shards; padded
rows are zero in the embedding and cut from the gathered logits.
"""

from __future__ import annotations

import torch
from torch import nn

from collectives.tiled_allreduce import sum_over_ranks
from runtime.layers.linear import Loadable, take
from runtime.parallel import ParallelState


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: ParallelState,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.per_rank
        self.stop = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(self.per_rank, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.load_part

    def load_part(self, src: Loadable, part: int = 0) -> None:
        n = self.stop - self.start
        if n > 0:
            self.weight.data[:n].copy_(take(src, 0, self.start, self.stop))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = nn.functional.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        # Exactly one rank contributes each row, so the sum is exact.
        return sum_over_ranks(out, self.tp.comm, self.tp.wait_clock)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocabulary slice, gathered to the full vocabulary on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = nn.functional.linear(hidden, self.weight)
        if self.tp.world_size > 1:
            logits = self.tp.comm.all_gather(logits.contiguous(), dim=-1)
        return logits[..., : self.vocab_size]
