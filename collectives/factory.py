"""Communicators by backend name: the one place that knows which class serves which backend.

The cluster layer forms a group in two steps, so that no rank blocks before the others know where
to meet::

    info = open_rendezvous(backend)                       # on rank 0's process; returns at once
    comm = create_communicator(backend, rank, world, info, device)   # on every rank, concurrently
"""

from __future__ import annotations

import os
import socket

import torch

from collectives.base import Communicator, SingleRankCommunicator

TORCH_BACKENDS = ("nccl", "hccl", "gloo")  # served by collectives.torch_dist
COMM_BACKENDS = (*TORCH_BACKENDS, "mpi")  # every name a communicator can be built for


def _check_backend(backend: str) -> None:
    if backend not in COMM_BACKENDS:
        raise ValueError(
            f"unknown communication backend {backend!r}; valid backends: {', '.join(COMM_BACKENDS)}"
        )


def default_backend(device_type: str) -> str:
    """The usual backend for tensors on ``device_type``: nccl (cuda), hccl (npu), gloo (cpu)."""
    defaults = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
    if device_type not in defaults:
        raise ValueError(
            f"no default communication backend for device type {device_type!r}; "
            f"known device types: {', '.join(defaults)}"
        )
    return defaults[device_type]


def host_address() -> str:
    """An address of this host that the other hosts can reach.

    ``TILERUN_MASTER_ADDR`` overrides. Otherwise the address of the interface that routes outward
    (a UDP connect sends no packet), else what the hostname resolves to, else loopback (fine when
    every rank is on this host).
    """
    forced = os.environ.get("TILERUN_MASTER_ADDR")
    if forced:
        return forced
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
            if addr and not addr.startswith("0."):
                return addr
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; the store binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def open_rendezvous(backend: str, world_size: int = 2) -> dict:
    """Where the ranks of a new group meet; call on rank 0's process. Never blocks.

    torch.distributed backends: ``{"master_addr": <this host>, "master_port": <free port>}``.
    mpi: ``{"mode": "port", "port_names": [<MPI port per joining rank>]}`` (open until rank 0's
    communicator has formed the group).
    """
    _check_backend(backend)
    if backend == "mpi":
        from collectives.mpi import mpi_open_rendezvous

        return mpi_open_rendezvous(world_size)
    return {"master_addr": host_address(), "master_port": free_port()}


def create_communicator(
    backend: str,
    rank: int,
    world_size: int,
    rendezvous: dict,
    device: torch.device | str = "cpu",
) -> Communicator:
    """This rank's Communicator; every rank of the group calls it at the same time.

    ``world_size == 1`` gives a :class:`SingleRankCommunicator` without touching the backend.
    """
    _check_backend(backend)
    if world_size == 1:
        if rank != 0:
            raise ValueError(f"rank {rank} is outside a group of world_size 1")
        return SingleRankCommunicator()
    if backend == "hccl":
        from collectives.torch_dist import import_torch_npu

        import_torch_npu()  # before torch.device("npu"), which only parses once it is imported
    device = torch.device(device)
    if backend in TORCH_BACKENDS:
        from collectives.torch_dist import TorchDistCommunicator

        return TorchDistCommunicator(backend, rank, world_size, rendezvous, device)
    from collectives.mpi import MpiCommunicator

    return MpiCommunicator(rank, world_size, rendezvous, device)


__all__ = [
    "COMM_BACKENDS",
    "TORCH_BACKENDS",
    "default_backend",
    "open_rendezvous",
    "create_communicator",
    "host_address",
    "free_port",
]
