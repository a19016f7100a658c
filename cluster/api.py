"""The Python API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.config import EngineConfig
from cluster.engine import Engine, Progress, RequestOutput
from runtime.tokenizer import load_tokenizer
from scheduler.errors import CapacityError
from scheduler.request import SamplingParams


class LLM:
    """A model served by tilerun workers.

    >>> llm = LLM(model="demo-small", device="cpu")          # embedded local Ray cluster
    >>> out = llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=16))[0]
    >>> out.token_ids, out.text, out.metrics["decode_tokens_per_s"]

    Keyword arguments are the flat fields of :class:`cluster.config.EngineConfig` (``tp``,
    ``comm``, ``attention``, ``prefill_chunk``, ...; ``tilerun run --help`` lists them all).
    ``executor="local"`` runs one worker in this process without Ray; ``ray_address`` attaches
    to an existing cluster.
    """

    def __init__(self, model: str = "demo-small", **engine_kwargs) -> None:
        t0 = time.perf_counter()
        self.config = EngineConfig.from_dict({"model": model, **engine_kwargs})
        self.engine = Engine(self.config)
        self.tokenizer = load_tokenizer(self.engine.checkpoint)
        #: ``ready in ...s: ... KV cache: device N blocks, host M blocks ...``
        self.ready_line = self.engine.ready_line(time.perf_counter() - t0)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a batch; prompts are text or lists of token ids."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if any(isinstance(p, str) and not p for p in prompts):
            # a tokenizer turns "" into a lone BOS, and the model would generate from nothing
            raise CapacityError("the prompt is empty: give at least one character of text")
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        outs = self.engine.generate(ids, params, on_progress)
        for o in outs:
            o.text = self.tokenizer.decode(o.token_ids)
        return outs

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
