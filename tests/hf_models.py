"""Small Hugging Face Llama checkpoints with random weights, written as real safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {
    # name: LlamaConfig overrides
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_llama(directory: Path, shape: str, seed: int = 0, **overrides):
    """Save a random-weight ``LlamaForCausalLM`` and return the (float32, eval) HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        # larger weights than the default 0.02 so logits are far apart and greedy choices
        # are decided by the model, not by float rounding
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
    )
    kw.update(SHAPES[shape])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from transformers ``generate`` (no early stop), on ``hf``'s device."""
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def make_hf_minimax(directory: Path, seed: int = 0, **overrides):
    """Save a random-weight ``MiniMaxForCausalLM`` (lightning and softmax layers, a mixture of
    experts, weighted residuals) and return the (float32, eval) HF model."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    kw = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        block_size=16,  # transformers' own lightning block, not tilerun's
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # logits far apart, as for the Llama checkpoints
        full_attn_alpha_factor=0.9,
        linear_attn_beta_factor=1.1,
        mlp_alpha_factor=1.05,
        mlp_beta_factor=0.95,
        eos_token_id=None,
        bos_token_id=None,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(MiniMaxConfig(**kw)).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model
