"""The mixture-of-experts MLP's sync-free routing (what CUDA decode steps and CUDA graphs run)
against its loop over picked experts (transformers' order), on the CPU in float64: both the
gathered-weights form (fewer token-expert pairs than experts) and the every-expert form; and
what each rank computes under expert parallelism."""

from __future__ import annotations

import pytest
import torch

from collectives.base import Communicator, SingleRankCommunicator
from runtime.config import ModelConfig
from runtime.layers.moe import SparseMoE
from runtime.parallel import ParallelState


def whole_config(experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(
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


def _moe(experts: int, top_k: int) -> SparseMoE:
    moe = SparseMoE(
        whole_config(experts, top_k), ParallelState(), torch.float64, torch.device("cpu")
    )
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


class _RankOfTwo(SingleRankCommunicator):
    """Rank ``r`` of a pretend group of two whose sums are left to the test (each rank's
    partial output comes back as is), to check what each rank computes."""

    def __init__(self, r: int) -> None:
        Communicator.__init__(self, r, 2)


@pytest.mark.parametrize("tokens", [1, 5])
def test_expert_parallel_ranks_sum_to_the_whole(tokens):
    """Expert parallelism over two ranks: each holds a contiguous half of the experts whole;
    the two ranks' partial outputs, by the loop and by device routing (both forms), add up to
    the single-rank layer's."""
    whole = _moe(8, 2)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g, dtype=torch.float64)
    want = whole(x)
    probs = torch.softmax(torch.nn.functional.linear(x, whole.gate).float(), dim=-1)
    weights, picked = torch.topk(probs, 2, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    looped, routed = [], []
    for r in range(2):
        tp = ParallelState(comm=_RankOfTwo(r), expert_parallel=True)
        part = SparseMoE(whole_config(8, 2), tp, torch.float64, torch.device("cpu"))
        assert part.gate_up.shape[0] == 4 and part.first == 4 * r
        assert [e for e in range(8) if part.holds(e)] == list(range(4 * r, 4 * r + 4))
        part.gate.data.copy_(whole.gate)
        part.gate_up.data.copy_(whole.gate_up[4 * r : 4 * r + 4])
        part.down.data.copy_(whole.down[4 * r : 4 * r + 4])
        looped.append(part(x))
        routed.append(part.route_on_device(x, weights, picked))
    torch.testing.assert_close(looped[0] + looped[1], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(routed[0] + routed[1], want, rtol=1e-12, atol=1e-12)
