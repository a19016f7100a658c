"""Multi-node placement on one machine: two raylets (``ray.cluster_utils.Cluster``), each with its
own CPUs; TP=4 over gloo spans both and gives TP=1's greedy tokens."""

from __future__ import annotations

import pytest

from cluster import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, prefill_chunk=16)


def test_tp4_across_two_simulated_nodes_matches_tp1(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from cluster import LLM
    from tests.hf_models import make_hf_llama

    make_hf_llama(tmp_path, "mha")  # 4 KV heads: one per rank at TP=4
    engine = {**ENGINE, "model": str(tmp_path)}

    prompts = [list(range(1, 50)), [7, 3, 9]]
    params = SamplingParams(max_new_tokens=8)
    with LLM(executor="local", **engine) as one:
        want = [o.token_ids for o in one.generate(prompts, params)]

    if ray.is_initialized():  # this test needs its own two-node cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        with LLM(tp=4, comm="gloo", ray_address=cluster.address, **engine) as four:
            got = [o.token_ids for o in four.generate(prompts, params)]
            where = ray.get([w.where.remote() for w in four.engine.executor.workers])
        nodes = [w["node"] for w in where]
        # two ranks per node (PACK fills a node, then the next), contiguous ranks per node
        assert len(set(nodes)) == 2 and nodes[0] == nodes[1] and nodes[2] == nodes[3]
        assert got == want
    finally:
        ray.shutdown()
        cluster.shutdown()
