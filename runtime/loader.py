"""From a model name to a ready model: a preset (seeded random weights) or a HF checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.config import ModelConfig
from runtime.model.llama import LlamaForCausalLM
from runtime.model.minimax import MiniMaxForCausalLM
from runtime.parallel import ParallelState
from runtime.presets import PRESETS, get_preset
from runtime.weights import init_random, load_checkpoint
from scheduler.errors import ConfigError


@dataclass(frozen=True)
class ModelSource:
    """A model resolved once (on the driver) and handed to every worker: its config, and where
    its weights come from (a checkpoint directory, or ``seed`` for a preset's random weights)."""

    name: str
    config: ModelConfig
    checkpoint: Path | None
    seed: int = 0


def resolve_model(name: str, seed: int = 0) -> ModelSource:
    """The model ``name`` names: a checkpoint directory, else a preset (error lists presets)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return ModelSource(name, ModelConfig.from_hf(p), p, seed)
    if p.exists() and name not in PRESETS:
        raise ConfigError(f"model={name!r} is a file; give the checkpoint directory that holds it")
    if name not in PRESETS and ("/" in name or name.startswith((".", "~"))):
        raise ConfigError(
            f"model directory {str(p)!r} does not exist; give an existing checkpoint directory "
            f"or a preset ({', '.join(sorted(PRESETS))})"
        )
    return ModelSource(name, get_preset(name), None, seed)  # get_preset raises, listing presets


MODEL_CLASSES = {"llama": LlamaForCausalLM, "minimax": MiniMaxForCausalLM}


def build_model(
    source: ModelSource,
    tp: ParallelState,
    dtype: torch.dtype,
    device: torch.device,
    stream: Callable[[nn.Module], object] | None = None,
) -> LlamaForCausalLM | MiniMaxForCausalLM:
    """``source``'s model on ``device``: this rank's slices of the checkpoint, or seeded weights.

    ``stream`` (weights in a slower tier): the model is built in host memory (its parameters
    allocated, not yet touched), ``stream(model)`` gives the tier, each streamed layer moves
    into it as soon as its tensors are loaded (``take``), and ``finish`` points the streamed
    layers at their device slots or mapping. Only the rest is moved to ``device``: neither
    the device nor host memory ever holds every weight at once.
    """
    built_on = torch.device("cpu") if stream is not None else device
    model = MODEL_CLASSES[source.config.model_type](source.config, tp, dtype, built_on)
    tier = stream(model) if stream is not None else None
    on_layer = tier.take if tier is not None else None
    try:
        if source.checkpoint is None:
            init_random(model, seed=source.seed, device=device, on_layer=on_layer)
        else:
            load_checkpoint(model, source.checkpoint, on_layer=on_layer)
    except BaseException:
        if tier is not None:
            tier.close()  # the disk tier's half-written file is given back at once
        raise
    if tier is not None:
        tier.finish()
        model.streamer = tier
        model.to(device)  # the streamed layers' parameters are on the device already
    return model.eval()
