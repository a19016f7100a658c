"""Ray: cluster bring-up, one actor per device, the driver-side engine, jobs and the CLI."""

from scheduler.request import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and Ray; commands that only touch the task store (submit, result)
    # stay quick by not importing it until someone asks for it
    if name == "LLM":
        from cluster.api import LLM

        return LLM
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
