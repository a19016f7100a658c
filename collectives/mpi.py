"""A Communicator over mpi4py.

Two ways to form the group:

* **launched by** ``mpiexec -n N``: every process is already in ``COMM_WORLD``; pass a rendezvous
  dict without a port (``{}`` or ``{"mode": "world"}``).
* **among Ray actors**, each actor's worker process being its own ``mpiexec -n 1`` job (see
  ``cluster/mpi_env.py``; plain singletons cannot connect to each other). Rank 0's process calls
  :func:`mpi_open_rendezvous` (returns at once with ``{"mode": "port", "port_names": [...]}``), the
  driver hands that dict to every rank, and all ranks call ``MpiCommunicator(rank, world, info)``
  concurrently. The group grows one rank at a time: the current group ``Accept``\\ s collectively,
  the newcomer ``Connect``\\ s, both ``Merge``. Connects arrive in any order, so a final
  ``Split(0, key=rank)`` puts the ranks in the requested order.

Tensors: CPU tensors are passed to MPI as numpy views of their memory (no copy) when contiguous
and of a dtype MPI can sum; float16/bfloat16 are reduced in a float32 staging buffer (MPI has no
portable sum for them). CUDA tensors go through a host staging buffer unless the MPI library is
CUDA-aware (``MPIX_Query_cuda_support``, or ``TILERUN_MPI_CUDA_AWARE=1/0`` to force), in which
case device memory is handed to MPI after the current stream is synchronised (MPI knows nothing
of CUDA streams).

Non-blocking collectives progress only inside MPI calls unless the MPI library runs a progress
thread (MPICH: ``MPIR_CVAR_ASYNC_PROGRESS=1``); :meth:`MpiHandle.poll` lets a caller push
progress between its own work.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from collectives.base import Communicator, Handle

log = logging.getLogger(__name__)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            f"the mpi backend needs mpi4py and an MPI library, which are not importable here "
            f"({e}); install them with: pip install mpi4py mpich  (or pip install 'tilerun[mpi]')"
        ) from e
    return MPI


# dtypes MPI can sum directly through a numpy view
_NUMPY_REDUCIBLE = {
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.complex64,
    torch.complex128,
}


def mpi_cuda_aware() -> bool:
    """Whether the loaded MPI library can read and write CUDA device memory.

    ``TILERUN_MPI_CUDA_AWARE`` (``1``/``0``) overrides the probe. The probe calls
    ``MPIX_Query_cuda_support`` (Open MPI and MPICH both export it) in the ``libmpi`` that mpi4py
    loaded; anything that fails means "not CUDA-aware", which is always correct, only slower.
    """
    forced = os.environ.get("TILERUN_MPI_CUDA_AWARE")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    _import_mpi()
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps if "libmpi" in ln and ".so" in ln})
        for path in paths:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "MPIX_Query_cuda_support"):
                return bool(lib.MPIX_Query_cuda_support())
    except OSError:
        pass
    return False


def mpi_open_rendezvous(world_size: int, host: str | None = None) -> dict:
    """Open one MPI port per joining rank on rank 0's process; returns at once with the dict to
    hand every rank.

    Rank k connects on its own port ``port_names[k - 1]`` and the group accepts the ports in
    order, so no two processes ever connect to one port at the same time (concurrent connects
    to a single port crashed MPICH now and then) and the join order is the rank order. The
    ports are closed by rank 0's :class:`MpiCommunicator` once the group is complete.

    ``host`` is not used here: where MPI listens is fixed when the process starts (the
    launcher's environment, see ``cluster.mpi_env.mpi_bind_env``).
    """
    MPI = _import_mpi()
    return {"mode": "port", "port_names": [MPI.Open_port() for _ in range(world_size - 1)]}


class MpiHandle(Handle):
    """An in-flight non-blocking MPI collective; copies a staging buffer back on wait.

    Holds references to every buffer MPI is reading or writing, so none is freed early.
    """

    def __init__(
        self, request, target: torch.Tensor, staging: torch.Tensor | None, keep: object
    ) -> None:
        self._request = request
        self._target = target
        self._staging = staging
        self._keep = keep
        self._done = False

    def poll(self) -> bool:
        """Push MPI progress; True when the collective has finished (``wait`` still copies back)."""
        if self._done:
            return True
        return bool(self._request.Test())

    def wait(self) -> None:
        if self._done:
            return
        self._request.Wait()
        if self._staging is not None:
            self._target.copy_(self._staging)
        self._done = True
        self._request = self._target = self._staging = self._keep = None


class MpiCommunicator(Communicator):
    """One rank of an MPI intracommunicator whose rank order equals the requested ranks."""

    backend = "mpi"

    def __init__(
        self,
        rank: int,
        world_size: int,
        rendezvous: dict | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(rank, world_size)
        MPI = _import_mpi()
        self._MPI = MPI
        self.device = torch.device(device)
        self.cuda_aware = self.device.type == "cuda" and mpi_cuda_aware()
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"the mpi backend handles cpu and cuda tensors, got device {self.device}; "
                "use backend 'hccl' on npu"
            )
        if self.device.type == "cuda":
            log.info(
                "mpi backend on %s: MPI is %sCUDA-aware",
                self.device,
                "" if self.cuda_aware else "not ",
            )
        rendezvous = rendezvous or {}
        if "master_addr" in rendezvous:
            raise ValueError(
                "this rendezvous dict is for a torch.distributed backend; for mpi build it with "
                "collectives.factory.open_rendezvous('mpi') on rank 0's process"
            )
        mode = rendezvous.get("mode", "port" if "port_names" in rendezvous else "world")
        if mode == "port" and len(rendezvous.get("port_names") or ()) != world_size - 1:
            raise ValueError(
                f"mpi rendezvous mode 'port' needs world_size - 1 = {world_size - 1} port_names "
                "(collectives.factory.open_rendezvous('mpi', world_size) on rank 0)"
            )
        self._comm = None
        if mode == "world":
            self._comm = self._from_world()
        elif mode == "port":
            self._comm = self._grow_from_port(list(rendezvous["port_names"]))
        else:
            raise ValueError(f"mpi rendezvous mode {mode!r} is not 'world' or 'port'")
        if self._comm.Get_size() != world_size or self._comm.Get_rank() != rank:
            raise RuntimeError(
                f"mpi group formed with rank {self._comm.Get_rank()}/{self._comm.Get_size()}, "
                f"expected {rank}/{world_size}"
            )

    # -- group formation ---------------------------------------------------------------------

    def _from_world(self):
        world = self._MPI.COMM_WORLD
        if world.Get_size() != self.world_size:
            raise RuntimeError(
                f"COMM_WORLD has {world.Get_size()} processes but world_size is "
                f"{self.world_size}; launch with mpiexec -n {self.world_size}, or form the group "
                "through a port (collectives.factory.open_rendezvous('mpi'))"
            )
        # Split (rather than Dup) so the requested rank order holds even if it differs from the
        # launch order; it also gives tilerun a communicator of its own.
        return world.Split(0, key=self.rank)

    def _grow_from_port(self, port_names: list[str]):
        MPI = self._MPI
        if MPI.COMM_WORLD.Get_size() != 1:
            raise RuntimeError(
                "forming an mpi group through a port needs every process to be its own "
                "`mpiexec -n 1` job (cluster.mpi_env.mpi_runtime_env() for Ray actors); this "
                f"process's COMM_WORLD has {MPI.COMM_WORLD.Get_size()} ranks"
            )
        try:
            if self.rank == 0:
                group = MPI.COMM_WORLD.Dup()
            else:
                inter = MPI.COMM_WORLD.Connect(port_names[self.rank - 1], root=0)
                group = inter.Merge(high=True)
                inter.Disconnect()
            # Everyone already in the group accepts the next newcomer together, until full; the
            # newcomer of a group of size k is rank k, on its own port.
            while group.Get_size() < self.world_size:
                inter = group.Accept(port_names[group.Get_size() - 1], root=0)
                grown = inter.Merge(high=False)
                inter.Disconnect()
                group.Free()
                group = grown
            final = group.Split(0, key=self.rank)
            group.Free()
            return final
        finally:
            if self.rank == 0:
                for name in port_names:
                    MPI.Close_port(name)

    # -- buffers -----------------------------------------------------------------------------

    def _reduce_buffers(self, tensor: torch.Tensor) -> tuple[object, torch.Tensor | None]:
        """(buffer MPI reduces in place, staging tensor to copy back or None)."""
        t = tensor.detach()
        direct = t.is_contiguous() and t.dtype in _NUMPY_REDUCIBLE
        if t.device.type == "cpu":
            if direct:
                return t.numpy(), None
            staging = t.to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)
            staging = staging.contiguous()
            return staging.numpy(), staging
        if t.device.type == "cuda":
            if self.cuda_aware and direct:
                torch.cuda.current_stream(t.device).synchronize()
                return t, None
            host_dtype = t.dtype if t.dtype in _NUMPY_REDUCIBLE else torch.float32
            staging = t.to("cpu", dtype=host_dtype).contiguous()  # blocks until t is computed
            return staging.numpy(), staging
        raise ValueError(f"the mpi backend cannot handle tensors on {t.device}")

    def _byte_buffers(self, tensor: torch.Tensor) -> tuple[object, torch.Tensor | None]:
        """A byte view for copies (broadcast, gather): any dtype moves as raw bytes."""
        t = tensor.detach()
        if t.device.type == "cuda" and self.cuda_aware and t.is_contiguous():
            torch.cuda.current_stream(t.device).synchronize()
            return t.view(-1).view(torch.uint8), None
        staging = None
        if t.device.type != "cpu" or not t.is_contiguous():
            staging = t.to("cpu").contiguous()
            t = staging
        return t.view(-1).view(torch.uint8).numpy(), staging

    # -- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        MPI = self._MPI
        buf, staging = self._reduce_buffers(tensor)
        if async_op:
            req = self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return MpiHandle(req, tensor, staging, keep=buf)
        self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if staging is not None:
            tensor.copy_(staging)
        return None

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        dim = dim % max(tensor.dim(), 1)
        send, _ = self._byte_buffers(tensor)
        on_device = tensor.device.type == "cuda" and self.cuda_aware
        stacked = torch.empty(
            (self.world_size, *tensor.shape),
            dtype=tensor.dtype,
            device=tensor.device if on_device else "cpu",
        )
        recv = stacked.view(-1).view(torch.uint8)
        self._comm.Allgather(send, recv if on_device else recv.numpy())
        # [world, ..., d, ...] -> world next to d, then merge: rank-major concatenation along dim.
        shape = list(tensor.shape)
        if tensor.dim() == 0:
            out = stacked
        else:
            shape[dim] *= self.world_size
            out = stacked.movedim(0, dim).reshape(shape)
        return out.to(tensor.device)

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, async_op: bool = False
    ) -> Handle | None:
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast src {src} is outside a group of {self.world_size}")
        buf, staging = self._byte_buffers(tensor)
        if async_op:
            req = self._comm.Ibcast(buf, root=src)
            return MpiHandle(req, tensor, staging, keep=buf)
        self._comm.Bcast(buf, root=src)
        if staging is not None:
            tensor.copy_(staging)
        return None

    def barrier(self) -> None:
        self._comm.Barrier()

    def close(self) -> None:
        comm, self._comm = self._comm, None
        if comm is None or comm == self._MPI.COMM_NULL:
            return
        # Disconnect (collective) rather than Free: it also ends the connection between
        # processes that met through a port, so each can later finalise on its own.
        comm.Disconnect()


__all__ = ["MpiCommunicator", "MpiHandle", "mpi_open_rendezvous", "mpi_cuda_aware"]
