"""Model configuration: a frozen, validated description of a Llama-family decoder.

It is built from a Hugging Face ``config.json`` (``ModelConfig.from_hf``), a YAML/dict of the same
fields, or a named synthetic preset (``runtime.presets``). Validation happens here, once, and every
error names the field and the fix.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in HF configs)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _number(f"rope_scaling.{name}", getattr(self, name))
        _positive_int(
            "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings
        )
        if self.rope_type not in _ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"valid: {', '.join(_ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                "rope_scaling.high_freq_factor must exceed rope_scaling.low_freq_factor "
                f"({self.high_freq_factor} <= {self.low_freq_factor})"
            )

    @staticmethod
    def from_hf(d: dict[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        keep = {f.name for f in fields(RopeScaling)}
        return RopeScaling(
            rope_type=kind, **{k: v for k, v in d.items() if k in keep - {"rope_type"}}
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU), or of a
    MiniMax-01-style hybrid (``model_type="minimax"``): lightning-attention and softmax-attention
    layers by ``layer_types``, a mixture-of-experts MLP, and weighted residuals."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    torch_dtype: str = "float32"
    model_type: str = "llama"
    # minimax: per layer "linear_attention" (lightning) or "full_attention" (softmax, paged KV)
    layer_types: tuple[str, ...] | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    sliding_window: int | None = None
    # minimax's weighted residuals: x = norm(x) * alpha + sublayer(norm(x)) * beta
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs "
                "each key/value head to serve a whole group of query heads"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        _number("rms_norm_eps", self.rms_norm_eps)
        _number("rope_theta", self.rope_theta)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(
                f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}"
            )
        if self.bos_token_id is not None and not _is_int(self.bos_token_id):
            raise ConfigError(
                f"bos_token_id must be an integer token id or null, got {self.bos_token_id!r}"
            )
        eos = self.eos_token_id
        if not (
            eos is None
            or _is_int(eos)
            or (isinstance(eos, (list, tuple)) and all(_is_int(x) for x in eos))
        ):
            raise ConfigError(
                f"eos_token_id must be an integer token id, a list of them or null, got {eos!r}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a mapping, got {self.rope_scaling!r}")
        if not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a string, got {self.torch_dtype!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r}; tilerun runs {', '.join(MODEL_TYPES)}"
            )
        if self.model_type == "minimax":
            self._check_minimax()
        elif self.layer_types is not None and set(self.layer_types) != {"full_attention"}:
            raise ConfigError(
                f"layer_types {self.layer_types!r}: a {self.model_type} model has only "
                "full_attention layers"
            )

    def _check_minimax(self) -> None:
        n = self.num_hidden_layers
        types = self.layer_types
        if types is None:  # transformers' default: softmax on even layers, lightning on odd
            types = tuple("full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n))
        if not isinstance(types, (list, tuple)) or len(types) != n:
            raise ConfigError(f"layer_types must list one type per layer ({n}), got {types!r}")
        bad = sorted(set(types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"layer_types: unknown {bad}; valid: {', '.join(LAYER_TYPES)}")
        object.__setattr__(self, "layer_types", tuple(types))
        if "full_attention" not in types:
            raise ConfigError(
                "layer_types has no full_attention layer; tilerun runs hybrids with at least one "
                "softmax-attention layer (its KV cache sizes the pool)"
            )
        for name in ("num_local_experts", "num_experts_per_tok"):
            _positive_int(name, getattr(self, name))
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_local_experts={self.num_local_experts}"
            )
        if self.sliding_window is not None:
            raise ConfigError(
                f"sliding_window={self.sliding_window}: tilerun's softmax layers attend to the "
                "whole context; use a checkpoint without a sliding window"
            )
        for f in fields(self):
            if f.name.endswith(("_alpha_factor", "_beta_factor")):
                _number(f.name, getattr(self, f.name))

    def is_lightning(self, layer: int) -> bool:
        """Whether layer ``layer`` is a lightning (linear) attention layer."""
        return self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    @property
    def num_lightning_layers(self) -> int:
        if self.layer_types is None:  # counted, never listed: a config may claim 10**9 layers
            return 0
        return self.layer_types.count("linear_attention")

    @property
    def num_kv_layers(self) -> int:
        """The layers that keep a paged KV cache: the softmax-attention ones."""
        return self.num_hidden_layers - self.num_lightning_layers

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a dict of ModelConfig fields (HF names); unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"{source}: expected a mapping of model fields, got {type(d).__name__}"
            )
        known = {f.name for f in fields(ModelConfig)}
        required = [f.name for f in fields(ModelConfig) if f.default is MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ConfigError(
                f"{source}: missing required field(s) {', '.join(missing)} for a Llama-family model"
            )
        kw = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 moved rope_theta/rope_scaling into rope_parameters
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope is not None and not isinstance(rope, (dict, RopeScaling)):
            key = "rope_scaling" if d.get("rope_scaling") is not None else "rope_parameters"
            raise ConfigError(
                f"{source}: {key} must be a mapping such as "
                f'{{"rope_type": "linear", "factor": 2.0}}, got {rope!r}'
            )
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in d:
            kw["rope_theta"] = rope["rope_theta"]
        if not isinstance(kw.get("rope_scaling"), RopeScaling):
            try:
                kw["rope_scaling"] = RopeScaling.from_hf(rope if isinstance(rope, dict) else None)
            except TypeError as e:
                raise ConfigError(f"{source}: bad rope_scaling: {e}") from e
        dtype = d.get("torch_dtype", d.get("dtype"))
        kw["torch_dtype"] = str(dtype) if dtype else "float32"
        if isinstance(kw.get("layer_types"), list):
            kw["layer_types"] = tuple(kw["layer_types"])
        try:
            return ModelConfig(**kw)
        except TypeError as e:  # wrong types surface here
            raise ConfigError(f"{source}: {e}") from e

    @staticmethod
    def from_hf(path: str | Path) -> ModelConfig:
        """Read a Hugging Face ``config.json`` (a file or the checkpoint directory holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"no model config at {p}: a checkpoint directory needs config.json")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a UTF-8 text file") from None
        if not isinstance(d, dict):
            raise ConfigError(
                f"{p}: holds a JSON {type(d).__name__}, expected an object of model fields"
            )
        arch = d.get("architectures") or []
        mtype = d.get("model_type", "llama")
        if mtype == "minimax" or "MiniMaxForCausalLM" in arch:
            return ModelConfig.from_dict({**d, "model_type": "minimax"}, source=str(p))
        if mtype not in ("llama", "mistral", "qwen2") and not any("Llama" in a for a in arch):
            raise ConfigError(
                f"{p}: model_type {mtype!r} is not a model tilerun runs; it runs the Llama "
                "family (llama, mistral, qwen2) and MiniMax (lightning + softmax attention)"
            )
        return ModelConfig.from_dict({**d, "model_type": "llama"}, source=str(p))


MODEL_TYPES = ("llama", "minimax")
LAYER_TYPES = ("full_attention", "linear_attention")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{name} must be a number, got {value!r}")
