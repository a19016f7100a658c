"""From a model name to a ready model: a preset (seeded random weights) or a HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.config import ModelConfig
from scheduler.errors import ConfigError
from runtime.model.llama import LlamaForCausalLM
from runtime.parallel import ParallelState
from runtime.presets import PRESETS, get_preset
from runtime.weights import init_random, load_checkpoint


def resolve_model(name: str) -> tuple[ModelConfig, Path | None]:
    """``(config, checkpoint_dir)``; ``checkpoint_dir`` is None for a synthetic preset."""
    p = Path(name).expanduser()
    if p.is_dir():
        return ModelConfig.from_hf(p), p
    if name in PRESETS:
        return get_preset(name), None
    if p.exists():
        raise ConfigError(f"model={name!r} is a file; give the checkpoint directory that holds it")
    return get_preset(name), None  # raises, listing presets


def build_model(
    name: str, tp: ParallelState, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> LlamaForCausalLM:
    cfg, ckpt = resolve_model(name)
    model = LlamaForCausalLM(cfg, tp, dtype, device)
    if ckpt is None:
        init_random(model, seed=seed)
    else:
        load_checkpoint(model, ckpt)
    return model.eval()
