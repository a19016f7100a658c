"""CPU attention on torch's fused flash-attention kernel for CPUs, over the paged KV cache.

torch ships a FlashAttention-2 forward for CPUs (``aten._scaled_dot_product_flash_attention_for_cpu``:
blocked online softmax, vectorised, split over heads and query blocks on the intra-op threads)
that returns the log-sum-exp the contract asks for and reads grouped-query K/V heads without
repeating them. :class:`runtime.attention.fused_runs.FusedRunsBackend` feeds it the paged cache
(runs of blocks as views, chunks split at their start, decode heads folded into rows).
"""

from __future__ import annotations

import torch

from runtime.attention.fused_runs import FusedRunsBackend

_OP_NAME = "_scaled_dot_product_flash_attention_for_cpu"


class CpuFlashBackend(FusedRunsBackend):
    """torch's CPU flash-attention kernel, one call per run of consecutive blocks."""

    name = "flash_cpu"

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "it is torch's CPU kernel; use triton, efficient_cuda or torch on accelerators"
        if not hasattr(torch.ops.aten, _OP_NAME):
            return f"this torch ({torch.__version__}) has no aten.{_OP_NAME}"
        return None

    def attend(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the kernel reads grouped K/V heads itself: q [1, Hq, n, D] over k/v [1, Hkv, N, D]
        o, l_ = getattr(torch.ops.aten, _OP_NAME)(
            q.transpose(0, 1).unsqueeze(0), k, v, 0.0, causal, scale=scale
        )
        return o[0].transpose(0, 1), l_[0].transpose(0, 1)
