"""Float64 reference for lightning attention: the oracle its tiled form is tested against.

Deliberately naive: the full ``T x T`` decay-masked score matrix of one sequence, plus what the
state it starts from contributes, written straight from the definition
``o_t = sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j`` (see ``runtime.attention.lightning``).
"""

from __future__ import annotations

import torch


def reference_lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``q``/``k`` ``[T, H, D]``, ``v [T, H, E]``, rates ``slopes [H]``, optional
    starting ``state [H, D, E]``. Returns ``(out [T, H, E], state after the last token
    [H, D, E])``, both float64."""
    T, H, D = q.shape
    E = v.shape[2]
    s = slopes.double().view(H, 1, 1)
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k, v))  # [H, T, .]
    pos = torch.arange(T, dtype=torch.float64, device=q.device)
    gap = pos.view(T, 1) - pos.view(1, T)
    mask = torch.where(gap >= 0, torch.exp(-s * gap.clamp(min=0)), torch.zeros_like(gap))
    out = torch.matmul(torch.matmul(qd, kd.transpose(-1, -2)) * mask, vd)
    s0 = torch.zeros(H, D, E, dtype=torch.float64, device=q.device)
    if state is not None:
        s0 = state.double()
    # the starting state seen from token t has decayed t+1 times
    out += torch.matmul(qd * torch.exp(-s * (pos + 1).view(T, 1)), s0)
    weights = torch.exp(-s * (T - 1 - pos).view(T, 1))  # key j's weight in the final state
    final = torch.exp(-s * T) * s0 + torch.matmul((kd * weights).transpose(-1, -2), vd)
    return out.transpose(0, 1), final
