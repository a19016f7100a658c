"""A correctness check any Communicator can run on a live group; every rank computes its expected
values locally, so a wrong sum, order or tile fails on the rank that sees it.

Used by the tests (spawned gloo processes, ``mpiexec``, Ray actors) and by hand on a new cluster::

    mpiexec -n 2 python -m collectives.selfcheck            # MPI over COMM_WORLD
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from collectives.base import Communicator
from collectives.factory import create_communicator, open_rendezvous
from collectives.tiled_allreduce import linear_all_reduce

# Ragged sizes so that partial tiles, fewer rows than tiles and empty inputs all occur.
_ROWS = (0, 1, 5, 17, 64)
_TILES = (1, 2, 3, 7, 100)
_IN_FEATURES = 37  # split unevenly over any world size > 1
_OUT_FEATURES = 11


def _check(ok: bool, what: str, rank: int) -> None:
    if not ok:
        raise AssertionError(f"rank {rank}: {what}")


def _rank_tensor(rank: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    base = torch.arange(n, device=device).reshape(shape)
    # small integers: every sum below is exact in every dtype checked, bfloat16 included
    return ((base % 7) * (rank + 1) + rank).to(dtype)


def _check_all_reduce(comm: Communicator, device) -> None:
    r, w = comm.rank, comm.world_size
    scale, offset = w * (w + 1) // 2, w * (w - 1) // 2
    for dtype in (torch.float32, torch.float64, torch.int64, torch.bfloat16):
        t = _rank_tensor(r, (2, 3, 5), dtype, device)
        expected = ((_rank_tensor(0, (2, 3, 5), torch.int64, device) * scale) + offset).to(dtype)
        comm.all_reduce(t)
        _check(torch.equal(t, expected), f"all_reduce {dtype} sync: {t.flatten()[:6]}", r)
    # non-contiguous tensor: the result must land in the caller's view
    base = _rank_tensor(r, (4, 6), torch.float32, device)
    view = base.T
    comm.all_reduce(view)
    expected = (_rank_tensor(0, (4, 6), torch.int64, device) * scale + offset).float()
    _check(torch.equal(base, expected), "all_reduce non-contiguous", r)
    # several in flight at once, waited out of order
    a = _rank_tensor(r, (1000,), torch.float32, device)
    b = _rank_tensor(r, (3, 7), torch.float64, device)
    ha = comm.all_reduce(a, async_op=True)
    hb = comm.all_reduce(b, async_op=True)
    hb.wait()
    ha.wait()
    ha.wait()  # idempotent
    _check(
        torch.equal(a, (_rank_tensor(0, (1000,), torch.int64, device) * scale + offset).float()),
        "all_reduce async (a)",
        r,
    )
    _check(
        torch.equal(b, (_rank_tensor(0, (3, 7), torch.int64, device) * scale + offset).double()),
        "all_reduce async (b)",
        r,
    )


def _check_all_gather(comm: Communicator, device) -> None:
    r, w = comm.rank, comm.world_size
    for dim in (0, 1, -1):
        t = _rank_tensor(r, (2, 3), torch.float32, device)
        got = comm.all_gather(t, dim=dim)
        expected = torch.cat(
            [_rank_tensor(i, (2, 3), torch.float32, device) for i in range(w)], dim
        )
        _check(torch.equal(got, expected), f"all_gather dim={dim}: {tuple(got.shape)}", r)
    t = _rank_tensor(r, (5,), torch.int32, device)
    got = comm.all_gather(t)
    expected = torch.cat([_rank_tensor(i, (5,), torch.int32, device) for i in range(w)])
    _check(torch.equal(got, expected), "all_gather int32", r)


def _check_broadcast(comm: Communicator, device) -> None:
    r, w = comm.rank, comm.world_size
    src = w - 1
    t = _rank_tensor(r, (3, 4), torch.float32, device)
    comm.broadcast(t, src=src)
    _check(torch.equal(t, _rank_tensor(src, (3, 4), torch.float32, device)), "broadcast sync", r)
    t = _rank_tensor(r, (3, 4), torch.bfloat16, device)
    h = comm.broadcast(t, src=0, async_op=True)
    h.wait()
    _check(torch.equal(t, _rank_tensor(0, (3, 4), torch.bfloat16, device)), "broadcast async", r)
    base = _rank_tensor(r, (3, 4), torch.float64, device)
    comm.broadcast(base.T, src=src)
    _check(torch.equal(base, _rank_tensor(src, (3, 4), torch.float64, device)), "broadcast view", r)


def _check_linear(comm: Communicator, device) -> None:
    r, w = comm.rank, comm.world_size
    gen = torch.Generator().manual_seed(1234)  # same on every rank: each builds the full problem
    shard = torch.tensor_split(torch.arange(_IN_FEATURES), w)[r]
    for rows in _ROWS:
        # integer-valued: every matmul is exact, so plain, tiled and unsharded must agree bitwise
        xi = torch.randint(-3, 4, (rows, _IN_FEATURES), generator=gen).float()
        wi = torch.randint(-3, 4, (_OUT_FEATURES, _IN_FEATURES), generator=gen).float()
        # random floats: agreement up to float32 rounding against a float64 reference
        xf = torch.randn(rows, _IN_FEATURES, generator=gen)
        wf = torch.randn(_OUT_FEATURES, _IN_FEATURES, generator=gen)
        exact = xi @ wi.T
        ref = (xf.double() @ wf.double().T).float()
        plain_f = None
        for tiles in _TILES:
            yi = linear_all_reduce(
                xi[:, shard].to(device), wi[:, shard].to(device), comm, num_tiles=tiles
            ).cpu()
            _check(torch.equal(yi, exact), f"linear exact rows={rows} tiles={tiles}", r)
            yf = linear_all_reduce(
                xf[:, shard].to(device), wf[:, shard].to(device), comm, num_tiles=tiles
            ).cpu()
            err = (yf - ref).abs().max().item() if rows else 0.0
            _check(
                torch.allclose(yf, ref, rtol=1e-5, atol=1e-5),
                f"linear float rows={rows} tiles={tiles} max err {err:.3g}",
                r,
            )
            if plain_f is None:
                plain_f = yf
            _check(
                torch.allclose(yf, plain_f, rtol=1e-5, atol=1e-5),
                f"linear tiled vs plain rows={rows} tiles={tiles}",
                r,
            )
    # leading dims are flattened and restored
    x3 = torch.randint(-3, 4, (2, 9, _IN_FEATURES), generator=gen).float()
    w3 = torch.randint(-3, 4, (_OUT_FEATURES, _IN_FEATURES), generator=gen).float()
    y3 = linear_all_reduce(x3[..., shard].to(device), w3[:, shard].to(device), comm, 4).cpu()
    _check(torch.equal(y3, x3 @ w3.T), "linear with leading dims", r)


def run_selfcheck(comm: Communicator, device: torch.device | str = "cpu") -> list[str]:
    """Run every check on ``comm``; returns the names of the checks passed, raises on a failure."""
    device = torch.device(device)
    done = []
    for name, fn in (
        ("all_reduce", _check_all_reduce),
        ("all_gather", _check_all_gather),
        ("broadcast", _check_broadcast),
        ("linear_all_reduce", _check_linear),
    ):
        fn(comm, device)
        comm.barrier()
        done.append(name)
    done.append("barrier")
    return done


class SelfCheckWorker:
    """A plain object a test (or ``cluster/``) wraps as a Ray actor to check a group of actors."""

    def __init__(self) -> None:
        self.comm: Communicator | None = None

    def open_rendezvous(self, backend: str, world_size: int = 2) -> dict:
        return open_rendezvous(backend, world_size)

    def join(self, backend: str, rank: int, world_size: int, rendezvous: dict) -> int:
        self.comm = create_communicator(backend, rank, world_size, rendezvous, "cpu")
        return self.comm.rank

    def run(self) -> list[str]:
        assert self.comm is not None, "join() first"
        return run_selfcheck(self.comm)

    def leave(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None

    def pid(self) -> int:
        return os.getpid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="mpi", choices=["mpi"])
    parser.parse_args(argv)
    from mpi4py import MPI

    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    comm = create_communicator("mpi", world.Get_rank(), world.Get_size(), {"mode": "world"})
    done = run_selfcheck(comm)
    comm.close()
    print(f"selfcheck ok rank {world.Get_rank()}/{world.Get_size()}: {', '.join(done)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
