"""Triton kernel writing this step's K/V into the paged cache (semantics of ``store_kv_ref``).

One program per token: it reads the token's slot, and unless the slot is -1 copies the
``[num_kv_heads, head_dim]`` K and V rows (any strides, e.g. views into a fused QKV output) to
``kv_cache[0|1, slot // block_size, slot % block_size]``, casting to the cache dtype.
The grid is ``(num_tokens,)``: no host synchronisation, safe to capture in a CUDA graph.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kv,
    stride_blk,
    stride_slot,
    stride_head,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < head_dim)
    dst = (slot // BLOCK_SIZE) * stride_blk + (slot % BLOCK_SIZE) * stride_slot
    dst += offs_h[:, None] * stride_head + offs_d[None, :]
    ty = cache_ptr.dtype.element_ty

    k_src = k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    tl.store(cache_ptr + dst, tl.load(k_src, mask=mask).to(ty), mask=mask)
    v_src = v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    tl.store(cache_ptr + stride_kv + dst, tl.load(v_src, mask=mask).to(ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Write k/v ``[num_tokens, num_kv_heads, head_dim]`` to ``kv_cache`` at ``slot_mapping``, -1 skipped."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert kv_cache.stride(-1) == 1, "kv_cache must be contiguous in head_dim"
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_heads,
        head_dim,
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
