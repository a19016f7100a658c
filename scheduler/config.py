"""What the scheduler needs from the user: block size, step budget, seats, context limit, and
whether steps overlap."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scheduler.errors import CapacityError
from scheduler.fields import check_fields, option

#: tokens per step where the user leaves ``prefill_chunk`` unset. Larger chunks amortise each
#: step's fixed cost (weights read once per step, launches, and on CPU one OpenMP barrier per op)
#: over more tokens; activations grow with them. Measured: on an H100 the 7B shape prefills 30.5K
#: tokens/s in 8K chunks against 17K in 512-token ones; on the 2-core CPU chunks of 2048 and more
#: run 2x the 512-token ones under load and 2048 is the best idle (within 5%) (benchmarks/results/
#: prefill-chunk-cpu*.json).
AUTO_PREFILL_CHUNK = {"cuda": 8192, "npu": 8192, "cpu": 2048}


def auto_prefill_chunk(device_type: str) -> int:
    """Tokens per step for ``device_type`` (``cpu``, ``cuda``, ``npu``) when not configured."""
    return AUTO_PREFILL_CHUNK.get(device_type, 512)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching and admission. The KV pool's size (``num_blocks``) is not user config: the
    workers measure it, and the engine hands it to the :class:`~scheduler.scheduler.Scheduler`."""

    block_size: int = option(16, help="tokens per KV cache block", minimum=1)
    prefill_chunk: int | None = option(
        None,
        help="tokens per engine step (the outer tiling level that bounds activations; default: "
        "by device, 8192 on GPUs and NPUs, 2048 on CPUs, as measured in benchmarks/results/)",
        minimum=1,
    )
    max_num_seqs: int = option(8, help="most sequences running at once", minimum=1)
    max_model_len: int | None = option(
        None,
        help="longest prompt + new tokens of one sequence (default: the model's context limit)",
        minimum=1,
    )
    overlap_schedule: bool = option(
        True,
        help="schedule and send step i+1 while the workers run step i, so the driver's work and "
        "the hop to the workers hide behind the device (the same tokens either way; off: one "
        "step at a time)",
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with ``prefill_chunk`` chosen for ``device_type`` where left unset."""
        if self.prefill_chunk is not None:
            return self
        return dataclasses.replace(self, prefill_chunk=auto_prefill_chunk(device_type))

    def for_model(self, model_limit: int) -> SchedulerConfig:
        """This config with ``max_model_len`` set against the model's context limit."""
        if self.max_model_len is not None and self.max_model_len > model_limit:
            raise CapacityError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={model_limit} by {self.max_model_len - model_limit}"
            )
        return dataclasses.replace(self, max_model_len=self.max_model_len or model_limit)
