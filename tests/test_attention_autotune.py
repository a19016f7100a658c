"""``auto`` on a CPU measures the candidates: the fastest exact one wins, an inexact one never."""

from __future__ import annotations

import time

import pytest
import torch

from runtime import cpu_module
from runtime.attention import autotune
from runtime.attention.autotune import AttentionShape, choose_backend
from runtime.attention.cpu_flash import CpuFlashBackend
from runtime.attention.registry import resolve_backend
from runtime.attention.torch_tiled import TorchTiledBackend

SHAPE = AttentionShape(8, 2, 32, torch.float32, 16)  # the demo model's attention


class Slow(TorchTiledBackend):
    """Exact, but sleeps on every call."""

    def forward(self, *args):
        time.sleep(0.02)
        return super().forward(*args)


class Wrong(CpuFlashBackend):
    """Fast, but its output is off by a little more than float rounding."""

    def forward(self, *args):
        out, lse = super().forward(*args)
        return out + 1e-3, lse


def test_fastest_exact_candidate_wins_and_inexact_one_drops_out():
    choice = choose_backend(SHAPE, {"slow": Slow(), "flash": CpuFlashBackend()})
    assert choice.name == "flash" and choice.ms["slow"] > choice.ms["flash"]
    assert "flash" in choice.reason and "slow" in choice.reason
    choice = choose_backend(SHAPE, {"wrong": Wrong(), "slow": Slow()})
    assert choice.name == "slow" and "wrong" not in choice.ms
    assert "not exact: wrong" in choice.reason
    with pytest.raises(RuntimeError, match="no exact"):
        choose_backend(SHAPE, {"wrong": Wrong()})


def test_auto_on_cpu_measures_the_registered_candidates(monkeypatch):
    name, why = resolve_backend("auto", torch.device("cpu"), SHAPE)
    assert name in autotune.CPU_CANDIDATES
    assert why.startswith("auto: fastest exact on this CPU") and "flash_cpu" in why
    # without a shape (no model to measure for) auto is the CPU default, no measurement: our
    # kernel where a C++ compiler built it, else torch's
    default = "fa2_cpu" if cpu_module.compiler() else "flash_cpu"
    assert resolve_backend("auto", torch.device("cpu")) == (default, "auto: the CPU default")
    # a forced backend is not measured
    assert resolve_backend("torch", torch.device("cpu"), SHAPE) == ("torch", "asked for")
    # only one runnable candidate: chosen without measuring
    monkeypatch.setattr(autotune, "CPU_CANDIDATES", ("torch",))
    assert resolve_backend("auto", torch.device("cpu"), SHAPE)[0] == "torch"


def test_auto_on_cpu_is_measured_once_per_process(monkeypatch):
    """Two engines of one process run the same kernel (bitwise the same logits) even when a
    second measurement, on a busier moment, would have ranked the candidates the other way."""
    shape = AttentionShape(4, 4, 16, torch.float32, 16)  # a shape no other test resolves
    first = resolve_backend("auto", torch.device("cpu"), shape)
    loser = next(n for n in autotune.CPU_CANDIDATES if n != first[0])

    def rigged(shape, candidates, device):
        return autotune.Choice(loser, "auto: rigged", {})

    monkeypatch.setattr(autotune, "choose_backend", rigged)
    assert resolve_backend("auto", torch.device("cpu"), shape) == first
    # another shape is measured anew
    other = AttentionShape(4, 2, 16, torch.float32, 16)
    assert resolve_backend("auto", torch.device("cpu"), other) == (loser, "auto: rigged")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_cpu_candidates_pass_the_exactness_check(dtype):
    shape = AttentionShape(8, 2, 32, dtype, 16)
    choice = choose_backend(shape, {"flash_cpu": CpuFlashBackend(), "torch": TorchTiledBackend()})
    assert set(choice.ms) == {"flash_cpu", "torch"}
