"""The tree stays ruff clean (lint and format), as pyproject.toml configures it."""

from __future__ import annotations

import ast
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


# package -> top-level modules it must never import (DESIGN.md's floors, bottom up)
OURS = ("scheduler", "runtime", "collectives", "cluster", "scripts", "tests")
LAYER_RULES: dict[str, tuple[str, ...]] = {
    "scheduler": ("torch", "ray", *(p for p in OURS if p != "scheduler")),
    "collectives": ("ray", "cluster", "runtime", "scripts", "tests"),
    "runtime": ("ray", "cluster", "scripts", "tests"),
    "cluster": ("scripts", "tests"),
}


def layering_violations(root: Path) -> list[str]:
    """Every import under ``root`` that breaks ``LAYER_RULES``, as 'path:line imports mod'.

    Reads the syntax tree, so imports inside functions count too.
    """
    found = []
    for pkg, banned in LAYER_RULES.items():
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    if name.partition(".")[0] in banned:
                        found.append(f"{f.relative_to(root)}:{node.lineno} imports {name}")
    return found


def test_layering():
    """scheduler/ imports nothing of ours nor torch/ray; collectives/ no cluster, runtime or ray;
    runtime/ no ray or cluster; only cluster/ imports ray."""
    assert layering_violations(ROOT) == []


@pytest.mark.parametrize(
    "pkg, line",
    [
        ("scheduler", "from runtime.device import DTYPES"),
        ("scheduler", "import collectives.base"),
        ("scheduler", "import torch"),
        ("collectives", "from runtime.parallel import ParallelState"),
        ("collectives", "from cluster import LLM"),
        ("runtime", "import ray"),
        ("runtime", "from cluster.config import EngineConfig"),
    ],
)
def test_layering_check_catches_each_rule(tmp_path, pkg, line):
    """The check above is not vacuous: one bad import, even inside a function, is reported."""
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "bad.py").write_text(f"def f():\n    {line}\n")
    assert layering_violations(tmp_path) == [f"{pkg}/bad.py:2 imports {line.split()[1]}"]
