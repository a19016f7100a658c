"""The Worker: one device, one tensor-parallel shard, one step at a time.

A plain object (no Ray): ``cluster/`` wraps it as an actor, tests and the single-process
executor call it directly. Bring-up is a sequence of named calls the driver makes on every
worker: ``init_device`` -> ``init_communicator`` -> ``load_model`` -> ``kv_cache_capacity`` ->
``init_kv_cache`` -> ``warm_up``; then ``execute`` once per engine step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from runtime import device as dev
from runtime.attention import AttentionMetadata, get_backend, resolve_backend_name
from runtime.kv_cache import KVCache, bytes_per_block
from runtime.loader import ModelSource, build_model
from runtime.parallel import ParallelState
from runtime.sampling import make_generator, sample
from runtime.worker_config import WorkerConfig
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: dict[int, int]  # seq_id -> token (rank 0 only; empty elsewhere)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # on request, float32 CPU
    seconds: float = 0.0


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        model: ModelSource,
        limits: SchedulerConfig,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``model`` is resolved once by the driver; ``limits`` is the scheduler's config with
        ``max_model_len`` set: the batch shapes this worker sizes its cache and graphs for."""
        if limits.max_model_len is None:
            raise ValueError("limits.max_model_len is unset: use SchedulerConfig.for_model")
        self.config = config
        self.limits = limits
        self.rank = rank
        self.world_size = world_size
        self.source = model
        self.model_config = model.config
        self.max_model_len: int = limits.max_model_len
        self.parallel = ParallelState(
            overlap=config.overlap, allreduce_tiles=config.allreduce_tiles
        )
        self.device: torch.device | None = None
        self.model = None
        self.kv: KVCache | None = None
        self._generators: dict[int, torch.Generator] = {}
        self._graphs = None  # runtime.cuda_graphs.DecodeGraphs, made on the first decode step
        self._graphs_off: str | None = None if config.cuda_graphs else "turned off by config"
        self._eager_only = False

    # -- bring-up ----------------------------------------------------------------------------
    def init_device(self) -> dict:
        self.device = dev.resolve_device(self.config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = dev.resolve_dtype(self.config.dtype, self.device)
        self.backend_name = resolve_backend_name(self.config.attention, self.device)
        opts = {"q_tile": self.config.q_tile, "kv_tile": self.config.kv_tile}
        self.backend = get_backend(
            self.backend_name, self.device, **(opts if self.backend_name == "torch" else {})
        )
        if self.rank == 0:
            log.info("attention backend: %s on %s", self.backend_name, self.device)
        info = dev.device_info(self.device)
        return {
            "rank": self.rank,
            "device": str(self.device),
            "name": info.name,
            "capability": info.capability,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.backend_name,
        }

    def open_rendezvous(self, backend: str, host: str | None = None) -> dict:
        """Rank 0 only: the address (or MPI port) the other ranks join at, listening on ``host``
        (loopback when the group is on one node, else the node's address; never all
        interfaces)."""
        from collectives.factory import open_rendezvous

        return open_rendezvous(backend, self.world_size, host)

    def init_communicator(self, backend: str, rendezvous: dict) -> None:
        from collectives.factory import create_communicator

        self.parallel.comm = create_communicator(
            backend, self.rank, self.world_size, rendezvous, self.device
        )
        if self.parallel.wants_tile_chooser:
            from collectives.cost import measured_tile_chooser

            self.parallel.tile_chooser = measured_tile_chooser(
                self.parallel.comm, self.device, dtype=self.dtype
            )

    def load_model(self) -> dict:
        t0 = time.perf_counter()
        self._check_memory()
        self.model = build_model(self.source, self.parallel, self.dtype, self.device)
        dev.synchronize(self.device)
        n = sum(p.numel() for p in self.model.parameters())
        return {"rank": self.rank, "params_local": n, "seconds": time.perf_counter() - t0}

    def _check_memory(self) -> None:
        """Refuse, before allocating anything, weights and one step's activations that this
        device cannot hold, with the figure and the budget. The driver's preflight checks the
        same on its own host; this check also covers workers on other nodes."""
        from runtime.memory_estimate import DTYPE_BYTES, available_host_bytes, check_fits, estimate

        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in DTYPE_BYTES:
            return
        est = estimate(
            self.model_config,
            dtype,
            tp=self.world_size,
            kv_tokens=self.limits.block_size,
            prefill_chunk=min(self.limits.prefill_chunk, self.max_model_len),
            block_size=self.limits.block_size,
        )
        free = dev.free_memory_bytes(self.device)
        if free is None:
            free = available_host_bytes()
        check_fits(est, free, f"{self.device} of rank {self.rank}")

    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        return bytes_per_block(
            c.num_hidden_layers,
            self.limits.block_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.dtype,
        )

    def kv_cache_capacity(self) -> int:
        """How many blocks this worker can hold (the engine takes the minimum over ranks)."""
        max_model_len = self.max_model_len
        bs = self.limits.block_size
        if self.config.kv_cache_tokens is not None:
            return -(-self.config.kv_cache_tokens // bs)
        free = dev.free_memory_bytes(self.device)
        if free is None:  # CPU: room for max_num_seqs sequences of full length
            return -(-max_model_len // bs) * self.limits.max_num_seqs
        total = dev.device_info(self.device).total_memory_bytes or free
        # keep (1 - utilization) of the card and some room for activations of one chunk
        budget = free - (1 - self.config.gpu_memory_utilization) * total - self._activation_bytes()
        return max(int(budget // self.kv_bytes_per_block()), 1)

    def _activation_bytes(self) -> int:
        c = self.model_config
        t = self.limits.prefill_chunk * self.limits.max_num_seqs
        elem = torch.empty((), dtype=self.dtype).element_size()
        # a few hidden-sized and intermediate-sized tensors of one chunk, plus logits
        return int(t * elem * (8 * c.hidden_size + 3 * c.intermediate_size) + t * c.vocab_size * 4)

    def init_kv_cache(self, num_blocks: int) -> dict:
        c = self.model_config
        self._graphs = None  # captured graphs point into the old cache
        self.kv = KVCache(
            c.num_hidden_layers,
            num_blocks,
            self.limits.block_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.dtype,
            self.device,
        )
        return {"rank": self.rank, "num_blocks": num_blocks, "bytes": self.kv.nbytes}

    def warm_up(self) -> None:
        """One small prefill and decode steps (kernel compilation, allocator pools), written into
        the first blocks before the scheduler hands any out.

        Compiled backends specialise the decode kernel on the split count, which grows with the
        context, so decode is also run at doubling lengths up to ``max_model_len``: every block
        table entry points at block 0 (the contents do not matter for compilation), and the
        first long request does not pay for compiling in its decode timings.
        """
        max_model_len = self.max_model_len
        bs = self.limits.block_size
        n = min(2 * bs, self.kv.num_blocks * bs - 1)
        table = tuple(range(-(-(n + 1) // bs)))
        params = SamplingParams(max_new_tokens=1)
        prefill = SeqChunk(-1, (0,) * n, 0, table, sample=False, params=params)
        lengths = [n]
        if self.backend_name == "triton":
            while lengths[-1] * 2 < max_model_len:
                lengths.append(lengths[-1] * 2)
            lengths.append(max_model_len - 1)
        self._eager_only = True  # the ladder compiles the eager decode kernels
        try:
            self.execute(ScheduledBatch(0, (prefill,)))
            for length in lengths:
                blocks = (0,) * (length // bs + 1)
                chunk = SeqChunk(-1, (0,), length, blocks, False, params)
                self.execute(ScheduledBatch(0, (chunk,)))
        finally:
            self._eager_only = False
        graphs = self._decode_graphs()
        if graphs is not None:  # the first request's first decode step need not capture
            try:
                graphs.capture(1)
            except Exception as e:
                self._drop_graphs(e)

    def reset_peak_memory(self) -> None:
        dev.reset_peak_memory(self.device)

    def memory_stats(self) -> dict:
        return {
            "rank": self.rank,
            "peak_bytes": dev.peak_memory_bytes(self.device),
            "kv_cache_bytes": self.kv.nbytes if self.kv else 0,
        }

    # -- CUDA graphs --------------------------------------------------------------------------
    def _decode_graphs(self):
        """The worker's captured decode steps, or ``None`` where graphs are off or unsupported."""
        if self._graphs is not None or self._graphs_off is not None:
            return self._graphs
        from runtime.cuda_graphs import DecodeGraphs, unsupported_reason

        if self.kv is None:
            return None
        reason = unsupported_reason(self.device, self.backend_name, self.parallel.comm.backend)
        if reason is not None:
            self._graphs_off = reason
            if self.rank == 0:
                log.info("decode steps run eagerly (no CUDA graphs): %s", reason)
            return None
        c = self.model_config
        self._graphs = DecodeGraphs(
            self.model,
            self.backend,
            self.kv.layers,
            max_num_seqs=self.limits.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=self.limits.block_size,
            num_kv_heads=c.num_key_value_heads // self.world_size,
            head_dim=c.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        return self._graphs

    def _drop_graphs(self, error: Exception) -> None:
        """A capture or replay failed: alone, fall back to eager steps; in a group, fail (the
        other ranks are inside the same collectives)."""
        if self.world_size > 1:
            raise error
        log.warning("CUDA-graph decode failed (%s); decode steps run eagerly from now on", error)
        self._graphs = None
        self._graphs_off = f"failed: {error}"

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether pure-decode steps replay CUDA graphs on this worker."""
        return self._decode_graphs() is not None

    def _graph_result(
        self, rows: torch.Tensor, batch: ScheduledBatch, logits: str, t0: float
    ) -> StepResult:
        result = StepResult(sampled={})
        if logits == "all":
            all_logits = rows.cpu()
            for i, c in enumerate(batch.chunks):
                result.logits[c.seq_id] = all_logits[i : i + 1]
        if self.rank == 0:
            for i, c in enumerate(batch.chunks):
                if not c.sample:
                    continue
                result.sampled[c.seq_id] = sample(rows[i], c.params, self._generator(c))
                if logits == "sampled":
                    result.logits[c.seq_id] = rows[i].cpu()
        dev.synchronize(self.device)
        result.seconds = time.perf_counter() - t0
        return result

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        """Run one step. ``logits``: ``none``, ``sampled`` (rows that sample) or ``all`` rows.

        Pure-decode steps (one token per sequence) replay a captured CUDA graph where
        ``runtime.cuda_graphs`` supports this worker; everything else runs eagerly.
        """
        t0 = time.perf_counter()
        for sid in batch.finished_seq_ids:
            self._generators.pop(sid, None)
        if not self._eager_only and all(len(c.token_ids) == 1 for c in batch.chunks):
            graphs = self._decode_graphs()
            if graphs is not None and graphs.fits(batch.chunks):
                try:
                    rows = graphs.run(batch.chunks)  # float32 [B, vocab]: the graph's output
                except Exception as e:  # eager below redoes the step (its KV writes are the same)
                    self._drop_graphs(e)
                else:
                    return self._graph_result(rows, batch, logits, t0)
        ids: list[int] = []
        pos: list[int] = []
        for c in batch.chunks:
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, c.seq_len))
        d = self.device
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in batch.chunks],
            [c.seq_len for c in batch.chunks],
            [list(c.block_table) for c in batch.chunks],
            self.limits.block_size,
            d,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=d)
        positions = torch.tensor(pos, dtype=torch.long, device=d)
        hidden = self.model(input_ids, positions, self.kv.layers, meta, self.backend)

        ends = meta.query_start_loc[1:].tolist()
        rows = [e - 1 for e, c in zip(ends, batch.chunks) if c.sample]
        result = StepResult(sampled={})
        if logits == "all":
            all_logits = self.model.compute_logits(hidden).cpu()
            start = 0
            for c in batch.chunks:
                result.logits[c.seq_id] = all_logits[start : start + len(c.token_ids)]
                start += len(c.token_ids)
        if rows:
            # every rank runs the LM head (it is vocabulary-parallel); rank 0 samples
            sampled_logits = self.model.compute_logits(hidden[rows])
            if self.rank == 0:
                sampling = [c for c in batch.chunks if c.sample]
                for row, c in zip(sampled_logits, sampling):
                    gen = self._generator(c)
                    result.sampled[c.seq_id] = sample(row, c.params, gen)
                    if logits == "sampled":
                        result.logits[c.seq_id] = row.cpu()
        dev.synchronize(d)
        result.seconds = time.perf_counter() - t0
        return result

    def _generator(self, c) -> torch.Generator | None:
        if c.params.temperature == 0:
            return None
        g = self._generators.get(c.seq_id)
        if g is None:
            # unseeded requests still sample repeatably: their stream follows their id
            seed = c.params.seed if c.params.seed is not None else c.seq_id
            g = self._generators[c.seq_id] = make_generator(seed)
        return g

    def shutdown(self) -> None:
        self._graphs = None
        self.parallel.comm.close()
        self.kv = None
        self.model = None
