"""Weights: Hugging Face safetensors checkpoints (single or sharded), or seeded random weights.

Only safetensors are read (never pickle). Each parameter's own ``weight_loader`` takes its rank's
slice, and the slice is read lazily from the file, so a rank reads only what it keeps.
"""

from __future__ import annotations

import json
import math
import stat
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from runtime.model.llama import LlamaForCausalLM
from scheduler.errors import CheckpointError

# Parameters are floating point; an integer tensor under a weight's name is a wrong or hostile
# checkpoint, not something to cast. Keys are safetensors header dtypes.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_ITEM_BYTES = {**FLOAT_DTYPES, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
               "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def safe_entry(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` if it is a regular file inside ``directory`` once links are resolved.

    Checkpoints come from anywhere: an index or a link must not make the loader open
    ``/etc/passwd``, weights from another directory, or a FIFO that blocks the load forever.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}: file name {name!r} is not a non-empty string")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{what}: file {name!r} is outside the checkpoint directory {directory} "
            "(absolute paths and '..' are refused)"
        )
    root = directory.resolve()
    target = (directory / rel).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(
            f"{what}: file {name!r} links to {target}, outside the checkpoint directory {root}"
        )
    try:
        mode = target.stat().st_mode
    except OSError:
        raise CheckpointError(f"{what}: file {name!r} does not exist in {directory}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{what}: {name!r} in {directory} is not a regular file "
            f"({_file_kind(mode)}); only regular files are read"
        )
    return target


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header of ``path`` (tensor name -> dtype, shape, offsets), checked against
    the file's size before any tensor is read; a malformed file is one line naming it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after "
                "the length field (truncated or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], [int(x) for x in meta["shape"]]
            start, stop = (int(x) for x in meta["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {meta!r}"
            ) from None
        if dtype not in _ITEM_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        want = _ITEM_BYTES[dtype] * math.prod(shape)
        if (
            not 0 <= start <= stop <= data_bytes
            or stop - start != want
            or min(shape, default=0) < 0
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} spans bytes [{start}, {stop}) but the file holds "
                f"{data_bytes} data bytes and {dtype}{shape} needs {want} (truncated or corrupt)"
            )
        out[name] = {"dtype": dtype, "shape": shape}
    return out


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (every file checked, see safe_entry)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        safe_entry(d, index.name, "checkpoint index")
        try:
            data = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index}: 'weight_map' must be a mapping of tensor name to file name, got "
                f"{type(weight_map).__name__}"
            )
        checked: dict[str, Path] = {}
        out = {}
        for name, fname in weight_map.items():
            if fname not in checked:
                checked[fname] = safe_entry(d, fname, f"{index.name} entry {name!r}")
            out[name] = checked[fname]
        return out
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
        path = safe_entry(d, f.name, "checkpoint")
        for name in read_header(path):
            out[name] = path
    return out


class LayerCountdown:
    """Calls ``done(i)`` as soon as every checkpoint tensor of decoder layer ``i`` is loaded, so
    that a layer bound for a slower tier leaves host memory before the next one is read (a
    model larger than memory loads with about one layer in it)."""

    def __init__(self, names, done: Callable[[int], None] | None) -> None:
        self.done = done
        self.left: dict[int, int] = {}
        for name in names:
            i = layer_of(name)
            if i is not None:
                self.left[i] = self.left.get(i, 0) + 1

    def loaded(self, name: str) -> None:
        i = layer_of(name)
        if self.done is None or i is None:
            return
        self.left[i] -= 1
        if self.left[i] == 0:
            self.done(i)


def layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (``model.layers.<i>.``), or None."""
    if not name.startswith("model.layers."):
        return None
    return int(name.split(".", 3)[2])


def load_checkpoint(
    model: LlamaForCausalLM,
    directory: str | Path,
    on_layer: Callable[[int], None] | None = None,
) -> None:
    """Load and shard a HF Llama checkpoint into ``model``; errors name the tensor at fault.
    ``on_layer(i)``: called once layer ``i``'s tensors are all in (see ``LayerCountdown``)."""
    where = checkpoint_files(directory)
    targets = model.hf_weight_map()
    countdown = LayerCountdown(targets, on_layer)
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
        header = read_header(path)
        for name in names:
            meta = header.get(name)
            if meta is None:
                raise CheckpointError(f"tensor {name} is not in {path.name}, which the index names")
            if meta["dtype"] not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name} in {path.name} is {meta['dtype']}; weights must be floating "
                    f"point ({', '.join(FLOAT_DTYPES)}), integer tensors are not cast"
                )
            expected = model.full_shape(name)
            if tuple(meta["shape"]) != tuple(expected):
                raise CheckpointError(
                    f"tensor {name} in {path.name} has shape {meta['shape']}, "
                    f"expected {list(expected)} from the model config"
                )
        try:
            with safe_open(str(path), framework="pt") as h:
                for name in names:
                    param, part = targets[name]
                    _loader(param)(_slicer(h.get_slice(name), len(header[name]["shape"])), part)
                    countdown.loaded(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None


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


def init_random(
    model: LlamaForCausalLM,
    seed: int = 0,
    std: float = 0.02,
    device: torch.device | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> None:
    """Seeded random weights, identical for every TP size: each *full* tensor is drawn from a
    generator seeded by (seed, tensor name), then sliced by the parameter's own loader.
    ``device``: where to draw (default: the model's), so that a model built off its device
    (weights to be streamed) gets the same weights as one built on it; ``on_layer`` as for
    ``load_checkpoint``."""
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    targets = model.hf_weight_map()
    countdown = LayerCountdown(targets, on_layer)
    for name, (param, part) in targets.items():
        shape = model.full_shape(name)
        if name.endswith("norm.weight"):
            full = torch.ones(shape, dtype=dtype, device=device)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)
        _loader(param)(full, part)
        del full
        countdown.loaded(name)
