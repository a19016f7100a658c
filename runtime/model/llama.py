"""A Llama-family decoder composed from tensor-parallel-aware layers.

The model is plain math over packed tokens: ``forward(input_ids [T], positions [T], kv_caches,
meta, backend)``. Batching, chunked prefill and sharding are decided outside it.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.config import ModelConfig
from runtime.layers import fused_ops
from runtime.layers.attention import LlamaAttention
from runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from runtime.layers.linear import ColumnParallelLinear, RowParallelLinear
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding
from runtime.model.base import CausalLM
from runtime.parallel import ParallelState


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        n = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [n, n], tp, ["intermediate_size"] * 2, dtype, device
        )
        self.down_proj = RowParallelLinear(
            n, cfg.hidden_size, tp, "intermediate_size", dtype, device
        )

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused_ops.fused_enabled(gate_up):
            return fused_ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        # in place: one [tokens, intermediate] buffer fewer per layer (the same products)
        return nn.functional.silu(gate).mul_(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate/up run inside the down projection's tiles, so each tile's AllReduce overlaps the
        # next tile's whole MLP (3x the FLOPs of down alone), not only its down matmul
        return self.down_proj(x, prologue=self._gate_up, prologue_cost=2.0)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(cfg, tp, dtype, device)

    def forward(self, x, residual, rope, kv_cache, meta, backend):
        """``(mlp output, residual stream)``: the residual add is left to the next norm, which
        fuses it (``residual`` None: ``x`` is the first layer's input)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    def __init__(
        self, cfg: ModelConfig, tp: ParallelState, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, tp, dtype, device) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        if cfg.tie_word_embeddings:  # one tensor: the checkpoint has no lm_head.weight
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (after the last norm)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)  # once per step, shared by the layers
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv, meta, backend)
        return self.norm(x, residual)[0]

    def hf_weight_map(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Checkpoint tensor name (HF Llama layout) -> (parameter, fused part index)."""
        m = self.outer_weight_map()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            gu = layer.mlp.gate_up_proj.weight
            m |= layer.self_attn.weight_map(p + "self_attn.")
            m |= {
                p + "mlp.gate_proj.weight": (gu, 0),
                p + "mlp.up_proj.weight": (gu, 1),
                p + "mlp.down_proj.weight": (layer.mlp.down_proj.weight, 0),
                p + "input_layernorm.weight": (layer.input_layernorm.weight, 0),
                p + "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight, 0),
            }
        return m

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The unsharded checkpoint shape expected for ``name``."""
        c = self.config
        d, h = c.head_dim, c.hidden_size
        suffix = name.split(".")[-2]
        shapes = {
            "embed_tokens": (c.vocab_size, h),
            "lm_head": (c.vocab_size, h),
            "norm": (h,),
            "q_proj": (c.num_attention_heads * d, h),
            "k_proj": (c.num_key_value_heads * d, h),
            "v_proj": (c.num_key_value_heads * d, h),
            "o_proj": (h, c.num_attention_heads * d),
            "gate_proj": (c.intermediate_size, h),
            "up_proj": (c.intermediate_size, h),
            "down_proj": (h, c.intermediate_size),
            "input_layernorm": (h,),
            "post_attention_layernorm": (h,),
        }
        return shapes[suffix]
