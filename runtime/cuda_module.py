"""CUDA C++ kernels of our own: built with ``nvcc`` into a cubin once (cached on disk), launched
through the CUDA driver API on torch's current stream.

No C++ extension and no torch headers: ``nvcc -cubin`` on one ``.cu`` file takes seconds, and
``ctypes`` over ``libcuda`` loads it into the context torch already uses (the device's primary
context), so launches are ordered with torch's work on the same stream and are captured by CUDA
graphs like any other.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from runtime.kernel_cache import cache_root, compile_cached

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_lock = threading.Lock()
_driver: ctypes.CDLL | None = None


class CudaBuildError(RuntimeError):
    """``nvcc`` is missing or failed, or the driver refused the result."""


def cache_dir() -> Path:
    """Where built cubins are kept: ``$TILERUN_CACHE/cubin``, else ``~/.cache/tilerun/cubin``."""
    return cache_root() / "cubin"


def nvcc_path() -> str | None:
    """The CUDA compiler: ``nvcc`` on PATH, else under ``$CUDA_HOME`` or ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def build(source: Path, capability: tuple[int, int], flags: tuple[str, ...] = ()) -> Path:
    """``source`` compiled for ``sm_<capability>``: the cached cubin, or a fresh build (atomic,
    so processes building at once are safe). The cache key covers the source, the flags and the
    compiler's version."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaBuildError(
            f"building {source.name} needs the CUDA compiler (nvcc), which is not on PATH, "
            "CUDA_HOME or /usr/local/cuda: install the CUDA toolkit or choose another backend"
        )
    arch = f"{capability[0]}{capability[1]}"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return compile_cached(
        source, cache_dir(), f"sm_{arch}", "cubin", repr((flags, version, arch)),
        lambda out: [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", *flags,
                     "-o", str(out), str(source)],
        CudaBuildError, "nvcc",
    )  # fmt: skip


def _cuda() -> ctypes.CDLL:
    global _driver
    with _lock:
        if _driver is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaBuildError(f"the CUDA driver library cannot be loaded: {e}") from e
            _check(lib, lib.cuInit(0), "cuInit")
            _driver = lib
        return _driver


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(status, ctypes.byref(msg))
        raise CudaBuildError(f"{what} failed: CUDA error {status} ({(msg.value or b'?').decode()})")


class Kernel:
    """One ``extern "C"`` kernel of a loaded module."""

    def __init__(self, module: Module, handle: ctypes.c_void_p, name: str) -> None:
        self.module, self.handle, self.name = module, handle, name
        self._shared = 0

    def allow_shared(self, nbytes: int) -> None:
        """Let a launch use ``nbytes`` of dynamic shared memory (more than 48 KB needs this)."""
        if nbytes > self._shared:
            lib = _cuda()
            _check(
                lib,
                lib.cuFuncSetAttribute(
                    self.handle, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes
                ),
                f"raising {self.name}'s shared memory to {nbytes} bytes",
            )
            self._shared = nbytes

    def __call__(self, grid: int, block: int, shared: int, *args) -> None:
        """Launch on torch's current stream; ``args`` are ctypes values in the kernel's order."""
        lib = _cuda()
        self.module.make_current()
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.module.device).cuda_stream)
        _check(
            lib,
            lib.cuLaunchKernel(self.handle, grid, 1, 1, block, 1, 1, shared, stream, params, None),
            f"launching {self.name}",
        )


class Module:
    """A cubin loaded into the primary context of ``device`` (the one torch uses)."""

    def __init__(self, cubin: Path, device: torch.device) -> None:
        lib = _cuda()
        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        dev, self._ctx = ctypes.c_int(), ctypes.c_void_p()
        _check(lib, lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), dev), "the context")
        self.make_current()
        self._handle = ctypes.c_void_p()
        _check(
            lib, lib.cuModuleLoad(ctypes.byref(self._handle), str(cubin).encode()), f"load {cubin}"
        )
        self._kernels: dict[str, Kernel] = {}

    def make_current(self) -> None:
        """This thread's current context is the primary one (threads start with none)."""
        lib = _cuda()
        cur = ctypes.c_void_p()
        lib.cuCtxGetCurrent(ctypes.byref(cur))
        if cur.value != self._ctx.value:
            _check(lib, lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def kernel(self, name: str) -> Kernel:
        if name not in self._kernels:
            lib = _cuda()
            self.make_current()
            handle = ctypes.c_void_p()
            _check(
                lib,
                lib.cuModuleGetFunction(ctypes.byref(handle), self._handle, name.encode()),
                f"kernel {name}",
            )
            self._kernels[name] = Kernel(self, handle, name)
        return self._kernels[name]
