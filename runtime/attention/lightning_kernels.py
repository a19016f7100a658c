"""Which lightning core a layer runs: the Triton kernels on a CUDA device, the torch path
elsewhere.

The Triton kernels (``triton_lightning``) keep each head's state in registers across a
sequence's blocks, and read and write it once a decode step; on an H200 they run the core
25-40x faster than the torch path (``benchmarks/results/lightning-core-nvidia-h200.json``:
64 heads of 128, bf16, 111 against 3.1 TFLOP/s at 32K; a decode step of 16 sequences at 3.1
against 0.95 TB/s of state). They need power-of-two head sizes of at least 16; other shapes,
and every other device (the CPU, NPUs), take ``runtime.attention.lightning``. Both share one
contract, so the choice is made per call from the tensors' device and shape: a model built in
host memory for the weight tier and then moved, or a test on the CPU, needs no other setting.
"""

from __future__ import annotations

import torch

from runtime.attention.lightning import lightning_forward


def lightning_kernel(device: torch.device, head_dim: int, value_dim: int) -> str:
    """``"triton"`` or ``"torch"``: what :func:`lightning_step` runs for these tensors."""
    if device.type != "cuda":
        return "torch"
    if any(n < 16 or n & (n - 1) for n in (head_dim, value_dim)):
        return "torch"
    return "triton"


def lightning_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    query_lens: list[int],
    states: torch.Tensor,
) -> torch.Tensor:
    """``lightning_forward``'s contract (packed sequences, ``states`` advanced in place) on the
    core :func:`lightning_kernel` names; a step of single tokens takes the decode kernel."""
    if lightning_kernel(q.device, q.shape[2], v.shape[2]) == "torch":
        return lightning_forward(q, k, v, slopes, query_lens, states)
    # imported here: Triton is only needed where a CUDA device is
    from runtime.attention.triton_lightning import (
        lightning_decode_triton,
        lightning_prefill_triton,
    )

    if all(n == 1 for n in query_lens):
        return lightning_decode_triton(q, k, v, slopes, states)
    return lightning_prefill_triton(q, k, v, slopes, query_lens, states)
