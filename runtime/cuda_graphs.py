"""CUDA-graph decode: capture one decode step per batch-size bucket, replay it every step.

A decode step of a Llama is hundreds of small kernels (32 layers x ~20 torch ops + 2 Triton
launches); launched one by one from Python the GPU waits on the host. Here the whole step --
embedding, every layer, final norm and the LM head for every row of the bucket -- is captured once
per bucket (1, 2, 4, 8, ... up to ``max_num_seqs``) into a CUDA graph and replayed.

What a graph reads lives in static device buffers sized for the largest bucket and for the longest
block table (``max_model_len / block_size`` blocks): token ids, positions, KV slots, sequence
lengths, block tables and the decode kernel's keys per split program. Before each replay the
step's values are copied in (two host-to-device copies from pinned staging). Rows beyond the
step's batch are padding that cannot disturb the real rows: KV slot -1 (the KV write kernel skips
negative slots), sequence length 1 over block 0 (finite reads), token 0 at position 0; their
logits are computed and ignored.

Python-side decisions that depend on the step's lengths are kept out of the graph, as the backend
contract's captured decode says (``runtime/attention/base.py``): the metadata a graph is captured
with carries no host lengths, only a ``CapturedDecode`` with the capacity (``max_model_len``),
which sizes the launches, and a device buffer of launch values that every replay refreshes with
what the backend would choose eagerly for the real lengths.

Graphs are used only on CUDA, with the single-rank or NCCL communicator (gloo and MPI collectives
cannot be captured); everything else runs eagerly. A backend that declares a captured decode
(``triton``) is captured whole; any other is captured in pieces around its eager attention calls
(``runtime/piecewise_graphs.py``). ``DecodeGraphRunner`` is the worker's one handle on all of this:
whether graphs are on (and why not), the graphs, and the fallback after a failure.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime.attention.base import AttentionMetadata, CapturedDecode

log = logging.getLogger(__name__)

CAPTURABLE_COMMS = ("none", "nccl")  # SingleRankCommunicator.backend, NCCL


def unsupported_reason(device: torch.device, comm_backend: str) -> str | None:
    """``None`` when decode steps on this worker can be captured, else why not. Any attention
    backend can be: one without captured decode is captured in pieces around its eager
    attention (``runtime/piecewise_graphs.py``)."""
    if device.type != "cuda":
        return f"device {device.type} is not CUDA"
    if comm_backend not in CAPTURABLE_COMMS:
        return f"communicator {comm_backend!r} cannot be captured (only single-rank or NCCL)"
    return None


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes a graph is captured for: powers of two below ``max_num_seqs``, then it."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    out.append(max_num_seqs)
    return tuple(out)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] float32, written by every replay


class DecodeGraphs:
    """Captured decode steps of one worker's model, one per batch-size bucket, made on first use."""

    def __init__(
        self,
        model,
        backend,
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        bind_states=None,
    ) -> None:
        """``bind_states(chunks, bucket)``, if given (a model with per-sequence lightning
        states), points the model at the step's state slots, padded to the bucket, in a static
        buffer the graph reads; it runs before every capture and replay."""
        self.model = model
        self.bind_states = bind_states
        self.backend = backend
        self.kv_layers = kv_layers
        self.buckets = batch_buckets(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.capacity = max_model_len
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        n, w = self.max_bs, self.max_blocks
        p = self.num_params = backend.captured_decode_params
        # int64: token ids | positions | KV slots;  int32: seq_lens | launch values | block tables
        self._n64 = 3 * n
        self._n32 = n + p + n * w
        self._host64 = torch.zeros(self._n64, dtype=torch.int64, pin_memory=True)
        self._host32 = torch.zeros(self._n32, dtype=torch.int32, pin_memory=True)
        self._np64, self._np32 = self._host64.numpy(), self._host32.numpy()
        self._dev64 = torch.zeros(self._n64, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(self._n32, dtype=torch.int32, device=device)
        self.input_ids = self._dev64[:n]
        self.positions = self._dev64[n : 2 * n]
        self.slot_mapping = self._dev64[2 * n :]
        self.seq_lens = self._dev32[:n]
        self.launch_values = self._dev32[n : n + p]
        self.block_tables = self._dev32[n + p :].view(n, w)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._copied: torch.cuda.Event | None = None  # staging may be rewritten once it fired
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}

    # -- which steps --------------------------------------------------------------------------
    def bucket_for(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def fits(self, chunks) -> bool:
        """True when these chunks are a pure-decode step a graph can run."""
        if not chunks or len(chunks) > self.max_bs:
            return False
        for c in chunks:
            if len(c.token_ids) != 1 or c.seq_len > self.capacity:
                return False
            if len(c.block_table) * self.block_size < c.seq_len:
                return False  # let the eager path raise its error
        return True

    # -- capture ------------------------------------------------------------------------------
    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_lens_cpu=(1,) * bs,
            seq_lens_cpu=None,  # lengths change per replay: only the device buffer holds them
            captured=CapturedDecode(self.capacity, self.launch_values),
        )

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_layers, meta, self.backend
        )
        return self.model.compute_logits(hidden)

    def _launch_values(self, bs: int, max_seq_len: int) -> tuple[int, ...]:
        values = self.backend.captured_decode_values(
            bs,
            max_seq_len,
            self.capacity,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        if len(values) != self.num_params:
            raise ValueError(
                f"{self.backend.name}: captured_decode_values gave {len(values)} values, "
                f"captured_decode_params declares {self.num_params}"
            )
        return tuple(values)

    def _warm_up(self, bs: int, meta: AttentionMetadata) -> torch.cuda.Stream:
        """Run the step once on a side stream before capturing it (compiles kernels, settles
        the allocator and handles); returns that stream."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(bs, meta)
        current.wait_stream(side)
        return side

    @torch.inference_mode()
    def capture(self, bs: int) -> None:
        """Capture the decode step of bucket ``bs`` (all rows padding while capturing)."""
        if bs in self.graphs:
            return
        self._stage([], bs)
        if self.bind_states is not None:
            self.bind_states([], bs)
        meta = self._meta(bs)
        self._warm_up(bs, meta)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(bs, meta)
        torch.cuda.synchronize(self.device)
        self.graphs[bs] = _Graph(graph, logits)
        log.info("captured decode graph for batch size %d", bs)

    # -- replay -------------------------------------------------------------------------------
    def _stage(self, chunks, bs: int) -> None:
        """Write the step's metadata (padded to ``bs`` rows) into the static device buffers."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the staging buffers
        n, w, page, p = self.max_bs, self.max_blocks, self.block_size, self.num_params
        # numpy views of the pinned staging: a slice assignment from a list is one C loop,
        # where a torch.tensor per field cost ~8 us each, per step, on the replay's critical path
        h64, h32 = self._np64, self._np32
        ids, pos, slots = [], [], []
        lens, need_w = [], 1
        for i, c in enumerate(chunks):
            start = c.start_pos
            table = c.block_table
            ids.append(c.token_ids[0])
            pos.append(start)
            slots.append(table[start // page] * page + start % page)
            lens.append(c.seq_len)
            k = -(-c.seq_len // page)
            need_w = max(need_w, k)
            row = n + p + i * w
            h32[row : row + k] = table[:k]
        pad = bs - len(chunks)
        ids += [0] * pad
        pos += [0] * pad
        slots += [-1] * pad
        lens += [1] * pad
        for i in range(len(chunks), bs):
            h32[n + p + i * w] = 0  # padding rows read block 0
        h64[:bs] = ids
        h64[n : n + bs] = pos
        h64[2 * n : 2 * n + bs] = slots
        h32[:bs] = lens
        if p:  # a piecewise graph's backend has none
            h32[n : n + p] = self._launch_values(bs, max(lens))
        # only the first ``need_w`` entries of a row are read (positions < seq_len)
        end32 = n + p + (bs - 1) * w + need_w
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32[:end32].copy_(self._host32[:end32], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self.device))

    @torch.inference_mode()
    def run(self, chunks, fill_pending=None) -> torch.Tensor:
        """Replay the step for these decode chunks; float32 logits ``[len(chunks), vocab]``.

        ``fill_pending(ids, chunks)``, if given, rewrites the staged input tokens on the device
        before the replay (the worker's pending tokens, see ``Worker._fill_pending``). The
        result is a view of the graph's output: read it (in stream order) before the next run.
        """
        bs = self.bucket_for(len(chunks))
        if bs not in self.graphs:
            self.capture(bs)
        self._stage(chunks, bs)
        if self.bind_states is not None:
            self.bind_states(chunks, bs)
        if fill_pending is not None and any(c.token_ids[0] < 0 for c in chunks):
            fill_pending(self.input_ids[: len(chunks)], chunks)
        g = self.graphs[bs]
        g.graph.replay()
        return g.logits[: len(chunks)]


class DecodeGraphRunner:
    """A worker's pure-decode steps through CUDA graphs: whether they apply, and why not.

    ``off`` is None while graphs are in use, else the reason (turned off by config, unsupported
    here, or a failed capture/replay). ``run`` answers None whenever a step must run eagerly.
    """

    def __init__(self, graphs: DecodeGraphs | None, off: str | None, world_size: int = 1) -> None:
        if (graphs is None) == (off is None):
            raise ValueError("give the graphs, or the reason there are none")
        self.graphs = graphs
        self.off = off
        self.world_size = world_size
        self._eager_only = False

    @property
    def active(self) -> bool:
        return self.off is None

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.graphs.graphs)) if self.graphs is not None else ()

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Steps inside run eagerly (warm-up compiles the eager decode kernels)."""
        self._eager_only = True
        try:
            yield
        finally:
            self._eager_only = False

    def run(self, chunks, fill_pending=None) -> torch.Tensor | None:
        """This step's float32 logits ``[len(chunks), vocab]`` from a replayed graph (a view:
        read it before the next step), or None when the step must run eagerly."""
        if self.graphs is None or self._eager_only or not self.graphs.fits(chunks):
            return None
        try:
            return self.graphs.run(chunks, fill_pending)
        except Exception as e:  # the eager step redoes it (its KV writes are the same)
            self._drop(e)
            return None

    def warm_up(self) -> None:
        """Capture batch size 1 now, so that a request's first decode step need not."""
        if self.graphs is None:
            return
        try:
            self.graphs.capture(1)
        except Exception as e:
            self._drop(e)

    def _drop(self, error: Exception) -> None:
        """Alone, fall back to eager steps; in a group, fail (the other ranks are inside the
        same collectives)."""
        if self.world_size > 1:
            raise error
        log.warning("CUDA-graph decode failed (%s); decode steps run eagerly from now on", error)
        self.graphs = None
        self.off = f"failed: {error}"

    def close(self) -> None:
        self.graphs = None
        self.off = self.off or "closed"


__all__ = ["DecodeGraphRunner", "DecodeGraphs", "batch_buckets", "unsupported_reason"]
