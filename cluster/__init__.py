"""Ray: cluster bring-up, one actor per device, the driver-side engine, jobs and the CLI."""

from cluster.api import LLM
from scheduler.request import SamplingParams

__all__ = ["LLM", "SamplingParams"]
