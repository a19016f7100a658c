"""A Communicator over torch.distributed: NCCL (CUDA), gloo (CPU) and HCCL (Ascend, via torch_npu).

The group is formed from a rendezvous dict (``{"master_addr": ..., "master_port": ...}``) that rank
0's process produced (see :func:`collectives.factory.open_rendezvous`), through a TCPStore that
rank 0 hosts. Nothing is read from ``MASTER_ADDR``/``RANK`` environment variables, so a Ray actor
can build its group from values the driver hands it.

The group is torch.distributed's default group of this process: a worker belongs to exactly one
tensor-parallel group, and the default group is the only kind every torch backend (HCCL included)
supports through the public API. A second live TorchDistCommunicator in one process is refused.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from collectives.base import Communicator, Handle
from collectives.factory import (
    TORCH_BACKENDS,
    interface_of,
    listening_socket,
    local_address_towards,
)

DEFAULT_TIMEOUT_S = 300.0


class WorkHandle(Handle):
    """Wraps a torch ``Work``; copies a staging buffer back into the caller's tensor on wait."""

    def __init__(
        self,
        work: dist.Work,
        target: torch.Tensor | None = None,
        staging: torch.Tensor | None = None,
    ) -> None:
        self._work = work
        self._target = target
        self._staging = staging
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        # For NCCL/HCCL this does not block the host: it orders the current stream after the
        # collective's stream, which is the contract of Handle.wait on device backends.
        self._work.wait()
        if self._target is not None and self._staging is not None:
            self._target.copy_(self._staging)
        self._done = True
        self._work = self._target = self._staging = None


def import_torch_npu() -> None:
    """Import torch_npu (it registers the ``npu`` device and the ``hccl`` backend) or explain."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "the hccl backend needs torch_npu, which is not importable here "
            f"({e}); on an Ascend host install the torch_npu build matching torch "
            f"{torch.__version__} (pip install torch-npu==<matching version>), or use backend "
            "'gloo' (CPU) / 'nccl' (CUDA)"
        ) from e


class TorchDistCommunicator(Communicator):
    """One rank of a torch.distributed group created from a rendezvous dict.

    ``device`` is where this rank's tensors live (``cpu``, ``cuda:i``, ``npu:i``); for NCCL and
    HCCL it becomes the current device of the process.
    """

    def __init__(
        self,
        backend: str,
        rank: int,
        world_size: int,
        rendezvous: dict,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(rank, world_size)
        if backend not in TORCH_BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {TORCH_BACKENDS}")
        for key in ("master_addr", "master_port"):
            if key not in rendezvous:
                raise ValueError(
                    f"rendezvous dict for backend {backend!r} lacks {key!r}; build it with "
                    f"collectives.factory.open_rendezvous({backend!r}) on rank 0's process"
                )
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; close() the "
                "existing TorchDistCommunicator (or dist.destroy_process_group()) first"
            )
        self.backend = backend
        if backend == "hccl":
            import_torch_npu()  # registers the npu device type that torch.device() must parse
        self.device = torch.device(device)
        self._closed = False
        self._prepare_device()

        timeout = datetime.timedelta(seconds=float(rendezvous.get("timeout_s", DEFAULT_TIMEOUT_S)))
        # Rank 0 hosts the store; the others connect to it. wait_for_workers makes rank 0's
        # constructor return only once everyone has arrived, so a wrong address fails fast and
        # loudly on every rank instead of hanging in the first collective.
        master_addr, port = str(rendezvous["master_addr"]), int(rendezvous["master_port"])
        listen_fd = None
        if rank == 0:
            # a socket bound to master_addr alone: the store never listens on all interfaces
            listen_fd = listening_socket(master_addr, port, max(world_size, 16)).detach()
        _bind_backend_to(backend, master_addr)
        self._store = dist.TCPStore(
            host_name=master_addr,
            port=port,
            world_size=world_size,
            is_master=rank == 0,
            timeout=timeout,
            wait_for_workers=True,
            master_listen_fd=listen_fd,
        )
        dist.init_process_group(
            backend=backend,
            store=self._store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )

    def _prepare_device(self) -> None:
        if self.backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "backend 'nccl' needs CUDA, but torch.cuda.is_available() is False here "
                    f"(torch {torch.__version__}); use backend 'gloo' on CPU, or install a CUDA "
                    "build of torch on a GPU host"
                )
            if self.device.type != "cuda":
                raise ValueError(f"backend 'nccl' needs a cuda device, got {self.device}")
            # NVLink multicast (NVLS) is off on the device machines; NCCL reads this at init.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            else:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.backend == "hccl":
            import_torch_npu()
            if self.device.type != "npu":
                raise ValueError(f"backend 'hccl' needs an npu device, got {self.device}")
            if self.device.index is not None:
                torch.npu.set_device(self.device)

    # -- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        return _in_place(
            tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=async_op), async_op
        )

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        src = tensor.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src)
        return torch.cat(parts, dim=dim)

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, async_op: bool = False
    ) -> Handle | None:
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast src {src} is outside a group of {self.world_size}")
        return _in_place(tensor, lambda t: dist.broadcast(t, src=src, async_op=async_op), async_op)

    def barrier(self) -> None:
        if self.backend == "nccl":
            # Without device_ids NCCL guesses the device from the rank and warns.
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None


def _bind_backend_to(backend: str, master_addr: str) -> None:
    """Make gloo/NCCL listen for their peer connections on the interface that reaches rank 0
    (loopback when the group is on one host), not on whatever the hostname resolves to.
    A user's own ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` wins."""
    var = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}.get(backend)
    if var is None or os.environ.get(var):
        return
    try:
        name = interface_of(local_address_towards(master_addr))
    except OSError:
        name = None
    if name:
        os.environ[var] = name


def _in_place(tensor: torch.Tensor, collective, async_op: bool) -> Handle | None:
    """Run an in-place ``collective`` on ``tensor``; torch backends need contiguous buffers, so a
    non-contiguous tensor goes through a contiguous copy that is copied back when done."""
    staging = tensor if tensor.is_contiguous() else tensor.contiguous()
    work = collective(staging)
    if async_op:
        if staging is tensor:
            return WorkHandle(work)
        return WorkHandle(work, target=tensor, staging=staging)
    if staging is not tensor:
        tensor.copy_(staging)
    return None


__all__ = ["TorchDistCommunicator", "WorkHandle"]
