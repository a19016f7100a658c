"""What every decoder here shares: float32 logits from the LM head, and the embedding, final
norm and LM head entries of the checkpoint name map."""

from __future__ import annotations

import torch
from torch import nn


class CausalLM(nn.Module):
    """A decoder with ``embed_tokens``, ``norm``, ``lm_head`` and ``config`` attributes."""

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits for the given hidden rows, on every rank."""
        return self.lm_head(hidden).float()

    def outer_weight_map(self) -> dict[str, tuple[nn.Parameter, int]]:
        """The checkpoint names of the embedding, the final norm and (untied) the LM head."""
        m = {
            "model.embed_tokens.weight": (self.embed_tokens.weight, 0),
            "model.norm.weight": (self.norm.weight, 0),
        }
        if not self.config.tie_word_embeddings:
            m["lm_head.weight"] = (self.lm_head.weight, 0)
        return m
