"""A MiniMax-01-style hybrid decoder: lightning-attention layers and softmax-attention layers
(``ModelConfig.layer_types``), a mixture-of-experts MLP in every layer, and weighted residuals
(``x = norm(x) * alpha + sublayer(norm(x)) * beta``), as transformers' ``MiniMaxForCausalLM``.

Softmax layers keep the paged KV cache (``kv_caches`` holds theirs only, in order); lightning
layers keep one state per sequence in a :class:`~runtime.lightning_states.LightningStates`
that the worker binds to each step (:meth:`MiniMaxForCausalLM.bind_step`). Under tensor
parallelism a rank holds whole heads of every attention layer (and their states) and a slice of
every expert (see the layers).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.attention.base import AttentionBackend, AttentionMetadata
from runtime.config import ModelConfig
from runtime.layers.attention import LlamaAttention
from runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from runtime.layers.lightning_attention import LightningAttention
from runtime.layers.moe import SparseMoE
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding
from runtime.lightning_states import LightningStates
from runtime.model.base import CausalLM
from runtime.parallel import ParallelState


class MiniMaxDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: ParallelState, dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lightning = cfg.is_lightning(layer)
        if self.lightning:
            index = sum(cfg.is_lightning(i) for i in range(layer))
            self.self_attn = LightningAttention(cfg, layer, index, tp, dtype, device)
            self.alpha, self.beta = cfg.linear_attn_alpha_factor, cfg.linear_attn_beta_factor
        else:
            self.self_attn = LlamaAttention(cfg, tp, dtype, device)
            self.alpha, self.beta = cfg.full_attn_alpha_factor, cfg.full_attn_beta_factor
        self.block_sparse_moe = SparseMoE(cfg, tp, dtype, device)
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha_factor, cfg.mlp_beta_factor

    def forward(self, x, rope, kv_cache, states, meta, backend):
        h = self.input_layernorm(x)
        if self.lightning:
            a = self.self_attn(h, states, meta)
        else:
            a = self.self_attn(h, rope, kv_cache, meta, backend)
        x = h * self.alpha + a * self.beta
        h = self.post_attention_layernorm(x)
        return h * self.mlp_alpha + self.block_sparse_moe(h) * self.mlp_beta


class MiniMaxForCausalLM(CausalLM):
    def __init__(
        self, cfg: ModelConfig, tp: ParallelState, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp_size = tp.world_size
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp, dtype, device
        )
        self.layers = nn.ModuleList(
            MiniMaxDecoderLayer(cfg, i, tp, dtype, device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.states: LightningStates | None = None

    # -- per-sequence states --------------------------------------------------------------------
    def allocate_states(self, num_slots: int, device: torch.device) -> LightningStates:
        """One state slot per sequence the worker may hold at once, for every lightning layer."""
        c = self.config
        heads = c.num_attention_heads // self.tp_size  # this rank's
        self.states = LightningStates(
            c.num_lightning_layers, num_slots, heads, c.head_dim, c.head_dim, device
        )
        return self.states

    def bind_step(
        self, seq_ids: list[int], start_positions: list[int], rows: int | None = None
    ) -> None:
        """The step's sequences' state slots (``rows``: a CUDA graph's bucket, see
        ``LightningStates.bind``)."""
        self.states.bind(seq_ids, start_positions, rows)

    def release(self, seq_ids) -> None:
        if self.states is not None:
            self.states.release(seq_ids)

    # -- the model ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]``; ``kv_caches``: the softmax layers' only."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        caches = iter(kv_caches)
        for layer in self.layers:
            kv = None if layer.lightning else next(caches)
            x = layer(x, rope, kv, self.states, meta, backend)
        return self.norm(x)

    def hf_weight_map(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Checkpoint tensor name (transformers' MiniMax layout) -> (parameter, part index)."""
        m = self.outer_weight_map()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = layer.self_attn
            if layer.lightning:
                m |= {
                    p + "self_attn.qkv_proj.weight": (a.qkv_proj.weight, 0),
                    p + "self_attn.output_gate.weight": (a.output_gate.weight, 0),
                    p + "self_attn.out_proj.weight": (a.out_proj.weight, 0),
                    p + "self_attn.norm.weight": (a.norm.weight, 0),
                }
            else:
                m |= a.weight_map(p + "self_attn.")
            moe = layer.block_sparse_moe
            m[p + "block_sparse_moe.gate.weight"] = (moe.gate, 0)
            for e in range(self.config.num_local_experts):
                if not moe.holds(e):
                    continue  # expert parallelism: another rank's; its tensors stay unread
                q = p + f"block_sparse_moe.experts.{e}."
                m[q + "w1.weight"] = (moe.gate_up, 2 * e)
                m[q + "w3.weight"] = (moe.gate_up, 2 * e + 1)
                m[q + "w2.weight"] = (moe.down, e)
            m[p + "input_layernorm.weight"] = (layer.input_layernorm.weight, 0)
            m[p + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, 0)
        return m

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The unsharded checkpoint shape expected for ``name``."""
        c = self.config
        h, d = c.hidden_size, c.head_dim
        inner = c.num_attention_heads * d
        parts = name.split(".")
        suffix = parts[-2]
        if parts[-3:-1] == ["self_attn", "norm"]:
            return (inner,)
        shapes = {
            "embed_tokens": (c.vocab_size, h),
            "lm_head": (c.vocab_size, h),
            "norm": (h,),
            "input_layernorm": (h,),
            "post_attention_layernorm": (h,),
            "qkv_proj": (3 * inner, h),
            "output_gate": (inner, h),
            "out_proj": (h, inner),
            "q_proj": (inner, h),
            "k_proj": (c.num_key_value_heads * d, h),
            "v_proj": (c.num_key_value_heads * d, h),
            "o_proj": (h, inner),
            "gate": (c.num_local_experts, h),
            "w1": (c.intermediate_size, h),
            "w3": (c.intermediate_size, h),
            "w2": (h, c.intermediate_size),
        }
        return shapes[suffix]
