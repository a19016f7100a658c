"""The overlapped step loop with real workers: the same tokens with ``overlap_schedule`` on and
off, in process and through Ray actors (TP 1 and 2 over gloo), with chunked prefill, batched
requests of different lengths finishing at different steps, a stop token mid-batch, seeded
temperature sampling, and a small KV pool with spill and preemption; a rank killed mid-run is
still named within seconds."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster import LLM, SamplingParams
from cluster.executor import WorkerDiedError
from tests.test_spill_end_to_end import PLAIN, SPILL, _prompt

pytestmark = pytest.mark.slow

PROMPTS = [list(range(1, 60)), [5, 6, 7], list(range(40, 57)), list(range(3, 36))]
NEWS = [10, 4, 7, 12]  # different lengths: they finish at different steps


def _cfg(path, **kw):
    cfg = dict(model=str(path), device="cpu", dtype="float32", max_model_len=512)
    cfg.update(prefill_chunk=16, max_num_seqs=4)  # prompts of 59 and 33 tokens take chunks
    cfg.update(kw)
    return cfg


def _both(path, prompts, params, logits="none", **kw):
    """Outputs with overlap off, then on, from one config."""
    outs = []
    for overlap in (False, True):
        with LLM(**_cfg(path, overlap_schedule=overlap, **kw)) as llm:
            assert llm.engine.steps.overlap is overlap
            outs.append(llm.engine.generate(prompts, params, logits=logits))
    return outs


def _greedy(news=NEWS, **kw):
    return [SamplingParams(max_new_tokens=n, **kw) for n in news]


def test_local_greedy_batched_chunked_identical(hf_checkpoint):
    path, _ = hf_checkpoint
    off, on = _both(path, PROMPTS, _greedy(), logits="all", executor="local")
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [len(o.token_ids) for o in on] == NEWS
    for a, b in zip(off, on):  # every row's logits: the same computation, the same rows
        assert a.metrics["logits"].shape == b.metrics["logits"].shape
        assert (a.metrics["logits"] - b.metrics["logits"]).abs().max().item() == 0.0


def test_stop_token_mid_batch_and_seeded_sampling(hf_checkpoint):
    """A stop token ends one request while the others run on; the step already sent for it is
    discarded (no token, no logits row). Temperature/top-p requests with seeds, mixed with
    greedy ones in the same steps, sample the same tokens either way."""
    path, _ = hf_checkpoint
    with LLM(**_cfg(path, overlap_schedule=False, executor="local")) as llm:
        probe = llm.engine.generate(PROMPTS[:1], _greedy([10]))[0].token_ids
    stop = probe[2]
    first = probe.index(stop) + 1  # the request stops at the first occurrence
    params = _greedy()
    params[0] = SamplingParams(max_new_tokens=10, stop_token_ids=(stop,))
    params[2] = SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=123)
    params[3] = SamplingParams(max_new_tokens=12, temperature=1.2, seed=7)
    off, on = _both(path, PROMPTS, params, logits="all", executor="local")
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert on[0].token_ids == probe[:first] and on[0].finish_reason == "stop"
    assert [o.finish_reason for o in on[1:]] == ["length"] * 3
    for a, b in zip(off, on):
        assert a.metrics["logits"].shape == b.metrics["logits"].shape
    # the seeds matter: another seed gives other tokens
    with LLM(**_cfg(path, executor="local")) as llm:
        other = llm.engine.generate(
            [PROMPTS[3]], SamplingParams(max_new_tokens=12, temperature=1.2, seed=8)
        )[0]
    assert other.token_ids != on[3].token_ids


def test_spill_with_preemption_identical(tmp_path_factory):
    """Six decoding tasks over four device blocks: tasks are paused to the host and resumed;
    overlap on and off give the tokens of each task alone with everything on the device."""
    from tests.hf_models import make_hf_llama

    d = tmp_path_factory.mktemp("hf_overlap_spill")
    hf = make_hf_llama(d, "gqa", max_position_embeddings=1024)
    prompts = [_prompt(20 + 7 * i, hf.config.vocab_size, seed=50 + i) for i in range(6)]
    base = dict(model=str(d), device="cpu", dtype="float32", attention="torch", executor="local")
    base.update(prefill_chunk=64, max_model_len=512, max_num_seqs=6)
    params = SamplingParams(max_new_tokens=24)
    with LLM(**base, **PLAIN) as llm:
        alone = [llm.engine.generate([p], params)[0].token_ids for p in prompts]
    for overlap in (False, True):
        with LLM(**base, **dict(SPILL, kv_cache_tokens=64), overlap_schedule=overlap) as llm:
            outs = llm.engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == alone, f"overlap={overlap}"
        kv = outs[0].metrics["kv"]
        assert kv["preemptions"] >= 1 and kv["blocks_spilled"] > 0


@pytest.mark.ray
@pytest.mark.parametrize("tp", [1, 2])
def test_ray_tp_identical_to_local(ray_cluster, hf_checkpoint, tp):
    path, _ = hf_checkpoint
    params = _greedy()
    params[1] = SamplingParams(max_new_tokens=4, temperature=0.9, seed=3)
    with LLM(**_cfg(path, executor="local", overlap_schedule=False)) as llm:
        want = [o.token_ids for o in llm.engine.generate(PROMPTS, params)]
    off, on = _both(path, PROMPTS, params, executor="ray", tp=tp, comm="gloo")
    assert [o.token_ids for o in off] == want
    assert [o.token_ids for o in on] == want


@pytest.mark.ray
@pytest.mark.parametrize("rank", [0, 1])
def test_rank_killed_mid_run_is_named_within_seconds(ray_cluster, hf_checkpoint, rank):
    import ray

    path, _ = hf_checkpoint
    llm = LLM(**_cfg(path, executor="ray", tp=2, comm="gloo", overlap_schedule=True))
    pids = ray.get([w.pid.remote() for w in llm.engine.executor.workers])
    killed: list[float] = []

    def kill_at_step_5(p) -> None:
        if p.step == 5 and not killed:
            assert llm.engine.steps.in_flight == 1  # the next step is already on the workers
            os.kill(pids[rank], signal.SIGKILL)
            killed.append(time.monotonic())

    try:
        with pytest.raises(WorkerDiedError, match=rf"worker rank {rank} on cpu .* died"):
            llm.engine.generate(PROMPTS, _greedy([200] * 4), on_progress=kill_at_step_5)
        took = time.monotonic() - killed[0]
    finally:
        llm.shutdown()
    assert took < 20, f"the death was named after {took:.1f} s"
