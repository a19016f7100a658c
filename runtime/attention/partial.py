"""Attention of queries over keys they all see: the host part of cooperative attention.

Host-resident blocks are full and lie before every query of the step (the scheduler's
invariant), so no causal mask applies; the result is a partial ``(out, lse)`` that merges with
the device part through ``runtime.attention.merge``.

Two ways to compute it, both float32-accumulating and exact up to the input dtype's rounding:

* ``visible_attention``, the portable tiled path: the arithmetic of the ``torch`` backend
  (float32 tiles, online softmax) in plain ops. Each key tile is upcast and transposed into new
  tensors before two matmuls, so host KV is read several times over.
* ``host_attention``, the fast path over host KV: torch's fused CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the lse) called once per
  run of contiguous host blocks, reading the pool in place through strided views. Grouped query
  heads are folded into query rows (no causal mask, so a query head is just another row), so
  each key/value head is read once; when a run gives the threads too few (head, query) work
  items, its keys are split into equal sub-ranges on the batch dimension, still a view. The
  runs' partials merge by log-sum-exp in groups. ``method`` says how the stored dtype is
  handled and the work is cut: ``fused`` runs the kernel on it as stored (bf16 keys, float32
  accumulation inside), split by heads; ``fused-keys`` the same, each thread given one
  contiguous range of keys (all heads); ``fused-f32`` upcasts each run head-major into a
  reused float32 buffer first (for CPUs whose reduced precision kernels are slow; each head's
  keys then lie contiguous); ``tiled`` is ``visible_attention``. ``runtime.spill_rates`` times
  them on the worker's CPU and the step uses the fastest.
"""

from __future__ import annotations

import torch

from runtime.attention.torch_tiled import TorchTiledBackend

CPU_METHODS = ("fused", "fused-keys", "fused-f32", "tiled")
MIN_SPLIT_KEYS = 512  # the fused kernel's key block: sub-ranges shorter than this waste it
MIN_RANGE_KEYS = 128  # fused-keys: the shortest contiguous range a thread is given
GROUP_BYTES = 16 << 20  # partial outputs stacked before each log-sum-exp merge


def fused_available() -> bool:
    """Whether this torch has the fused CPU flash-attention kernel that returns the lse."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def host_attention(
    q: torch.Tensor,
    k: torch.Tensor | list[torch.Tensor],
    v: torch.Tensor | list[torch.Tensor],
    scale: float,
    method: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, Hq, D]`` over host ``k``/``v`` segments ``[N_i, Hkv, D]`` (views of the pool,
    each contiguous), every key visible to every query, by ``method`` (``CPU_METHODS``).

    Returns float32 ``out [n, Hq, D]`` and ``lse [n, Hq]``; with no keys the rows are zeros
    with lse ``-inf``. Runs with torch's intra-op threads (the caller sets how many).
    """
    if method not in CPU_METHODS:
        raise ValueError(f"cpu attention method {method!r} is not one of {', '.join(CPU_METHODS)}")
    ks = k if isinstance(k, list) else [k]
    vs = v if isinstance(v, list) else [v]
    if method == "tiled" or not fused_available() or q.device.type != "cpu":
        return visible_attention(q, ks, vs, scale)
    n, hq, d = q.shape
    if not ks or sum(x.shape[0] for x in ks) == 0:
        out = torch.zeros(n, hq, d, dtype=torch.float32)
        return out, torch.full((n, hq), float("-inf"), dtype=torch.float32)
    hkv = ks[0].shape[1]
    group = hq // hkv
    rows = n * group
    dtype = torch.float32 if method == "fused-f32" else ks[0].dtype
    # [1, Hkv, rows, D]: the query heads of one kv head (and all queries) are its rows
    qh = q.reshape(n, hkv, group, d).permute(1, 0, 2, 3).reshape(1, hkv, rows, d).to(dtype)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    threads = torch.get_num_threads()
    scratch: list[torch.Tensor] = []
    if dtype != ks[0].dtype:  # one float32 buffer per K and V, reused run after run
        longest = max(x.shape[0] for x in ks)
        scratch = [torch.empty(hkv, longest, d, dtype=dtype) for _ in range(2)]
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    q_by_split: dict[int, torch.Tensor] = {}
    acc: tuple[torch.Tensor, torch.Tensor] | None = None
    pending = 0
    for kx, vx in zip(ks, vs):
        keys = kx.shape[0]
        if keys == 0:
            continue
        if scratch:
            # upcast head-major: the kernel then reads each head's keys contiguously
            kh = scratch[0][:, :keys].copy_(kx.transpose(0, 1))
            vh = scratch[1][:, :keys].copy_(vx.transpose(0, 1))
            s = _splits(keys, hkv, rows, threads)
            kt = kh.view(hkv, s, keys // s, d).transpose(0, 1)  # [s, Hkv, keys/s, D]
            vt = vh.view(hkv, s, keys // s, d).transpose(0, 1)
        else:
            s = 1
            if kx.is_contiguous() and vx.is_contiguous():
                s = _splits(keys, hkv, rows, threads, by_keys=method == "fused-keys")
            # [s, Hkv, keys/s, D] strided views of the [keys, Hkv, D] run: no copy
            kt = kx.view(s, keys // s, hkv, d).permute(0, 2, 1, 3)
            vt = vx.view(s, keys // s, hkv, d).permute(0, 2, 1, 3)
        if s not in q_by_split:  # the queries once per split count, contiguous like any input
            q_by_split[s] = qh.expand(s, hkv, rows, d).contiguous()
        o, lse = op(q_by_split[s], kt, vt, scale=scale)
        outs.append(o)
        lses.append(lse)
        pending += o.numel() * 4
        if pending >= GROUP_BYTES:
            acc = _fold(outs, lses, acc)
            outs, lses, pending = [], [], 0
    if outs:
        acc = _fold(outs, lses, acc)
    out, lse = acc[0][0], acc[1][0]  # [Hkv, rows, D], [Hkv, rows]
    out = out.view(hkv, n, group, d).permute(1, 0, 2, 3).reshape(n, hq, d)
    lse = lse.view(hkv, n, group).permute(1, 0, 2).reshape(n, hq)
    return out, lse


def _splits(keys: int, hkv: int, rows: int, threads: int, by_keys: bool = False) -> int:
    """Sub-ranges to split a run's keys into, dividing ``keys`` evenly. By default: enough
    (head, query block) work items for about two per thread, none shorter than
    ``MIN_SPLIT_KEYS``. ``by_keys``: one contiguous range per thread (none shorter than
    ``MIN_RANGE_KEYS``). The kernel hands each thread consecutive (range, head) items, so then a
    thread reads every head of one contiguous stretch of the pool (pages and TLB entries shared
    by its heads) instead of one head's 256-byte pieces across the whole run, a page apart."""
    if by_keys:
        s = max(1, min(threads, keys // MIN_RANGE_KEYS))
        while keys % s:
            s -= 1
        return s
    items = hkv * -(-rows // 32)  # the kernel splits queries into blocks of 32 at small counts
    s = max(1, min(-(-2 * threads // items), keys // MIN_SPLIT_KEYS))
    while keys % s:
        s -= 1
    return s


def _fold(outs, lses, acc):
    """Merge partials ``[s_i, Hkv, R, D]`` / ``[s_i, Hkv, R]`` (and the running ``acc``) into
    one ``([1, Hkv, R, D], [1, Hkv, R])``, float32: softmax weights of their lse."""
    o = torch.cat(outs).to(torch.float32)
    lse = torch.cat(lses).to(torch.float32)
    if acc is not None:
        o = torch.cat([acc[0], o])
        lse = torch.cat([acc[1], lse])
    m = torch.logsumexp(lse, 0, keepdim=True)
    w = torch.exp(lse - m).unsqueeze(-1)
    return (o * w).sum(0, keepdim=True), m


def visible_attention(
    q: torch.Tensor,
    k: torch.Tensor | list[torch.Tensor],
    v: torch.Tensor | list[torch.Tensor],
    scale: float,
    kv_tile: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, Hq, D]`` over ``k``/``v`` ``[N, Hkv, D]``, every key visible to every query.

    ``k``/``v`` may also be lists of such segments (runs of host blocks read in place, never
    concatenated). Returns float32 ``out [n, Hq, D]`` and ``lse [n, Hq]``; with no keys the rows
    are zeros with lse ``-inf`` (they merge as "saw nothing").
    """
    ks = k if isinstance(k, list) else [k]
    vs = v if isinstance(v, list) else [v]
    n, hq, d = q.shape
    hkv = ks[0].shape[1]
    group = hq // hkv
    qh = q.reshape(n, hkv, group, d).transpose(0, 1).reshape(hkv, n * group, d)
    qh = qh.to(torch.float32) * scale
    rows = n * group
    m = torch.full((hkv, rows), float("-inf"), dtype=torch.float32, device=q.device)
    l_ = torch.zeros(hkv, rows, dtype=torch.float32, device=q.device)
    acc = torch.zeros(hkv, rows, d, dtype=torch.float32, device=q.device)
    keys = 0
    for k, v in zip(ks, vs):
        keys += k.shape[0]
        for j0 in range(0, k.shape[0], kv_tile):
            kt = k[j0 : j0 + kv_tile].to(torch.float32).transpose(0, 1)  # [Hkv, N, D]
            vt = v[j0 : j0 + kv_tile].to(torch.float32).transpose(0, 1)
            TorchTiledBackend._tile_step(qh, kt, vt, None, m, l_, acc)
    out = acc if keys == 0 else acc / l_.unsqueeze(-1)
    lse = m + torch.log(l_)
    out = out.view(hkv, n, group, d).transpose(0, 1).reshape(n, hq, d)
    lse = lse.view(hkv, n, group).transpose(0, 1).reshape(n, hq)
    return out, lse
