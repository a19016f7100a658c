"""Token selection: greedy, temperature and nucleus (top-p), seeded per request."""

from __future__ import annotations

import torch

from scheduler.request import SamplingParams


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def skip_draws(gen: torch.Generator, n: int, vocab: int) -> None:
    """Advance ``gen`` past the draws of ``n`` sampled tokens over a ``vocab``-sized vocabulary
    (``sample`` draws one float32 Exp(1) per token id), as a task resumed after ``n`` tokens
    goes on with the stream it had."""
    q = torch.empty(vocab, dtype=torch.float32)
    for _ in range(n):
        q.exponential_(1.0, generator=gen)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Pick one token from float32 ``logits [V]`` (any device); sampling runs on the CPU so a
    seed gives the same tokens on every device.

    The draw is an exponential race in token order: ``q_i ~ Exp(1)`` from ``gen``, one per
    token id, and the token maximising ``p_i / q_i`` (a sample from ``p``). Drawing per token
    id, not per rank in sorted order, keeps a seeded stream stable across settings whose logits
    differ in the last bits (batch composition, TP, the service against one run): with sorted
    positions, two tokens of nearly equal probability trading places swapped their draws and
    changed the pick (seen on the demo model's near-uniform distributions, 1.2e-7 apart);
    now a pick changes only where two tokens' ``p / q`` tie to that precision, or at the edge
    of the top-p nucleus.
    """
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep_sorted = (cum - sorted_p) < params.top_p
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    q = torch.empty_like(probs).exponential_(1.0, generator=gen)
    # a token outside the nucleus (p = 0) never wins, even against q = 0
    race = torch.where(probs > 0, probs / q, torch.full_like(probs, -1.0))
    return int(torch.argmax(race).item())
