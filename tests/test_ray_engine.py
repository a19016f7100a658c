"""The Ray path for real: a local Ray cluster, worker actors, tasks through them."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from cluster.executor import ClusterCapacityError, WorkerDiedError
from scheduler.errors import CapacityError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(path, **kw):
    return dict(model=str(path), device="cpu", dtype="float32", max_model_len=512, **kw)


def test_task_through_ray_actor_matches_local_worker(ray_cluster, hf_checkpoint):
    path, _ = hf_checkpoint
    prompts = [list(range(1, 60)), [5, 6, 7]]
    params = SamplingParams(max_new_tokens=10)
    with LLM(executor="local", **_cfg(path, prefill_chunk=32)) as local:
        want = [o.token_ids for o in local.generate(prompts, params)]
    with LLM(executor="ray", **_cfg(path, prefill_chunk=32)) as remote:
        got = remote.generate(prompts, params)
        assert remote.engine.device_infos[0]["device"] == "cpu"
    assert [o.token_ids for o in got] == want
    assert got[0].metrics["ttft_s"] > 0 and got[0].metrics["peak_memory_bytes"] > 0


def _assert_dead(ray, actor) -> None:
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ping.remote(), timeout=30)


def test_shutdown_frees_actors_and_placement_group(ray_cluster, hf_checkpoint):
    import ray
    from ray.util import placement_group_table

    path, _ = hf_checkpoint
    llm = LLM(executor="ray", **_cfg(path))
    workers = list(llm.engine.executor.workers)
    assert ray.get(workers[0].ping.remote()) == 0
    pg_id = llm.engine.executor.pg.id.hex()
    llm.shutdown()
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
    for w in workers:
        _assert_dead(ray, w)


def test_request_too_large_for_cluster_fails_fast_and_leaves_nothing(ray_cluster, tmp_path):
    import json

    from ray.util import placement_group_table

    # a model that tp=64 divides (the preflight refuses one it does not), config only: the
    # placement fails before any weight is read
    path = tmp_path / "wide"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 64, "num_key_value_heads": 64}
        )
    )  # fmt: skip
    with pytest.raises(ClusterCapacityError) as e:
        LLM(executor="ray", **_cfg(path, tp=64, placement_timeout_s=3))
    msg = str(e.value)
    assert "tp=64" in msg and "Fix" in msg and "CPU" in msg
    assert "--device cpu" not in msg  # it is on cpu already
    # no placement group is left holding resources
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_capacity_error_names_limit_before_work(ray_cluster, hf_checkpoint):
    path, _ = hf_checkpoint
    with LLM(executor="ray", **_cfg(path)) as llm:
        with pytest.raises(CapacityError, match=r"max_model_len=512 by 88 tokens"):
            llm.generate([[1] * 500], SamplingParams(max_new_tokens=100))
        # the engine is still usable afterwards: nothing was lost
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2


def test_dead_worker_is_reported_with_rank_and_device(ray_cluster, hf_checkpoint):
    import ray

    path, _ = hf_checkpoint
    llm = LLM(executor="ray", **_cfg(path))
    try:
        ray.kill(llm.engine.executor.workers[0], no_restart=True)
        with pytest.raises(WorkerDiedError, match=r"rank 0 on cpu"):
            llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
    finally:
        llm.shutdown()
