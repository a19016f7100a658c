"""The driver-side engine: the scheduler decides, the executor runs, results come back.

One loop (``cluster.step_loop``): ``schedule()`` -> ``executor.submit(batch)`` (one RPC per
worker per step) -> ``scheduler.update(sampled)``, with step i+1 sent before step i is back
unless ``overlap_schedule`` is off. Progress is reported through a callback after every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster import bytecode, preflight
from cluster.config import EngineConfig
from cluster.kv_metrics import KVMeter
from cluster.step_loop import StepLoop
from runtime.gc_freeze import freeze_startup_objects, unfreeze_startup_objects
from runtime.loader import resolve_model
from scheduler.errors import CapacityError
from scheduler.request import SamplingParams, Sequence
from scheduler.scheduler import Scheduler
from scheduler.spill import SpillScheduler


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    text: str | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class Progress:
    step: int
    prefill_done: int
    prefill_total: int
    generated: int
    elapsed_s: float
    step_tokens: int


class Engine:
    def __init__(self, config: EngineConfig, executor_options: dict | None = None) -> None:
        """``executor_options`` go to the Ray executor (the service names its workers so)."""
        # unset defaults that depend on the device (the prefill chunk) are fixed here, once
        kind = preflight.device_type(config.worker.device)
        config = dataclasses.replace(config, scheduler=config.scheduler.for_device(kind))
        self.config = config
        # the model is resolved here, once; workers receive the result
        self.model = resolve_model(config.worker.model, seed=config.worker.weights_seed)
        self.model_config, self.checkpoint = self.model.config, self.model.checkpoint
        limits = config.scheduler.for_model(self.model_config.max_position_embeddings)
        self.max_model_len = limits.max_model_len
        # everything checkable without a cluster or weights fails here, before Ray starts
        preflight.check_engine(config, self.model_config, self.max_model_len)
        bytecode.warn_once()  # a start that recompiles torch and Ray is said, once, with its fix
        if config.cluster.executor == "local":
            from cluster.executor import LocalExecutor

            self.executor = LocalExecutor(config, self.model, limits)
        else:
            from cluster.executor import RayExecutor

            self.executor = RayExecutor(config, self.model, limits, **(executor_options or {}))
        self.num_host_blocks = self.executor.num_host_blocks
        if self.num_host_blocks:
            self.scheduler = SpillScheduler(limits, self.executor.num_blocks, self.num_host_blocks)
        else:  # no host tier: the plain scheduler, whole lifetimes reserved on the device
            self.scheduler = Scheduler(limits, self.executor.num_blocks)
        self._next_id = 0
        freeze_startup_objects()  # the driver's too (runtime/gc_freeze.py)

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Scheduler) -> None:
        """A scheduler (tests put in one of their own) comes with its step loop."""
        if getattr(self, "steps", None) is not None and self.steps.in_flight:
            raise RuntimeError("the scheduler cannot change while steps are in flight")
        self._scheduler = scheduler
        overlap = self.config.scheduler.overlap_schedule
        self.steps = StepLoop(scheduler, self.executor, overlap)

    def set_allreduce(self, overlap: bool, tiles: int | None = None) -> None:
        """Tiled or plain AllReduce from the next step on, on every worker (ablations)."""
        self.executor.set_allreduce(overlap, tiles)

    @property
    def device_infos(self) -> list[dict]:
        return self.executor.device_infos

    def ready_line(self, seconds: float) -> str:
        """The start-up line the CLI, the API's users and the demo print."""
        info = self.device_infos[0]
        why = info.get("attention_reason", "asked for")  # how auto chose, e.g. measured times
        attention = info["attention"] + ("" if why == "asked for" else f" ({why})")
        return (
            f"ready in {seconds:.1f}s: {len(self.device_infos)} worker(s) on {info['device']} "
            f"({info['name']}), attention={attention}, dtype={info['dtype']}, "
            f"KV cache: device {self.executor.num_blocks} blocks, host {self.num_host_blocks} "
            f"blocks (x {self.config.scheduler.block_size} tokens), prefill chunk "
            f"{self.config.scheduler.prefill_chunk} tokens{self._steps_via()}"
        )

    def _steps_via(self) -> str:
        """How each step reaches the Ray workers (``step_transport``, as ``auto`` chose it)."""
        transport = getattr(self.executor, "step_transport", None)
        if transport is None:  # the worker runs in this process
            return ""
        depth = getattr(self.executor, "pipeline_depth", 1)
        return f", steps via {transport}" + (f" ({depth} in flight)" if depth > 1 else "")

    @property
    def keeps_prefixes(self) -> bool:
        """Whether prompts' KV can be saved and restored (``runtime.kv_prefix``): not for a
        lightning hybrid, whose per-sequence states are not in the KV cache."""
        return not self.model_config.num_lightning_layers

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        save_prefix: tuple[str, str] | tuple[str, str, int] | None = None,
        restore_prefix: tuple[str, int] | None = None,
    ) -> Sequence:
        """Queue one prompt. ``save_prefix`` (file stem, key[, tokens]): the workers write the KV
        of the prompt's first ``tokens`` positions (default: all) once they are computed;
        ``restore_prefix`` (file stem, tokens): read that many positions (at most the prompt's
        length - 1) from such files instead of computing them. Both are ignored where
        ``keeps_prefixes`` is false."""
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise CapacityError(
                f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        seq = Sequence(self._next_id, list(prompt_ids), params, self.model_config.eos_token_ids)
        if self.keeps_prefixes:
            if save_prefix is not None:
                stem, key, *n = save_prefix
                tokens = min(int(n[0]) if n else len(prompt_ids), len(prompt_ids))
                seq.save_prefix = (str(stem), key, tokens)
            if restore_prefix is not None:
                stem, tokens = restore_prefix
                seq.restore_prefix = str(stem)
                seq.restore_tokens = max(0, min(int(tokens), len(prompt_ids) - 1))
        self.scheduler.add(seq)  # raises CapacityError before anything is queued
        self._next_id += 1
        return seq

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_progress: Callable[[Progress], None] | None = None,
        logits: str = "none",
    ) -> list[RequestOutput]:
        """Run the prompts to completion. ``logits='all'`` keeps every row's logits (tests)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        for p, sp in zip(prompts, plist):  # check all before queueing any
            self.scheduler.check_fits(len(p), sp)
        self.executor.reset_peak_memory()
        t0 = time.perf_counter()
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        kept: dict[int, list] = {s.seq_id: [] for s in seqs}
        plen = {s.seq_id: len(s.prompt_ids) for s in seqs}
        total_prefill = sum(plen.values())
        done_prefill = 0
        meter = KVMeter(
            self.executor.num_blocks,
            self.num_host_blocks,
            self.config.scheduler.block_size,
            scheduler_stats=getattr(self.scheduler, "stats", None),
        )
        try:
            while self.steps.has_work:
                taken = self.steps.advance(logits)
                if taken is None:
                    break
                for step in taken:
                    batch, result = step.batch, step.result
                    meter.add(result, batch)
                    for sid, lg in result.logits.items():
                        if sid not in step.discarded:
                            kept.setdefault(sid, []).append(lg)
                    done_prefill += sum(
                        len(c.token_ids)
                        for c in batch.chunks
                        if c.seq_id not in step.discarded and c.start_pos < plen[c.seq_id]
                    )
                    if on_progress:
                        on_progress(
                            Progress(
                                batch.step,
                                min(done_prefill, total_prefill),
                                total_prefill,
                                sum(len(s.output_ids) for s in seqs),
                                time.perf_counter() - t0,
                                batch.num_tokens,
                            )
                        )
        except BaseException as e:
            # what was generated so far travels with the error (an interrupted run reports it)
            with contextlib.suppress(AttributeError):
                e.partial = [  # type: ignore[attr-defined]
                    RequestOutput(s.seq_id, s.prompt_ids, list(s.output_ids), "interrupted")
                    for s in seqs
                ]
            self.steps.abandon()
            self.scheduler.abort_all()
            raise
        peak = max(m["peak_bytes"] for m in self.executor.memory_stats())
        kv = meter.as_dict()
        outs = []
        for s in seqs:
            out = RequestOutput(s.seq_id, s.prompt_ids, s.output_ids, s.finish_reason)
            out.metrics = _metrics(s, peak)
            out.metrics["kv"] = kv
            out.metrics["allreduce_exposed_s"] = kv["allreduce_exposed_s"]
            if logits != "none":
                import torch

                out.metrics["logits"] = torch.cat(kept[s.seq_id]) if kept[s.seq_id] else None
            outs.append(out)
        return outs

    def shutdown(self) -> None:
        unfreeze_startup_objects()
        self.executor.shutdown()


def _metrics(s: Sequence, peak: int) -> dict:
    n_prompt, n_gen = len(s.prompt_ids), len(s.output_ids)
    ttft = (s.first_token_time or s.arrival_time) - s.arrival_time
    prefill_s = (s.prefill_done_time or s.arrival_time) - s.arrival_time
    decode_s = (s.finish_time or 0) - (s.first_token_time or 0)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "ttft_s": ttft,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else None,
        "decode_s": decode_s,
        "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None,
        "peak_memory_bytes": peak,
        "restored_tokens": s.restore_tokens,  # prompt positions read from a KV prefix file
    }
