"""The ``triton`` attention backend: Triton kernels for KV write, prefill and decode.

Runs on CUDA GPUs of compute capability 8.0 or newer, and on the CPU when ``TRITON_INTERPRET=1``
was set before the kernel modules were imported (CI runs the real kernels in Triton's
interpreter that way, at tiny shapes).

Prefill picks its kernel by capability: on sm_90 at head dim 128 in float16/bfloat16 the
FA3-style Gluon kernel of ``gluon_prefill_hopper`` (``GLUON_BY_DEFAULT``); else on Hopper (9.0+)
the TMA kernel of ``triton_prefill_hopper`` for float16/bfloat16 at head dims 64 and 128; else
(Ampere, float32, other head dims, caches TMA cannot describe) the pointer-gather kernel of
``triton_prefill``. ``prefill_path`` forces one ("hopper" also runs in the interpreter, for
tests). ``TILERUN_PREFILL_PATH`` sets the path where the code asks for "auto" (engines built
from the CLI).
"""

from __future__ import annotations

import os

import torch

from runtime.attention.base import AttentionBackend, AttentionMetadata

try:  # the kernel modules are reached through their module objects so that tests can reload them
    from runtime.attention import (
        triton_decode,
        triton_kv_write,
        triton_prefill,
        triton_prefill_hopper,
    )

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # triton missing: the registry reports this reason
    _IMPORT_ERROR = f"triton is not importable ({e})"


PREFILL_PATHS = ("auto", "hopper", "ampere", "gluon")
# whether ``auto`` takes the Gluon kernel where it applies (sm_90, head dim 128, fp16/bf16): on
# the H100 it prefills the 7B shape's 32K at 28,078 tok/s against the TMA kernel's 25,357 and
# transformers' 23,169 (benchmarks/results/generate-7b-32k-prefill-*-nvidia-h100-80gb-hbm3.json)
GLUON_BY_DEFAULT = True


class TritonBackend(AttentionBackend):
    """FlashAttention-2 prefill and split-KV decode over the paged cache, in Triton."""

    name = "triton"
    captured_decode_params = 1  # the keys per split program of the decode kernel

    def __init__(
        self,
        prefill_config: triton_prefill.PrefillConfig | None = None,
        decode_config: triton_decode.DecodeConfig | None = None,
        hopper_config: triton_prefill_hopper.HopperPrefillConfig | None = None,
        prefill_path: str = "auto",
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(_IMPORT_ERROR)
        if prefill_path not in PREFILL_PATHS:
            raise ValueError(f"prefill_path={prefill_path!r}; valid: {', '.join(PREFILL_PATHS)}")
        if prefill_path == "auto":  # the deployment's choice, for engines built from the CLI
            prefill_path = os.environ.get("TILERUN_PREFILL_PATH", "auto")
            if prefill_path not in PREFILL_PATHS:
                raise ValueError(
                    f"TILERUN_PREFILL_PATH={prefill_path!r}; valid: {', '.join(PREFILL_PATHS)}"
                )
        self.prefill_config = prefill_config
        self.decode_config = decode_config
        self.hopper_config = hopper_config
        self.prefill_path = prefill_path

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 0):
                return f"compute capability {cap[0]}.{cap[1]} < 8.0 (use the 'torch' backend)"
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "on CPU only under Triton's interpreter (set TRITON_INTERPRET=1 before import)"
        return f"device type {device.type!r} is not supported by Triton kernels here"

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        triton_kv_write.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = (q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables)
        if self.use_gluon(q, k_cache, v_cache):
            from runtime.attention.gluon_prefill_hopper import prefill_attention_gluon

            return prefill_attention_gluon(*args, meta.max_query_len, scale)
        if self.use_hopper(q, k_cache, v_cache):
            return triton_prefill_hopper.prefill_attention_hopper(
                *args,
                meta.max_query_len,
                scale,
                config=self.hopper_config,
                gather_config=self.prefill_config,
            )
        return triton_prefill.prefill_attention(
            *args, meta.max_query_len, scale, config=self.prefill_config
        )

    def use_gluon(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether prefill runs the Gluon FA3-style kernel: forced, or (``GLUON_BY_DEFAULT``) on
        sm_90 where it applies (head dim 128, float16/bfloat16)."""
        if self.prefill_path == "gluon":
            return True  # prefill_attention_gluon raises naming why if it cannot
        if self.prefill_path != "auto" or not GLUON_BY_DEFAULT or q.device.type != "cuda":
            return False
        try:
            from runtime.attention import gluon_prefill_hopper
        except ImportError:  # a Triton without Gluon
            return False
        return gluon_prefill_hopper.unsupported_reason(q, k_cache, v_cache) is None

    def use_hopper(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether prefill runs the TMA kernel: forced, or on sm_90+ where it applies."""
        if self.prefill_path == "ampere":
            return False
        if self.prefill_path == "hopper":
            return True  # prefill_attention_hopper raises naming why if it cannot
        if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) < (9, 0):
            return False
        cfg = self.hopper_config or triton_prefill_hopper.default_hopper_config(
            q.shape[-1], q.device
        )
        return triton_prefill_hopper.unsupported_reason(q, k_cache, v_cache, cfg) is None

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not meta.is_decode:
            return self.prefill(q, k_cache, v_cache, meta, scale)
        # a captured step: the grid is sized for the capacity (meta.max_seq_len) and the keys
        # per split program come from the device (captured_decode_values, refreshed per replay)
        return triton_decode.decode_attention(
            q,
            k_cache,
            v_cache,
            meta.seq_lens,
            meta.block_tables,
            meta.max_seq_len,
            scale,
            config=self.decode_config,
            chunk_buffer=meta.captured.params if meta.captured is not None else None,
        )

    def captured_decode_values(
        self,
        num_seqs: int,
        max_seq_len: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[int]:
        """``(keys per split program,)``: what an eager decode of ``num_seqs`` sequences, the
        longest ``max_seq_len`` keys, would use, widened if needed so that the splits fit the
        grid the graph froze for ``capacity`` keys."""
        cfg = self.decode_config or triton_decode.default_decode_config(head_dim, dtype, device)
        plan = triton_decode.split_plan
        _, grid = plan(num_seqs, num_kv_heads, capacity, device, cfg)
        chunk, splits = plan(num_seqs, num_kv_heads, max_seq_len, device, cfg)
        if splits > grid:
            chunk, _ = plan(num_seqs, num_kv_heads, max_seq_len, device, cfg, num_splits=grid)
        return (chunk,)
