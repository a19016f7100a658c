"""The time a rank's step waits on AllReduce (``collectives.wait_clock``), over real gloo
processes: a rank held back by its peer sees the wait, plain and tiled; a group of one never
waits; the worker reports it per step and the engine and the service carry it on."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from collectives.base import SingleRankCommunicator
from collectives.factory import create_communicator, open_rendezvous
from collectives.tiled_allreduce import linear_all_reduce
from collectives.wait_clock import WaitClock

LAG_S = 0.3


def _rank_main(rank: int, rendezvous: dict) -> None:
    torch.set_num_threads(1)
    comm = create_communicator("gloo", rank, 2, rendezvous, "cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 32, generator=g)
        w = torch.randn(16, 32, generator=g)
        full = x @ w.T
        shard = slice(16 * rank, 16 * (rank + 1))
        for tiles in (1, 4):
            clock = WaitClock()
            comm.barrier()
            if rank == 1:
                time.sleep(LAG_S)  # rank 0's collective cannot finish before rank 1 joins it
            y = linear_all_reduce(x[:, shard], w[:, shard], comm, tiles, clock=clock)
            torch.testing.assert_close(y, full)
            waited = clock.seconds()
            if rank == 0:
                assert waited >= 0.8 * LAG_S, (tiles, waited)
            else:
                assert 0 < waited < 0.8 * LAG_S, (tiles, waited)
            clock.reset()
            assert clock.seconds() == 0
    finally:
        comm.close()


@pytest.mark.timeout(120)
def test_a_rank_held_back_by_its_peer_waits_plain_and_tiled():
    rendezvous = dict(open_rendezvous("gloo"), timeout_s=60)
    mp.spawn(_rank_main, args=(rendezvous,), nprocs=2, join=True)


def test_a_group_of_one_never_waits():
    clock = WaitClock()
    x, w = torch.randn(8, 4), torch.randn(3, 4)
    y = linear_all_reduce(x, w, SingleRankCommunicator(), 4, clock=clock)
    torch.testing.assert_close(y, x @ w.T)
    assert clock.seconds() == 0


@pytest.mark.ray
@pytest.mark.slow
def test_tp2_steps_report_allreduce_wait_to_the_engine_and_the_service(ray_cluster, tmp_path):
    """TP=2 over gloo with overlap off: every step's AllReduce is exposed, so the engine's
    metrics and the service's counters (what Ray's metrics and the status page read) are > 0;
    at TP=1 they are 0."""
    from cluster import LLM, SamplingParams
    from cluster.service.loop import ServiceLoop
    from cluster.service.spec import ServiceSpec, sampling_dict

    cfg = dict(model="tiny", device="cpu", dtype="float32", max_model_len=128, overlap=False)
    prompt = list(range(1, 40))
    params = SamplingParams(max_new_tokens=4)
    with LLM(executor="local", **cfg) as llm:
        assert llm.engine.generate([prompt], params)[0].metrics["allreduce_exposed_s"] == 0
    spec = ServiceSpec.from_dict({**cfg, "tp": 2, "comm": "gloo"})
    loop = ServiceLoop(spec, tmp_path)
    try:
        loop._build()
        out = loop.engine.generate([prompt], params)[0]
        assert out.metrics["allreduce_exposed_s"] > 0
        assert out.metrics["kv"]["allreduce_exposed_s"] == out.metrics["allreduce_exposed_s"]
        assert loop.snapshot()["counters"]["allreduce_exposed_s"] == 0  # not a service step yet
        task = loop.store.add(prompt, sampling_dict(params))
        deadline = time.monotonic() + 120
        while loop.store.get(task).state != "done":
            assert time.monotonic() < deadline
            loop._turn()
        assert loop.snapshot()["counters"]["allreduce_exposed_s"] > 0
    finally:
        if loop.engine is not None:
            loop.engine.shutdown()
