"""Triton kernels in tests: on a GPU compiled, without one in Triton's interpreter.

Triton decides interpreter or compiler when ``@triton.jit`` decorates a function, its own
``triton.language`` helpers included, so ``TRITON_INTERPRET=1`` must be set before the first
``import triton`` of the process: importing this module does that (conftest.py also does it for a
whole session). If something imported triton without it earlier in the session, its helpers are
compiled-mode objects that cannot run on the CPU: a test module then skips its tests through
:func:`guard` and reruns itself in a fresh process through :func:`rerun`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

NEEDS_FRESH_PROCESS = not ON_GPU and type(triton.language.zeros).__name__ != "InterpretedFunction"
RERUN_TEST = "test_in_fresh_interpreter_process"


def guard(request) -> None:
    """For a module's autouse fixture: skip every test but the rerun when the kernels cannot
    run in this process."""
    if NEEDS_FRESH_PROCESS and request.node.originalname != RERUN_TEST:
        pytest.skip("triton was imported without TRITON_INTERPRET; covered by the rerun test")


def rerun(test_file: str) -> None:
    """For a module's ``test_in_fresh_interpreter_process``: run ``test_file`` in a new process
    with the interpreter on from the start (skipped where the kernels ran in this one)."""
    if not NEEDS_FRESH_PROCESS:
        pytest.skip("the kernels run in this process")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
