"""The mixture-of-experts MLP's sync-free routing (what CUDA decode steps and CUDA graphs run)
against its loop over picked experts (transformers' order), on the CPU in float64: both the
gathered-weights form (fewer token-expert pairs than experts) and the every-expert form."""

from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig
from runtime.layers.moe import SparseMoE
from runtime.parallel import ParallelState


def _moe(experts: int, top_k: int) -> SparseMoE:
    cfg = ModelConfig(
        model_type="minimax",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        layer_types=("linear_attention", "full_attention"),
    )
    moe = SparseMoE(cfg, ParallelState(), torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(experts * 10 + top_k)
    for p in (moe.gate, moe.gate_up, moe.down):
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return moe


# (experts, top_k, tokens): 2, 6 and 3 pairs gather the picked experts' weights; 8 and 10
# pairs (as many as experts, or more) run every expert
FORMS = [(8, 2, 1), (8, 2, 3), (6, 3, 1), (8, 2, 4), (4, 2, 5)]


@pytest.mark.parametrize("experts, top_k, tokens", FORMS)
def test_device_routing_equals_the_loop(experts, top_k, tokens):
    moe = _moe(experts, top_k)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g, dtype=torch.float64)
    looped = moe(x)  # the CPU takes the loop
    probs = torch.softmax(torch.nn.functional.linear(x, moe.gate).float(), dim=-1)
    weights, picked = torch.topk(probs, top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    routed = moe.route_on_device(x, weights, picked)
    torch.testing.assert_close(routed, looped, rtol=1e-12, atol=1e-12)
