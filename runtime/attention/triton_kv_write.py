"""Write this step's keys and values into their paged-cache slots in one launch (Triton).

Program ``t`` moves token ``t``'s ``[Hkv, D]`` key and value rows to slot ``slot_mapping[t]``
(``block * block_size + offset``); a negative slot (a padding token) is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    Key,
    Value,
    KCache,
    VCache,
    Slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    row = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(Key + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(Value + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = KCache + blk * stride_kcb + row * stride_kct + offs_h[:, None] * stride_kch
    v_dst = VCache + blk * stride_vcb + row * stride_vct + offs_h[:, None] * stride_vch
    tl.store(k_dst + offs_d[None, :], k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d[None, :], v.to(VCache.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[T, Hkv, D]`` at ``slot_mapping`` (int64 ``[T]``) in the caches."""
    T, h, d = key.shape
    if value.shape != key.shape or k_cache.shape[2:] != (h, d) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not fit caches "
            f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)}"
        )
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {T} tokens")
    if T == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k/v caches must be contiguous in the head dimension")
    _kv_write_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h,
        HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d),
        PAGE=k_cache.shape[1],
        num_warps=4,
    )  # fmt: skip


__all__ = ["write_kv"]
