"""The Worker: one device, one tensor-parallel shard, one step at a time.

A plain object (no Ray): ``cluster/`` wraps it as an actor, tests and the single-process
executor call it directly. Bring-up is a sequence of named calls the driver makes on every
worker: ``init_device`` -> ``init_communicator`` -> ``load_model`` -> ``kv_cache_capacity`` ->
``init_kv_cache`` -> ``warm_up``; then ``execute`` once per engine step.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from runtime import device as dev
from runtime.attention import AttentionMetadata, get_backend, resolve_backend_name
from runtime.cuda_graphs import DecodeGraphRunner, DecodeGraphs, unsupported_reason
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
        self.decode_graphs = DecodeGraphRunner(None, off="no KV cache yet")

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
        self.decode_graphs.close()  # captured graphs point into the old cache
        self.kv = KVCache(
            c.num_hidden_layers,
            num_blocks,
            self.limits.block_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.dtype,
            self.device,
        )
        self.decode_graphs = self._make_decode_graphs()
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
        with self.decode_graphs.eager():  # the ladder compiles the eager decode kernels
            self.execute(ScheduledBatch(0, (prefill,)))
            for length in lengths:
                blocks = (0,) * (length // bs + 1)
                chunk = SeqChunk(-1, (0,), length, blocks, False, params)
                self.execute(ScheduledBatch(0, (chunk,)))
        self.decode_graphs.warm_up()

    def reset_peak_memory(self) -> None:
        dev.reset_peak_memory(self.device)

    def memory_stats(self) -> dict:
        return {
            "rank": self.rank,
            "peak_bytes": dev.peak_memory_bytes(self.device),
            "kv_cache_bytes": self.kv.nbytes if self.kv else 0,
        }

    # -- CUDA graphs --------------------------------------------------------------------------
    def _make_decode_graphs(self) -> DecodeGraphRunner:
        if not self.config.cuda_graphs:
            return DecodeGraphRunner(None, off="turned off by config")
        reason = unsupported_reason(self.device, self.backend, self.parallel.comm.backend)
        if reason is not None:
            if self.rank == 0:
                log.info("decode steps run eagerly (no CUDA graphs): %s", reason)
            return DecodeGraphRunner(None, off=reason)
        c = self.model_config
        graphs = DecodeGraphs(
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
        return DecodeGraphRunner(graphs, off=None, world_size=self.world_size)

    def set_allreduce(self, overlap: bool, tiles: int | None = None) -> None:
        """Switch the row-parallel AllReduce between tiled (``overlap``) and plain at run time,
        for ablations on one running group; every rank must get the same call. Captured decode
        graphs hold the old collectives, so they are made again."""
        self.parallel.overlap = overlap
        self.parallel.allreduce_tiles = tiles
        if self.kv is not None:
            self.decode_graphs.close()
            self.decode_graphs = self._make_decode_graphs()

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether pure-decode steps replay CUDA graphs on this worker."""
        return self.decode_graphs.active

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
        chunks = batch.chunks
        # the row of each chunk's last token: the one that samples
        last = list(itertools.accumulate(len(c.token_ids) for c in chunks))
        sample_rows = [end - 1 for end, c in zip(last, chunks) if c.sample]
        all_logits = None
        if all(len(c.token_ids) == 1 for c in chunks):
            all_logits = self.decode_graphs.run(chunks)  # None: run it eagerly
        if all_logits is None:
            hidden = self._forward(chunks)
            # every rank runs the LM head (it is vocabulary-parallel); rank 0 samples
            if logits == "all":
                all_logits = self.model.compute_logits(hidden)
            elif sample_rows:
                hidden = hidden[sample_rows]
                sample_rows = list(range(len(sample_rows)))
                all_logits = self.model.compute_logits(hidden)
        result = StepResult(sampled={})
        if logits == "all":
            cpu = all_logits.cpu()
            for end, c in zip(last, chunks):
                result.logits[c.seq_id] = cpu[end - len(c.token_ids) : end]
        if self.rank == 0 and sample_rows:
            for row, c in zip(sample_rows, [x for x in chunks if x.sample]):
                result.sampled[c.seq_id] = sample(all_logits[row], c.params, self._generator(c))
                if logits == "sampled":
                    result.logits[c.seq_id] = all_logits[row].cpu()
        dev.synchronize(self.device)
        result.seconds = time.perf_counter() - t0
        return result

    def _forward(self, chunks: tuple[SeqChunk, ...]) -> torch.Tensor:
        """The eager step: hidden states ``[tokens, hidden]`` of every packed token."""
        ids: list[int] = []
        pos: list[int] = []
        for c in chunks:
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, c.seq_len))
        d = self.device
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks],
            [c.seq_len for c in chunks],
            [list(c.block_table) for c in chunks],
            self.limits.block_size,
            d,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=d)
        positions = torch.tensor(pos, dtype=torch.long, device=d)
        return self.model(input_ids, positions, self.kv.layers, meta, self.backend)

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
        self.decode_graphs.close()
        self.parallel.comm.close()
        self.kv = None
        self.model = None
