"""The torch.distributed communicator over gloo, in 2 and 3 real spawned processes.

Each rank runs ``collectives.selfcheck`` (all_reduce sync/async over several dtypes and views,
all_gather along several dims, broadcast, barrier, and linear_all_reduce plain vs tiled against the
unsharded ``x @ W.T`` for ragged row counts, tile counts above the row count and empty inputs),
computing every expected value locally.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp

from collectives.base import SingleRankCommunicator
from collectives.factory import (
    COMM_BACKENDS,
    create_communicator,
    default_backend,
    open_rendezvous,
)
from collectives.tiled_allreduce import linear_all_reduce, tile_bounds


def _rank_main(rank: int, world_size: int, rendezvous: dict) -> None:
    # 2 cores for up to 3 processes: one intra-op thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    from collectives.cost import measured_tile_chooser
    from collectives.selfcheck import run_selfcheck

    comm = create_communicator("gloo", rank, world_size, rendezvous, "cpu")
    try:
        assert comm.rank == rank and comm.world_size == world_size
        run_selfcheck(comm)
        # the measured plan must be the same on every rank: its tiles are matched collectives
        choose = measured_tile_chooser(comm, "cpu")
        picks = torch.tensor([choose(rows, 4096, 2048) for rows in (1, 64, 512, 4096)])
        every = comm.all_gather(picks.unsqueeze(0), dim=0)
        assert (every == picks).all(), f"ranks chose different tile counts: {every.tolist()}"
    finally:
        comm.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_group(world_size: int) -> None:
    rendezvous = dict(open_rendezvous("gloo"), timeout_s=60)
    mp.spawn(_rank_main, args=(world_size, rendezvous), nprocs=world_size, join=True)


def test_tile_bounds_cover_rows_evenly() -> None:
    assert tile_bounds(0, 4) == []
    assert tile_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert tile_bounds(10, 1) == [(0, 10)]
    bounds = tile_bounds(17, 5)
    sizes = [b - a for a, b in bounds]
    assert sizes == [4, 4, 3, 3, 3]
    assert bounds[0][0] == 0 and bounds[-1][1] == 17
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


def test_single_rank_linear_all_reduce_is_the_matmul() -> None:
    comm = SingleRankCommunicator()
    x, w = torch.randn(9, 6), torch.randn(5, 6)
    for tiles in (1, 4, 20):
        assert torch.equal(linear_all_reduce(x, w, comm, tiles), x @ w.T)
    assert linear_all_reduce(x[:0], w, comm, 4).shape == (0, 5)


def test_factory_names_and_errors() -> None:
    # every backend a user may name (the config's choices) is one the factory builds, and
    # each device's default is among them: the lists cannot drift apart
    from cluster.config import ClusterConfig

    comm = next(f for f in dataclasses.fields(ClusterConfig) if f.name == "comm")
    assert set(comm.metadata["choices"]) - {"auto"} == set(COMM_BACKENDS)
    for name in COMM_BACKENDS:  # a group of one never touches the backend
        assert isinstance(create_communicator(name, 0, 1, {}, "cpu"), SingleRankCommunicator)
    assert {default_backend(d) for d in ("cuda", "npu", "cpu")} <= set(COMM_BACKENDS)
    with pytest.raises(ValueError, match="no default communication backend for device type"):
        default_backend("tpu")
    with pytest.raises(ValueError, match="nccl, hccl, gloo, mpi"):
        create_communicator("nvlink", 0, 2, {}, "cpu")
    with pytest.raises(ValueError, match="nccl, hccl, gloo, mpi"):
        open_rendezvous("tcp")
    assert isinstance(create_communicator("gloo", 0, 1, {}, "cpu"), SingleRankCommunicator)
    info = open_rendezvous("gloo")
    assert isinstance(info["master_addr"], str) and 0 < info["master_port"] < 65536


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
def test_nccl_without_cuda_says_so() -> None:
    with pytest.raises(RuntimeError, match="needs CUDA.*gloo"):
        create_communicator("nccl", 0, 2, {"master_addr": "127.0.0.1", "master_port": 1}, "cuda")


def test_hccl_without_torch_npu_says_so() -> None:
    try:
        import torch_npu  # noqa: F401

        pytest.skip("torch_npu is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="torch_npu"):
        create_communicator("hccl", 0, 2, {"master_addr": "127.0.0.1", "master_port": 1}, "npu")
