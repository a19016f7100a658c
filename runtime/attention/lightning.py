"""Lightning attention: linear attention with a per-head exponential decay, tiled into blocks.

What a lightning layer computes (TransNormerLLM, MiniMax-01): for head ``h`` with decay rate
``s_h >= 0`` and ``lambda_h = exp(-s_h)``, query ``t`` reads every earlier token through

    o_t = sum_{j <= t} lambda_h^(t - j) (q_t . k_j) v_j

with no softmax, so the whole past folds into one ``[D, E]`` state per head,
``S_t = lambda_h S_{t-1} + k_t^T v_t`` and ``o_t = q_t S_t``: decode costs O(1) per token
whatever the context, and that state is all a sequence keeps (no KV cache).

Prefill is tiled as Lightning Attention-2 does it (Qin et al., 2024), so that it runs as matrix
products instead of a T-step recurrence or a cumulative sum:

* **intra-block** (queries and keys of one block of ``B`` tokens): ordinary masked attention,
  ``((Q K^T) * M) V`` with the decay mask ``M[i, j] = lambda^(i - j)`` for ``j <= i``, else 0;
* **inter-block** (everything before the block): ``(Q * lambda^(i + 1)) S`` with ``S`` the
  state at the block's start, then ``S <- lambda^n S + (K * lambda^(n - 1 - j))^T V`` for a
  block of ``n`` tokens.

Here the blocks are walked in order, each a handful of products batched over the heads on
strided views of the packed inputs (no copy of the sequence). A prefill may continue from a state (chunked prefill, or a prompt appended to a conversation),
which gives the same result as one prefill of the whole text. All arithmetic is float32 (the
state stays float32 between steps); outputs come back in the inputs' dtype.
"""

from __future__ import annotations

import torch

# tokens per block: per token and head the intra part costs 4*B*D (the block's triangle counted
# whole) and the inter part 4*D*E, so small blocks save arithmetic until the per-block work (one
# state update, a few small products) dominates. On the 2-core CPU at D = E = 128, 8 heads, 4K /
# 16K / 64K tokens: 103K / 84K / 111K tokens/s at 64, 95K / 79K / 104K at 128, 67K / 59K / 81K
# at 256 (benchmarks/results/lightning-core-cpu.json). The result does not depend on it beyond
# float rounding.
BLOCK_SIZE = 64


def check_step(q, k, v, slopes, query_lens: list[int], states: torch.Tensor) -> None:
    """A packed step's inputs agree: shapes (see :func:`lightning_forward`), one state per
    sequence, and the sequences' lengths adding up to the rows. One line naming the mismatch."""
    _check(q, k, v, slopes)
    if len(query_lens) != states.shape[0]:
        raise ValueError(
            f"lightning attention: {len(query_lens)} sequences but {states.shape[0]} states"
        )
    if sum(query_lens) != q.shape[0]:
        raise ValueError(
            f"lightning attention: query_lens add up to {sum(query_lens)}, q has {q.shape[0]} rows"
        )
    want = (q.shape[1], q.shape[2], v.shape[2])
    if states.dim() != 4 or tuple(states.shape[1:]) != want:
        raise ValueError(
            f"lightning attention: states must be [N, H, D, E] = [N, {want[0]}, {want[1]}, "
            f"{want[2]}]; got {tuple(states.shape)}"
        )
    if states.dtype != torch.float32:
        raise ValueError(
            f"lightning attention: states are float32 (they add up every token's k^T v); got "
            f"{states.dtype}: make them with new_states()"
        )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"lightning attention: q and k must be [T, H, D] and v [T, H, E] with the same T and "
            f"H; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if slopes.shape != (q.shape[1],):
        raise ValueError(
            f"lightning attention: slopes must hold one decay rate per head ({q.shape[1]}); "
            f"got shape {tuple(slopes.shape)}"
        )


def new_states(num_seqs: int, num_heads: int, key_dim: int, value_dim: int, device=None):
    """Zero states ``[num_seqs, H, D, E]`` float32: what a sequence holds before its first token."""
    return torch.zeros(num_seqs, num_heads, key_dim, value_dim, dtype=torch.float32, device=device)


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """One sequence's ``T`` new tokens: ``q``/``k`` ``[T, H, D]``, ``v`` ``[T, H, E]``, decay
    rates ``slopes [H]``; ``state [H, D, E]`` float32 is the state before the first of them and
    is advanced past the last, in place. Returns ``out [T, H, E]`` in ``q``'s dtype."""
    check_step(q, k, v, slopes, [q.shape[0]], state.unsqueeze(0))
    _check_block_size(block_size)
    return _prefill(q, k, v, _rates(slopes, q), state, block_size, {})


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"lightning attention: block_size must be >= 1, got {block_size}")


def _rates(slopes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The decay rates as float32 ``[H, 1, 1]`` on ``q``'s device."""
    return slopes.to(device=q.device, dtype=torch.float32).view(-1, 1, 1)


def _prefill(q, k, v, s, state, block_size: int, decays: dict[int, _Decays]) -> torch.Tensor:
    """:func:`lightning_prefill` on checked inputs; ``decays`` (block length -> its decays) is
    shared by the sequences of one step, so each length's factors are made once."""
    T, H, _ = q.shape
    if T == 0:
        return q.new_empty(0, H, v.shape[2])
    out = torch.empty(T, H, v.shape[2], dtype=q.dtype, device=q.device)
    B = min(block_size, T)
    full = T // B
    # block by block over [H, B, .] views of the [T, H, .] inputs (the products take the strides):
    # only block-sized temporaries, which the allocator hands back each block, never a whole
    # sequence's copy (at 64K tokens those were most of a CPU's time, in page faults)
    d = _decays_for(decays, s, B)
    for a in range(0, full * B, B):
        out[a : a + B] = _block(q[a : a + B], k[a : a + B], v[a : a + B], state, d).transpose(0, 1)
    if full * B < T:  # the last, shorter block, with its own decays
        a = full * B
        d = _decays_for(decays, s, T - a)
        out[a:] = _block(q[a:], k[a:], v[a:], state, d).transpose(0, 1)
    return out


def _decays_for(decays: dict[int, _Decays], s: torch.Tensor, n: int) -> _Decays:
    if n not in decays:
        decays[n] = _Decays(s, n)
    return decays[n]


def _block(q, k, v, state: torch.Tensor, d: _Decays) -> torch.Tensor:
    """One block of ``n`` tokens (the decays' length), ``q``/``k`` ``[n, H, D]``, ``v [n, H, E]``:
    its float32 output ``[H, n, E]``; ``state`` advanced past it."""
    qb, kb, vb = (x.transpose(0, 1).float() for x in (q, k, v))  # [H, n, .]
    # intra, then inter added into the same buffer, then the state moves past the block
    o = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)).mul_(d.mask), vb)
    o.baddbmm_(qb * d.query, state)
    state.mul_(d.block).baddbmm_((kb * d.key).transpose(-1, -2), vb)
    return o


class _Decays:
    """The decay factors of a block of ``n`` tokens for rates ``s [H, 1, 1]``: ``query[i] =
    lambda^(i+1)``, ``key[j] = lambda^(n-1-j)``, ``block = lambda^n`` and the intra mask
    ``lambda^(i-j)`` on and below the diagonal, 0 above it."""

    def __init__(self, s: torch.Tensor, n: int) -> None:
        i = torch.arange(n, device=s.device, dtype=torch.float32)
        self.query = torch.exp(-s * (i + 1).view(n, 1))  # [H, n, 1]
        self.key = torch.exp(-s * (n - 1 - i).view(n, 1))  # [H, n, 1]
        self.block = torch.exp(-s * n)  # [H, 1, 1]
        gap = i.view(n, 1) - i.view(1, n)
        # 0 above the diagonal; the gap is clamped first, so no exp of a positive number overflows
        self.mask = torch.exp(-s * gap.clamp(min=0)).masked_fill(gap < 0, 0.0)  # [H, n, n]


def lightning_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """One new token for each of ``N`` sequences: ``q``/``k`` ``[N, H, D]``, ``v [N, H, E]``;
    ``states [N, H, D, E]`` float32, advanced in place (``S <- lambda S + k^T v``, then
    ``o = q S``). Returns ``out [N, H, E]`` in ``q``'s dtype."""
    _check(q, k, v, slopes)
    return _decode(q, k, v, slopes, states)


def _decode(q, k, v, slopes, states) -> torch.Tensor:
    """:func:`lightning_decode` on checked inputs."""
    N, H, D = q.shape
    E = v.shape[2]
    lam = torch.exp(-slopes.to(device=q.device, dtype=torch.float32)).view(1, H, 1, 1)
    states.mul_(lam)
    kf, vf = k.float().unsqueeze(-1), v.float().unsqueeze(-2)  # [N, H, D, 1], [N, H, 1, E]
    if states.is_contiguous():
        # the outer products added in place, batched over (sequence, head): no [N, H, D, E]
        # temporary (1.4x the broadcast form on the 2-core CPU, 16 sequences of 8 x 128 x 128)
        flat = states.view(N * H, D, E)
        flat.baddbmm_(kf.reshape(N * H, D, 1), vf.reshape(N * H, 1, E))
        return torch.bmm(q.float().reshape(N * H, 1, D), flat).view(N, H, E).to(q.dtype)
    states.add_(kf * vf)
    return torch.matmul(q.float().unsqueeze(-2), states).squeeze(-2).to(q.dtype)


def lightning_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    query_lens: list[int],
    states: torch.Tensor,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """A step of packed sequences: sequence ``b`` owns the next ``query_lens[b]`` rows of ``q``,
    ``k``, ``v`` (``[T, H, D]``, ``[T, H, E]``) and the state ``states[b]``, which is advanced
    in place. A step of single tokens (decode) runs as one batched update; otherwise each
    sequence is a tiled prefill from its state. Returns ``out [T, H, E]``."""
    check_step(q, k, v, slopes, query_lens, states)
    if all(n == 1 for n in query_lens):
        return _decode(q, k, v, slopes, states)
    _check_block_size(block_size)
    s, decays = _rates(slopes, q), {}
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    start = 0
    for b, n in enumerate(query_lens):
        rows = slice(start, start + n)
        out[rows] = _prefill(q[rows], k[rows], v[rows], s, states[b], block_size, decays)
        start += n
    return out


__all__ = [
    "BLOCK_SIZE",
    "check_step",
    "lightning_decode",
    "lightning_forward",
    "lightning_prefill",
    "new_states",
]
