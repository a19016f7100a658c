"""A benchmark result's command line names the kernel switches it ran under, and nothing else of
the environment."""

import importlib.util
import sys
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "_command", Path(__file__).resolve().parents[1] / "scripts" / "_command.py"
)
_command = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(_command)


def test_command_line_names_kernel_switches_only(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/bench_generate.py", "--contexts", "32768"])
    for k in _command.KERNEL_SWITCHES:
        monkeypatch.delenv(k, raising=False)
    assert _command.command_line() == "python scripts/bench_generate.py --contexts 32768"
    monkeypatch.setenv("TILERUN_PREFILL_PATH", "gluon")
    monkeypatch.setenv("TILERUN_EXPERT_GEMV", "0")
    monkeypatch.setenv("TILERUN_HOME", "/secret/place")  # not a kernel switch: left out
    assert _command.command_line() == (
        "TILERUN_PREFILL_PATH=gluon TILERUN_EXPERT_GEMV=0 "
        "python scripts/bench_generate.py --contexts 32768"
    )
