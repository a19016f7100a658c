"""One worker step's tail: the LM head runs once per step, and whichever logits a caller asks
for (none, the sampled rows, all rows) the same rows are sampled into the same tokens."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from scheduler.request import SamplingParams

PROMPTS = [[5, 9, 2, 7, 11, 3, 8], [4, 4, 1], list(range(20, 41))]


@pytest.fixture(scope="module")
def engine():
    # prefill_chunk 8: the 21-token prompt takes three chunks, mixed with other prompts' decodes
    cfg = EngineConfig.from_dict(dict(
        model="tiny", device="cpu", dtype="float32", attention="torch", prefill_chunk=8,
        max_model_len=64, max_num_seqs=4, executor="local",
    ))  # fmt: skip
    e = Engine(cfg)
    yield e
    e.shutdown()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logits_modes_sample_the_same_rows(engine, temperature):
    news = [6, 4, 5]
    params = [SamplingParams(max_new_tokens=n, temperature=temperature, seed=7) for n in news]
    plain = engine.generate(PROMPTS, params)
    sampled = engine.generate(PROMPTS, params, logits="sampled")
    every = engine.generate(PROMPTS, params, logits="all")
    for p, n, a, b, c in zip(PROMPTS, news, plain, sampled, every):
        assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) == n
        rows = c.metrics["logits"]  # every prompt position, then each fed-back token
        assert rows.shape[0] == len(p) + n - 1
        picked = b.metrics["logits"].view(n, -1)  # the row each token was sampled from
        torch.testing.assert_close(picked, rows[len(p) - 1 :], rtol=1e-5, atol=1e-5)
        if temperature == 0:
            assert picked.argmax(-1).tolist() == a.token_ids


def test_start_up_objects_are_frozen_out_of_the_collectors_full_passes():
    """After bring-up the driver's and the worker's start-up objects sit in the permanent
    generation (runtime/gc_freeze.py): a full collection no longer walks ~200K of them."""
    import gc

    from cluster.config import EngineConfig
    from cluster.engine import Engine

    gc.unfreeze()  # whatever earlier tests froze goes back to the collected generations
    assert gc.get_freeze_count() == 0
    engine = Engine(EngineConfig.from_dict(dict(
        model="tiny", device="cpu", executor="local", kv_host_tokens=0,
    )))  # fmt: skip
    try:
        assert gc.get_freeze_count() > 1000
        tracked = len(gc.get_objects())  # objects a full pass would still walk
        assert tracked < gc.get_freeze_count()
    finally:
        engine.shutdown()
    # shut down, nothing stays frozen: the engine's cycles are collectable again
    assert gc.get_freeze_count() == 0
