"""CUDA attention on torch's fused memory-efficient kernel, over the paged KV cache.

The path for GPUs the Triton kernels do not serve (Volta and Turing: compute capability below
8.0): ``aten._scaled_dot_product_efficient_attention`` is the xformers/cutlass FlashAttention-style
forward torch builds for every CUDA GPU from sm_50 on, and it returns the log-sum-exp the
contract asks for. :class:`runtime.attention.fused_runs.FusedRunsBackend` feeds it the paged
cache (runs of blocks as views, chunks split at their start, decode heads folded into rows).
What this module adds:

* grouped-query heads without repeating K/V: the kernel wants as many K/V heads as query heads,
  so the ``group`` query heads of a K/V head go to the *batch* dimension (``q`` viewed as
  ``[group, Hkv, n, D]``) and K/V are expanded over it with stride 0 (a view: the kernel takes
  any batch stride);
* decode of the whole batch in one launch, split over the keys (flash-decoding): the kernel's
  varlen form reads, for each of its "sequences", keys from ``cu_seqlens_k[i]`` for
  ``seqlen_k[i]`` slots of any one key tensor, here the flat cache (a view). Each piece of a
  run of consecutive blocks is one such sequence, whatever the runs and the batch, and its
  query rows are the query heads of each K/V head. One query row block per K/V head and
  sequence would be too few thread blocks to read a long context at memory speed, so runs are
  cut into pieces until there are about ``BLOCKS_PER_SM`` per SM; the pieces of a sequence
  merge exactly through lse.

bfloat16 needs compute capability 8.0 here (the kernel's own rule); float16 and float32 run on
all of them.
"""

from __future__ import annotations

import torch

from runtime.attention.base import gqa_group
from runtime.attention.fused_runs import FusedRunsBackend, block_runs, same_step, step_key
from runtime.device import multiprocessors

_OP_NAME = "_scaled_dot_product_efficient_attention"
# decode: a piece is at least this many keys (below it the launch and the merge cost more than
# the extra thread blocks give), and pieces are added until about this many thread blocks per SM
MIN_SPLIT_KEYS = 512
BLOCKS_PER_SM = 2


class CudaEfficientBackend(FusedRunsBackend):
    """torch's CUDA memory-efficient attention kernel over the paged cache: prefill one call per
    run of consecutive blocks, grouped K/V heads as stride-0 views; decode one launch per step,
    split over the keys."""

    name = "efficient_cuda"

    def __init__(self) -> None:
        super().__init__()
        self._decode_key: tuple | None = None  # (metadata, its block tables, its lengths)
        self._decode_cached: _DecodePlan | None = None

    @classmethod
    def supports(cls, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "it is torch's CUDA kernel; use flash_cpu or torch elsewhere"
        if not hasattr(torch.ops.aten, _OP_NAME):
            return f"this torch ({torch.__version__}) has no aten.{_OP_NAME}"
        return None

    def attend(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        n, hq, d = q.shape
        _, hkv, keys, _ = k.shape
        group = hq // hkv
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
            raise ValueError(
                "efficient_cuda: bfloat16 needs compute capability 8.0 or newer; "
                "run this GPU with --dtype float16"
            )
        # query head j*group + g -> batch g, head j (a view of the packed rows)
        qb = q.view(n, hkv, group, d).permute(2, 1, 0, 3)
        kb, vb = k.expand(group, hkv, keys, d), v.expand(group, hkv, keys, d)
        o, lse = getattr(torch.ops.aten, _OP_NAME)(
            qb, kb, vb, None, True, 0.0, causal, scale=scale
        )[:2]
        # o [group, Hkv, n, D] (stored [group, n, Hkv, D]); lse [group, Hkv, n rounded up to 32]
        out = o.permute(2, 1, 0, 3).reshape(n, hq, d)
        return out, lse[..., :n].permute(2, 1, 0).reshape(n, hq)

    # -- decode: the whole batch in one launch ---------------------------------------------------
    def decode(self, q, k_cache, v_cache, meta, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence of the step in one varlen launch of the kernel: each piece of a run of
        consecutive blocks is one of its "sequences" (``cu_seqlens_k`` gives the piece's first
        slot in the flat cache, ``seqlen_k`` its length), its query rows the query heads of
        each K/V head; the pieces of a sequence are merged through lse."""
        B, hq, d = q.shape
        nb, bs, hkv, _ = k_cache.shape
        group = gqa_group(hq, hkv)
        if k_cache.dtype != q.dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return self.prefill(q, k_cache, v_cache, meta, scale)  # per sequence, converted
        plan = self._decode_plan(meta, bs, hkv, group, q.device)
        rows = q.view(B, hkv, group, d).transpose(1, 2)  # [B, group, Hkv, D]
        if plan.pieces != B:
            rows = rows.index_select(0, plan.seq)
        o, lse = torch.ops.aten._efficient_attention_forward(
            rows.reshape(1, plan.pieces * group, hkv, d),
            k_cache.view(1, nb * bs, hkv, d),
            v_cache.view(1, nb * bs, hkv, d),
            None,  # bias
            plan.cu_q,
            plan.cu_k,
            group,  # max_seqlen_q
            plan.max_keys,  # max_seqlen_k
            0.0,  # dropout
            0,  # no causal mask: a decode query sees every key
            True,  # compute_log_sumexp
            scale=scale,
            seqlen_k=plan.lens,
        )[:2]
        o = o.view(plan.pieces, group, hkv, d)
        lse = lse[:, :, :group]  # [pieces, Hkv, group]
        if plan.pieces != B:
            o, lse = plan.merge(o, lse, B)
        out = torch.empty(B, hkv, group, d, dtype=q.dtype, device=q.device)
        out.copy_(o.transpose(1, 2))  # heads back in order and (after a merge) rounded: one copy
        return out.view(B, hq, d), lse.reshape(B, hq)

    def _decode_plan(self, meta, bs: int, hkv: int, hkv_group: int, device) -> _DecodePlan:
        """The step's pieces, made once per metadata object and shared by every layer."""
        if same_step(self._decode_key, meta):
            return self._decode_cached
        # enough pieces for BLOCKS_PER_SM thread blocks (one per K/V head and piece) per SM,
        # none shorter than MIN_SPLIT_KEYS
        want = -(-BLOCKS_PER_SM * multiprocessors(device) // hkv)
        longest = max(MIN_SPLIT_KEYS, -(-sum(meta.seq_lens_cpu) // want))
        # only the columns the step reads (a captured step's table is as wide as the capacity)
        tables = meta.block_tables[:, : -(-max(meta.seq_lens_cpu) // bs)].cpu()
        seq, starts, lens = [], [], []
        for b, slen in enumerate(meta.seq_lens_cpu):
            for p0, p1, slot in block_runs(tables[b, : -(-slen // bs)], slen, bs):
                cuts = -(-(p1 - p0) // longest)
                step = -(-(p1 - p0) // cuts)
                for a in range(p0, p1, step):
                    seq.append(b)
                    starts.append(slot + a - p0)
                    lens.append(min(step, p1 - a))
        self._decode_key = step_key(meta)
        self._decode_cached = _DecodePlan(
            seq, starts, lens, len(meta.seq_lens_cpu), hkv_group, device
        )
        return self._decode_cached


class _DecodePlan:
    """One decode step's pieces on the device: piece ``i`` is keys ``starts[i] ..
    starts[i] + lens[i] - 1`` of the flat cache for sequence ``seq[i]``."""

    def __init__(self, seq, starts, lens, num_seqs: int, group: int, device) -> None:
        self.pieces = len(seq)
        self.max_keys = max(lens)
        per_seq = [0] * num_seqs
        slot_in_seq = []
        for b in seq:  # pieces come sequence by sequence
            slot_in_seq.append(per_seq[b])
            per_seq[b] += 1
        e = self.pieces
        # one host-to-device copy: piece i's first query row (i * group), first key slot (the
        # last entry only closes the array; seqlen_k gives the lengths), length, sequence and
        # place among its sequence's pieces
        packed = torch.tensor(
            [i * group for i in range(e + 1)] + starts + [0] + lens + seq + slot_in_seq,
            dtype=torch.int32,
        ).to(device, non_blocking=True)
        self.cu_q = packed[: e + 1]
        self.cu_k = packed[e + 1 : 2 * e + 2]
        self.lens = packed[2 * e + 2 : 3 * e + 2]
        self.seq = packed[3 * e + 2 : 4 * e + 2].long()
        self._slot = packed[4 * e + 2 :].long()
        self._width = max(per_seq)
        self._uniform = min(per_seq) == self._width

    def merge(self, o: torch.Tensor, lse: torch.Tensor, num_seqs: int):
        """Pieces ``o [P, group, Hkv, D]``, ``lse [P, Hkv, group]`` -> per sequence, float32."""
        if self._uniform:  # every sequence has the same number of pieces: plain reshapes
            lse = lse.view(num_seqs, self._width, *lse.shape[1:])
            total = torch.logsumexp(lse, dim=1)
            w = torch.exp(lse - total.unsqueeze(1)).transpose(2, 3).unsqueeze(-1)
            o = o.view(num_seqs, self._width, *o.shape[1:])
            return (o * w).sum(dim=1), total  # half o times float32 w: float32
        pad = lse.new_full((num_seqs, self._width, *lse.shape[1:]), float("-inf"))
        pad[self.seq, self._slot] = lse
        total = torch.logsumexp(pad, dim=1)  # [B, Hkv, group]
        w = torch.exp(lse - total.index_select(0, self.seq))  # [P, Hkv, group]
        out = o.new_zeros((num_seqs, *o.shape[1:]), dtype=torch.float32)
        out.index_add_(0, self.seq, o * w.transpose(1, 2).unsqueeze(-1))
        return out, total
