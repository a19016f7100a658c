"""Weights: Hugging Face safetensors checkpoints (single or sharded), or seeded random weights.

Only safetensors are read (never pickle). Each parameter's own ``weight_loader`` takes its rank's
slice, and the slice is read lazily from the file, so a rank reads only what it keeps.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.model.llama import LlamaForCausalLM
from scheduler.errors import CheckpointError


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return {name: d / fname for name, fname in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = (
            f" (found {', '.join(bins)}: pickle-based files are never loaded; convert them to "
            "safetensors first)"
            if bins
            else ""
        )
        raise CheckpointError(f"no *.safetensors files in {d}{hint}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[name] = f
    return out


def load_checkpoint(model: LlamaForCausalLM, directory: str | Path) -> None:
    """Load and shard a HF Llama checkpoint into ``model``; errors name the tensor at fault."""
    where = checkpoint_files(directory)
    targets = model.hf_weight_map()
    missing = [n for n in targets if n not in where]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"checkpoint {directory} is missing tensor(s): {shown}")
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as h:
            for name in names:
                sl = h.get_slice(name)
                shape = tuple(sl.get_shape())
                expected = model.full_shape(name)
                if shape != expected:
                    raise CheckpointError(
                        f"tensor {name} in {path.name} has shape {list(shape)}, "
                        f"expected {list(expected)} from the model config"
                    )
                param, part = targets[name]
                _loader(param)(_slicer(sl, len(shape)), part)


def _loader(param):
    """The parameter's own sharding loader, or a whole-tensor copy for replicated ones (norms)."""
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        return loader

    def replicated(src, part: int = 0) -> None:
        full = src if isinstance(src, torch.Tensor) else src(0, 0, param.shape[0])
        param.data.copy_(full)

    return replicated


def _slicer(sl, ndim: int):
    def read(dim: int, start: int, stop: int) -> torch.Tensor:
        index = [slice(None)] * ndim
        index[dim] = slice(start, stop)
        return sl[tuple(index)]

    return read


def init_random(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Seeded random weights, identical for every TP size: each *full* tensor is drawn from a
    generator seeded by (seed, tensor name), then sliced by the parameter's own loader."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for name, (param, part) in model.hf_weight_map().items():
        shape = model.full_shape(name)
        if name.endswith("norm.weight"):
            full = torch.ones(shape, dtype=dtype, device=device)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)
        _loader(param)(full, part)
        del full
