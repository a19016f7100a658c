"""Kernels of our own, compiled once per machine and kept on disk.

One build step shared by the CUDA kernels (``nvcc -cubin``) and the CPU ones (a C++ compiler
into a shared library): the output is named by a hash of everything that decides it (source,
flags, compiler version, target), written under a temporary name and renamed into place, so
processes building at once are safe and a later start finds it at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$TILERUN_CACHE``, else ``~/.cache/tilerun``."""
    root = os.environ.get("TILERUN_CACHE") or os.path.join(Path.home(), ".cache", "tilerun")
    return Path(root)


def compile_cached(
    source: Path,
    out_dir: Path,
    tag: str,
    suffix: str,
    key: str,
    command: Callable[[Path], list[str]],
    error: type[Exception],
    compiler: str,
) -> Path:
    """``out_dir/<stem>-<tag>-<hash>.<suffix>``: cached, or built by ``command(output path)``.
    ``key`` is whatever besides the source decides the output; a failed build raises
    ``error`` with the compiler's first error lines."""
    digest = hashlib.sha256(source.read_bytes() + key.encode()).hexdigest()[:16]
    out = out_dir / f"{source.stem}-{tag}-{digest}.{suffix}"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_suffix(f".{os.getpid()}.probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise error(
            f"the kernel cache {out.parent} is not writable ({e.strerror or e}): set "
            "TILERUN_CACHE to a writable directory"
        ) from e
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(command(tmp), capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        said = [ln for ln in lines if "error" in ln][:2] or lines[-2:]
        raise error(f"{compiler} failed building {source.name} for {tag}: {' | '.join(said)}")
    os.replace(tmp, out)
    return out
