"""The start-up warning for packages without bytecode (``cluster/bytecode.py``): said only where
Python will compile them again at each start, naming the packages and the command that fixes it."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

from cluster.bytecode import bytecode_warning, uncompiled

ROOT = Path(__file__).resolve().parent.parent


def _package(tmp_path: Path, name: str) -> str:
    init = tmp_path / "site" / name / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text("X = 1\n")
    return str(init)


def test_uncompiled_until_compiled(tmp_path):
    path = _package(tmp_path, "pkg")
    assert uncompiled({"pkg": path, "absent": None, "ext": "/x/mod.so"}) == ["pkg"]
    py_compile.compile(path, doraise=True)
    assert uncompiled({"pkg": path}) == []


def test_warning_only_where_bytecode_is_never_written(tmp_path):
    torch_init, ray_init = _package(tmp_path, "torch"), _package(tmp_path, "ray")
    files = {"torch": torch_init, "ray": ray_init}
    # Python writes the cache at the first import: later starts are fast, nothing to say
    assert bytecode_warning(dont_write=False, module_files=files) is None
    message = bytecode_warning(dont_write=True, module_files=files)
    assert message is not None and "\n" not in message
    assert message.startswith("torch and ray have no bytecode and PYTHONDONTWRITEBYTECODE")
    assert f"python -m compileall -q -j 0 {tmp_path / 'site'}" in message
    py_compile.compile(torch_init, doraise=True)
    assert bytecode_warning(dont_write=True, module_files=files).startswith("ray has no bytecode")
    py_compile.compile(ray_init, doraise=True)
    assert bytecode_warning(dont_write=True, module_files=files) is None


def test_a_driver_under_the_variable_reads_its_own_setting(tmp_path):
    """In a real interpreter started with PYTHONDONTWRITEBYTECODE=1, a package imported without
    bytecode is named; the same package once compiled is not."""
    path = _package(tmp_path, "torch")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.modules.pop('torch', None)\n"
        "import importlib; sys.modules['torch'] = importlib.import_module('torch')\n"
        "from cluster.bytecode import bytecode_warning\n"
        "print(bytecode_warning(module_files={'torch': sys.modules['torch'].__file__}))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}

    def run() -> str:
        return subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "site")],
            env=env, capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout.strip()  # fmt: skip

    assert run().startswith("torch has no bytecode")
    assert not (Path(path).parent / "__pycache__").exists()  # the variable kept it unwritten
    py_compile.compile(path, doraise=True)
    assert run() == "None"
