"""A warning, once per driver, where torch or Ray will be compiled from source at every start.

Installers that write no bytecode (uv without ``--compile-bytecode``, ``pip --no-compile``)
together with ``PYTHONDONTWRITEBYTECODE=1`` (common in container images) leave every Python
process to compile torch's and Ray's sources each time it imports them: the driver, Ray's
dashboard and agents, every worker. On an H200 host that took the 7B shape's time to its first
step from 12 s to 18 s (``benchmarks/results/time-to-ready-llama2-7b-nvidia-h200-bytecode-*``).
Without ``PYTHONDONTWRITEBYTECODE`` Python writes the cache at the first import, so only the
first start pays and nothing is said.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

PACKAGES = ("torch", "ray")
_said = False


def uncompiled(module_files: dict[str, str | None]) -> list[str]:
    """The names among ``module_files`` (name -> source path) whose source has no cached
    bytecode beside it (``__pycache__``); entries without a ``.py`` source are skipped."""
    return [
        name
        for name, path in module_files.items()
        if path
        and path.endswith(".py")
        and not os.path.exists(importlib.util.cache_from_source(path))
    ]


def bytecode_warning(
    dont_write: bool | None = None, module_files: dict[str, str | None] | None = None
) -> str | None:
    """The one-line warning, or None when imports are not recompiled at each start.

    ``dont_write`` defaults to this interpreter's setting, ``module_files`` to the ``__init__``
    of torch and Ray where they are imported (a package installed without bytecode has none
    for its ``__init__`` either)."""
    if dont_write is None:
        dont_write = sys.dont_write_bytecode
    if not dont_write:
        return None
    if module_files is None:
        module_files = {n: getattr(sys.modules.get(n), "__file__", None) for n in PACKAGES}
    names = uncompiled(module_files)
    if not names:
        return None
    # the site-packages folder of each package: <site>/<package>/__init__.py
    sites = sorted({os.path.dirname(os.path.dirname(module_files[n])) for n in names})
    return (
        f"{' and '.join(names)} {'has' if len(names) == 1 else 'have'} no bytecode and "
        "PYTHONDONTWRITEBYTECODE is set, so every "
        f"tilerun process compiles {'it' if len(names) == 1 else 'them'} again at each start "
        "(seconds per process). Fix: run "
        f"`python -m compileall -q -j 0 {' '.join(sites)}` once (uv: install with "
        "--compile-bytecode), or unset PYTHONDONTWRITEBYTECODE"
    )


def warn_once() -> None:
    """Log :func:`bytecode_warning` the first time it applies in this process."""
    global _said
    if _said:
        return
    _said = True
    message = bytecode_warning()
    if message:
        log.warning(message)
