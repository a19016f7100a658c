"""The host weight tier on a CUDA GPU: layers in page-locked host memory, two device slots
filled on a side stream, against every weight resident. Skips without a CUDA GPU (the ring's
logic also runs on the CPU device in ``test_weight_tier.py``, a thread copying)."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from scheduler.request import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LAYER = 2_820_096 // 2  # one demo-small decoder layer in bfloat16


def _engine(**kw) -> Engine:
    cfg = dict(model="demo-small", device="cuda", dtype="bfloat16", executor="local")
    cfg.update(prefill_chunk=64, block_size=16, max_model_len=512, kv_cache_tokens=4096)
    cfg.update(kw)
    return Engine(EngineConfig.from_dict(cfg))


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (n,), generator=g).tolist()


@pytest.mark.parametrize("layers, streamed", [(1.5, (0, 1, 2, 3)), (0.9, (0, 2, 3))])
def test_host_tier_gives_the_resident_tokens_and_logits(layers, streamed):
    prompts = [_prompt(150, 1), _prompt(7, 2), _prompt(64, 3)]
    params = SamplingParams(max_new_tokens=24)
    base = _engine(cuda_graphs=False)  # both eager: the same kernels on the same bytes
    want = base.generate(prompts, params, logits="all")
    base.shutdown()
    engine = _engine(offload_weights_gib=layers * LAYER / 2**30)
    worker = engine.executor.worker
    assert worker.weight_streamer.streamed == streamed
    assert worker.weight_streamer.tier == "host" and not worker.uses_cuda_graphs
    got = engine.generate(prompts, params, logits="all")
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert torch.equal(g.metrics["logits"], w.metrics["logits"])
    stats = worker.memory_stats()["weight_tier"]
    assert stats["out_of_order_fetches"] == 0 and stats["fetches"] > len(streamed)
    engine.shutdown()


def test_offloaded_layers_leave_device_memory():
    def weights_and_slots(**kw) -> tuple[int, Engine]:
        # each engine's own allocations (a process-wide count would also see what the last
        # engine left behind), less its KV cache; eager, so no graph pool is counted
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        engine = _engine(cuda_graphs=False, **kw)
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - before - engine.executor.worker.kv.nbytes
        return used, engine

    used_all, resident = weights_and_slots()
    resident.shutdown()
    del resident
    used, engine = weights_and_slots(offload_weights_gib=1.5 * LAYER / 2**30)
    assert engine.executor.worker.weight_streamer.streamed == (0, 1, 2, 3)
    # 4 layers streamed through 2 slots: 2 layers' bytes freed
    freed = used_all - used
    assert freed >= 2 * LAYER - 64 * 1024, (used_all, used, freed, 2 * LAYER)
    engine.shutdown()
