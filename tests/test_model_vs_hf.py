"""tilerun against Hugging Face transformers on the same safetensors weights (float32)."""

from __future__ import annotations

import os

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime import cpu_module
from scheduler.request import SamplingParams
from tests.hf_models import SHAPES, hf_greedy, make_hf_llama

# float32 end to end: differences come only from summation order (tiled softmax, fused
# projections); observed max |diff| is ~1e-5 on logits of magnitude ~5.
LOGIT_ATOL = 2e-4
NEW_TOKENS = 32
PREFILL_CHUNK = 64  # so the 150-token prompt takes three chunks
PROMPT_LENS = (1, 17, 113, 150)


# the fast lane keeps one shape (GQA); every shape runs in the full suite
@pytest.fixture(
    scope="module",
    params=[pytest.param(s, marks=() if s == "gqa" else pytest.mark.slow) for s in sorted(SHAPES)],
)
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_llama(d, request.param)
    return d, hf


def _engine(path, **kw) -> Engine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", attention="torch")
    cfg.update(prefill_chunk=PREFILL_CHUNK, block_size=16, max_model_len=1024)
    cfg.update(kw)
    return Engine(EngineConfig.from_dict({**cfg, "executor": "local"}))


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# auto on a CPU measures its candidates at start-up (fa2_cpu wins on the benchmark CPU)
@pytest.mark.parametrize(
    "attention",
    ["torch", "flash_cpu", "auto"]
    + (["fa2_cpu"] if cpu_module.compiler() else []),  # no compiler: test_attention_fa2_cpu
)
def test_logits_and_greedy_tokens_match_transformers(checkpoint, attention):
    path, hf = checkpoint
    vocab = hf.config.vocab_size
    engine = _engine(path, attention=attention)
    if attention == "auto":
        assert engine.device_infos[0]["attention"] in ("fa2_cpu", "flash_cpu", "torch")
        assert engine.device_infos[0]["attention_reason"].startswith("auto: fastest exact")
    prompts = [_prompt(n, vocab, seed=n) for n in PROMPT_LENS]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    for prompt in prompts:
        out = engine.generate([prompt], params, logits="all")[0]
        ours = out.metrics["logits"]  # rows: every prompt position, then each decode step
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0].float()
        assert ours.shape == ref.shape
        err = (ours - ref).abs().max().item()
        assert err < LOGIT_ATOL, f"prompt {len(prompt)}: max |logit diff| {err}"
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt {len(prompt)}"


def test_batch_of_different_lengths_equals_each_alone(checkpoint):
    path, hf = checkpoint
    engine = _engine(path, prefill_chunk=48)
    prompts = [_prompt(n, hf.config.vocab_size, seed=100 + n) for n in (5, 70, 33)]
    params = SamplingParams(max_new_tokens=12)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


def test_chunked_prefill_equals_one_shot(checkpoint):
    path, hf = checkpoint
    prompt = _prompt(150, hf.config.vocab_size, seed=7)
    params = SamplingParams(max_new_tokens=1)
    chunked = _engine(path, prefill_chunk=32).generate([prompt], params, logits="all")[0]
    whole = _engine(path, prefill_chunk=512).generate([prompt], params, logits="all")[0]
    diff = (chunked.metrics["logits"] - whole.metrics["logits"]).abs().max().item()
    assert diff < 1e-4
    assert chunked.token_ids == whole.token_ids


def test_sdpa_backend_matches_torch_backend(checkpoint):
    path, hf = checkpoint
    prompt = _prompt(40, hf.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=8)
    a = _engine(path, attention="torch").generate([prompt], params, logits="all")[0]
    b = _engine(path, attention="sdpa").generate([prompt], params, logits="all")[0]
    assert a.token_ids == b.token_ids
    assert (a.metrics["logits"] - b.metrics["logits"]).abs().max().item() < 1e-4


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="on CPU tensors the Triton kernels run only in the interpreter (GPU: test_gpu_end_to_end)",
)
@pytest.mark.slow  # the interpreter on CPU
def test_triton_backend_matches_transformers(checkpoint):
    """The real Triton kernels end to end (the interpreter on CPU): prefill in chunks, decode."""
    path, hf = checkpoint
    prompt = _prompt(37, hf.config.vocab_size, seed=11)
    out = _engine(path, attention="triton", prefill_chunk=16).generate(
        [prompt], SamplingParams(max_new_tokens=6), logits="all"
    )[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0].float()
    assert (out.metrics["logits"] - ref).abs().max().item() < LOGIT_ATOL
    assert out.token_ids == hf_greedy(hf, prompt, 6)
