"""On a CUDA GPU: greedy tokens with the Triton, portable, SDPA and efficient_cuda backends equal
transformers' on the same checkpoint (skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from scheduler.request import SamplingParams
from tests.hf_models import hf_greedy, make_hf_llama

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

NEW = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):

    d = tmp_path_factory.mktemp("gpu_ckpt")
    # head_dim 64: a size the Triton kernels are built for
    hf = make_hf_llama(d, "gqa", hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    return d, hf.cuda()


@pytest.mark.parametrize("attention", ["triton", "torch", "sdpa", "efficient_cuda"])
@pytest.mark.parametrize("prompt_len", [1, 17, 113, 1500])
def test_backends_match_transformers_on_gpu(checkpoint, attention, prompt_len):
    path, hf = checkpoint
    prompt = torch.randint(
        0, 384, (prompt_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    cfg = EngineConfig.from_dict(
        dict(
            model=str(path),
            device="cuda",
            dtype="float32",
            attention=attention,
            prefill_chunk=512,
            max_model_len=2048,
            kv_cache_tokens=4096,
            executor="local",
        )
    )
    engine = Engine(cfg)
    try:
        out = engine.generate([prompt], SamplingParams(max_new_tokens=NEW))[0]
    finally:
        engine.shutdown()
    assert out.token_ids == hf_greedy(hf, prompt, NEW)
