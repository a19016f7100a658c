"""The tree stays ruff clean (lint and format), as pyproject.toml configures it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return [exe]


def test_ruff_check():
    r = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = subprocess.run(
        [*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_layering():
    """runtime/ never imports ray; scheduler/ never imports torch or ray."""
    for pkg, banned in (("runtime", ("ray",)), ("scheduler", ("torch", "ray"))):
        for f in (ROOT / pkg).rglob("*.py"):
            for line in f.read_text().splitlines():
                s = line.strip()
                for mod in banned:
                    assert not s.startswith((f"import {mod}", f"from {mod} ", f"from {mod}.")), (
                        f"{f.relative_to(ROOT)} imports {mod}"
                    )
