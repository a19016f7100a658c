"""C++ kernels of our own for CPUs: built with the system's C++ compiler into a shared library
once per machine (cached on disk, ``runtime.kernel_cache``) and called through ``ctypes``.

No C++ extension and no torch headers: one ``.cpp`` file compiles in about a second. The
library is built with ``-march=native`` (the vector width of the CPU at hand) and OpenMP; it
links ``libgomp.so.1``, the soname torch's own OpenMP runtime is loaded under, so both share one
runtime and one thread count (``torch.set_num_threads``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

from runtime.kernel_cache import cache_root, compile_cached

FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
_lock = threading.Lock()
_loaded: dict[tuple[Path, str], ctypes.CDLL] = {}


class CpuBuildError(RuntimeError):
    """No C++ compiler, or it failed."""


def compiler() -> str | None:
    """``$CXX``, else ``c++``, ``g++`` or ``clang++`` on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(source: Path, march: str = "native") -> Path:
    """``source`` as a shared library for ``-march=<march>`` (``native``: this CPU)."""
    cxx = compiler()
    if cxx is None:
        raise CpuBuildError(
            f"building {source.name} needs a C++ compiler (c++, g++ or clang++ on PATH, or "
            "$CXX): install one (e.g. apt install g++) or choose another attention backend"
        )
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    target = _cpu_identity() if march == "native" else march
    return compile_cached(
        source, cache_root() / "cpu", f"march-{march}", "so", repr((FLAGS, version, target)),
        lambda out: [cxx, *FLAGS, f"-march={march}", "-o", str(out), str(source)],
        CpuBuildError, Path(cxx).name,
    )  # fmt: skip


def load(source: Path, march: str = "native") -> ctypes.CDLL:
    """The library built from ``source`` for ``march``, loaded once per process."""
    with _lock:
        if (source, march) not in _loaded:
            path = build(source, march)
            try:
                _loaded[source, march] = ctypes.CDLL(str(path))
            except OSError as e:
                raise CpuBuildError(f"{path.name} was built but cannot be loaded: {e}") from e
        return _loaded[source, march]
