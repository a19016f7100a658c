"""Requests and their state as the scheduler sees them: token ids, never tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from scheduler.errors import ConfigError
from scheduler.fields import check_fields, option


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``seed`` makes sampling repeatable."""

    max_new_tokens: int = option(64, help="tokens to generate", minimum=1)
    temperature: float = option(
        0.0, help="0 is greedy; higher flattens the distribution", minimum=0
    )
    top_p: float = option(1.0, help="nucleus sampling: keep the smallest set above this mass")
    seed: int | None = option(
        None, help="seed of the sampling generator (never changes a preset's weights)"
    )
    stop_token_ids: tuple[int, ...] = option((), help="token ids that end a sequence, e.g. 2,13")
    ignore_eos: bool = option(False, help="keep generating past the model's end-of-sequence tokens")

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


# The input token of a decode chunk whose previous step has not come back yet: each worker uses
# the token it sampled for that sequence in the last step that sampled it.
PENDING_TOKEN = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One prompt and its generation. ``num_computed`` tokens already have their KV in cache.

    With steps in flight (the overlapped loop schedules step i+1 before step i's tokens are
    back) the scheduler also counts ahead: ``num_scheduled`` positions are covered by steps it
    has scheduled, done or not, and ``num_pending`` tokens are being sampled by steps not yet
    back. Without steps in flight both equal what is done (``num_computed``, 0).
    """

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_scheduled: int = 0
    num_pending: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    prefill_done_time: float | None = None
    finish_time: float | None = None
    # KV prefix on disk (``runtime.kv_prefix``): ``save_prefix`` (stem, key, tokens) asks the
    # workers to write the KV of the first ``tokens`` positions once they are computed;
    # ``restore_prefix`` (stem) with ``restore_tokens`` > 0 makes the chunks of positions below
    # it read their rows from that file instead of computing them (at most the prompt's length
    # - 1: the last prompt token is computed, for the first new token's logits)
    save_prefix: tuple[str, str, int] | None = None
    restore_prefix: str | None = None
    restore_tokens: int = 0
    # a task resumed after this many generated tokens (they end its prompt): its seeded sampler
    # skips their draws
    skip_draws: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def prompt_scheduled(self) -> bool:
        """Every prompt position is in a scheduled step (the next step, if any, decodes)."""
        return self.num_scheduled >= len(self.prompt_ids)

    @property
    def can_decode(self) -> bool:
        """A decode step may be scheduled: the prompt is scheduled and the tokens known or in
        flight stay below ``max_new_tokens`` (a length stop is never learned late)."""
        return (
            self.status is not SeqStatus.FINISHED
            and self.prompt_scheduled
            and len(self.output_ids) + self.num_pending < self.params.max_new_tokens
        )

    def next_input(self) -> int:
        """The token at position ``num_scheduled``: known, or ``PENDING_TOKEN`` while a step in
        flight is still sampling it (the workers fill it in from what they sampled)."""
        i = self.num_scheduled - len(self.prompt_ids)
        if i < 0:
            return self.prompt_ids[self.num_scheduled]
        return self.output_ids[i] if i < len(self.output_ids) else PENDING_TOKEN

    def append_token(self, token: int, now: float) -> None:
        self.output_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        stop = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop |= set(self.eos_token_ids)
        if token in stop:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status = SeqStatus.FINISHED
            self.finish_time = now
