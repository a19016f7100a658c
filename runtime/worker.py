"""The Worker: one device, one tensor-parallel shard, one step at a time.

A plain object (no Ray): ``cluster/`` wraps it as an actor, tests and the single-process
executor call it directly. Bring-up is a sequence of named calls the driver makes on every
worker: ``init_device`` -> ``init_communicator`` -> ``load_model`` -> ``kv_cache_capacity`` ->
``init_kv_cache`` -> ``warm_up``; then ``execute`` once per engine step (or ``launch``, whose
``PendingStep`` reads the tokens back later: the driver overlaps its own work with the device's;
or ``advance``, which launches a step before it returns the one before: a transport hop between
steps then leaves the device busy).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from runtime import device as dev
from runtime import kv_prefix
from runtime.attention import AttentionMetadata, get_backend, resolve_backend
from runtime.attention.autotune import AttentionShape
from runtime.attention.lightning_kernels import lightning_kernel
from runtime.cuda_graphs import DecodeGraphRunner, DecodeGraphs, unsupported_reason
from runtime.gc_freeze import freeze_startup_objects, unfreeze_startup_objects
from runtime.kv_cache import KVCache, bytes_per_block
from runtime.kv_quant import resolve_host_dtype
from runtime.loader import ModelSource, build_model
from runtime.parallel import ParallelState
from runtime.piecewise_graphs import PiecewiseDecodeGraphs
from runtime.sampling import make_generator, sample, skip_draws
from runtime.spill_step import SpillStep, host_blocks_of
from runtime.spill_tuner import SpillTuner, step_kind
from runtime.worker_config import WorkerConfig
from scheduler import spill_cost
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.config import SchedulerConfig
from scheduler.request import PENDING_TOKEN, SamplingParams
from scheduler.table_deltas import TableStore

log = logging.getLogger(__name__)

STAGING_SHARE = 16  # see Worker._staging_blocks


@dataclass
class StepResult:
    sampled: dict[int, int]  # seq_id -> token (every rank samples the same: see Worker._sample)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # on request, float32 CPU
    seconds: float = 0.0
    bytes_moved: int = 0  # KV bytes that crossed between tiers (swaps and staging)
    movement_exposed_s: float = 0.0  # time the computation waited for that movement
    spill_mode: str = "none"  # none | stream | cooperate: how host-resident KV was attended
    host_blocks: int = 0  # host-resident blocks the step read, per layer
    cpu_blocks: int = 0  # of which the CPU attended (cooperate)
    allreduce_exposed_s: float = 0.0  # time the step waited on AllReduce (not hidden by compute)


class PendingStep:
    """A step launched on the device whose sampled tokens have not been read back yet.

    On CUDA the tokens travel to pinned host memory behind the step's kernels and ``result``
    waits for them alone, so the caller's CPU work between ``launch`` and ``result`` overlaps
    the device's step; elsewhere the step has already run when ``launch`` returns.
    """

    def __init__(
        self, result: StepResult, seq_ids: list[int], tokens, device, t0: float, clock=None
    ) -> None:
        self._result = result
        self._clock = clock  # collectives.wait_clock.WaitClock of this step, or None
        self._seq_ids = seq_ids
        self._tokens = tokens  # host int64 tensor (being filled on CUDA), or None: no sampling
        self._device = device
        self._event = None  # CUDA: fires when the step's work, token copy included, is done
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
        self._t0 = t0
        self._ready = False

    def done(self) -> bool:
        """Whether ``result`` would return without waiting."""
        return self._ready or self._event is None or self._event.query()

    def result(self) -> StepResult:
        if not self._ready:
            if self._event is not None:
                self._event.synchronize()
            else:
                dev.synchronize(self._device)
            if self._tokens is not None:
                self._result.sampled = dict(zip(self._seq_ids, self._tokens.tolist()))
            if self._clock is not None:
                self._result.allreduce_exposed_s = self._clock.seconds()
            self._result.seconds = time.perf_counter() - self._t0
            self._ready = True
        return self._result


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
            overlap=config.overlap,
            allreduce_tiles=config.allreduce_tiles,
            expert_parallel=config.expert_parallel,
        )
        self.device: torch.device | None = None
        self.model = None
        self.kv: KVCache | None = None
        self._host_pinning = False  # the host tier pins ahead of use (see _spill_step)
        self._generators: dict[int, torch.Generator] = {}
        # seq_id -> (device tensor, row): the token this worker sampled last for the sequence,
        # which a later step's PENDING_TOKEN stands for (steps run in the order they are sent)
        self._last_sampled: dict[int, tuple[torch.Tensor, int]] = {}
        self.tables = TableStore()  # block tables of live sequences (batches carry deltas)
        self._prefix_readers: dict[int, kv_prefix.PrefixReader] = {}  # restored sequences
        self.decode_graphs = DecodeGraphRunner(None, off="no KV cache yet")
        self.spill_rates: spill_cost.SpillRates | None = None  # at the first host-tier step
        # under --spill auto, measured step times overrule the model's cooperate picks
        self.spill_tuner = SpillTuner()
        self._spill_timed: tuple[tuple, str] | None = None  # (kind, mode) of the step running
        # torch threads for the CPU part of cooperative attention (None: the process's setting;
        # an accelerator worker takes the node's cores shared by its ranks, see init_device)
        self.cpu_threads: int | None = None
        self.cpu_method = "fused"  # runtime.attention.partial.CPU_METHODS; see ensure_spill_rates
        self.ranks_on_node = world_size
        self._said_eager = False
        self._held: collections.deque[PendingStep] = collections.deque()  # see ``advance``

    # -- bring-up ----------------------------------------------------------------------------
    def init_device(self) -> dict:
        self.device = dev.resolve_device(self.config.device)
        self.limits = self.limits.for_device(self.device.type)  # the engine's, or by device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = dev.resolve_dtype(self.config.dtype, self.device)
        if self.device.type != "cpu" and self.cpu_threads is None:
            cores = os.cpu_count() or 1
            self.cpu_threads = max(1, cores // max(1, self.ranks_on_node))
        opts = {"q_tile": self.config.q_tile, "kv_tile": self.config.kv_tile}
        c = self.model_config
        shape = AttentionShape(
            c.num_attention_heads // self.world_size,
            max(1, c.num_key_value_heads // self.world_size),
            c.head_dim,
            self.dtype,
            self.limits.block_size,
        )
        self.backend_name, self.backend_reason = resolve_backend(
            self.config.attention, self.device, shape, opts
        )
        self.backend = get_backend(
            self.backend_name, self.device, **(opts if self.backend_name == "torch" else {})
        )
        if self.rank == 0:
            log.info(
                "attention backend: %s on %s (%s)",
                self.backend_name,
                self.device,
                self.backend_reason,
            )
            if c.num_lightning_layers:
                kernel = lightning_kernel(self.device, c.head_dim, c.head_dim)
                log.info("lightning layers' core: %s on %s", kernel, self.device)
        info = dev.device_info(self.device)
        return {
            "rank": self.rank,
            "device": str(self.device),
            "name": info.name,
            "capability": info.capability,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.backend_name,
            "attention_reason": self.backend_reason,
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
        plan, tier = self._weight_plan()
        self._check_memory(plan.freed_bytes)
        stream = None
        if plan.streamed:
            from runtime.weight_tier import stream_layers

            def stream(model):
                return stream_layers(
                    model.layers, plan.streamed, tier, self.device, self.config.weight_tier_dir
                )

        self.model = build_model(self.source, self.parallel, self.dtype, self.device, stream)
        if plan.streamed and self.rank == 0:
            log.info(
                "weights: %d of %d decoder layers (%.2f GiB a rank) in the %s tier, streamed "
                "every step (%s); %.2f GiB of device memory freed",
                len(plan.streamed),
                self.model_config.num_hidden_layers,
                plan.streamed_bytes / 2**30,
                tier,
                f"through {plan.slots} device slots of {plan.slot_bytes / 2**30:.2f} GiB"
                if plan.slots
                else "read in place from the mapped file",
                plan.freed_bytes / 2**30,
            )
        if self.model_config.num_lightning_layers:
            # a slot for every sequence the scheduler may hold, and one for warm-up's
            self.model.allocate_states(self.limits.max_num_seqs + 1, self.device)
        dev.synchronize(self.device)
        n = sum(p.numel() for p in self.model.parameters())
        return {"rank": self.rank, "params_local": n, "seconds": time.perf_counter() - t0}

    def _weight_plan(self):
        """``(WeightPlan, tier)``: the layers this rank streams and where they live."""
        from runtime.memory_estimate import run_weight_plan

        w, dtype = self.config, str(self.dtype).removeprefix("torch.")
        return run_weight_plan(
            self.model_config, dtype, self.world_size, w.offload_weights_gib, w.weight_tier,
            self.device.type,
        )  # fmt: skip

    @property
    def weight_streamer(self):
        """The streamer of offloaded layers, or None when every weight is on the device."""
        return getattr(self.model, "streamer", None)

    def _check_memory(self, offloaded: int = 0) -> None:
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
            offloaded=offloaded,
        )
        free = dev.free_memory_bytes(self.device)
        if free is None:
            free = available_host_bytes()
        check_fits(est, free, f"{self.device} of rank {self.rank}")

    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        return bytes_per_block(
            c.num_kv_layers,
            self.limits.block_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.dtype,
        )

    def _spill_option(self, name: str, default):
        # one place that reads the spill fields (tests substitute it)
        return getattr(self.config, name, default)

    def kv_cache_capacity(self) -> dict:
        """How many blocks this worker can hold in each tier, ``{"device_blocks": D,
        "host_blocks": H}`` (the engine takes the minimum of each over ranks).

        Device: ``kv_cache_tokens`` if set, else what free device memory (available memory on
        CPU) leaves after the utilisation headroom and one chunk's activations. Host:
        ``kv_host_tokens`` if set (0: none), else available host memory less a headroom, shared
        by the ranks of a node; automatic sizing gives a CPU device no host tier (both tiers
        would be the same memory) and ``spill: off`` none at all.

        Automatic sizes stop at what the scheduler can ever use: ``max_num_seqs`` sequences of
        ``max_model_len`` tokens (it reserves lifetimes and keeps one block free; there is no
        prefix cache to fill the rest). The demo model on an H200 otherwise took 7.3M device
        and 7.3M host blocks for one 131K-token task that needs 8,197, and 21 s to be ready.
        """
        bs = self.limits.block_size
        usable = self.limits.max_num_seqs * -(-self.max_model_len // bs) + 1
        host_blocks = self._host_blocks()
        if self.config.kv_cache_tokens is not None:
            device_blocks = -(-self.config.kv_cache_tokens // bs)
        else:
            device_blocks = self._device_blocks_from_memory()
            if host_blocks:  # the staging area comes out of the same memory
                layers = self.model_config.num_kv_layers
                if host_blocks >= device_blocks * layers // STAGING_SHARE:
                    device_blocks = device_blocks * STAGING_SHARE // (STAGING_SHARE + 2)
                else:
                    device_blocks -= -(-2 * host_blocks // layers)
                device_blocks = max(device_blocks, 1)
            device_blocks = min(device_blocks, usable)
        if self._spill_option("kv_host_tokens", None) is None:
            host_blocks = min(host_blocks, max(usable - device_blocks, 0))
        return {"device_blocks": device_blocks, "host_blocks": host_blocks}

    def _device_blocks_from_memory(self) -> int:
        free = dev.free_memory_bytes(self.device)
        if free is None:  # CPU: the pool shares host memory with everything else
            avail, total = dev.host_memory_bytes()
            # pages are touched only as blocks fill: a busy moment does not shrink the pool
            # below half the machine
            avail = max(avail, total // 2)
            budget = (avail - dev.host_headroom_bytes(total)) / self.world_size
            budget = budget * self.config.gpu_memory_utilization - self._activation_bytes()
        else:
            total = dev.device_info(self.device).total_memory_bytes or free
            # keep (1 - utilization) of the card and some room for activations of one chunk
            budget = (
                free - (1 - self.config.gpu_memory_utilization) * total - self._activation_bytes()
            )
        return max(int(budget // self.kv_bytes_per_block()), 1)

    def _host_blocks(self) -> int:
        tokens = self._spill_option("kv_host_tokens", None)
        bs = self.limits.block_size
        if self._spill_option("spill", "auto") == "off":
            return 0
        if tokens is not None:
            return -(-tokens // bs)
        if self.device.type == "cpu":
            return 0
        avail, total = dev.host_memory_bytes()
        budget = (avail - dev.host_headroom_bytes(total)) / self.world_size
        storage, _ = resolve_host_dtype(self._spill_option("kv_host_dtype", "auto"), self.dtype)
        c = self.model_config
        per_block = bytes_per_block(
            c.num_kv_layers, bs, c.num_key_value_heads // self.world_size, c.head_dim, storage
        )
        return max(int(budget // per_block), 0)

    def _activation_bytes(self) -> int:
        c = self.model_config
        # a step holds at most prefill_chunk tokens (decode tokens count against the same
        # budget); logits are computed only for the rows that sample, one per sequence
        t = self.limits.prefill_chunk
        elem = torch.empty((), dtype=self.dtype).element_size()
        # a few hidden-sized and intermediate-sized tensors of one chunk, plus logits
        hidden = t * elem * (8 * c.hidden_size + 3 * c.intermediate_size)
        return int(hidden + self.limits.max_num_seqs * c.vocab_size * 4)

    def init_kv_cache(self, device_blocks: int, host_blocks: int = 0) -> dict:
        """Allocate both tiers (nothing zero-filled; the host tier is pinned in the background
        on CUDA). The device staging area takes ``min(host_blocks, staging)`` blocks of one
        layer per buffer, two buffers."""
        c = self.model_config
        self.decode_graphs.close()  # captured graphs point into the old cache
        if self.kv is not None:
            self.kv.close()
            self.kv = None
            dev.empty_cache(self.device)  # the old cache's memory counts as free below
        staging = min(host_blocks, self._staging_blocks(device_blocks))
        self.kv = KVCache(
            c.num_kv_layers,
            device_blocks,
            self.limits.block_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.dtype,
            self.device,
            host_blocks=host_blocks,
            host_dtype=self._spill_option("kv_host_dtype", "auto"),
            staging_blocks=staging,
        )
        self.decode_graphs = self._make_decode_graphs()
        self._host_pinning = False  # see _spill_step
        return {
            "rank": self.rank,
            "num_blocks": device_blocks,
            "device_blocks": device_blocks,
            "host_blocks": host_blocks,
            "bytes": self.kv.nbytes,
            "host_bytes": self.kv.host_nbytes,
        }

    def _staging_blocks(self, device_blocks: int) -> int:
        """Blocks (of one layer) per staging buffer; ``init_kv_cache`` caps it at the host
        tier's size, the most one layer of a step can ever stream.

        Automatic sizing: two buffers of ``D * L / STAGING_SHARE`` blocks cost ``2 /
        STAGING_SHARE`` of the pool's bytes (1/8) and hold ``L / STAGING_SHARE`` times the device
        tier's tokens (twice, for a 32-layer model: a 256K context of the 7B shape on an H100,
        ~100K tokens on the device and ~156K on the host, stages its host part in one go).
        With ``kv_cache_tokens`` forced on an accelerator the pool is small on purpose: the
        staging area takes the free memory left after the pool, with the same headroom as the
        automatic pool. Whatever a step streams beyond one buffer goes in rounds."""
        share = max(1, device_blocks * self.model_config.num_kv_layers // STAGING_SHARE)
        free = dev.free_memory_bytes(self.device)
        if self.config.kv_cache_tokens is None or free is None:
            return share
        total = dev.device_info(self.device).total_memory_bytes or free
        budget = (
            free
            - (1 - self.config.gpu_memory_utilization) * total
            - self._activation_bytes()
            - device_blocks * self.kv_bytes_per_block()
        )
        per = 2 * self.kv_bytes_per_block() / self.model_config.num_kv_layers  # two buffers
        return max(1, int(budget // per))

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
        freeze_startup_objects()  # the collector's full passes skip what start-up built
        # the spill cost model's rates are measured at the first step that reads host blocks
        # (ensure_spill_rates), not here: ~1.2 s of start-up on an H200 that a task which
        # never spills does not need

    def ensure_spill_rates(self) -> None:
        """Measure the rates the spill cost model weighs, once, where it decides (a host tier,
        an accelerator, ``auto`` or ``cooperate``); on a CPU device both tiers are the same
        memory and it never runs."""
        mode = self._spill_option("spill", "auto")
        if (
            self.spill_rates is not None
            or not self.kv.host_blocks
            or self.device.type == "cpu"
            or mode not in ("auto", "cooperate")
        ):
            return
        from runtime.spill_rates import measure_rates

        c, kv = self.model_config, self.kv
        measured = measure_rates(
            self.backend,
            self.device,
            self.dtype,
            c.num_attention_heads // self.world_size,
            c.num_key_value_heads // self.world_size,
            c.head_dim,
            self.limits.block_size,
            run_tokens=kv.host.chunk_blocks * self.limits.block_size,  # one run per host chunk
            # the device's FLOP rate at a prefill chunk's shape (up to 4K queries)
            prefill_queries=min(4096, self.limits.prefill_chunk or 4096),
            host_dtype=self.dtype if kv.quant else kv.host_storage,
            cpu_threads=self.cpu_threads,  # the CPU rate at the threads it will use
            quant=kv.quant,  # an 8-bit host tier: the CPU part dequantizes before it attends
        )
        self.spill_rates, self.cpu_method = measured.spill, measured.cpu.method
        if self.rank == 0:
            r = self.spill_rates
            log.info(
                "spill rates: link %.1f GB/s, device %.1f TFLOP/s %.0f GB/s, "
                "cpu %.2f TFLOP/s %.1f GB/s (%s, %s threads)",
                r.link_bytes_per_s / 1e9,
                r.device_flops / 1e12,
                r.device_bytes_per_s / 1e9,
                r.cpu_flops / 1e12,
                r.cpu_bytes_per_s / 1e9,
                self.cpu_method,
                self.cpu_threads,
            )

    def reset_peak_memory(self) -> None:
        dev.reset_peak_memory(self.device)

    def memory_stats(self) -> dict:
        return {
            "rank": self.rank,
            "peak_bytes": dev.peak_memory_bytes(self.device),
            "kv_cache_bytes": self.kv.nbytes if self.kv else 0,
            "kv_host_bytes": self.kv.host_nbytes if self.kv else 0,
            "kv_host_allocated_bytes": self.kv.host.allocated_bytes
            if self.kv and self.kv.host
            else 0,
            "weight_tier": self.weight_streamer.stats() if self.weight_streamer else None,
        }

    # -- CUDA graphs --------------------------------------------------------------------------
    def _make_decode_graphs(self) -> DecodeGraphRunner:
        if not self.config.cuda_graphs:
            return DecodeGraphRunner(None, off="turned off by config")
        reason = unsupported_reason(self.device, self.parallel.comm.backend)
        lightning = bool(self.model_config.num_lightning_layers)
        if reason is None and lightning and not self.backend.captured_decode_params:
            reason = (
                f"lightning layers' states are bound only in whole-step graphs; the "
                f"{self.backend.name} attention backend is captured in pieces"
            )
        if reason is None and self.weight_streamer is not None:
            reason = "offloaded weights stream in through hooks that graphs do not replay"
        if reason is not None:
            if self.rank == 0:
                log.info("decode steps run eagerly (no CUDA graphs): %s", reason)
            return DecodeGraphRunner(None, off=reason)
        c = self.model_config
        # a backend without captured decode: the stretches between its eager attention calls
        kind = DecodeGraphs if self.backend.captured_decode_params else PiecewiseDecodeGraphs
        if kind is PiecewiseDecodeGraphs and self.rank == 0:
            log.info(
                "decode steps replay CUDA graphs between eager %s attention calls (piecewise)",
                self.backend.name,
            )
        graphs = kind(
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
            **({"bind_states": self._bind_graph_states} if lightning else {}),
        )
        if lightning:
            self.model.states.reserve_graph_rows(graphs.max_bs)
        return DecodeGraphRunner(graphs, off=None, world_size=self.world_size)

    def _bind_graph_states(self, chunks, rows: int) -> None:
        """A decode graph's lightning state slots: the step's sequences', then scratch."""
        self.model.bind_step([c.seq_id for c in chunks], [c.start_pos for c in chunks], rows)

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
    def execute(self, batch: ScheduledBatch, logits: str = "none") -> StepResult:
        """Run one step and return its tokens (``launch(...).result()``)."""
        return self.launch(batch, logits).result()

    def advance(
        self, batch: ScheduledBatch | None, logits: str = "none", hold: int = 0
    ) -> list[StepResult]:
        """Launch ``batch`` (None: nothing), then return the results of the steps launched
        before it, oldest first, keeping back the newest ``hold`` steps (this one included).

        With ``hold`` = d a step's result comes back d calls later, after the next d steps have
        been queued behind it: on CUDA the device then runs those steps while step i's tokens
        travel to the driver and the driver sends the next one, instead of idling for the hop
        (the compiled step graph sends every step this way; ``advance(None)`` flushes). The
        pipes split the call: ``take_held(hold - 1)``, reply, then ``hold_step(batch)``."""
        if batch is not None:
            self.hold_step(batch, logits)
        return self.take_held(int(hold) if batch is not None else 0)

    def hold_step(self, batch: ScheduledBatch, logits: str = "none") -> None:
        """Launch ``batch`` and keep it for a later ``take_held``."""
        self._held.append(self.launch(batch, logits))

    def take_held(self, keep: int = 0) -> list[StepResult]:
        """The results of the held steps but the newest ``keep``, oldest first (each waited
        for)."""
        done = []
        while len(self._held) > keep:
            done.append(self._held.popleft().result())
        return done

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, logits: str = "none") -> PendingStep:
        """Start one step. ``logits``: ``none``, ``sampled`` (rows that sample) or ``all`` rows.

        Pure-decode steps (one token per sequence) replay a captured CUDA graph where
        ``runtime.cuda_graphs`` supports this worker; everything else runs eagerly. A decode
        chunk whose token is ``PENDING_TOKEN`` gets the token this worker sampled last for its
        sequence, copied on the device (the driver sent this step before it had that token).
        """
        t0 = time.perf_counter()
        self.parallel.wait_clock.reset()
        batch = self.tables.expand(batch)  # whole block tables from the step's deltas
        for sid in batch.finished_seq_ids:
            self._generators.pop(sid, None)
            self._last_sampled.pop(sid, None)
            self._prefix_readers.pop(sid, None)
        if self.model_config.num_lightning_layers:
            self.model.release(batch.finished_seq_ids)
        restored = [c for c in batch.chunks if c.kv_prefix is not None]
        tables = {c.seq_id: c.block_table for c in batch.chunks} if batch.kv_saves else {}
        if restored:  # read from a prefix file after the step's swaps, never computed
            batch = dataclasses.replace(
                batch, chunks=tuple(c for c in batch.chunks if c.kv_prefix is None)
            )
            if not batch.chunks:
                return self._restore_only(batch, restored, t0)
        chunks = batch.chunks
        # the row of each chunk's last token: the one that samples
        last = list(itertools.accumulate(len(c.token_ids) for c in chunks))
        sample_rows = [end - 1 for end, c in zip(last, chunks) if c.sample]
        spill = self._spill_step(batch)  # None: every block the step reads is on the device
        if spill is not None and not self._said_eager and self.rank == 0:
            self._said_eager = True
            log.info("steps that read host KV blocks or move blocks run eagerly (no CUDA graph)")
        all_logits, figures = None, None
        if spill is None and all(len(c.token_ids) == 1 for c in chunks):
            all_logits = self.decode_graphs.run(chunks, self._fill_pending)  # None: eager
        if all_logits is None:
            t_forward = time.perf_counter()
            hidden, figures = self._forward(chunks, spill)  # a spill step ends synchronised
            if self._spill_timed is not None:
                self.spill_tuner.record(*self._spill_timed, time.perf_counter() - t_forward)
            # every rank runs the LM head (it is vocabulary-parallel) and samples
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
        sampling = [c for c in chunks if c.sample]
        tokens = None
        if sample_rows:
            n = len(sample_rows)  # a slice, not an index list: no copy the host waits for
            rows = all_logits[:n] if sample_rows == list(range(n)) else all_logits[sample_rows]
            picked = self._sample(rows, sampling)
            for i, c in enumerate(sampling):
                self._last_sampled[c.seq_id] = (picked, i)
            tokens = _to_host(picked)
            if self.rank == 0 and logits == "sampled":
                for row, c in zip(sample_rows, sampling):
                    result.logits[c.seq_id] = all_logits[row].cpu()
        if figures is not None:
            result.bytes_moved = figures.bytes_moved
            result.movement_exposed_s = figures.exposed_s
            result.spill_mode = figures.mode
            result.host_blocks, result.cpu_blocks = figures.host_blocks, figures.cpu_blocks
        # the step's swaps ran layer by layer inside it: restored rows land after them
        self._restore(restored)
        self._save_prefixes(batch.kv_saves, tables)
        # exposed AllReduce time is read when the step is done (CUDA: its timing events)
        clock = self.parallel.wait_clock.take()
        return PendingStep(result, [c.seq_id for c in sampling], tokens, self.device, t0, clock)

    def _restore_only(self, batch: ScheduledBatch, restored: list[SeqChunk], t0: float):
        """A step whose chunks all read their rows from prefix files: its swaps, then the rows
        (no forward, no AllReduce: every rank does the same from its own file)."""
        if batch.swaps and self.kv is not None:
            swaps = list(batch.swaps)
            plan = self.kv.plan_copies(swaps)
            moved = sum(
                self.kv.copy_blocks(layer, swaps, plan) for layer in range(self.kv.num_layers)
            )
        else:
            moved = 0
        self._restore(restored)
        self._save_prefixes(batch.kv_saves, {})
        result = StepResult(sampled={})
        result.bytes_moved = moved
        self.parallel.wait_clock.take()
        return PendingStep(result, [], None, self.device, t0)

    def _prefix_layout(self) -> dict[str, str]:
        return kv_prefix.layout(self.kv, self.rank, self.world_size)

    def _restore(self, chunks: list[SeqChunk]) -> None:
        """Rows of restored chunks from this rank's prefix files into their device blocks."""
        for c in chunks:
            path = kv_prefix.rank_path(c.kv_prefix, self.rank)
            try:
                reader = self._prefix_readers.get(c.seq_id)
                if reader is None or reader.path != path:
                    reader = kv_prefix.PrefixReader(path, self._prefix_layout())
                    self._prefix_readers[c.seq_id] = reader
                reader.write_rows(self.kv, c.block_table, c.start_pos, c.seq_len)
            except Exception as e:  # the service drops the file and computes the prompt again
                self._prefix_readers.pop(c.seq_id, None)
                raise kv_prefix.PrefixReadError(
                    f"could not read the KV prefix {path} of sequence {c.seq_id}: {e}"
                ) from e

    def _save_prefixes(self, saves, tables: dict) -> None:
        """Write the prompt KV of sequences whose prefill this step completed (a failure to
        write costs a later attempt its prefill, never this step)."""
        for seq_id, tokens, stem, key in saves:
            table = tables.get(seq_id)
            if table is None:
                continue
            try:
                kv_prefix.save(
                    self.kv, list(table), tokens, stem, {**self._prefix_layout(), "key": key}
                )
            except Exception as e:  # noqa: BLE001 - a lost save costs a re-run its prefill only
                log.warning("could not save the KV prefix of sequence %d: %s", seq_id, e)

    def _sample(self, rows: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """This step's tokens ``[len(chunks)]`` int64 on the device, from float32 logits
        ``rows``. Every rank samples (each holds the full gathered logits, the same on every
        rank, and seeds the same generators), so every rank has the tokens the next step may
        need without a collective. Greedy steps stay on the device (no wait for the step);
        a step with temperature sampling reads its rows back (``sample`` runs on the CPU, so a
        seed gives the same tokens on every device)."""
        if all(c.params.temperature == 0 for c in chunks):
            return torch.argmax(rows, dim=-1)
        vocab = rows.shape[-1]
        picked = [
            sample(rows[i], c.params, self._generator(c, vocab)) for i, c in enumerate(chunks)
        ]
        return torch.tensor(picked, dtype=torch.long, device=rows.device)

    def _fill_pending(self, ids: torch.Tensor, chunks: tuple[SeqChunk, ...]) -> None:
        """Write into ``ids`` (the step's packed input tokens, on the device) the token this
        worker sampled last for each decode chunk that carries ``PENDING_TOKEN``: device to
        device, without waiting for the step that sampled it."""
        groups: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        row = 0
        for c in chunks:
            if c.token_ids[0] == PENDING_TOKEN:
                src = self._last_sampled.get(c.seq_id)
                if src is None or len(c.token_ids) != 1:
                    raise RuntimeError(
                        f"sequence {c.seq_id}: a pending input token at position {c.start_pos}, "
                        "but this worker has sampled no token for it"
                    )
                g = groups.setdefault(id(src[0]), (src[0], [], []))
                g[1].append(row)
                g[2].append(src[1])
            row += len(c.token_ids)
        for tensor, dst, src in groups.values():
            d0, s0, k = dst[0], src[0], len(dst)
            if dst == list(range(d0, d0 + k)) and src == list(range(s0, s0 + k)):
                # the usual decode step (the same sequences in the same order as the step that
                # sampled): one slice copy, no index tensors sent to the device
                ids[d0 : d0 + k].copy_(tensor[s0 : s0 + k])
                continue
            idx = _to_device(torch.tensor([dst, src], dtype=torch.long), ids.device)
            ids.index_copy_(0, idx[0], tensor.index_select(0, idx[1]))

    def _forward(self, chunks: tuple[SeqChunk, ...], spill: SpillStep | None):
        """The eager step: hidden states ``[tokens, hidden]`` of every packed token, and the
        step's movement figures when it reads host blocks or moves blocks (else None)."""
        ids: list[int] = []
        pos: list[int] = []
        for c in chunks:
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, c.seq_len))
        d = self.device
        if spill is not None:  # tables without the CPU's blocks, host ids as staging slots
            tables, seq_lens = spill.tables, spill.seq_lens
        else:
            tables = [list(c.block_table) for c in chunks]
            seq_lens = [c.seq_len for c in chunks]
        meta = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks], seq_lens, tables, self.limits.block_size, d
        )
        if spill is not None:
            spill.bind(meta)
        input_ids = torch.tensor(ids, dtype=torch.long, device=d)
        if PENDING_TOKEN in ids:
            self._fill_pending(input_ids, chunks)
        positions = torch.tensor(pos, dtype=torch.long, device=d)
        if self.model_config.num_lightning_layers:
            self.model.bind_step([c.seq_id for c in chunks], [c.start_pos for c in chunks])
        hidden = self.model(input_ids, positions, self.kv.layers, meta, self.backend)
        return hidden, (spill.finish() if spill is not None else None)

    def _spill_step(self, batch: ScheduledBatch) -> SpillStep | None:
        """The step's movement and mixed-table plan, or None for an all-device step."""
        swaps = batch.swaps
        self._spill_timed = None
        if self.kv is None or (not swaps and not self.kv.host_blocks):
            return None
        bs = self.limits.block_size
        # the host tier pins chunks ahead of use from here on: once the step's sequences hold a
        # quarter of the device tier (a long task is filling it) or blocks move; warm-up's
        # sequences (id -1, long decode tables over block 0) hold nothing
        if not self._host_pinning and self.kv.host is not None:
            held = sum(c.seq_len for c in batch.chunks if c.seq_id >= 0)
            if swaps or 4 * held >= self.kv.num_blocks * bs:
                self.kv.host.pin_ahead()
                self._host_pinning = True
        n_host = host_blocks_of(batch.chunks, self.kv.num_blocks, bs)
        if not n_host and not swaps:
            return None
        fraction, min_blocks = 0.0, 0
        if n_host:
            self.ensure_spill_rates()
            forced = self._spill_option("spill", "auto")
            if forced == "auto" and not self._auto_may_cooperate():
                forced = "stream"
            shape = self._step_shape(batch)
            choice = spill_cost.choose(shape, self.spill_rates, forced)
            if forced == "auto" and choice.mode == "cooperate":  # see runtime.spill_tuner
                decode = all(len(c.token_ids) == 1 for c in batch.chunks)
                kind = step_kind(len(batch.chunks), decode, n_host)
                rates, f = self.spill_rates, choice.cpu_fraction / 2
                est = spill_cost.layer_seconds(shape, rates, f) if rates and rates.known else None
                candidates = {
                    "cooperate": choice,
                    "cooperate-half": spill_cost.SpillChoice("cooperate", f, est or float("nan")),
                    "stream": spill_cost.choose(shape, rates, "stream"),
                }
                picked = self.spill_tuner.pick(kind, tuple(candidates))
                self._spill_timed = (kind, picked)
                choice = candidates[picked]
            fraction, min_blocks = choice.cpu_fraction, choice.cpu_min_blocks
        return SpillStep(
            self.kv,
            batch.chunks,
            swaps,
            cpu_fraction=fraction,
            cpu_min_blocks=min_blocks,
            cpu_threads=self.cpu_threads,
            cpu_method=self.cpu_method,
        )

    def _auto_may_cooperate(self) -> bool:
        """Whether ``--spill auto`` may let the CPU attend: not where the device is the CPU (the
        "host" tier is the same memory, so a split gains nothing)."""
        return self.kv.device.type != "cpu"

    def _step_shape(self, batch: ScheduledBatch) -> spill_cost.StepShape:
        """One layer's attention work of the step, split by tier, for the cost model."""
        c, kv, bs = self.model_config, self.kv, self.limits.block_size
        hq = c.num_attention_heads // self.world_size
        per_key = kv.device_layer_block_bytes / bs
        dev_flops = dev_bytes = host_flops = 0.0
        n_host = n_seqs = host_queries = 0
        for ch in batch.chunks:
            used = ch.block_table[: -(-ch.seq_len // bs)]
            h = sum(1 for b in used if b >= kv.num_blocks)
            n_host += h
            n_seqs += h > 0
            qlen = len(ch.token_ids)
            dev_flops += spill_cost.attention_flops(qlen, ch.seq_len - h * bs, hq, c.head_dim)
            dev_bytes += (ch.seq_len - h * bs) * per_key
            host_flops += spill_cost.attention_flops(qlen, h * bs, hq, c.head_dim)
            host_queries += qlen if h else 0
        return spill_cost.StepShape(
            device_flops=dev_flops,
            device_bytes=dev_bytes,
            host_flops=host_flops,
            host_bytes=n_host * kv.host_layer_block_bytes,
            host_bytes_on_device=n_host * kv.device_layer_block_bytes,
            host_blocks=n_host,
            host_seqs=n_seqs,
            # a cooperating sequence's queries go out in the model's dtype; out (float32) and
            # lse come back
            cpu_io_bytes=host_queries * hq * (c.head_dim * (self.kv.dtype.itemsize + 4) + 4),
        )

    def _generator(self, c, vocab: int) -> torch.Generator | None:
        if c.params.temperature == 0:
            return None
        g = self._generators.get(c.seq_id)
        if g is None:
            # unseeded requests still sample repeatably: their stream follows their id
            seed = c.params.seed if c.params.seed is not None else c.seq_id
            g = self._generators[c.seq_id] = make_generator(seed)
            skip_draws(g, c.skip_draws, vocab)  # a resumed task goes on with its stream
        return g

    def shutdown(self) -> None:
        unfreeze_startup_objects()
        if self.weight_streamer is not None:
            self.weight_streamer.close()
        self.decode_graphs.close()
        self.parallel.comm.close()
        if self.kv is not None:
            self.kv.close()
        self.kv = None
        self.model = None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``; on CUDA through pinned memory, so the copy waits in
    the stream instead of making the host wait for the work before it."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host; on CUDA a pinned copy still under way (``PendingStep`` waits)."""
    if t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.cpu()
