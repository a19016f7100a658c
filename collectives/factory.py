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
from collectives.names import COMM_BACKENDS, TORCH_BACKENDS


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


LOOPBACK = "127.0.0.1"


def host_address() -> str:
    """An address of this host that the other hosts can reach.

    ``TILERUN_MASTER_ADDR`` overrides. Otherwise the address of the interface that routes outward
    (a UDP connect sends no packet), else what the hostname resolves to, else loopback (fine when
    every rank is on this host). The cluster layer passes the address Ray uses for the node
    instead, or loopback when every rank is local; this is the fallback for callers without Ray.
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
        return LOOPBACK


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# The socket that reserves each open torch rendezvous's port, by port: open_rendezvous binds it
# to the chosen address (never all interfaces) without listening, and rank 0's TCPStore serves
# on it (or, when rank 0 is another process, on its own socket bound to the same address: a
# bound socket that does not listen does not stop that, both having SO_REUSEADDR).
_RESERVED: dict[int, socket.socket] = {}


def bind_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (SO_REUSEADDR), not yet listening."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """The socket to serve rendezvous ``host:port`` on: the one :func:`open_rendezvous` reserved
    in this process (handed over once), else a new one bound to the same address."""
    s = _RESERVED.pop(port, None) or bind_socket(host, port)
    s.listen(backlog)
    return s


def local_address_towards(addr: str) -> str:
    """This host's address on the route to ``addr`` (loopback for loopback)."""
    if addr.startswith("127.") or addr == "localhost":
        return LOOPBACK
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 1))
        return s.getsockname()[0]


def interface_of(addr: str) -> str | None:
    """The name of the network interface holding IPv4 ``addr`` (Linux), or None."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def open_rendezvous(backend: str, world_size: int = 2, host: str | None = None) -> dict:
    """Where the ranks of a new group meet; call on rank 0's process. Never blocks.

    ``host``: the address to listen on, the one Ray uses for this node, or loopback when every
    rank is on this host (default: :func:`host_address`). Nothing listens on all interfaces.

    torch.distributed backends: ``{"master_addr": host, "master_port": <port bound on host>}``.
    mpi: ``{"mode": "port", "port_names": [<MPI port per joining rank>]}`` (open until rank 0's
    communicator has formed the group).
    """
    _check_backend(backend)
    host = host or host_address()
    if backend == "mpi":
        from collectives.mpi import mpi_open_rendezvous

        return mpi_open_rendezvous(world_size, host)
    s = bind_socket(host)
    port = s.getsockname()[1]
    _RESERVED[port] = s
    return {"master_addr": host, "master_port": port}


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
    "interface_of",
    "local_address_towards",
    "bind_socket",
    "listening_socket",
]
