"""The MiniMax hybrid on a CUDA GPU, where its lightning layers run the Triton kernels
(``runtime.attention.lightning_kernels``), against transformers' model on the CPU (float32, the
same safetensors weights). Skips without a CUDA GPU; the choice itself is checked everywhere."""

from __future__ import annotations

import pytest
import torch

from runtime.attention.lightning_kernels import lightning_kernel
from scheduler.request import SamplingParams
from tests import test_minimax_vs_hf
from tests.test_minimax_vs_hf import _engine, _matches_hf, _prompt

# the same transformers checkpoint (safetensors + the model on the CPU) as the CPU tests
checkpoint = test_minimax_vs_hf.checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOGIT_ATOL = 1e-3  # float32 on two devices: different reduction orders, no TF32


def test_the_kernel_follows_the_device_and_head_size():
    assert lightning_kernel(torch.device("cpu"), 128, 128) == "torch"
    assert lightning_kernel(torch.device("cuda", 0), 128, 128) == "triton"
    assert lightning_kernel(torch.device("cuda", 0), 16, 16) == "triton"
    assert lightning_kernel(torch.device("cuda", 0), 96, 96) == "torch"  # not a power of two
    assert lightning_kernel(torch.device("cuda", 0), 8, 8) == "torch"  # below tl.dot's 16


def _cuda_engine(path, **kw):
    return _engine(path, device="cuda", **kw)


@cuda
def test_triton_lightning_layers_match_transformers(checkpoint):
    """Prompts of 1 to 150 tokens in chunks of 64 (the prefill kernel continues from a state),
    then 24 tokens by the decode kernel: every logit row and every greedy token."""
    path, hf = checkpoint
    engine = _cuda_engine(path)
    for n in (1, 17, 150):
        _matches_hf(engine, hf, _prompt(n, seed=n), atol=LOGIT_ATOL)
    engine.shutdown()


@cuda
def test_mixed_steps_give_each_sequence_its_own_tokens(checkpoint):
    """Steps that pack prefill chunks beside decode tokens (the prefill kernel over sequences
    of 1 and of many tokens): each sequence gets the tokens it gets alone."""
    path, _ = checkpoint
    engine = _cuda_engine(path, prefill_chunk=48, max_num_seqs=3)
    prompts = [_prompt(n, seed=200 + n) for n in (5, 70, 33, 120)]
    params = SamplingParams(max_new_tokens=12)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
    engine.shutdown()


@cuda
def test_decode_graphs_give_the_eager_tokens(checkpoint):
    """Decode steps replayed from CUDA graphs (lightning states bound through the static slot
    buffer, padding rows on the scratch slot, experts routed on the device) against the same
    steps run eagerly: the same greedy tokens and logits, for a batch of 3 in buckets 1-4."""
    path, _ = checkpoint
    prompts = [_prompt(n, seed=300 + n) for n in (1, 40, 90)]
    params = SamplingParams(max_new_tokens=20)
    runs = {}
    for graphs in (False, True):
        engine = _cuda_engine(path, dtype="bfloat16", attention="auto", cuda_graphs=graphs)
        worker = engine.executor.worker
        assert worker.uses_cuda_graphs == graphs
        runs[graphs] = engine.generate(prompts, params, logits="all")
        if graphs:
            assert worker.decode_graphs.captured_buckets, "no decode step replayed a graph"
        engine.shutdown()
    for eager, replayed in zip(runs[False], runs[True]):
        assert replayed.token_ids == eager.token_ids
        err = (replayed.metrics["logits"] - eager.metrics["logits"]).abs().max().item()
        assert err < 1e-2, err
