"""Synthetic presets (Llama shapes and a MiniMax-01 hybrid): random weights from a fixed seed,
for demos, tests and benchmarks."""

from __future__ import annotations

from runtime.config import ModelConfig, RopeScaling
from scheduler.errors import ConfigError

PRESETS: dict[str, ModelConfig] = {
    # A few MB: unit and integration tests.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=None,
    ),
    # Small enough for a 2-core CPU to take a 16K-token prompt in well under a minute.
    "demo-small": ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=262144,
        rope_theta=500000.0,
        eos_token_id=None,
    ),
    # A MiniMax-01-style hybrid as small as demo-small: seven lightning-attention layers, then one
    # softmax layer (MiniMax-Text-01's pattern), a mixture of 4 experts (top 2) in every layer.
    # `./scripts/demo --model minimax-small` shows the lightning path.
    "minimax-small": ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=262144,
        rope_theta=10000000.0,
        rms_norm_eps=1e-5,
        eos_token_id=None,
        model_type="minimax",
        layer_types=("linear_attention",) * 7 + ("full_attention",),
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    # The shape of Llama-2-7B (MHA, 32 layers): benchmarks on the GPU machine.
    "llama2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=262144,
        rms_norm_eps=1e-5,
        eos_token_id=None,
        torch_dtype="bfloat16",
    ),
    # The shape of Llama-3-8B (GQA 32/8, llama3 rope scaling).
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        eos_token_id=None,
        torch_dtype="bfloat16",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}, "
            "or a checkpoint directory holding config.json and *.safetensors"
        ) from None
