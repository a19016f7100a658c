"""Bad configs and checkpoints fail with a message that names the field or tensor at fault."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.config import EngineConfig
from runtime.config import ModelConfig
from runtime.loader import build_model, resolve_model
from runtime.parallel import ParallelState
from scheduler.errors import CheckpointError, ConfigError

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_missing_field_is_named():
    d = dict(BASE)
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match="missing required field.*intermediate_size"):
        ModelConfig.from_dict(d)


def test_inconsistent_head_counts_are_named():
    with pytest.raises(
        ConfigError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"
    ):
        ModelConfig.from_dict({**BASE, "num_key_value_heads": 3})
    with pytest.raises(
        ConfigError, match="hidden_size=30 is not divisible by num_attention_heads=4"
    ):
        ModelConfig.from_dict({**BASE, "hidden_size": 30})


def test_wrong_types_and_engine_fields_are_named():
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer"):
        ModelConfig.from_dict({**BASE, "num_hidden_layers": "two"})
    with pytest.raises(ConfigError, match="prefill_chunk must be a positive integer"):
        EngineConfig.from_dict({"prefill_chunk": 0})
    with pytest.raises(ConfigError, match="unknown engine field.*tensor_parallel"):
        EngineConfig.from_dict({"tensor_parallel": 2})
    with pytest.raises(ConfigError, match="comm='ucx' is not valid"):
        EngineConfig.from_dict({"comm": "ucx"})


def test_hf_config_json_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 32,,}')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type .bert. is not a model tilerun runs"):
        ModelConfig.from_hf(tmp_path)


@pytest.fixture()
def checkpoint(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint
    tensors = load_file(str(src / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    return tmp_path, tensors


def _load(path):
    return build_model(
        resolve_model(str(path)), ParallelState(), torch.float32, torch.device("cpu")
    )


def test_missing_tensor_is_named(checkpoint):
    path, tensors = checkpoint
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight"
    ):
        _load(path)


def test_wrong_shape_is_named(checkpoint):
    path, tensors = checkpoint
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.self_attn.k_proj.weight .* shape \[8, 64\], expected \[16, 64\]",
    ):
        _load(path)


def test_sharded_checkpoint_with_index_loads_same_weights(checkpoint, hf_checkpoint):
    path, tensors = checkpoint
    names = sorted(tensors)
    half = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname))
    index = {"weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = _load(path)
    want = tensors["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.layers[1].mlp.down_proj.weight, want)


def test_pickle_checkpoints_are_refused(tmp_path, hf_checkpoint):
    src, _ = hf_checkpoint
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle-based files are never loaded"):
        _load(tmp_path)


@pytest.mark.parametrize(
    "device_type,capability,want",
    [
        ("cpu", None, torch.float32),
        ("cuda", (9, 0), torch.bfloat16),
        ("cuda", (8, 0), torch.bfloat16),
        ("cuda", (7, 5), torch.float16),  # Turing
        ("cuda", (7, 0), torch.float16),  # Volta
        ("npu", None, torch.bfloat16),
    ],
)
def test_auto_dtype_follows_the_device(device_type, capability, want):
    from runtime.device import dtype_for

    assert dtype_for("auto", device_type, capability) == want
    assert dtype_for(None, device_type, capability) == want


def test_bfloat16_on_a_gpu_without_it_is_refused_with_the_fix():
    from runtime.device import dtype_for

    with pytest.raises(
        ConfigError, match=r"bfloat16 needs .* 8\.0.*this one is 7\.0.*--dtype float16"
    ):
        dtype_for("bfloat16", "cuda", (7, 0))
    assert dtype_for("float16", "cuda", (7, 0)) == torch.float16
    assert dtype_for("bfloat16", "cuda", (8, 6)) == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype='fp4' is not valid"):
        dtype_for("fp4", "cuda", (9, 0))
