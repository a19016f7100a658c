"""Exact merge of two partial attention results over disjoint key sets.

If ``out_a``/``lse_a`` is attention over key set A and ``out_b``/``lse_b`` over a disjoint set B,
attention over A and B together is the lse-weighted average of the two outputs, and its lse is
``logaddexp(lse_a, lse_b)``. This is how the device-resident and host-resident parts of a KV
cache combine.
"""

from __future__ import annotations

import torch


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(out [T,H,D], lse [T,H])`` partials; returns ``(out, lse)``.

    A row whose lse is ``-inf`` on one side saw no keys there: its output on that side is ignored
    (it may hold anything, nan included). A row with no keys on either side comes back as zeros
    with lse ``-inf``. Arithmetic is float32; ``out`` keeps ``out_a``'s dtype, ``lse`` is float32.
    """
    lse_a = lse_a.to(torch.float32)
    lse_b = lse_b.to(torch.float32)
    lse = torch.logaddexp(lse_a, lse_b)
    # both sides empty: lse is -inf; subtract 0 instead so the weights are 0, not nan
    lse_safe = lse.masked_fill(lse == float("-inf"), 0.0)
    w_a = torch.exp(lse_a - lse_safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse_safe).unsqueeze(-1)
    # where, not multiply, so that an empty side's nan output cannot leak through a 0 weight
    part_a = torch.where(w_a > 0, out_a.to(torch.float32) * w_a, 0.0)
    part_b = torch.where(w_b > 0, out_b.to(torch.float32) * w_b, 0.0)
    return (part_a + part_b).to(out_a.dtype), lse
