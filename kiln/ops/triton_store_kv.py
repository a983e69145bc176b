"""Triton kernel writing this step's K/V into the paged cache (semantics of ``store_kv_ref``).

One program per token: it reads the token's slot, and unless the slot is -1 copies the
``[num_kv_heads, head_dim]`` K and V rows (any strides, e.g. views into a fused QKV output) to
``kv_cache[0|1, slot // block_size, slot % block_size]``, casting to the cache dtype. An fp8 cache
stores ``x / scale`` (the layer's ``k_scale`` / ``v_scale``) saturated at +-448, as ``store_kv_ref``.
The grid is ``(num_tokens,)``: no host synchronisation, safe to capture in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from kiln.ops.triton_prefill import INTERPRET


@triton.jit
def _round_e4m3(x):
    """fp32 -> the nearest float8_e4m3fn value (ties to even), still in fp32. Triton's interpreter
    narrows to fp8 without carrying a rounded-up mantissa into the exponent (7.95 becomes 4.0), so under
    the interpreter values are rounded here first and the cast that follows is exact."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)  # subnormals share 2^-6's step
    big = tl.exp2(e - 3.0) * 12582912.0  # 1.5 * 2^23 steps: adding it rounds to a whole step
    return (x + big) - big


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
    k_scale,
    v_scale,
    FP8: tl.constexpr,
    ROUND: tl.constexpr,
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
    k = tl.load(k_src, mask=mask)
    v_src = v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    v = tl.load(v_src, mask=mask)
    if FP8:
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
        if ROUND:
            k, v = _round_e4m3(k), _round_e4m3(v)
    tl.store(cache_ptr + dst, k.to(ty), mask=mask)
    tl.store(cache_ptr + stride_kv + dst, v.to(ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
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
        k_scale,
        v_scale,
        FP8=kv_cache.dtype == torch.float8_e4m3fn,
        ROUND=INTERPRET,
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
